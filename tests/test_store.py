"""The SQLite state store: migrations, files/threads, jobs, memories, projects, misc, locking."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import stat
import sys
from pathlib import Path

import pytest
from structlog.testing import capture_logs

import memd.store.db as db
from memd.clock import FakeClock
from memd.errors import StoreError
from memd.store.records import FileRecord, JobRecord, MemoryRecord, ThreadRecord
from memd.store.schema import LATEST_VERSION
from memd.store.store import Store, make_owner


def make_file(path: str, thread_id: str | None = None, offset: int = 100) -> FileRecord:
    return FileRecord(
        path=path, kind="codex", dev=1, inode=hash(path) & 0xFFFF, size=offset, mtime=1.5,
        offset=offset, head_hash="ab" * 32, thread_id=thread_id,
    )


def make_thread(
    thread_id: str, *, path: str | None = None, project: str = "/p", updated_at: float = 100.0,
    watermark: int = 100, eligible: bool = True,
) -> ThreadRecord:
    return ThreadRecord(
        id=thread_id, path=path or f"/s/{thread_id}.jsonl", project=project, cwd=project,
        source="cli", originator="codex_cli_rs", cli_version="0.77.0", model="gpt-5",
        title=f"task {thread_id}", created_at=updated_at - 50, updated_at=updated_at,
        watermark=watermark, user_messages=2, skipped_lines=0, eligible=eligible,
        reason=None if eligible else "source:exec",
    )


def make_memory(thread_id: str, *, project: str = "/p", watermark: int = 100,
                at: float = 0.0) -> MemoryRecord:
    return MemoryRecord(
        thread_id=thread_id, project=project, path=f"trace_summaries/{thread_id}.md",
        trace_memory=f"# memory of {thread_id}", summary=f"summary {thread_id}",
        source_watermark=watermark, generated_at=at, extractor="offline", tokens_in=0,
        tokens_out=0,
    )


async def add_thread(store: Store, thread_id: str, **kw) -> ThreadRecord:
    thread = make_thread(thread_id, **kw)
    await store.record_thread(thread, "{}", make_file(thread.path, thread_id, thread.watermark))
    return thread


def raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


# ---------------------------------------------------------------------- migrations and open


async def test_fresh_database_is_migrated_wal_and_private(store: Store, db_path: Path) -> None:
    conn = raw(db_path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == LATEST_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    finally:
        conn.close()
    assert {"files", "threads", "jobs", "memories", "leases", "usage", "projects", "daemons",
            "meta"} <= tables
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(db_path.parent.stat().st_mode) == 0o700


async def test_connection_pragmas(store: Store) -> None:
    conn = store._connection()
    assert (await conn.execute_fetchall("PRAGMA synchronous"))[0][0] == 1  # NORMAL
    assert (await conn.execute_fetchall("PRAGMA foreign_keys"))[0][0] == 1
    assert (await conn.execute_fetchall("PRAGMA busy_timeout"))[0][0] == 5000
    assert conn.isolation_level is None


async def test_reopen_is_a_noop_and_keeps_data(db_path: Path, clock: FakeClock) -> None:
    async with await Store.open(db_path, clock=clock) as s:
        await s.set_meta("extractor", "offline")
    with capture_logs() as logs:
        async with await Store.open(db_path, clock=clock) as s:
            assert await s.get_meta("extractor") == "offline"
    assert not [e for e in logs if e["event"] == "store_migrated"]
    conn = raw(db_path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == LATEST_VERSION
    conn.close()


async def test_future_schema_version_is_refused(db_path: Path, clock: FakeClock) -> None:
    db_path.parent.mkdir(parents=True)
    conn = raw(db_path)
    conn.execute(f"PRAGMA user_version = {LATEST_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        await Store.open(db_path, clock=clock)
    conn = raw(db_path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == LATEST_VERSION + 1
    assert conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
    conn.close()


async def test_failed_migration_rolls_back_entirely(
    db_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with await Store.open(db_path, clock=clock):
        pass
    broken = dict(db.MIGRATIONS)
    broken[LATEST_VERSION + 1] = (
        "CREATE TABLE extra (x INTEGER);\nINSERT INTO missing VALUES (1);\n"
    )
    monkeypatch.setattr(db, "MIGRATIONS", broken)
    monkeypatch.setattr(db, "LATEST_VERSION", LATEST_VERSION + 1)
    with capture_logs() as logs, pytest.raises(StoreError, match="migrate"):
        await Store.open(db_path, clock=clock)
    assert [e["event"] for e in logs] == ["store_failed"]
    conn = raw(db_path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == LATEST_VERSION
    assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name='extra'").fetchone()[0] == 0
    conn.close()


async def test_not_a_database_gives_store_error(db_path: Path, clock: FakeClock) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="database error"):
        await Store.open(db_path, clock=clock)
    assert db_path.read_bytes() == b"this is not sqlite" * 100


async def test_uncreatable_path_gives_store_error(tmp_path: Path, clock: FakeClock) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="cannot create"):
        await Store.open(blocker / "memd.sqlite3", clock=clock)


async def test_close_is_idempotent_and_use_after_close_fails(store: Store) -> None:
    await store.close()
    await store.close()
    assert store.closed
    with pytest.raises(StoreError, match="closed"):
        await store.get_meta("x")


def test_split_statements_keeps_comments_with_their_statement() -> None:
    parts = db.split_statements("-- a\nCREATE TABLE a (x);\nCREATE TABLE b (y TEXT DEFAULT ';');\n")
    assert parts == ["-- a\nCREATE TABLE a (x);", "CREATE TABLE b (y TEXT DEFAULT ';');"]
    with pytest.raises(ValueError):
        db.split_statements("CREATE TABLE a (x)")


# ---------------------------------------------------------------------- files and threads


async def test_record_thread_stores_thread_file_and_stats(store: Store) -> None:
    thread = make_thread("t1", eligible=False)
    file = make_file(thread.path, "t1", 4096)
    await store.record_thread(thread, '{"turns": 3}', file)
    got = await store.get_thread("t1")
    assert got == thread
    assert got is not None and got.eligible is False
    assert await store.get_file(thread.path) == file
    assert await store.get_thread_stats("t1") == '{"turns": 3}'
    assert await store.get_thread("nope") is None
    assert await store.get_thread_stats("nope") is None


async def test_archived_thread_keeps_its_id_and_takes_the_new_path(store: Store) -> None:
    await add_thread(store, "t1", path="/s/sessions/t1.jsonl", watermark=100)
    moved = make_thread("t1", path="/s/archived_sessions/t1.jsonl", watermark=120)
    await store.record_thread(moved, "{}", make_file(moved.path, "t1", 120))
    threads = await store.list_threads()
    assert [(t.id, t.path, t.watermark) for t in threads] == [
        ("t1", "/s/archived_sessions/t1.jsonl", 120)
    ]
    files = await store.all_files()
    assert set(files) == {"/s/sessions/t1.jsonl", "/s/archived_sessions/t1.jsonl"}
    assert await store.forget_file("/s/sessions/t1.jsonl") is True
    assert await store.forget_file("/s/sessions/t1.jsonl") is False
    assert set(await store.all_files()) == {"/s/archived_sessions/t1.jsonl"}


async def test_record_file_upserts_and_list_threads_is_newest_first(store: Store) -> None:
    await store.record_file(make_file("/s/a.jsonl", None, 10))
    await store.record_file(make_file("/s/a.jsonl", "ta", 20))
    got = await store.get_file("/s/a.jsonl")
    assert got is not None and (got.offset, got.thread_id) == (20, "ta")
    await add_thread(store, "old", updated_at=10.0)
    await add_thread(store, "new", updated_at=30.0)
    await add_thread(store, "mid", updated_at=20.0)
    assert [t.id for t in await store.list_threads()] == ["new", "mid", "old"]


async def test_record_threads_writes_a_batch_in_one_transaction(store: Store) -> None:
    threads = [make_thread(f"t{i}", updated_at=float(i)) for i in range(5)]
    batch = [
        (t, f'{{"n": {i}}}', make_file(t.path, t.id, t.watermark)) for i, t in enumerate(threads)
    ]
    empty = dataclasses.replace(make_file("/s/empty.jsonl", None, 0), error="empty_file")
    await store.record_threads(batch, files=[empty])
    assert [t.id for t in await store.list_threads()] == ["t4", "t3", "t2", "t1", "t0"]
    assert await store.get_thread_stats("t3") == '{"n": 3}'
    files = await store.all_files()
    assert set(files) == {t.path for t in threads} | {"/s/empty.jsonl"}
    assert files["/s/empty.jsonl"] == empty
    # Rows are written in order: a later entry for the same thread id wins.
    moved = make_thread("t0", path="/s/archived/t0.jsonl", watermark=7)
    moved_file = make_file(moved.path, "t0", 7)
    await store.record_threads([(threads[0], "{}", batch[0][2]), (moved, "{}", moved_file)])
    got = await store.get_thread("t0")
    assert got is not None and (got.path, got.watermark) == ("/s/archived/t0.jsonl", 7)
    await store.record_threads([])  # nothing to write: no transaction, no error


async def test_batch_lookups_and_forget_files(store: Store) -> None:
    for i in range(3):
        await add_thread(store, f"t{i}")
    got = await store.get_threads(["t0", "t2", "missing", "t2"])
    assert set(got) == {"t0", "t2"} and got["t2"] == make_thread("t2")
    assert await store.get_threads([]) == {}
    files = await store.get_files(["/s/t1.jsonl", "/s/nope.jsonl"])
    assert list(files) == ["/s/t1.jsonl"] and files["/s/t1.jsonl"].thread_id == "t1"
    assert await store.forget_files(["/s/t0.jsonl", "/s/t1.jsonl", "/s/nope.jsonl"]) == 2
    assert set(await store.all_files()) == {"/s/t2.jsonl"}
    assert {t.id for t in await store.list_threads()} == {"t0", "t1", "t2"}  # threads are kept


async def test_ensure_project_is_idempotent_and_updates_the_root(store: Store) -> None:
    first = await store.ensure_project("/p", "/mem/a")
    again = await store.ensure_project("/p", "/mem/a")
    assert first == again and first.memory_root == "/mem/a"
    moved = await store.ensure_project("/p", "/mem/b")
    assert moved.memory_root == "/mem/b"
    assert (await store.get_project("/p")) == moved


# ---------------------------------------------------------------------- jobs


async def test_claim_order_is_newest_first(store: Store) -> None:
    for thread_id, prio in [("a", 10.0), ("c", 30.0), ("b", 20.0)]:
        await store.upsert_extract_job(thread_id, 100, prio)
    claimed = []
    while (job := await store.claim_job("extract", "w", 60)) is not None:
        claimed.append(job)
    assert [j.key for j in claimed] == ["c", "b", "a"]
    assert all(j.status == "running" and j.token == 1 and j.attempts == 1 for j in claimed)
    assert await store.claim_job("consolidate", "w", 60) is None


async def test_two_connections_claim_each_job_once(store: Store, store2: Store) -> None:
    keys = {f"t{i:02d}" for i in range(30)}
    for i, key in enumerate(sorted(keys)):
        await store.upsert_extract_job(key, 100, float(i))

    async def drain(s: Store, owner: str) -> list[JobRecord]:
        got = []
        while (job := await s.claim_job("extract", owner, 60)) is not None:
            got.append(job)
            await asyncio.sleep(0)
        return got

    a, b = await asyncio.gather(drain(store, "A"), drain(store2, "B"))
    claimed = [j.key for j in a + b]
    assert sorted(claimed) == sorted(keys)  # every job once, none twice
    assert {j.owner for j in a} <= {"A"} and {j.owner for j in b} <= {"B"}


async def test_stalled_job_is_reclaimed_and_stale_finish_is_refused(
    store: Store, store2: Store, clock: FakeClock
) -> None:
    await add_thread(store, "t1")
    await store.upsert_extract_job("t1", 100, 1.0)
    stale = await store.claim_job("extract", "A", 60)
    assert stale is not None
    assert await store2.claim_job("extract", "B", 60) is None  # lease still valid
    clock.advance(61)
    with capture_logs() as logs:
        fresh = await store2.claim_job("extract", "B", 60)
    assert fresh is not None and fresh.key == "t1"
    assert (fresh.token, fresh.attempts, fresh.owner) == (2, 2, "B")
    assert [e["event"] for e in logs] == ["job_reclaimed"]
    assert logs[0]["stale_owner"] == "A"

    assert await store.finish_extract(stale, make_memory("t1")) is False
    assert await store.renew_job(stale, 60) is False
    assert await store.fail_job(stale, "boom", None, dead=True) is False
    assert await store.release_job(stale) is False
    assert await store.get_memory("t1") is None
    assert await store.get_project("/p") is None
    job = await store.get_job("extract", "t1")
    assert job is not None and (job.status, job.owner, job.token) == ("running", "B", 2)

    assert await store2.finish_extract(fresh, make_memory("t1", watermark=100)) is True
    job = await store.get_job("extract", "t1")
    assert job is not None and (job.status, job.success_watermark, job.owner) == ("done", 100, None)
    memory = await store.get_memory("t1")
    assert memory is not None and memory.trace_memory == "# memory of t1"
    project = await store.get_project("/p")
    assert project is not None and (project.memory_seq, project.last_memory_at) == (1, clock.now())


async def test_job_that_keeps_killing_its_worker_goes_dead(
    store: Store, clock: FakeClock
) -> None:
    await store.upsert_extract_job("poison", 100, 2.0)
    await store.upsert_extract_job("fine", 100, 1.0)
    for attempt in (1, 2, 3):
        job = await store.claim_job("extract", f"w{attempt}", 60, max_attempts=3)
        assert job is not None and (job.key, job.attempts) == ("poison", attempt)
        clock.advance(61)  # the worker died: no finish, no fail
    with capture_logs() as logs:
        job = await store.claim_job("extract", "w4", 60, max_attempts=3)
    assert job is not None and job.key == "fine"
    assert [(e["event"], e["key"]) for e in logs] == [("job_dead_stalled", "poison")]
    dead = await store.get_job("extract", "poison")
    assert dead is not None and (dead.status, dead.owner) == ("dead", None)
    assert dead.last_error == "lease expired 3 times (worker lost)"


async def test_renew_job_keeps_the_claim(store: Store, store2: Store, clock: FakeClock) -> None:
    await store.upsert_extract_job("t1", 100, 1.0)
    job = await store.claim_job("extract", "A", 60)
    assert job is not None
    clock.advance(50)
    assert await store.renew_job(job, 60) is True
    clock.advance(50)
    assert await store2.claim_job("extract", "B", 60) is None
    clock.advance(11)
    assert await store2.claim_job("extract", "B", 60) is not None


async def test_failed_job_waits_for_retry_at_then_dies(store: Store, clock: FakeClock) -> None:
    await store.upsert_extract_job("t1", 100, 1.0)
    job = await store.claim_job("extract", "A", 60)
    assert job is not None
    assert await store.fail_job(job, "HTTP 500", clock.now() + 60, dead=False) is True
    got = await store.get_job("extract", "t1")
    assert got is not None
    assert (got.status, got.attempts, got.last_error, got.owner) == ("error", 1, "HTTP 500", None)
    assert await store.claim_job("extract", "A", 60) is None
    clock.advance(60)
    job = await store.claim_job("extract", "A", 60)
    assert job is not None and (job.attempts, job.token) == (2, 2)
    assert await store.fail_job(job, "HTTP 500 again", None, dead=True) is True
    got = await store.get_job("extract", "t1")
    assert got is not None and (got.status, got.retry_at) == ("dead", None)
    clock.advance(10 * 86400)
    assert await store.claim_job("extract", "A", 60) is None
    # The same input again does not revive a dead job.
    await store.upsert_extract_job("t1", 100, 1.0)
    assert (await store.get_job("extract", "t1")).status == "dead"  # type: ignore[union-attr]


async def test_retry_jobs_revives_dead_and_error_jobs(store: Store, clock: FakeClock) -> None:
    for key in ("a", "b", "c"):
        await store.upsert_extract_job(key, 100, 1.0)
    for key, dead in (("a", True), ("b", False)):
        job = await store.claim_job("extract", "A", 60)
        assert job is not None and job.key == key
        await store.fail_job(job, "x", clock.now() + 3600, dead=dead)
    assert await store.retry_jobs("a") == 1
    a = await store.get_job("extract", "a")
    assert a is not None and (a.status, a.attempts, a.last_error, a.retry_at) == (
        "pending", 0, None, None)
    assert (await store.get_job("extract", "b")).status == "error"  # type: ignore[union-attr]
    assert await store.retry_jobs() == 1  # b; c is pending, untouched
    assert [j.status for j in await store.list_jobs("extract")] == ["pending"] * 3


async def test_grown_thread_resets_attempts(store: Store, clock: FakeClock) -> None:
    await store.upsert_extract_job("t1", 100, 1.0)
    job = await store.claim_job("extract", "A", 60)
    assert job is not None
    await store.fail_job(job, "bad", clock.now() + 600, dead=False)
    same = await store.upsert_extract_job("t1", 100, 1.0)
    assert (same.status, same.attempts) == ("error", 1)
    grown = await store.upsert_extract_job("t1", 250, 2.0)
    assert (grown.status, grown.attempts, grown.retry_at, grown.last_error) == (
        "pending", 0, None, None)
    assert (grown.input_watermark, grown.priority) == (250, 2.0)
    assert await store.claim_job("extract", "A", 60) is not None  # no backoff left


async def test_done_job_is_left_until_the_thread_grows(store: Store) -> None:
    await add_thread(store, "t1")
    await store.upsert_extract_job("t1", 100, 1.0)
    job = await store.claim_job("extract", "A", 60)
    assert job is not None
    assert await store.finish_extract(job, make_memory("t1", watermark=100)) is True
    assert (await store.upsert_extract_job("t1", 100, 1.0)).status == "done"
    assert (await store.upsert_extract_job("t1", 90, 1.0)).status == "done"
    again = await store.upsert_extract_job("t1", 150, 1.0)
    assert (again.status, again.input_watermark, again.success_watermark) == ("pending", 150, 100)


async def test_thread_growing_while_running_requeues_after_finish(store: Store) -> None:
    await add_thread(store, "t1")
    await store.upsert_extract_job("t1", 100, 1.0)
    job = await store.claim_job("extract", "A", 60)
    assert job is not None
    during = await store.upsert_extract_job("t1", 300, 1.0)
    assert (during.status, during.owner, during.token) == ("running", "A", job.token)
    assert await store.finish_extract(job, make_memory("t1", watermark=100)) is True
    after = await store.get_job("extract", "t1")
    assert after is not None
    assert (after.status, after.attempts, after.success_watermark) == ("pending", 0, 100)
    assert (await store.get_memory("t1")).source_watermark == 100  # type: ignore[union-attr]


async def test_failure_after_growth_is_not_dead(store: Store, clock: FakeClock) -> None:
    await store.upsert_extract_job("t1", 100, 1.0)
    job = await store.claim_job("extract", "A", 60)
    assert job is not None
    await store.upsert_extract_job("t1", 300, 1.0)
    assert await store.fail_job(job, "gave up", None, dead=True) is True
    got = await store.get_job("extract", "t1")
    assert got is not None and (got.status, got.attempts) == ("error", 0)
    assert await store.claim_job("extract", "A", 60) is not None


async def test_release_job_does_not_count_the_attempt(store: Store) -> None:
    await store.upsert_extract_job("t1", 100, 1.0)
    job = await store.claim_job("extract", "A", 60)
    assert job is not None
    assert await store.release_job(job) is True
    got = await store.get_job("extract", "t1")
    assert got is not None and (got.status, got.attempts, got.owner) == ("pending", 0, None)
    assert await store.release_job(job) is False  # no longer running
    again = await store.claim_job("extract", "B", 60)
    assert again is not None and (again.attempts, again.token) == (1, 2)


async def test_finish_extract_validates_and_writes_nothing_on_error(store: Store) -> None:
    await store.upsert_extract_job("ghost", 100, 1.0)
    job = await store.claim_job("extract", "A", 60)
    assert job is not None
    with pytest.raises(ValueError):
        await store.finish_extract(job, make_memory("other"))
    # The thread row is missing: the memory's foreign key fails, the whole transaction rolls back.
    with capture_logs() as logs, pytest.raises(StoreError, match="finish_extract"):
        await store.finish_extract(job, make_memory("ghost"))
    assert [e["event"] for e in logs] == ["store_failed"]
    got = await store.get_job("extract", "ghost")
    assert got is not None and (got.status, got.owner) == ("running", "A")
    assert await store.get_project("/p") is None
    assert await store.get_memory("ghost") is None


async def test_list_jobs_filters(store: Store) -> None:
    await store.upsert_extract_job("a", 100, 1.0)
    await store.upsert_extract_job("b", 100, 2.0)
    await store.claim_job("extract", "A", 60)
    assert [j.key for j in await store.list_jobs()] == ["b", "a"]
    assert [j.key for j in await store.list_jobs(status="running")] == ["b"]
    assert [j.key for j in await store.list_jobs("extract", "pending")] == ["a"]
    assert await store.list_jobs("consolidate") == []


# ---------------------------------------------------------------------- memories and projects


async def finish(store: Store, thread_id: str, *, project: str = "/p", watermark: int = 100,
                 updated_at: float = 100.0) -> None:
    await add_thread(store, thread_id, project=project, updated_at=updated_at, watermark=watermark)
    await store.upsert_extract_job(thread_id, watermark, updated_at)
    job = await store.claim_job("extract", "W", 60)
    assert job is not None and job.key == thread_id
    assert await store.finish_extract(job, make_memory(thread_id, project=project,
                                                       watermark=watermark)) is True


async def test_memories_newest_source_first_and_delete_bumps_seq(store: Store) -> None:
    await finish(store, "old", updated_at=10.0)
    await finish(store, "new", updated_at=30.0)
    await finish(store, "mid", updated_at=20.0)
    await finish(store, "elsewhere", project="/q", updated_at=40.0)
    assert [m.thread_id for m in await store.list_memories("/p")] == ["new", "mid", "old"]
    assert await store.memory_watermarks() == {"old": 100, "new": 100, "mid": 100,
                                               "elsewhere": 100}
    assert (await store.get_project("/p")).memory_seq == 3  # type: ignore[union-attr]
    deleted = await store.delete_memory("mid")
    assert deleted is not None and deleted.path == "trace_summaries/mid.md"
    assert await store.delete_memory("mid") is None
    assert [m.thread_id for m in await store.list_memories("/p")] == ["new", "old"]
    assert (await store.get_project("/p")).memory_seq == 4  # type: ignore[union-attr]
    assert (await store.get_project("/q")).memory_seq == 1  # type: ignore[union-attr]


async def test_memory_moving_project_bumps_both(store: Store) -> None:
    await finish(store, "t1", project="/p", watermark=100)
    await store.upsert_extract_job("t1", 200, 1.0)
    job = await store.claim_job("extract", "W", 60)
    assert job is not None
    assert await store.finish_extract(job, make_memory("t1", project="/q", watermark=200))
    assert (await store.get_project("/p")).memory_seq == 2  # type: ignore[union-attr]
    assert (await store.get_project("/q")).memory_seq == 1  # type: ignore[union-attr]
    assert await store.list_memories("/p") == []


async def test_projects_due_follows_delay_interval_and_failures(
    store: Store, clock: FakeClock
) -> None:
    root = await store.ensure_project("/p", "/mem/p")
    assert (root.memory_root, root.memory_seq) == ("/mem/p", 0)
    assert await store.projects_due(120, 600) == []
    await finish(store, "t1")
    assert await store.projects_due(120, 600) == []  # quiet period not over
    clock.advance(120)
    due = await store.projects_due(120, 600)
    assert [(p.project, p.memory_seq, p.memory_root) for p in due] == [("/p", 1, "/mem/p")]

    owner = make_owner()
    token = await store.acquire_lease("consolidate:/p", owner, 600)
    assert token is not None
    assert await store.mark_consolidated("/p", 1, "consolidate:/p", owner, token) is True
    assert await store.projects_due(120, 600) == []
    consolidated_at = clock.now()

    clock.advance(10)
    await finish(store, "t2")
    clock.advance(120)
    assert await store.projects_due(120, 600) == []  # min interval since the last run
    clock.advance(600)
    assert [p.project for p in await store.projects_due(120, 600)] == ["/p"]

    await store.mark_consolidation_failed("/p", "consolidation command exited 1")
    p = await store.get_project("/p")
    assert p is not None
    assert (p.failures, p.last_error, p.last_consolidated_at) == (
        1, "consolidation command exited 1", consolidated_at)
    assert await store.projects_due(120, 600) == []  # a failing project does not spin
    clock.advance(600)
    assert [p.project for p in await store.projects_due(120, 600)] == ["/p"]
    # ensure_project again keeps the counters.
    again = await store.ensure_project("/p", "/mem/p2")
    assert (again.memory_root, again.memory_seq, again.failures) == ("/mem/p2", 2, 1)


async def test_memory_written_during_consolidation_keeps_project_due(
    store: Store, clock: FakeClock
) -> None:
    await finish(store, "t1")
    seq_at_start = (await store.get_project("/p")).memory_seq  # type: ignore[union-attr]
    token = await store.acquire_lease("consolidate:/p", "O", 600)
    assert token is not None
    await finish(store, "t2")  # lands while the subprocess runs
    assert await store.mark_consolidated("/p", seq_at_start, "consolidate:/p", "O", token)
    clock.advance(600)
    due = await store.projects_due(0, 600)
    assert [(p.memory_seq, p.consolidated_seq) for p in due] == [(2, 1)]


# ---------------------------------------------------------------------- usage, daemons, meta


async def test_usage_tokens_since(store: Store, clock: FakeClock) -> None:
    await store.record_usage("extract", "gpt-5", 1000, 200, 800)
    clock.advance(100)
    since = clock.now()
    await store.record_usage("consolidate", "gpt-5", 50, 5, 0)
    assert await store.tokens_since(since) == 55
    assert await store.tokens_since(since - 100) == 1255
    assert await store.tokens_since(since + 1) == 0


async def test_daemons_register_heartbeat_unregister(store: Store, clock: FakeClock) -> None:
    owner = make_owner()
    await store.register_daemon(owner, 1234, "box")
    clock.advance(30)
    assert await store.heartbeat_daemon(owner) is True
    assert await store.heartbeat_daemon("nobody") is False
    [d] = await store.list_daemons()
    assert (d.owner, d.pid, d.host, d.heartbeat_at - d.started_at, d.stopped_at) == (
        owner, 1234, "box", 30.0, None)
    assert await store.unregister_daemon(owner) is True
    [d] = await store.list_daemons()
    assert d.stopped_at == clock.now()
    clock.advance(8 * 86400)
    await store.register_daemon("other", 99, "box")
    assert [d.owner for d in await store.list_daemons()] == ["other"]  # week-old row pruned


async def test_meta_set_get_delete(store: Store) -> None:
    assert await store.get_meta("model_pause") is None
    await store.set_meta("model_pause", "auth: 401")
    await store.set_meta("model_pause", "auth: 403")
    assert await store.get_meta("model_pause") == "auth: 403"
    await store.set_meta("model_pause", None)
    assert await store.get_meta("model_pause") is None


async def test_counts(store: Store, clock: FakeClock) -> None:
    await finish(store, "done1")
    await add_thread(store, "exec1", eligible=False)
    await store.upsert_extract_job("p1", 100, 1.0)
    await store.upsert_extract_job("p2", 100, 0.5)
    job = await store.claim_job("extract", "A", 60)
    assert job is not None and job.key == "p1"
    job2 = await store.claim_job("extract", "A", 60)
    assert job2 is not None and job2.key == "p2"
    await store.fail_job(job2, "x", 1e12, dead=False)
    assert await store.queue_depth() == 1  # p2 waits for its retry_at
    c = await store.counts()
    assert (c.threads, c.eligible, c.memories, c.projects) == (2, 1, 1, 1)
    assert (c.jobs_pending, c.jobs_running, c.jobs_done, c.jobs_error, c.jobs_dead) == (
        0, 1, 1, 1, 0)


# ---------------------------------------------------------------------- locking

_HOLD_LOCK = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
conn.execute("INSERT INTO meta (key, value) VALUES ('holder', 'committed')")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("COMMIT")
conn.close()
print("released", flush=True)
"""


