"""The one exception hierarchy of memd.

Every error memd raises on purpose derives from :class:`MemdError`. Each class carries the process
exit code that ``memd`` returns when the error reaches the command line (SPEC §10: 0 ok, 1 runtime
failure, 2 usage, 78 configuration).
"""

from __future__ import annotations


class MemdError(Exception):
    """Base class. ``exit_code`` is what ``memd`` exits with when this error reaches the CLI."""

    exit_code: int = 1


class UsageError(MemdError):
    """The command line was malformed (exit 2)."""

    exit_code = 2


class ConfigError(MemdError):
    """A configuration file is missing or a value is invalid (exit 78, EX_CONFIG).

    The message names the offending key and never contains a secret value.
    """

    exit_code = 78


class StoreError(MemdError):
    """The SQLite state store failed (locked past the busy timeout, corrupt, unwritable)."""


class DatabaseDamaged(StoreError):
    """The state database is damaged (``quick_check`` failed, "malformed", "not a database"):
    memd stops and names ``memd db recover`` (SPEC §5)."""


class LeaseLost(MemdError):
    """A lease renewal or fenced write found another owner or a newer fencing token.

    The holder must stop the guarded work at once; nothing it writes afterwards is accepted.
    """


class RolloutError(MemdError):
    """A rollout file cannot be read as a whole (not a single bad line: those are skipped)."""


class ExtractorError(MemdError):
    """An extractor failed for one thread; the job is retried with backoff."""


class ModelAuthError(ExtractorError):
    """The model endpoint rejected the credentials (401/403): all model work pauses."""


class ContextLengthError(ExtractorError):
    """The model endpoint said the input is longer than its context window."""


class BudgetExhausted(ExtractorError):
    """The daily token budget is spent; model work waits until the next UTC day.

    Args:
        message: what was spent against which limit.
        resume_at: epoch seconds when the budget resets (the next UTC midnight), or ``None``.
    """

    def __init__(self, message: str, *, resume_at: float | None = None) -> None:
        super().__init__(message)
        self.resume_at = resume_at


class ConsolidationError(MemdError):
    """A consolidation run failed (command missing, non-zero exit, timeout, lease lost)."""


class MemoryWriteError(MemdError):
    """Writing memory files failed (disk full, permissions); nothing half-written is left."""
