"""Phase 1, extraction: input building, redaction, extractors and the worker pool (SPEC §6)."""
