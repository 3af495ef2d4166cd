"""Rollout parsing: turn transcript lines into typed records. No I/O happens in this package."""
