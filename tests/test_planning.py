"""Event-driven planning (SPEC §15, issue 14): a planning pass looks only at the threads whose
rollout changed (watcher events, the reconcile scan's stat differences), found through an index,
and a rollout that grows while a pass reads it is relearned by the next pass.

Rollouts are real files indexed by the real :class:`~memd.ingest.indexer.Indexer`; time is a
:class:`~memd.clock.ManualClock` and each file's mtime is set relative to it.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from pathlib import Path

from memd.clock import ManualClock
from memd.errors import StoreError
from memd.ingest.files import FileStat
from memd.ingest.indexer import Indexer
from memd.schedule.scheduler import Scheduler
from memd.store import threads as threads_module
from memd.store.store import Store
from tests.builders import append_turn, simple_turns, thread_id, write_rollout
from tests.fakes import GatedExtractor, extraction_pool, prepare


def indexer_for(store: Store, clock: ManualClock, tmp_path: Path) -> Indexer:
    return Indexer(
        store,
        clock,
        roots=[tmp_path / "sessions"],
        max_line_bytes=1 << 20,
        include_sources=["cli", "vscode", "unknown", "custom"],
        project_rule="cwd",
    )


def rollout(tmp_path: Path, n: int, clock: ManualClock, *, idle_s: float) -> Path:
    """A session whose last activity was ``idle_s`` seconds ago (on the manual clock)."""
    path = write_rollout(tmp_path / "sessions", thread_id(n), tmp_path / "proj", simple_turns(f"t{n}"))
    os.utime(path, (clock.now() - idle_s, clock.now() - idle_s))
    return path


class CountingIndexer(Indexer):
    """The real indexer, counting the threads a planning pass reads forward."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.caught_up: list[str] = []

    async def catch_up(self, thread_id: str):  # type: ignore[no-untyped-def]
        self.caught_up.append(thread_id)
        return await super().catch_up(thread_id)


async def test_a_pass_reads_only_the_threads_whose_rollout_changed(
    tmp_path: Path, manual_store: Store, manual_clock: ManualClock
) -> None:
    paths = [rollout(tmp_path, n, manual_clock, idle_s=600 + n) for n in range(30)]
    indexer = CountingIndexer(
        manual_store, manual_clock, roots=[tmp_path / "sessions"], max_line_bytes=1 << 20,
        include_sources=["cli"], project_rule="cwd",
    )  # fmt: skip
    scheduler = Scheduler(manual_store, indexer, manual_clock, min_idle_s=60, max_age_days=30)
    await indexer.scan()
    first = await scheduler.plan()
    assert (first.queued, first.looked_at) == (30, 30)
    pool = extraction_pool(manual_store, manual_clock, extractor=GatedExtractor(gated=False), prepare=prepare,
                           memory_dir=tmp_path / "memory", owner="host:1:a", concurrency=2, poll_s=0.05)  # fmt: skip
    await pool.run(asyncio.Event(), burst=True)

    # Learned: a reconcile scan finds nothing changed, and passes read nothing at all.
    indexer.caught_up.clear()
    await indexer.scan()
    for _ in range(3):
        manual_clock.advance(60)
        summary = await scheduler.plan()
        assert (summary.looked_at, summary.queued, summary.idle_wait, summary.next_due_s) == (0, 0, 0, None)
    assert indexer.caught_up == []

    # One rollout grows; the watcher names it: the next passes read that thread and no other.
    append_turn(paths[7], "also update the changelog")
    os.utime(paths[7], (manual_clock.now() - 5, manual_clock.now() - 5))
    await indexer.refresh_paths([str(paths[7])])
    summary = await scheduler.plan()
    assert (summary.looked_at, summary.idle_wait) == (0, 1)  # inside its idle gate
    assert summary.next_due_s == 55
    manual_clock.advance(55)
    summary = await scheduler.plan()
    assert (summary.looked_at, summary.queued_ids) == (1, [thread_id(7)])
    assert indexer.caught_up == [thread_id(7)]
    job = await manual_store.jobs.get("extract", thread_id(7))
    assert job is not None and (job.status, job.input_watermark) == ("pending", paths[7].stat().st_size)


