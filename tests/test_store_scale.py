"""The store stays cheap after years of sessions (SPEC §15, issue 14): a claim reads waiting jobs
only, whatever the number of finished ones, and still takes the most urgent claimable job."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from memd.clock import FakeClock
from memd.store import jobs as jobs_module
from memd.store.store import Store


def add_finished_jobs(db_path: Path, n: int, *, at: float) -> None:
    """``n`` done extract jobs and ``n // 10`` dead ones, written directly (a long history)."""
    conn = sqlite3.connect(db_path)
    with conn:
        conn.executemany(
            "INSERT INTO jobs (kind, key, status, priority, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
            [("extract", f"old-{i:06d}", "dead" if i % 10 == 0 else "done", at - i, at - i, at - i) for i in range(n)],
        )
    conn.close()


def claim_vm_steps(db_path: Path, now: float) -> int:
    """SQLite VM instructions the claim's candidate query runs (a progress handler counts them)."""
    conn = sqlite3.connect(db_path)
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    conn.set_progress_handler(count, 1)
    conn.execute(jobs_module._CLAIM_CANDIDATE, {"kind": "extract", "now": now}).fetchall()
    conn.close()
    return steps


async def test_a_claim_does_the_same_work_over_100_or_20000_finished_jobs(tmp_path: Path, clock: FakeClock) -> None:
    steps = []
    for n in (100, 20_000):
        db_path = tmp_path / f"{n}" / "memd.sqlite3"
        store = await Store.open(db_path, clock=clock)
        await store.jobs.upsert_extract("waiting", 100, clock.now())
        await store.close()
        add_finished_jobs(db_path, n, at=clock.now())
        steps.append(claim_vm_steps(db_path, clock.now()))
        store = await Store.open(db_path, clock=clock)
        job = await store.jobs.claim("extract", "w", 60)
        assert job is not None and job.key == "waiting"
        assert await store.jobs.claim("extract", "w", 60) is None
        assert await store.jobs.queue_depth() == 0
        await store.close()
    assert steps[0] == steps[1], steps


async def test_the_claim_takes_the_most_urgent_of_pending_due_retries_and_expired_leases(
    store: Store, clock: FakeClock
) -> None:
    for key, priority in (("pending-low", 1.0), ("retry-high", 5.0), ("retry-later", 9.0), ("stalled", 3.0)):
        await store.jobs.upsert_extract(key, 100, priority)
    # Fail two of them (one due in 10 s, one in 1000 s) and leave one running with a lease of 30 s.
    for key, retry_in_s in (("retry-later", 1000.0), ("retry-high", 10.0)):
        while (job := await store.jobs.claim("extract", "w", 60)) is not None and job.key != key:
            await store.jobs.release(job)
        assert job is not None
        await store.jobs.fail(job, "boom", clock.now() + retry_in_s, dead=False)
    job = await store.jobs.claim("extract", "w", 30)
    assert job is not None and job.key == "stalled"

    clock.advance(20)  # retry-high is due; the stalled lease is not expired; retry-later waits
    order = []
    while (job := await store.jobs.claim("extract", "w2", 60)) is not None:
        order.append(job.key)
    assert order == ["retry-high", "pending-low"]
    clock.advance(20)  # the stalled job's lease expired
    job = await store.jobs.claim("extract", "w2", 60)
    assert job is not None and (job.key, job.fencing_token) == ("stalled", 2)
    assert await store.jobs.claim("extract", "w2", 60) is None
    assert (await store.jobs.get("extract", "retry-later")).status == "error"  # type: ignore[union-attr]
    clock.advance(1000)
    job = await store.jobs.claim("extract", "w2", 60)
    assert job is not None and job.key == "retry-later"
