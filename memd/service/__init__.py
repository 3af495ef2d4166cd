"""systemd integration (SPEC §12): sd_notify and the watchdog, shutdown signals, the user unit."""
