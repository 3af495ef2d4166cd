"""The injected clocks: the fake one that jumps, the manual one that waits to be advanced."""

from __future__ import annotations

import asyncio

from memd.clock import FakeClock, ManualClock, wait_any
from memd.faults import FaultLog, newest


async def test_a_manual_clock_wakes_exactly_the_sleeps_that_came_due() -> None:
    clock = ManualClock(1000.0)
    woke: list[float] = []

    async def sleeper(delay_s: float) -> None:
        await clock.sleep(delay_s)
        woke.append(delay_s)

    tasks = [asyncio.create_task(sleeper(d)) for d in (5.0, 10.0, 30.0)]
    await asyncio.sleep(0)
    assert clock.sleepers == 3 and woke == []
    clock.advance(10.0)
    await asyncio.sleep(0)
    assert sorted(woke) == [5.0, 10.0] and clock.sleepers == 1
    clock.advance(19.0)
    await asyncio.sleep(0)
    assert len(woke) == 2
    clock.advance(1.0)
    await asyncio.gather(*tasks)
    assert woke[-1] == 30.0 and clock.now() == 1030.0


async def test_wait_any_returns_on_an_event_or_on_the_clocks_timeout() -> None:
    clock = ManualClock(0.0)
    event = asyncio.Event()
    waiter = asyncio.create_task(wait_any(clock, (event,), 60.0))
    await asyncio.sleep(0)
    assert not waiter.done()
    event.set()
    await asyncio.wait_for(waiter, 1)
    assert clock.sleepers == 0  # the timer was cancelled with the wait
    waiter = asyncio.create_task(wait_any(clock, (asyncio.Event(),), 60.0))
    while clock.sleepers == 0:
        await asyncio.sleep(0)
    clock.advance(59.0)
    await asyncio.sleep(0)
    assert not waiter.done()
    clock.advance(1.0)
    await asyncio.wait_for(waiter, 1)


async def test_autojump_passes_short_timers_and_leaves_long_ones_to_the_test() -> None:
    clock = ManualClock(0.0)
    jumper = asyncio.create_task(clock.autojump(idle_s=0.001, horizon_s=10.0))
    try:
        await asyncio.wait_for(clock.sleep(8.0), 1)  # a backoff: passes at once
        assert clock.now() == 8.0
        long_sleep = asyncio.create_task(clock.sleep(300.0))  # a heartbeat: waits
        await asyncio.sleep(0.02)
        assert not long_sleep.done() and clock.now() == 8.0
        clock.advance(300.0)
        await asyncio.wait_for(long_sleep, 1)
    finally:
        jumper.cancel()


async def test_a_fake_clock_jumps_on_every_sleep() -> None:
    clock = FakeClock(0.0)
    await clock.sleep(42.0)
    assert clock.now() == 42.0


def test_the_fault_log_keeps_the_newest_fault() -> None:
    log = FaultLog()
    assert log.newest is None
    log.note("claim_failed", RuntimeError("database is locked"), now_s=1_767_225_600.0)
    older = log.newest
    assert older is not None and older.at == "2026-01-01T00:00:00Z"
    assert older.error == "RuntimeError: database is locked"
    other = FaultLog()
    other.note("watch_failed", "x" * 2000, now_s=1_767_225_660.0)
    latest = newest(older, other.newest, None)
    assert latest is other.newest and latest is not None and len(latest.error) == 500
    assert newest(None, None) is None
    assert '"event": "claim_failed"' in older.to_json()


def test_a_fault_log_cleans_the_error_text_it_keeps() -> None:
    log = FaultLog(clean=lambda text: text.replace("hunter2", "[REDACTED_SECRET]"))
    fault = log.note("claim_failed", RuntimeError("password hunter2 rejected"), now_s=0)
    assert fault.error == "RuntimeError: password [REDACTED_SECRET] rejected" and log.newest == fault
