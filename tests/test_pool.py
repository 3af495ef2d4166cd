"""The extraction worker pool (SPEC §6.1, issue 3): fixed concurrency with the slot taken before
the claim, leases renewed while a job runs, fenced commits, and two processes on one state never
extracting the same thread at the same time.

Store time is a :class:`~memd.clock.ManualClock` (lease expiry is driven, not waited for); the
heartbeat runs on real time every ``lease_s / 3``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from memd.clock import ManualClock
from memd.errors import ExtractorError
from memd.extract.base import ExtractionResult
from memd.extract.pool import JobPool
from memd.memory.files import project_root
from memd.rollout.session import ThreadStats
from memd.schedule.retry import RetryPolicy
from memd.store.records import FileRecord, ThreadRecord
from memd.store.store import Store
from tests.builders import thread_id
from tests.fakes import GatedExtractor, extraction_pool, prepare

REPO = Path(__file__).resolve().parents[1]
PROJECT = "/work/demo"
async def add_thread(store: Store, n: int, *, updated_at: float, watermark: int = 100) -> ThreadRecord:
    """Index a thread (no rollout on disk: the pool never reads one, ``prepare`` does) and queue it."""
    thread = ThreadRecord(
        id=thread_id(n),
        path=f"/rollouts/{n}.jsonl",
        project=PROJECT,
        cwd=PROJECT,
        source="cli",
        originator="codex_cli_rs",
        cli_version="0.77.0",
        model="gpt-5-codex",
        title=f"task {n}",
        created_at=updated_at,
        updated_at=updated_at,
        watermark=watermark,
        user_messages=1,
        skipped_lines=0,
        eligible=True,
        reason=None,
    )
    file = FileRecord(
        path=thread.path,
        kind="codex",
        dev=1,
        inode=1000 + n,
        size=watermark,
        mtime=updated_at,
        watermark=watermark,
        head_hash="0" * 64,
        thread_id=thread.id,
    )
    await store.threads.record(thread, ThreadStats().to_json(), file)
    await store.jobs.upsert_extract(thread.id, watermark, priority=updated_at)
    return thread


def make_pool(
    store: Store,
    clock: ManualClock,
    tmp_path: Path,
    extractor,
    *,
    owner: str = "host:1:a",
    concurrency: int = 2,
    lease_s: float = 900.0,
    retry: RetryPolicy | None = None,
) -> JobPool:
    return extraction_pool(
        store,
        clock,
        extractor=extractor,
        prepare=prepare,
        memory_dir=tmp_path / "memory",
        owner=owner,
        concurrency=concurrency,
        lease_s=lease_s,
        retry=retry,
        poll_s=0.05,
    )


async def until(predicate: Callable[[], bool], what: str) -> None:
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


def trace_files(tmp_path: Path) -> list[Path]:
    root = project_root(tmp_path / "memory", PROJECT)
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != "PROJECT") if root.is_dir() else []


# --------------------------------------------------------------------------- concurrency


async def test_concurrency_is_fixed_and_a_worker_takes_its_slot_before_it_claims(tmp_path, manual_store, manual_clock):
    for n in range(5):
        await add_thread(manual_store, n, updated_at=manual_clock.now() - 100 + n)
    running_at_claim: list[int] = []
    running_seen: list[int] = []
    claimed: list[str] = []
    real_claim = manual_store.jobs.claim

    async def running_claims() -> int:
        return len(await manual_store.jobs.list_all("extract", "running"))

    async def instrumented_claim(*args, **kwargs):  # type: ignore[no-untyped-def]
        running_at_claim.append(await running_claims())
        job = await real_claim(*args, **kwargs)
        running_seen.append(await running_claims())
        if job is not None:
            claimed.append(job.key)
        return job

    manual_store.jobs.claim = instrumented_claim  # type: ignore[method-assign]

    async def on_start(_thread: str) -> None:
        running_seen.append(await running_claims())
        await asyncio.sleep(0.02)

    extractor = GatedExtractor(on_start=on_start)
    pool = make_pool(manual_store, manual_clock, tmp_path, extractor, concurrency=2)
    run = asyncio.create_task(pool.run(asyncio.Event(), burst=True))
    await until(lambda: len(extractor.started) == 2, "two jobs running")
    for _ in range(20):  # the idle loop cannot claim a third job while both slots are taken
        await asyncio.sleep(0.01)
    assert len(extractor.started) == 2
    assert running_at_claim == [0, 1]
    extractor.gate.set()
    await run

    assert pool.stats.done == 5
    assert max(running_seen) == 2  # the concurrency was used ...
    assert max(running_at_claim) <= 1  # ... and no claim was made without a free slot
    # Newest first: priority is the thread's last activity.
    assert claimed == [thread_id(n) for n in (4, 3, 2, 1, 0)]


# --------------------------------------------------------------------------- leases


async def test_a_running_job_renews_its_lease_and_cannot_be_taken_over(tmp_path, manual_store, manual_clock):
    await add_thread(manual_store, 1, updated_at=manual_clock.now() - 100)
    renewals: list[float] = []
    real_renew = manual_store.jobs.renew

    async def counting_renew(job, lease_s):  # type: ignore[no-untyped-def]
        ok = await real_renew(job, lease_s)
        renewals.append(manual_clock.now())
        return ok

    manual_store.jobs.renew = counting_renew  # type: ignore[method-assign]
    extractor = GatedExtractor()
    pool = make_pool(manual_store, manual_clock, tmp_path, extractor, concurrency=1, lease_s=0.3)  # renewed every 0.1 s
    run = asyncio.create_task(pool.run(asyncio.Event(), burst=True))
    await until(lambda: extractor.started, "the job started")
    claimed = await manual_store.jobs.get("extract", thread_id(1))
    for _ in range(4):  # 0.8 s of store time in all: far past one lease
        manual_clock.advance(0.2)
        seen = len(renewals)
        await until(lambda: len(renewals) > seen, "a renewal")  # noqa: B023
        lease_until = (await manual_store.jobs.get("extract", thread_id(1))).lease_until
        assert lease_until == pytest.approx(renewals[-1] + 0.3)
        assert await manual_store.jobs.claim("extract", "other:2:b", 0.3) is None  # no takeover
    extractor.gate.set()
    await run

    job = await manual_store.jobs.get("extract", thread_id(1))
    assert (job.status, job.fencing_token, job.attempts) == ("done", claimed.fencing_token, 1)
    assert pool.stats.done == 1 and pool.stats.fenced_out == 0
    assert (await manual_store.memories.get(thread_id(1))) is not None


async def test_a_job_whose_lease_was_taken_over_writes_nothing(tmp_path, manual_store, manual_clock):
    await add_thread(manual_store, 1, updated_at=manual_clock.now() - 100)
    extractor = GatedExtractor()
    pool = make_pool(manual_store, manual_clock, tmp_path, extractor, concurrency=1, lease_s=300.0)  # no renewal in this test
    run = asyncio.create_task(pool.run(asyncio.Event(), burst=True))
    await until(lambda: extractor.started, "the job started")
    first = await manual_store.jobs.get("extract", thread_id(1))

    manual_clock.advance(301)  # the lease expired: another daemon re-claims the job
    taken = await manual_store.jobs.claim("extract", "other:2:b", 300.0)
    assert taken is not None and taken.fencing_token == first.fencing_token + 1
    extractor.gate.set()  # the first worker finishes late and tries to commit
    await run

    assert pool.stats.fenced_out == 1 and pool.stats.done == 0
    assert await manual_store.memories.get(thread_id(1)) is None
    assert trace_files(tmp_path) == []  # no trace file, no temp file left behind
    job = await manual_store.jobs.get("extract", thread_id(1))
    assert (job.status, job.owner, job.fencing_token) == ("running", "other:2:b", taken.fencing_token)


async def test_a_lost_lease_seen_by_the_heartbeat_stops_the_work(tmp_path, manual_store, manual_clock):
    await add_thread(manual_store, 1, updated_at=manual_clock.now() - 100)
    allow_renew = asyncio.Event()
    real_renew = manual_store.jobs.renew

    async def held_renew(job, lease_s):  # type: ignore[no-untyped-def]
        await allow_renew.wait()  # the takeover happens before this renewal reaches the store
        return await real_renew(job, lease_s)

    manual_store.jobs.renew = held_renew  # type: ignore[method-assign]
    extractor = GatedExtractor()  # never released: only the lost lease ends the job
    pool = make_pool(manual_store, manual_clock, tmp_path, extractor, concurrency=1, lease_s=0.3)
    run = asyncio.create_task(pool.run(asyncio.Event(), burst=True))
    await until(lambda: extractor.started, "the job started")
    manual_clock.advance(1.0)
    assert await manual_store.jobs.claim("extract", "other:2:b", 300.0) is not None
    allow_renew.set()
    await run

    assert extractor.cancelled == [thread_id(1)]
    assert pool.stats.fenced_out == 1 and pool.stats.done == 0
    assert await manual_store.memories.get(thread_id(1)) is None
    assert (await manual_store.jobs.get("extract", thread_id(1))).owner == "other:2:b"


# --------------------------------------------------------------------------- failures and pauses


async def test_a_failure_is_recorded_with_backoff_and_other_jobs_go_on(tmp_path, manual_store, manual_clock):
    for n in range(3):
        await add_thread(manual_store, n, updated_at=manual_clock.now() - 100 + n)

    class FailsOne(GatedExtractor):
        async def extract(self, request):  # type: ignore[no-untyped-def]
            if request.thread_id == thread_id(1):
                raise ExtractorError("model request failed after 4 attempts (server)")
            return await super().extract(request)

    pool = make_pool(
        manual_store, manual_clock, tmp_path, FailsOne(gated=False), retry=RetryPolicy(base_s=60, cap_s=3600, max_attempts=5)
    )
    await pool.run(asyncio.Event(), burst=True)
    assert (pool.stats.done, pool.stats.failed) == (2, 1)
    job = await manual_store.jobs.get("extract", thread_id(1))
    assert (job.status, job.attempts, job.owner) == ("error", 1, None)
    assert job.retry_at == pytest.approx(manual_clock.now() + 60)
    assert "server" in job.last_error


async def test_the_pause_reason_is_recorded_for_memd_status_and_cleared_when_it_ends(tmp_path, manual_store, manual_clock):
    from memd.errors import BudgetExhausted

    for n in range(2):
        await add_thread(manual_store, n, updated_at=manual_clock.now() - 100 + n)
    resume_at = manual_clock.now() + 500

    class OverBudget(GatedExtractor):
        async def extract(self, request):  # type: ignore[no-untyped-def]
            if manual_clock.now() < resume_at:
                raise BudgetExhausted("spent", resume_at=resume_at)
            return await super().extract(request)

    await manual_store.meta.set("model_pause", "left by a previous process")
    pool = make_pool(manual_store, manual_clock, tmp_path, OverBudget(gated=False), concurrency=1)
    await pool.run(asyncio.Event(), burst=True)
    reason = await manual_store.meta.get("model_pause")
    assert reason == pool.paused_reason and "daily token budget reached" in reason
    from memd.extract.pool import PauseKind

    assert pool.pause_kind is PauseKind.BUDGET
    assert {j.status for j in await manual_store.jobs.list_all("extract")} == {"pending"}

    manual_clock.advance(501)
    await pool.run(asyncio.Event(), burst=True)
    assert pool.stats.done == 2
    assert await manual_store.meta.get("model_pause") is None and pool.pause_kind is None


# --------------------------------------------------------------------------- two processes

WORKER = textwrap.dedent(
    """
    import asyncio, json, os, sys, time
    from pathlib import Path

    from memd.clock import SystemClock
    from memd.extract.base import ExtractionResult
    from tests.fakes import extraction_pool
    from memd.store.store import Store, make_owner
    from tests.fakes import TRACE, prepare

    db, memory_dir, log_path, go, ready = sys.argv[1:6]
    delay_s = float(sys.argv[6])


    class Slow:
        name = "slow"

        def _log(self, what, thread_id):
            fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, f"{what} {thread_id} {os.getpid()}\\n".encode())
            finally:
                os.close(fd)

        async def extract(self, request):
            self._log("start", request.thread_id)
            await asyncio.sleep(delay_s)
            self._log("end", request.thread_id)
            return ExtractionResult(trace_memory=TRACE, summary="s", extractor="slow")

        async def aclose(self):
            pass


    async def main():
        store = await Store.open(Path(db), clock=SystemClock())
        Path(ready).touch()
        while not os.path.exists(go):
            await asyncio.sleep(0.01)
        pool = extraction_pool(store, SystemClock(), extractor=Slow(), prepare=prepare,
                              memory_dir=Path(memory_dir), owner=make_owner(), concurrency=2,
                              lease_s=60.0, poll_s=0.05)
        await pool.run(asyncio.Event(), burst=True)
        await store.close()
        print(json.dumps({"pid": os.getpid(), "done": pool.stats.done, "fenced_out": pool.stats.fenced_out}))


    asyncio.run(main())
    """
)


@pytest.mark.timeout(120)
async def test_two_processes_on_one_state_never_extract_a_thread_twice_at_the_same_time(tmp_path, manual_store, manual_clock):
    n_threads = 8
    for n in range(n_threads):
        await add_thread(manual_store, n, updated_at=time.time() - 1000 + n)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    log_path = tmp_path / "extractions.log"
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = []
    for i in range(2):
        procs.append(
            await asyncio.create_subprocess_exec(
                sys.executable,
                str(script),
                str(manual_store.path),
                str(tmp_path / "memory"),
                str(log_path),
                str(go),
                str(tmp_path / f"ready{i}"),
                "0.3",
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        )
    await until(lambda: all((tmp_path / f"ready{i}").exists() for i in range(2)), "both workers ready")
    go.touch()
    results = []
    for proc in procs:
        out, err = await asyncio.wait_for(proc.communicate(), 90)
        assert proc.returncode == 0, err.decode()[-3000:]
        results.append(json.loads(out.decode().strip().splitlines()[-1]))

    # O_APPEND writes are atomic and ordered: per thread, the lines must be exactly start, end.
    per_thread: dict[str, list[tuple[str, str]]] = {}
    for line in log_path.read_text().splitlines():
        what, tid, pid = line.split()
        per_thread.setdefault(tid, []).append((what, pid))
    assert set(per_thread) == {thread_id(n) for n in range(n_threads)}
    for tid, entries in per_thread.items():
        assert [what for what, _ in entries] == ["start", "end"], (tid, entries)
        assert entries[0][1] == entries[1][1]
    assert sum(r["done"] for r in results) == n_threads
    assert all(r["fenced_out"] == 0 for r in results)
    assert len({pid for entries in per_thread.values() for _, pid in entries}) == 2  # both took work
    memories = [await manual_store.memories.get(thread_id(n)) for n in range(n_threads)]
    assert all(m is not None for m in memories)
    assert {j.status for j in await manual_store.jobs.list_all("extract")} == {"done"}


# --------------------------------------------------------------------------- file name and no-ops


async def test_the_trace_file_is_named_after_the_extractors_title(tmp_path, manual_store, manual_clock):
    await add_thread(manual_store, 1, updated_at=manual_clock.now() - 100)

    class Titled(GatedExtractor):
        async def extract(self, request):  # type: ignore[no-untyped-def]
            result = await super().extract(request)
            return ExtractionResult(result.trace_memory, result.summary, result.extractor, title="Fix the build!")

    await make_pool(manual_store, manual_clock, tmp_path, Titled(gated=False)).run(asyncio.Event(), burst=True)
    [trace] = [p for p in trace_files(tmp_path) if p.parent.name == "trace_summaries"]
    assert trace.name.endswith("_fix_the_build.md")  # the slug of the title, not of the thread's "task 1"


async def test_a_no_op_session_makes_no_memory_folder(tmp_path, manual_store, manual_clock):
    await add_thread(manual_store, 1, updated_at=manual_clock.now() - 100)

    class Nothing(GatedExtractor):
        async def extract(self, request):  # type: ignore[no-untyped-def]
            return ExtractionResult("", "", "offline")

    pool = make_pool(manual_store, manual_clock, tmp_path, Nothing(gated=False))
    await pool.run(asyncio.Event(), burst=True)
    assert (pool.stats.done, pool.stats.noop) == (1, 1)
    assert not project_root(tmp_path / "memory", PROJECT).exists()
    assert (await manual_store.jobs.get("extract", thread_id(1))).status == "done"  # type: ignore[union-attr]


async def test_a_models_trace_is_named_after_its_first_task(tmp_path, manual_store, manual_clock):
    await add_thread(manual_store, 1, updated_at=manual_clock.now() - 100)  # GatedExtractor gives no title
    await make_pool(manual_store, manual_clock, tmp_path, GatedExtractor(gated=False)).run(asyncio.Event(), burst=True)
    [trace] = [p for p in trace_files(tmp_path) if p.parent.name == "trace_summaries"]
    assert trace.name.endswith("_fix_the_build.md")  # "## Task: fix the build", not the thread's "task 1"


# --------------------------------------------------------------------------- secrets in error texts (SPEC §14)

PLANTED_TOKEN = "ghp_Zq8mX0pLw4Tn2Vb6Yc1Rd5Sf9Gh3Jk7Lm0Np"  # a generated shape, not a real token


async def test_an_error_text_with_a_secret_is_stored_redacted(tmp_path, manual_store, manual_clock, db_path):
    import sqlite3

    await add_thread(manual_store, 1, updated_at=manual_clock.now() - 100)

    class Leaks(GatedExtractor):
        async def extract(self, request):  # type: ignore[no-untyped-def]
            raise ExtractorError(f"server said: Authorization: Bearer {PLANTED_TOKEN} is not allowed")

    pool = make_pool(manual_store, manual_clock, tmp_path, Leaks(gated=False))
    await pool.run(asyncio.Event(), burst=True)
    job = await manual_store.jobs.get("extract", thread_id(1))
    assert job.status == "error" and "[REDACTED_SECRET]" in job.last_error
    assert all(PLANTED_TOKEN not in message for _, message in pool.stats.failures)
    with sqlite3.connect(db_path) as conn:
        assert PLANTED_TOKEN not in "\n".join(conn.iterdump())


async def test_the_daemons_fault_log_redacts_what_it_keeps(tmp_path, monkeypatch):
    from memd.config import load_settings
    from memd.daemon import build_components

    monkeypatch.setenv("MEMD_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("MEMD_MEMORY_DIR", str(tmp_path / "memory"))
    components = await build_components(load_settings(None, {}))
    try:
        fault = components.faults.note("claim_failed", RuntimeError(f"token {PLANTED_TOKEN}"), now_s=0)
    finally:
        await components.aclose()
    assert PLANTED_TOKEN not in fault.error and "[REDACTED_SECRET]" in fault.error


async def test_a_commit_that_ends_in_lease_lost_after_the_claim_was_lost_is_retrieved(
    tmp_path, manual_store, manual_clock
):
    import contextlib
    import gc

    from memd.errors import LeaseLost
    from memd.extract.pool import JobResult
    from memd.store.records import JobKind

    await add_thread(manual_store, 1, updated_at=manual_clock.now() - 100)
    started, finish_commit = asyncio.Event(), asyncio.Event()

    async def commit() -> JobResult:
        await finish_commit.wait()
        raise LeaseLost("the claim was taken over")

    async def handler(job, bound):  # type: ignore[no-untyped-def]
        # Like ExtractJob: the commit step is shielded, so a cancellation waits for it.
        started.set()
        step = asyncio.ensure_future(commit())
        while not step.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(step)
        return step.result()

    unretrieved: list[dict[str, object]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: unretrieved.append(context))
    try:
        pool = JobPool(
            manual_store, manual_clock, kind=JobKind.EXTRACT, handler=handler, owner="host:1:a", lease_s=3, poll_s=0.05
        )
        run = asyncio.create_task(pool.run(asyncio.Event(), burst=True))
        await started.wait()

        async def taken_over(job, lease_s):  # type: ignore[no-untyped-def]
            return False

        manual_store.jobs.renew = taken_over  # type: ignore[method-assign]
        manual_clock.advance(1)  # the heartbeat finds the claim gone and cancels the work
        await until(lambda: manual_clock.sleepers == 0, "the heartbeat saw the lost claim")
        finish_commit.set()
        await run
        assert pool.stats.fenced_out == 1
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert [c.get("message") for c in unretrieved] == []