async def test_a_rollout_that_grows_during_a_pass_is_relearned_on_the_next_pass(
    tmp_path: Path, manual_store: Store, manual_clock: ManualClock
) -> None:
    grows = rollout(tmp_path, 1, manual_clock, idle_s=600)
    rollout(tmp_path, 2, manual_clock, idle_s=700)
    indexer = indexer_for(manual_store, manual_clock, tmp_path)
    await indexer.scan()
    read_at = grows.stat().st_size
    real_catch_up = indexer.catch_up

    async def catch_up_then_append(thread: str):  # type: ignore[no-untyped-def]
        record = await real_catch_up(thread)
        if thread == thread_id(1) and grows.stat().st_size == read_at:
            # Mid-pass: the agent appends a turn and the watcher indexes it, after the pass read it.
            append_turn(grows, "one more thing: run the linter")
            os.utime(grows, (manual_clock.now(), manual_clock.now()))
            await indexer.refresh_paths([str(grows)])
        return record

    indexer.catch_up = catch_up_then_append  # type: ignore[method-assign]
    scheduler = Scheduler(manual_store, indexer, manual_clock, min_idle_s=60, max_age_days=30)
    summary = await scheduler.plan()
    # The pass decided on what it read: the first 'read_at' bytes.
    assert sorted(summary.queued_ids) == [thread_id(1), thread_id(2)]
    job = await manual_store.jobs.get("extract", thread_id(1))
    assert job is not None and job.input_watermark == read_at < grows.stat().st_size

    # The change recorded during the pass is kept for the next one (not lost with the pass's mark):
    summary = await scheduler.plan()
    assert (summary.looked_at, summary.idle_wait, summary.next_due_s) == (0, 1, 60)  # idle gate first
    manual_clock.advance(60)
    summary = await scheduler.plan()
    assert (summary.looked_at, summary.queued_ids) == (1, [thread_id(1)])
    job = await manual_store.jobs.get("extract", thread_id(1))
    assert job is not None and (job.status, job.input_watermark) == ("pending", grows.stat().st_size)


async def test_threads_inside_the_idle_gate_are_counted_from_the_index_and_the_soonest_gives_the_wake_up(
    tmp_path: Path, manual_store: Store, manual_clock: ManualClock
) -> None:
    for n, idle_s in ((1, 10), (2, 20), (3, 100)):
        rollout(tmp_path, n, manual_clock, idle_s=idle_s)
    indexer = indexer_for(manual_store, manual_clock, tmp_path)
    await indexer.scan()
    summary = await Scheduler(manual_store, indexer, manual_clock, min_idle_s=60, max_age_days=30).plan()
    assert (summary.looked_at, summary.queued_ids, summary.idle_wait) == (1, [thread_id(3)], 2)
    assert summary.next_due_s == 40  # thread 2 leaves the gate first


def vm_steps(db_path: Path, sql: str, params: dict[str, float | None]) -> int:
    """SQLite VM instructions a query runs (a progress handler counts them)."""
    conn = sqlite3.connect(db_path)
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    conn.set_progress_handler(count, 1)
    conn.execute(sql, params).fetchall()
    conn.close()
    return steps


async def test_planning_queries_do_the_same_work_over_100_or_20000_planned_threads(
    tmp_path: Path, manual_clock: ManualClock
) -> None:
    now = time.time()
    steps: list[tuple[int, int, int, int]] = []
    for n in (100, 20_000):
        db_path = tmp_path / f"{n}" / "memd.sqlite3"
        await (await Store.open(db_path, clock=manual_clock)).close()
        conn = sqlite3.connect(db_path)
        with conn:
            conn.executemany(
                "INSERT INTO threads (id, path, project, cwd, source, originator, cli_version, model, created_at,"
                " updated_at, watermark, user_messages, skipped_lines, eligible, plan_pending)"
                " VALUES (?, ?, 'p', 'p', 'cli', 'o', 'v', 'm', ?, ?, 100, 1, 0, 1, ?)",
                # n planned threads over three years, and one changed thread in each range.
                [(f"t{i}", f"/r/{i}", now - i * 5000.0, now - i * 5000.0, 0) for i in range(n)]
                + [
                    ("ready", "/r/a", now - 7200, now - 7200, 1),
                    ("waiting", "/r/b", now - 10, now - 10, 1),
                    ("old", "/r/c", now - 400 * 86_400.0, now - 400 * 86_400.0, 1),
                ],  # fmt: skip
            )
        conn.close()
        params = {"before": now - 3600, "after": now - 30 * 86_400.0, "limit": 500}
        params |= {"cursor_updated_at": None, "cursor_id": None}
        steps.append(
            (
                vm_steps(db_path, threads_module._PLAN_CANDIDATES, params),
                vm_steps(db_path, threads_module._PLAN_CANDIDATES_AFTER, params | {"cursor_updated_at": now, "cursor_id": "~"}),
                vm_steps(db_path, threads_module._PLAN_WAITING, params),
                vm_steps(db_path, threads_module._PLAN_TOO_OLD, params),
            )
        )
        store = await Store.open(db_path, clock=manual_clock)
        candidates = await store.threads.plan_candidates(ready_before=params["before"], active_after=params["after"])
        backlog = await store.threads.plan_backlog(ready_before=params["before"], active_after=params["after"])
        await store.close()
        assert [c.thread.id for c in candidates] == ["ready"]
        assert (backlog.waiting, backlog.too_old) == (1, 1)
    assert steps[0] == steps[1], steps


