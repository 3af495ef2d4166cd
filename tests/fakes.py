"""Fakes shared by the tests: no test module imports another test module, they import this."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from memd.clock import Clock, ManualClock
from memd.config import Settings
from memd.daemon import Daemon, OnceSummary
from memd.extract.base import ExtractionRequest, Extractor
from memd.extract.job import ExtractJob
from memd.extract.pool import JobPool, JobResult
from memd.faults import FaultLog
from memd.schedule.retry import RetryPolicy
from memd.store.records import JobKind, ThreadRecord
from memd.store.store import Store

#: Builds a request for a thread without reading its rollout: ``prepare(thread, max_input_tokens)``.
PrepareFn = Callable[[ThreadRecord, int], Awaitable[ExtractionRequest]]


class FixedRequests:
    """A request builder whose requests come from a test function instead of a rollout."""

    def __init__(self, prepare: PrepareFn) -> None:
        self._prepare = prepare

    async def build(self, thread: ThreadRecord, max_input_tokens: int) -> ExtractionRequest:
        return await self._prepare(thread, max_input_tokens)


def extraction_pool(
    store: Store,
    clock: Clock,
    *,
    extractor: Extractor,
    prepare: PrepareFn,
    memory_dir: Path,
    owner: str,
    concurrency: int = 4,
    lease_s: float = 900.0,
    retry: RetryPolicy | None = None,
    max_input_tokens: int = 120_000,
    poll_s: float = 5.0,
    on_done: Callable[[JobResult], None] | None = None,
) -> JobPool:
    """The daemon's extraction pool (a :class:`JobPool` running :class:`ExtractJob`), with the
    requests built by ``prepare``."""
    faults = FaultLog()
    job = ExtractJob(
        store,
        clock,
        extractor=extractor,
        requests=FixedRequests(prepare),  # type: ignore[arg-type]
        memory_dir=memory_dir,
        max_input_tokens=max_input_tokens,
        faults=faults,
    )
    return JobPool(
        store,
        clock,
        kind=JobKind.EXTRACT,
        handler=job,
        owner=owner,
        concurrency=concurrency,
        lease_s=lease_s,
        retry=retry,
        poll_s=poll_s,
        on_done=on_done,
        faults=faults,
    )


async def run_once(settings: Settings, *, start_s: float | None = None) -> OnceSummary:
    """``memd once`` in process on a :class:`ManualClock` (ahead of the rollouts' mtimes by 60 s)
    whose short timers (retry pauses, backoff) pass at once and long ones (heartbeats) wait."""
    clock = ManualClock(time.time() + 60 if start_s is None else start_s)
    jumper = asyncio.create_task(clock.autojump(horizon_s=10.0))
    daemon = await Daemon.open(settings, clock=clock)
    try:
        return await daemon.once()
    finally:
        await daemon.close()
        jumper.cancel()
