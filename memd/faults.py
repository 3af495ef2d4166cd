"""The newest fault a long-running component survived, for ``memd status`` (SPEC §13).

A leaf module (no memd imports). A fault is an infrastructure failure that memd absorbed — the
database locked past its busy timeout, a watcher that died, a trace file that could not be
written — as opposed to one thread's extraction failing (that is the job's ``last_error``). The
daemon and the worker pool each keep a :class:`FaultLog`; the daemon saves the newest fault of all
of them in the store's meta ``last_fault`` as :meth:`Fault.to_json`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

#: Longest error text kept (characters).
ERROR_MAX_CHARS = 500


@dataclass(frozen=True, slots=True)
class Fault:
    """One survived fault.

    Attributes:
        at: when it happened, ISO-8601 UTC (``2026-01-02T03:04:05Z``).
        event: the log event that reported it (``claim_failed``, ``watch_failed``, ...).
        error: ``<ExceptionType>: <message>``, at most :data:`ERROR_MAX_CHARS` characters.
    """

    at: str
    event: str
    error: str

    def to_json(self) -> str:
        """The JSON object ``{"at", "event", "error"}`` that ``memd status`` reads."""
        return json.dumps({"at": self.at, "event": self.event, "error": self.error})


class FaultLog:
    """Remembers the newest fault noted (one per component; no I/O).

    Args:
        clean: applied to every error text before it is kept (the daemon passes the secret
            redactor, SPEC §14: the fault is stored in the database); the identity by default.
    """

    def __init__(self, clean: Callable[[str], str] | None = None) -> None:
        self.newest: Fault | None = None
        self._clean = clean

    def note(self, event: str, error: BaseException | str, *, now_s: float) -> Fault:
        """Record a fault that happened at ``now_s`` (epoch seconds) and return it."""
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        if self._clean is not None:
            text = self._clean(text)
        at = datetime.fromtimestamp(now_s, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.newest = Fault(at=at, event=event, error=text[:ERROR_MAX_CHARS])
        return self.newest


def newest(*faults: Fault | None) -> Fault | None:
    """The most recent of ``faults`` (ISO times compare as text), or ``None`` when all are ``None``."""
    present = [f for f in faults if f is not None]
    return max(present, key=lambda f: f.at) if present else None