async def test_a_reconcile_scan_of_an_unchanged_history_is_a_stat_walk(
    tmp_path: Path, manual_store: Store, manual_clock: ManualClock, monkeypatch
) -> None:
    paths = [rollout(tmp_path, n, manual_clock, idle_s=600 + n) for n in range(20)]
    indexer = indexer_for(manual_store, manual_clock, tmp_path)
    assert (await indexer.scan()).indexed == 20
    planned = await Scheduler(manual_store, indexer, manual_clock, min_idle_s=0, max_age_days=0).plan()
    assert planned.looked_at == 20
    built: list[str] = []
    asked: list[list[str]] = []
    real_from_os, real_get_files = FileStat.from_os, manual_store.threads.get_files

    def counting_from_os(path: str, st: os.stat_result) -> FileStat:
        built.append(path)
        return real_from_os(path, st)

    async def counting_get_files(wanted):  # type: ignore[no-untyped-def]
        wanted = list(wanted)
        asked.append(wanted)
        return await real_get_files(wanted)

    monkeypatch.setattr(FileStat, "from_os", staticmethod(counting_from_os))
    monkeypatch.setattr(manual_store.threads, "get_files", counting_get_files)

    # Nothing changed: every file is compared with its stamp in the walk; no record is built or read.
    summary = await indexer.scan()
    assert (summary.files_seen, summary.unchanged, summary.indexed) == (20, 20, 0)
    assert (built, asked) == ([], [])

    # One file grew: only that one is built, read back and indexed (and marked for planning).
    append_turn(paths[3], "and the docs")
    summary = await indexer.scan()
    assert (summary.files_seen, summary.unchanged, summary.indexed) == (20, 19, 1)
    assert set(built) == {str(paths[3])} and asked == [[str(paths[3])]]  # (the head read fstat-s it too)
    candidates = await manual_store.threads.plan_candidates(ready_before=1e12, active_after=0)
    assert [c.thread.id for c in candidates] == [thread_id(3)]


async def test_a_pass_reads_changed_threads_a_page_at_a_time_and_keeps_the_pages_it_finished(
    tmp_path: Path, manual_store: Store, manual_clock: ManualClock
) -> None:
    for n in range(7):
        rollout(tmp_path, n, manual_clock, idle_s=600 + n)
    indexer = CountingIndexer(
        manual_store, manual_clock, roots=[tmp_path / "sessions"], max_line_bytes=1 << 20,
        include_sources=["cli"], project_rule="cwd",
    )  # fmt: skip
    scheduler = Scheduler(manual_store, indexer, manual_clock, min_idle_s=60, max_age_days=30)
    scheduler.page_size = 3
    await indexer.scan()

    # The database fails while the third page is decided: the two finished pages stay planned.
    real_upsert = manual_store.jobs.upsert_extract
    calls = 0

    async def failing_upsert(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if calls == 7:
            raise StoreError("database is locked")
        return await real_upsert(*args, **kwargs)

    manual_store.jobs.upsert_extract = failing_upsert  # type: ignore[method-assign]
    try:
        await scheduler.plan()
    except StoreError:
        pass
    else:
        raise AssertionError("the pass should have failed")
    left = await manual_store.threads.plan_candidates(ready_before=manual_clock.now(), active_after=0)
    assert [c.thread.id for c in left] == [thread_id(6)]  # the oldest, on the third page

    manual_store.jobs.upsert_extract = real_upsert  # type: ignore[method-assign]
    indexer.caught_up.clear()
    summary = await scheduler.plan()
    assert (summary.looked_at, summary.queued_ids) == (1, [thread_id(6)])
    assert indexer.caught_up == [thread_id(6)]