async def test_locked_database_gives_store_error_then_recovers(
    db_path: Path, clock: FakeClock
) -> None:
    s = await Store.open(db_path, clock=clock, busy_timeout_s=0.2)
    try:
        await s.record_usage("extract", "m", 10, 1, 0)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _HOLD_LOCK, str(db_path),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdin is not None and proc.stdout is not None
        try:
            assert (await proc.stdout.readline()).strip() == b"locked"
            with capture_logs() as logs, pytest.raises(StoreError, match="database is locked"):
                await s.record_usage("extract", "m", 20, 2, 0)
            assert [e["event"] for e in logs] == ["store_locked"]
            assert logs[0]["op"] == "record_usage" and logs[0]["busy_timeout_s"] == 0.2
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
            assert (await proc.stdout.readline()).strip() == b"released"
        finally:
            if proc.returncode is None:
                proc.stdin.close()
            assert await proc.wait() == 0
        # The connection is clean after the failure: the retry commits, nothing was lost.
        await s.record_usage("extract", "m", 20, 2, 0)
        assert await s.tokens_since(0) == 33
        assert await s.get_meta("holder") == "committed"
    finally:
        await s.close()


async def test_cancelled_operation_leaves_the_connection_clean(
    db_path: Path, clock: FakeClock
) -> None:
    s = await Store.open(db_path, clock=clock, busy_timeout_s=30)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _HOLD_LOCK, str(db_path),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdin is not None and proc.stdout is not None
        assert (await proc.stdout.readline()).strip() == b"locked"
        task = asyncio.create_task(s.record_usage("extract", "m", 1, 1, 0))
        await asyncio.sleep(0.1)  # let it queue BEGIN IMMEDIATE behind the lock (not timed)
        task.cancel()
        # The lock goes away while the cancelled BEGIN is still queued: the BEGIN then succeeds
        # on the connection's thread, and the store must roll it back.
        proc.stdin.write(b"go\n")
        await proc.stdin.drain()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await proc.wait() == 0
        await s.record_usage("extract", "m", 5, 5, 0)  # no "transaction within a transaction"
        assert await s.tokens_since(0) == 10
        assert await s.get_meta("holder") == "committed"
    finally:
        await s.close()


async def test_tasks_sharing_one_store_do_not_interleave_transactions(store: Store) -> None:
    for i in range(20):
        await store.upsert_extract_job(f"t{i}", 100, float(i))
    jobs = await asyncio.gather(*(store.claim_job("extract", f"w{i}", 60) for i in range(25)))
    claimed = [j.key for j in jobs if j is not None]
    assert sorted(claimed) == sorted(f"t{i}" for i in range(20))
