"""Injected time.

Every component that reads the time takes a :class:`Clock` so that tests drive idle gates,
backoff and lease expiry without sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
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


class ManualClock(FakeClock):
    """A fake clock whose :meth:`sleep` waits until :meth:`advance` moves time past its end.

    For tests of loops that sleep (the worker pool's heartbeat and idle polls): nothing happens
    until the test advances the time, and then exactly the sleeps that came due wake up.
    """

    def __init__(self, start_s: float = 1_767_225_600.0) -> None:
        super().__init__(start_s)
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def advance(self, delta_s: float) -> None:
        """Move the time forward by ``delta_s`` seconds and wake the sleeps that came due."""
        super().advance(delta_s)
        now = self.now()
        for deadline, future in list(self._sleepers):
            if deadline <= now and not future.done():
                future.set_result(None)

    async def sleep(self, delay_s: float) -> None:
        """Wait until the time was advanced by ``delay_s`` seconds (at once when ``<= 0``)."""
        if delay_s <= 0:
            await asyncio.sleep(0)
            return
        entry = (self.now() + delay_s, asyncio.get_running_loop().create_future())
        self._sleepers.append(entry)
        try:
            await entry[1]
        finally:
            self._sleepers.remove(entry)

    @property
    def sleepers(self) -> int:
        """How many sleeps are waiting now."""
        return len(self._sleepers)

    async def autojump(self, idle_s: float = 0.01, horizon_s: float | None = None) -> None:
        """Run forever: every ``idle_s`` real seconds, advance the time to the end of the earliest
        waiting sleep (after trio's ``autojump_threshold``), when it ends within ``horizon_s``.

        Run it as a task in tests whose code sleeps while other work (a local HTTP server, a
        subprocess) takes real time: short timers (backoffs, ``Retry-After``, retry pauses) pass
        at once, in order, while long ones (job heartbeats, idle polls) wait for an explicit
        :meth:`advance`, so leases never expire behind the test's back.

        Args:
            idle_s: real seconds between two looks.
            horizon_s: longest jump in fake seconds (``None``: any).
        """
        while True:
            await asyncio.sleep(idle_s)
            pending = [deadline for deadline, future in self._sleepers if not future.done()]
            if not pending:
                continue
            jump_s = max(0.0, min(pending) - self.now())
            if horizon_s is None or jump_s <= horizon_s:
                self.advance(jump_s)


async def wait_any(clock: Clock, events: Sequence[asyncio.Event], timeout_s: float) -> None:
    """Wait until one of ``events`` is set, or ``timeout_s`` seconds pass on ``clock``.

    The timeout is a :meth:`Clock.sleep`, so a fake clock drives it like every other wait.
    """
    if any(event.is_set() for event in events):
        return
    waiters: list[asyncio.Future[object]] = [asyncio.ensure_future(event.wait()) for event in events]
    waiters.append(asyncio.ensure_future(clock.sleep(max(0.0, timeout_s))))
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        for waiter in waiters:
            with contextlib.suppress(asyncio.CancelledError):
                await waiter


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
