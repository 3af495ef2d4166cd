"""Memory files on disk (SPEC §8): the per-project layout, slugs, crash-safe writes and repair after a crash."""
