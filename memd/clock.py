"""Injected time.

Every component that reads the time takes a :class:`Clock` so that tests drive idle gates,
backoff and lease expiry without sleeping.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    """A source of wall-clock time.

    ``now()`` returns seconds since the Unix epoch (float, UTC); ``sleep(delay_s)`` waits.
    """

    def now(self) -> float:
        """Return the current time in seconds since the epoch."""
        ...

    async def sleep(self, delay_s: float) -> None:
        """Wait ``delay_s`` seconds (or less, for a fake clock)."""
        ...


class SystemClock:
    """The real clock: :func:`time.time` and :func:`asyncio.sleep`."""

    def now(self) -> float:
        """Return ``time.time()``."""
        return time.time()

    async def sleep(self, delay_s: float) -> None:
        """Sleep ``delay_s`` seconds on the event loop."""
        await asyncio.sleep(max(0.0, delay_s))


class FakeClock:
    """A clock for tests: time moves only when :meth:`advance` is called or a sleep passes.

    Args:
        start_s: the initial time in seconds since the epoch.
    """

    def __init__(self, start_s: float = 1_767_225_600.0) -> None:
        self._now = float(start_s)

    def now(self) -> float:
        """Return the fake current time."""
        return self._now

    def advance(self, delta_s: float) -> None:
        """Move the fake time forward by ``delta_s`` seconds."""
        self._now += float(delta_s)

    async def sleep(self, delay_s: float) -> None:
        """Advance the fake time by ``delay_s`` and yield to the event loop once."""
        self._now += max(0.0, delay_s)
        await asyncio.sleep(0)


def iso_utc(ts_s: float) -> str:
    """Format epoch seconds as an ISO-8601 UTC string such as ``2026-01-02T17:00:00Z``."""
    return datetime.fromtimestamp(ts_s, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str | None) -> float | None:
    """Parse an ISO-8601 timestamp (``Z`` or offset, optional fraction) to epoch seconds.

    Returns ``None`` for ``None``, empty or unparseable text (rollouts carry placeholder values
    such as ``[trimmed for fixture]``).
    """
    if not text or not isinstance(text, str):
        return None
    try:
        value = text.strip()
        if value.endswith("Z"):
            value = value[:-1] + "+00:00"
        dt = datetime.fromisoformat(value)
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        return dt.timestamp()
    except ValueError:
        return None
