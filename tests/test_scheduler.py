"""The scheduler (SPEC §4, issue 3) with an injected FakeClock — no sleeps: the idle gate, the
age limit, watermark staleness, newest first, exponential backoff to ``dead``, a growing thread
resetting its attempts, and ``retry`` re-queueing.

Rollouts are real files in a temporary root, indexed by the real :class:`~memd.ingest.indexer.Indexer`;
a thread's last activity is its file's mtime, set relative to the fake clock.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from memd.clock import FakeClock
from memd.errors import ExtractorError
from memd.extract.pool import JobPool
from memd.ingest.indexer import Indexer
from memd.schedule.retry import RetryPolicy
from memd.schedule.scheduler import Scheduler
from memd.store.store import Store
from tests.builders import append_turn, simple_turns, thread_id, write_rollout
from tests.fakes import GatedExtractor, extraction_pool, prepare

DAY_S = 86_400.0


def make(store: Store, clock: FakeClock, tmp_path: Path, *, min_idle_s: float = 3600, max_age_days: float = 30) -> Scheduler:
    indexer = Indexer(store, clock, roots=[tmp_path / "sessions"], max_line_bytes=1 << 20,
                      include_sources=["cli", "vscode", "unknown", "custom"], project_rule="cwd")
    return Scheduler(store, indexer, clock, min_idle_s=min_idle_s, max_age_days=max_age_days)


def rollout(tmp_path: Path, n: int, clock: FakeClock, *, idle_s: float, source: str = "cli", turns=None) -> Path:
    """A finished session whose last activity was ``idle_s`` seconds ago (fake time)."""
    path = write_rollout(tmp_path / "sessions", thread_id(n), tmp_path / "proj", turns or simple_turns(f"t{n}"), source=source)
    touch(path, clock.now() - idle_s)
    return path


def touch(path: Path, mtime: float) -> None:
    os.utime(path, (mtime, mtime))


async def plan(scheduler: Scheduler):  # type: ignore[no-untyped-def]
    await scheduler._indexer.scan()
    return await scheduler.plan()


def pool_for(store: Store, clock: FakeClock, tmp_path: Path, extractor, retry: RetryPolicy | None = None) -> JobPool:
    return extraction_pool(store, clock, extractor=extractor, prepare=prepare, memory_dir=tmp_path / "memory",
                          owner="host:1:a", concurrency=1, retry=retry or RetryPolicy(), poll_s=0.05)


class Failing(GatedExtractor):
    def __init__(self) -> None:
        super().__init__(gated=False)

    async def extract(self, request):  # type: ignore[no-untyped-def]
        self.started.append(request.thread_id)
        raise ExtractorError("model request failed after 4 attempts (server): HTTP 503")


async def test_the_idle_gate_holds_a_thread_until_it_has_been_quiet_for_min_idle_s(tmp_path, manual_store, manual_clock):
    rollout(tmp_path, 1, manual_clock, idle_s=10)
    scheduler = make(manual_store, manual_clock, tmp_path, min_idle_s=60)
    summary = await plan(scheduler)
    assert (summary.queued, summary.idle_wait) == (0, 1)
    assert summary.next_due_s == pytest.approx(50)
    assert await manual_store.jobs.list_all("extract") == []

    manual_clock.advance(49)
    assert (await scheduler.plan()).queued == 0
    manual_clock.advance(1)
    summary = await scheduler.plan()
    assert summary.queued_ids == [thread_id(1)]
    [job] = await manual_store.jobs.list_all("extract")
    assert (job.key, job.status) == (thread_id(1), "pending")


async def test_threads_older_than_max_age_days_wait_for_a_backfill(tmp_path, manual_store, manual_clock):
    rollout(tmp_path, 1, manual_clock, idle_s=31 * DAY_S)
    rollout(tmp_path, 2, manual_clock, idle_s=29 * DAY_S)
    summary = await plan(make(manual_store, manual_clock, tmp_path, min_idle_s=0, max_age_days=30))
    assert (summary.queued_ids, summary.too_old) == ([thread_id(2)], 1)
    # max_age_days = 0 is no limit (what `memd backfill` and `--max-age-days 0` use): the old
    # thread, never planned, is planned now; the other one was planned already.
    summary = await plan(make(manual_store, manual_clock, tmp_path, min_idle_s=0, max_age_days=0))
    assert (summary.queued_ids, summary.too_old, summary.looked_at) == ([thread_id(1)], 0, 1)
    pending = await manual_store.jobs.list_all("extract", "pending")
    assert {j.key for j in pending} == {thread_id(1), thread_id(2)}


async def test_sessions_that_are_not_interactive_or_have_no_user_message_never_get_a_job(tmp_path, manual_store, manual_clock):
    rollout(tmp_path, 1, manual_clock, idle_s=100, source="exec")
    rollout(tmp_path, 2, manual_clock, idle_s=100, turns=[{"answer": "hello"}])
    rollout(tmp_path, 3, manual_clock, idle_s=100)
    summary = await plan(make(manual_store, manual_clock, tmp_path, min_idle_s=0))
    assert summary.queued_ids == [thread_id(3)]
    assert summary.not_eligible == 2
    reasons = {t.id: str(t.reason) if t.reason else None for t in await manual_store.threads.list_all()}
    assert reasons[thread_id(1)] == "source:exec" and reasons[thread_id(2)] == "no_user_messages"


async def test_candidates_are_claimed_newest_first(tmp_path, manual_store, manual_clock):
    for n, idle_s in ((1, 500), (2, 100), (3, 300)):
        rollout(tmp_path, n, manual_clock, idle_s=idle_s)
    await plan(make(manual_store, manual_clock, tmp_path, min_idle_s=0))
    order = []
    while (job := await manual_store.jobs.claim("extract", "host:1:a", 900)) is not None:
        order.append(job.key)
    assert order == [thread_id(2), thread_id(3), thread_id(1)]


async def test_a_memory_covering_the_watermark_is_left_alone_and_a_grown_thread_is_queued_again(tmp_path, manual_store, manual_clock):
    path = rollout(tmp_path, 1, manual_clock, idle_s=100)
    scheduler = make(manual_store, manual_clock, tmp_path, min_idle_s=60)
    await plan(scheduler)
    await pool_for(manual_store, manual_clock, tmp_path, GatedExtractor(gated=False)).run(asyncio.Event(), burst=True)
    memory = await manual_store.memories.get(thread_id(1))
    assert memory is not None and memory.source_watermark == path.stat().st_size

    summary = await plan(scheduler)  # nothing changed: nothing is looked at
    assert (summary.queued, summary.looked_at) == (0, 0)
    assert (await manual_store.jobs.get("extract", thread_id(1))).status == "done"

    append_turn(path, "Also add the tests to CI")  # the thread grows ...
    touch(path, manual_clock.now() - 10)
    summary = await plan(scheduler)
    assert (summary.queued, summary.idle_wait) == (0, 1)  # ... and must be idle again first
    manual_clock.advance(50)
    summary = await plan(scheduler)
    assert summary.queued_ids == [thread_id(1)]
    job = await manual_store.jobs.get("extract", thread_id(1))
    assert (job.status, job.input_watermark) == ("pending", path.stat().st_size)


async def test_a_forgotten_memory_is_not_extracted_again_until_the_thread_grows(tmp_path, manual_store, manual_clock):
    path = rollout(tmp_path, 1, manual_clock, idle_s=100)
    scheduler = make(manual_store, manual_clock, tmp_path, min_idle_s=0)
    await plan(scheduler)
    await pool_for(manual_store, manual_clock, tmp_path, GatedExtractor(gated=False)).run(asyncio.Event(), burst=True)
    await manual_store.memories.delete(thread_id(1))  # `memd forget`
    summary = await plan(scheduler)
    assert (summary.queued, summary.looked_at) == (0, 0)
    assert await manual_store.jobs.claim("extract", "host:1:a", 900) is None
    append_turn(path, "and one more thing")
    touch(path, manual_clock.now() - 10)
    assert (await plan(scheduler)).queued_ids == [thread_id(1)]


async def test_failures_back_off_exponentially_end_dead_and_a_growing_thread_resets_the_attempts(tmp_path, manual_store, manual_clock):
    path = rollout(tmp_path, 1, manual_clock, idle_s=100)
    scheduler = make(manual_store, manual_clock, tmp_path, min_idle_s=0)
    await plan(scheduler)
    extractor = Failing()
    pool = pool_for(manual_store, manual_clock, tmp_path, extractor, RetryPolicy(base_s=60, cap_s=200, max_attempts=4))

    delays = []
    for attempt in range(1, 4):
        await pool.run(asyncio.Event(), burst=True)
        job = await manual_store.jobs.get("extract", thread_id(1))
        assert (job.status, job.attempts) == ("error", attempt)
        delays.append(round(job.retry_at - manual_clock.now()))
        manual_clock.advance(delays[-1] - 1)
        await pool.run(asyncio.Event(), burst=True)  # not due yet: not tried
        assert len(extractor.started) == attempt
        manual_clock.advance(1)
    assert delays == [60, 120, 200]  # 60 s doubling, capped
    await pool.run(asyncio.Event(), burst=True)
    job = await manual_store.jobs.get("extract", thread_id(1))
    assert (job.status, job.attempts, job.retry_at) == ("dead", 4, None)
    assert "HTTP 503" in job.last_error

    manual_clock.advance(30 * DAY_S - 1000)
    summary = await plan(scheduler)
    assert (summary.queued, summary.looked_at) == (0, 0)  # dead for this input: never retried by itself
    await pool.run(asyncio.Event(), burst=True)
    assert len(extractor.started) == 4

    append_turn(path, "try again with the new toolchain")
    touch(path, manual_clock.now() - 10)
    assert (await plan(scheduler)).queued_ids == [thread_id(1)]
    job = await manual_store.jobs.get("extract", thread_id(1))
    assert (job.status, job.attempts, job.last_error) == ("pending", 0, None)


async def test_retry_requeues_a_dead_thread(tmp_path, manual_store, manual_clock):
    rollout(tmp_path, 1, manual_clock, idle_s=100)
    await plan(make(manual_store, manual_clock, tmp_path, min_idle_s=0))
    extractor = Failing()
    await pool_for(manual_store, manual_clock, tmp_path, extractor, RetryPolicy(max_attempts=1)).run(asyncio.Event(), burst=True)
    assert (await manual_store.jobs.get("extract", thread_id(1))).status == "dead"
    assert await manual_store.jobs.retry(thread_id(1)) == 1
    job = await manual_store.jobs.get("extract", thread_id(1))
    assert (job.status, job.attempts, job.retry_at) == ("pending", 0, None)
    await pool_for(manual_store, manual_clock, tmp_path, GatedExtractor(gated=False)).run(asyncio.Event(), burst=True)
    assert (await manual_store.jobs.get("extract", thread_id(1))).status == "done"


def test_retry_policy_delays() -> None:
    policy = RetryPolicy()  # SPEC §4: 60 s doubling, cap 6 h, 5 attempts
    assert [policy.delay_s(a) for a in range(1, 6)] == [60, 120, 240, 480, 960]
    assert policy.delay_s(20) == 6 * 3600
    assert [policy.is_dead(a) for a in (4, 5)] == [False, True]
