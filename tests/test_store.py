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
from memd.rollout.project import Ineligible
from memd.store.records import FileRecord, JobRecord, MemoryRecord, ThreadRecord
from memd.store.schema import LATEST_VERSION
from memd.store.store import Store, make_owner


def make_file(path: str, thread_id: str | None = None, offset: int = 100) -> FileRecord:
    return FileRecord(
        path=path, kind="codex", dev=1, inode=hash(path) & 0xFFFF, size=offset, mtime=1.5,
        watermark=offset, head_hash="ab" * 32, thread_id=thread_id,
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
        reason=None if eligible else Ineligible.parse("source:exec"),
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
    await store.threads.record(thread, "{}", make_file(thread.path, thread_id, thread.watermark))
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
    conn = store._db._connection()
    assert (await conn.execute_fetchall("PRAGMA synchronous"))[0][0] == 1  # NORMAL
    assert (await conn.execute_fetchall("PRAGMA foreign_keys"))[0][0] == 1
    assert (await conn.execute_fetchall("PRAGMA busy_timeout"))[0][0] == 5000
    assert conn.isolation_level is None


async def test_reopen_is_a_noop_and_keeps_data(db_path: Path, clock: FakeClock) -> None:
    async with await Store.open(db_path, clock=clock) as s:
        await s.meta.set("extractor", "offline")
    with capture_logs() as logs:
        async with await Store.open(db_path, clock=clock) as s:
            assert await s.meta.get("extractor") == "offline"
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
    # An existing database is backed up before any migration (SPEC §5).
    assert [e["event"] for e in logs] == ["store_backed_up", "store_failed"]
    assert list(db_path.parent.glob("memd.sqlite3.backup-*"))
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
        await store.meta.get("x")


def test_split_statements_keeps_comments_with_their_statement() -> None:
    parts = db.split_statements("-- a\nCREATE TABLE a (x);\nCREATE TABLE b (y TEXT DEFAULT ';');\n")
    assert parts == ["-- a\nCREATE TABLE a (x);", "CREATE TABLE b (y TEXT DEFAULT ';');"]
    with pytest.raises(ValueError):
        db.split_statements("CREATE TABLE a (x)")


# ---------------------------------------------------------------------- files and threads


async def test_record_thread_stores_thread_file_and_stats(store: Store) -> None:
    thread = make_thread("t1", eligible=False)
    file = make_file(thread.path, "t1", 4096)
    await store.threads.record(thread, '{"turns": 3}', file)
    got = await store.threads.get("t1")
    assert got == thread
    assert got is not None and got.eligible is False
    assert await store.threads.get_file(thread.path) == file
    assert await store.threads.stats("t1") == '{"turns": 3}'
    assert await store.threads.get("nope") is None
    assert await store.threads.stats("nope") is None


async def test_archived_thread_keeps_its_id_and_takes_the_new_path(store: Store) -> None:
    await add_thread(store, "t1", path="/s/sessions/t1.jsonl", watermark=100)
    moved = make_thread("t1", path="/s/archived_sessions/t1.jsonl", watermark=120)
    await store.threads.record(moved, "{}", make_file(moved.path, "t1", 120))
    threads = await store.threads.list_all()
    assert [(t.id, t.path, t.watermark) for t in threads] == [
        ("t1", "/s/archived_sessions/t1.jsonl", 120)
    ]
    files = await store.threads.all_files()
    assert set(files) == {"/s/sessions/t1.jsonl", "/s/archived_sessions/t1.jsonl"}
    assert await store.threads.forget_file("/s/sessions/t1.jsonl") is True
    assert await store.threads.forget_file("/s/sessions/t1.jsonl") is False
    assert set(await store.threads.all_files()) == {"/s/archived_sessions/t1.jsonl"}


async def test_record_file_upserts_and_list_threads_is_newest_first(store: Store) -> None:
    await store.threads.record_file(make_file("/s/a.jsonl", None, 10))
    await store.threads.record_file(make_file("/s/a.jsonl", "ta", 20))
    got = await store.threads.get_file("/s/a.jsonl")
    assert got is not None and (got.watermark, got.thread_id) == (20, "ta")
    await add_thread(store, "old", updated_at=10.0)
    await add_thread(store, "new", updated_at=30.0)
    await add_thread(store, "mid", updated_at=20.0)
    assert [t.id for t in await store.threads.list_all()] == ["new", "mid", "old"]


async def test_record_threads_writes_a_batch_in_one_transaction(store: Store) -> None:
    threads = [make_thread(f"t{i}", updated_at=float(i)) for i in range(5)]
    batch = [
        (t, f'{{"n": {i}}}', make_file(t.path, t.id, t.watermark)) for i, t in enumerate(threads)
    ]
    empty = dataclasses.replace(make_file("/s/empty.jsonl", None, 0), error="empty_file")
    await store.threads.record_many(batch, files=[empty])
    assert [t.id for t in await store.threads.list_all()] == ["t4", "t3", "t2", "t1", "t0"]
    assert await store.threads.stats("t3") == '{"n": 3}'
    files = await store.threads.all_files()
    assert set(files) == {t.path for t in threads} | {"/s/empty.jsonl"}
    assert files["/s/empty.jsonl"] == empty
    # Rows are written in order: a later entry for the same thread id wins.
    moved = make_thread("t0", path="/s/archived/t0.jsonl", watermark=7)
    moved_file = make_file(moved.path, "t0", 7)
    await store.threads.record_many([(threads[0], "{}", batch[0][2]), (moved, "{}", moved_file)])
    got = await store.threads.get("t0")
    assert got is not None and (got.path, got.watermark) == ("/s/archived/t0.jsonl", 7)
    await store.threads.record_many([])  # nothing to write: no transaction, no error


async def test_batch_lookups_and_forget_files(store: Store) -> None:
    for i in range(3):
        await add_thread(store, f"t{i}")
    got = await store.threads.get_many(["t0", "t2", "missing", "t2"])
    assert set(got) == {"t0", "t2"} and got["t2"] == make_thread("t2")
    assert await store.threads.get_many([]) == {}
    files = await store.threads.get_files(["/s/t1.jsonl", "/s/nope.jsonl"])
    assert list(files) == ["/s/t1.jsonl"] and files["/s/t1.jsonl"].thread_id == "t1"
    assert await store.threads.forget_files(["/s/t0.jsonl", "/s/t1.jsonl", "/s/nope.jsonl"]) == 2
    assert set(await store.threads.all_files()) == {"/s/t2.jsonl"}
    assert {t.id for t in await store.threads.list_all()} == {"t0", "t1", "t2"}  # threads are kept


async def test_ensure_project_is_idempotent_and_updates_the_root(store: Store) -> None:
    first = await store.projects.ensure("/p", "/mem/a")
    again = await store.projects.ensure("/p", "/mem/a")
    assert first == again and first.memory_root == "/mem/a"
    moved = await store.projects.ensure("/p", "/mem/b")
    assert moved.memory_root == "/mem/b"
    assert (await store.projects.get("/p")) == moved


# ---------------------------------------------------------------------- jobs


async def test_claim_order_is_newest_first(store: Store) -> None:
    for thread_id, prio in [("a", 10.0), ("c", 30.0), ("b", 20.0)]:
        await store.jobs.upsert_extract(thread_id, 100, prio)
    claimed = []
    while (job := await store.jobs.claim("extract", "w", 60)) is not None:
        claimed.append(job)
    assert [j.key for j in claimed] == ["c", "b", "a"]
    assert all(j.status == "running" and j.fencing_token == 1 and j.attempts == 1 for j in claimed)
    assert await store.jobs.claim("consolidate", "w", 60) is None


async def test_two_connections_claim_each_job_once(store: Store, store2: Store) -> None:
    keys = {f"t{i:02d}" for i in range(30)}
    for i, key in enumerate(sorted(keys)):
        await store.jobs.upsert_extract(key, 100, float(i))

    async def drain(s: Store, owner: str) -> list[JobRecord]:
        got = []
        while (job := await s.jobs.claim("extract", owner, 60)) is not None:
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
    await store.jobs.upsert_extract("t1", 100, 1.0)
    stale = await store.jobs.claim("extract", "A", 60)
    assert stale is not None
    assert await store2.jobs.claim("extract", "B", 60) is None  # lease still valid
    clock.advance(61)
    with capture_logs() as logs:
        fresh = await store2.jobs.claim("extract", "B", 60)
    assert fresh is not None and fresh.key == "t1"
    assert (fresh.fencing_token, fresh.attempts, fresh.owner) == (2, 2, "B")
    assert [e["event"] for e in logs] == ["job_reclaimed"]
    assert logs[0]["stale_owner"] == "A"

    assert await store.jobs.finish_extract(stale, make_memory("t1")) is False
    assert await store.jobs.renew(stale, 60) is False
    assert await store.jobs.fail(stale, "boom", None, dead=True) is False
    assert await store.jobs.release(stale) is False
    assert await store.memories.get("t1") is None
    assert await store.projects.get("/p") is None
    job = await store.jobs.get("extract", "t1")
    assert job is not None and (job.status, job.owner, job.fencing_token) == ("running", "B", 2)

    assert await store2.jobs.finish_extract(fresh, make_memory("t1", watermark=100)) is True
    job = await store.jobs.get("extract", "t1")
    assert job is not None and (job.status, job.success_watermark, job.owner) == ("done", 100, None)
    memory = await store.memories.get("t1")
    assert memory is not None and memory.trace_memory == "# memory of t1"
    project = await store.projects.get("/p")
    assert project is not None and (project.memory_seq, project.last_memory_at) == (1, clock.now())


async def test_job_that_keeps_killing_its_worker_goes_dead(
    store: Store, clock: FakeClock
) -> None:
    await store.jobs.upsert_extract("poison", 100, 2.0)
    await store.jobs.upsert_extract("fine", 100, 1.0)
    for attempt in (1, 2, 3):
        job = await store.jobs.claim("extract", f"w{attempt}", 60, max_attempts=3)
        assert job is not None and (job.key, job.attempts) == ("poison", attempt)
        clock.advance(61)  # the worker died: no finish, no fail
    with capture_logs() as logs:
        job = await store.jobs.claim("extract", "w4", 60, max_attempts=3)
    assert job is not None and job.key == "fine"
    assert [(e["event"], e["key"]) for e in logs] == [("job_dead_stalled", "poison")]
    dead = await store.jobs.get("extract", "poison")
    assert dead is not None and (dead.status, dead.owner) == ("dead", None)
    assert dead.last_error == "lease expired 3 times (worker lost)"


async def test_renew_job_keeps_the_claim(store: Store, store2: Store, clock: FakeClock) -> None:
    await store.jobs.upsert_extract("t1", 100, 1.0)
    job = await store.jobs.claim("extract", "A", 60)
    assert job is not None
    clock.advance(50)
    assert await store.jobs.renew(job, 60) is True
    clock.advance(50)
    assert await store2.jobs.claim("extract", "B", 60) is None
    clock.advance(11)
    assert await store2.jobs.claim("extract", "B", 60) is not None


async def test_failed_job_waits_for_retry_at_then_dies(store: Store, clock: FakeClock) -> None:
    await store.jobs.upsert_extract("t1", 100, 1.0)
    job = await store.jobs.claim("extract", "A", 60)
    assert job is not None
    assert await store.jobs.fail(job, "HTTP 500", clock.now() + 60, dead=False) is True
    got = await store.jobs.get("extract", "t1")
    assert got is not None
    assert (got.status, got.attempts, got.last_error, got.owner) == ("error", 1, "HTTP 500", None)
    assert await store.jobs.claim("extract", "A", 60) is None
    clock.advance(60)
    job = await store.jobs.claim("extract", "A", 60)
    assert job is not None and (job.attempts, job.fencing_token) == (2, 2)
    assert await store.jobs.fail(job, "HTTP 500 again", None, dead=True) is True
    got = await store.jobs.get("extract", "t1")
    assert got is not None and (got.status, got.retry_at) == ("dead", None)
    clock.advance(10 * 86400)
    assert await store.jobs.claim("extract", "A", 60) is None
    # The same input again does not revive a dead job.
    await store.jobs.upsert_extract("t1", 100, 1.0)
    assert (await store.jobs.get("extract", "t1")).status == "dead"  # type: ignore[union-attr]


async def test_retry_jobs_revives_dead_and_error_jobs(store: Store, clock: FakeClock) -> None:
    for key in ("a", "b", "c"):
        await store.jobs.upsert_extract(key, 100, 1.0)
    for key, dead in (("a", True), ("b", False)):
        job = await store.jobs.claim("extract", "A", 60)
        assert job is not None and job.key == key
        await store.jobs.fail(job, "x", clock.now() + 3600, dead=dead)
    assert await store.jobs.retry("a") == 1
    a = await store.jobs.get("extract", "a")
    assert a is not None and (a.status, a.attempts, a.last_error, a.retry_at) == (
        "pending", 0, None, None)
    assert (await store.jobs.get("extract", "b")).status == "error"  # type: ignore[union-attr]
    assert await store.jobs.retry() == 1  # b; c is pending, untouched
    assert [j.status for j in await store.jobs.list_all("extract")] == ["pending"] * 3


async def test_grown_thread_resets_attempts(store: Store, clock: FakeClock) -> None:
    await store.jobs.upsert_extract("t1", 100, 1.0)
    job = await store.jobs.claim("extract", "A", 60)
    assert job is not None
    await store.jobs.fail(job, "bad", clock.now() + 600, dead=False)
    same = await store.jobs.upsert_extract("t1", 100, 1.0)
    assert (same.status, same.attempts) == ("error", 1)
    grown = await store.jobs.upsert_extract("t1", 250, 2.0)
    assert (grown.status, grown.attempts, grown.retry_at, grown.last_error) == (
        "pending", 0, None, None)
    assert (grown.input_watermark, grown.priority) == (250, 2.0)
    assert await store.jobs.claim("extract", "A", 60) is not None  # no backoff left


async def test_done_job_is_left_until_the_thread_grows(store: Store) -> None:
    await add_thread(store, "t1")
    await store.jobs.upsert_extract("t1", 100, 1.0)
    job = await store.jobs.claim("extract", "A", 60)
    assert job is not None
    assert await store.jobs.finish_extract(job, make_memory("t1", watermark=100)) is True
    assert (await store.jobs.upsert_extract("t1", 100, 1.0)).status == "done"
    assert (await store.jobs.upsert_extract("t1", 90, 1.0)).status == "done"
    again = await store.jobs.upsert_extract("t1", 150, 1.0)
    assert (again.status, again.input_watermark, again.success_watermark) == ("pending", 150, 100)


async def test_thread_growing_while_running_requeues_after_finish(store: Store) -> None:
    await add_thread(store, "t1")
    await store.jobs.upsert_extract("t1", 100, 1.0)
    job = await store.jobs.claim("extract", "A", 60)
    assert job is not None
    during = await store.jobs.upsert_extract("t1", 300, 1.0)
    assert (during.status, during.owner, during.fencing_token) == ("running", "A", job.fencing_token)
    assert await store.jobs.finish_extract(job, make_memory("t1", watermark=100)) is True
    after = await store.jobs.get("extract", "t1")
    assert after is not None
    assert (after.status, after.attempts, after.success_watermark) == ("pending", 0, 100)
    assert (await store.memories.get("t1")).source_watermark == 100  # type: ignore[union-attr]


async def test_failure_after_growth_is_not_dead(store: Store, clock: FakeClock) -> None:
    await store.jobs.upsert_extract("t1", 100, 1.0)
    job = await store.jobs.claim("extract", "A", 60)
    assert job is not None
    await store.jobs.upsert_extract("t1", 300, 1.0)
    assert await store.jobs.fail(job, "gave up", None, dead=True) is True
    got = await store.jobs.get("extract", "t1")
    assert got is not None and (got.status, got.attempts) == ("error", 0)
    assert await store.jobs.claim("extract", "A", 60) is not None


async def test_release_job_does_not_count_the_attempt(store: Store) -> None:
    await store.jobs.upsert_extract("t1", 100, 1.0)
    job = await store.jobs.claim("extract", "A", 60)
    assert job is not None
    assert await store.jobs.release(job) is True
    got = await store.jobs.get("extract", "t1")
    assert got is not None and (got.status, got.attempts, got.owner) == ("pending", 0, None)
    assert await store.jobs.release(job) is False  # no longer running
    again = await store.jobs.claim("extract", "B", 60)
    assert again is not None and (again.attempts, again.fencing_token) == (1, 2)


async def test_finish_extract_validates_and_writes_nothing_on_error(store: Store) -> None:
    await store.jobs.upsert_extract("ghost", 100, 1.0)
    job = await store.jobs.claim("extract", "A", 60)
    assert job is not None
    with pytest.raises(ValueError):
        await store.jobs.finish_extract(job, make_memory("other"))
    # The thread row is missing: the memory's foreign key fails, the whole transaction rolls back.
    with capture_logs() as logs, pytest.raises(StoreError, match="finish_extract"):
        await store.jobs.finish_extract(job, make_memory("ghost"))
    assert [e["event"] for e in logs] == ["store_failed"]
    got = await store.jobs.get("extract", "ghost")
    assert got is not None and (got.status, got.owner) == ("running", "A")
    assert await store.projects.get("/p") is None
    assert await store.memories.get("ghost") is None


async def test_list_jobs_filters(store: Store) -> None:
    await store.jobs.upsert_extract("a", 100, 1.0)
    await store.jobs.upsert_extract("b", 100, 2.0)
    await store.jobs.claim("extract", "A", 60)
    assert [j.key for j in await store.jobs.list_all()] == ["b", "a"]
    assert [j.key for j in await store.jobs.list_all(status="running")] == ["b"]
    assert [j.key for j in await store.jobs.list_all("extract", "pending")] == ["a"]
    assert await store.jobs.list_all("consolidate") == []


# ---------------------------------------------------------------------- memories and projects


async def finish(store: Store, thread_id: str, *, project: str = "/p", watermark: int = 100,
                 updated_at: float = 100.0) -> None:
    await add_thread(store, thread_id, project=project, updated_at=updated_at, watermark=watermark)
    await store.jobs.upsert_extract(thread_id, watermark, updated_at)
    job = await store.jobs.claim("extract", "W", 60)
    assert job is not None and job.key == thread_id
    assert await store.jobs.finish_extract(job, make_memory(thread_id, project=project,
                                                       watermark=watermark)) is True


async def test_memories_newest_source_first_and_delete_bumps_seq(store: Store) -> None:
    await finish(store, "old", updated_at=10.0)
    await finish(store, "new", updated_at=30.0)
    await finish(store, "mid", updated_at=20.0)
    await finish(store, "elsewhere", project="/q", updated_at=40.0)
    assert [m.thread_id for m in await store.memories.list_for_project("/p")] == ["new", "mid", "old"]
    assert await store.memories.watermarks() == {"old": 100, "new": 100, "mid": 100,
                                               "elsewhere": 100}
    assert (await store.projects.get("/p")).memory_seq == 3  # type: ignore[union-attr]
    deleted = await store.memories.delete("mid")
    assert deleted is not None and deleted.path == "trace_summaries/mid.md"
    assert await store.memories.delete("mid") is None
    assert [m.thread_id for m in await store.memories.list_for_project("/p")] == ["new", "old"]
    assert (await store.projects.get("/p")).memory_seq == 4  # type: ignore[union-attr]
    assert (await store.projects.get("/q")).memory_seq == 1  # type: ignore[union-attr]


async def test_memory_moving_project_bumps_both(store: Store) -> None:
    await finish(store, "t1", project="/p", watermark=100)
    await store.jobs.upsert_extract("t1", 200, 1.0)
    job = await store.jobs.claim("extract", "W", 60)
    assert job is not None
    assert await store.jobs.finish_extract(job, make_memory("t1", project="/q", watermark=200))
    assert (await store.projects.get("/p")).memory_seq == 2  # type: ignore[union-attr]
    assert (await store.projects.get("/q")).memory_seq == 1  # type: ignore[union-attr]
    assert await store.memories.list_for_project("/p") == []


async def test_projects_due_follows_delay_interval_and_failures(
    store: Store, clock: FakeClock
) -> None:
    root = await store.projects.ensure("/p", "/mem/p")
    assert (root.memory_root, root.memory_seq) == ("/mem/p", 0)
    assert await store.projects.due(120, 600) == []
    await finish(store, "t1")
    assert await store.projects.due(120, 600) == []  # quiet period not over
    clock.advance(120)
    due = await store.projects.due(120, 600)
    assert [(p.project, p.memory_seq, p.memory_root) for p in due] == [("/p", 1, "/mem/p")]

    owner = make_owner()
    token = await store.leases.acquire("consolidate:/p", owner, 600)
    assert token is not None
    assert await store.projects.mark_consolidated("/p", 1, "consolidate:/p", owner, token) is True
    assert await store.projects.due(120, 600) == []
    consolidated_at = clock.now()

    clock.advance(10)
    await finish(store, "t2")
    clock.advance(120)
    assert await store.projects.due(120, 600) == []  # min interval since the last run
    clock.advance(600)
    assert [p.project for p in await store.projects.due(120, 600)] == ["/p"]

    assert await store.projects.mark_failed("/p", "consolidation command exited 1", "consolidate:/p", owner, token)
    p = await store.projects.get("/p")
    assert p is not None
    assert (p.failures, p.last_error, p.last_consolidated_at) == (
        1, "consolidation command exited 1", consolidated_at)
    assert await store.projects.due(120, 600) == []  # a failing project does not spin
    clock.advance(600)
    assert [p.project for p in await store.projects.due(120, 600)] == ["/p"]
    # ensure_project again keeps the counters.
    again = await store.projects.ensure("/p", "/mem/p2")
    assert (again.memory_root, again.memory_seq, again.failures) == ("/mem/p2", 2, 1)


async def test_a_failure_under_a_lost_lease_is_not_recorded(store: Store, clock: FakeClock) -> None:
    await finish(store, "t1")
    old = await store.leases.acquire("consolidate:/p", "A", 60)
    assert old is not None
    clock.advance(61)  # A's lease expired; B takes over and succeeds
    new = await store.leases.acquire("consolidate:/p", "B", 60)
    assert new is not None and new > old
    assert await store.projects.mark_consolidated("/p", 1, "consolidate:/p", "B", new)
    before = await store.projects.get("/p")
    assert not await store.projects.mark_failed("/p", "exit_code 1", "consolidate:/p", "A", old)
    assert not await store.projects.mark_failed("/p", "exit_code 1", "consolidate:/p", "B", old)
    assert await store.projects.get("/p") == before
    assert await store.projects.mark_failed("/p", "exit_code 1", "consolidate:/p", "B", new)
    after = await store.projects.get("/p")
    assert after is not None and (after.failures, after.last_error) == (1, "exit_code 1")


async def test_memory_written_during_consolidation_keeps_project_due(
    store: Store, clock: FakeClock
) -> None:
    await finish(store, "t1")
    seq_at_start = (await store.projects.get("/p")).memory_seq  # type: ignore[union-attr]
    token = await store.leases.acquire("consolidate:/p", "O", 600)
    assert token is not None
    await finish(store, "t2")  # lands while the subprocess runs
    assert await store.projects.mark_consolidated("/p", seq_at_start, "consolidate:/p", "O", token)
    clock.advance(600)
    due = await store.projects.due(0, 600)
    assert [(p.memory_seq, p.consolidated_seq) for p in due] == [(2, 1)]


# ---------------------------------------------------------------------- usage, daemons, meta


async def test_usage_tokens_since(store: Store, clock: FakeClock) -> None:
    await store.usage.record_usage("extract", "gpt-5", 1000, 200, 800)
    clock.advance(100)
    since = clock.now()
    await store.usage.record_usage("consolidate", "gpt-5", 50, 5, 0)
    assert await store.usage.tokens_since(since) == 55
    assert await store.usage.tokens_since(since - 100) == 1255
    assert await store.usage.tokens_since(since + 1) == 0


async def test_daemons_register_heartbeat_unregister(store: Store, clock: FakeClock) -> None:
    owner = make_owner()
    await store.daemons.register(owner, 1234, "box")
    clock.advance(30)
    assert await store.daemons.heartbeat(owner) is True
    assert await store.daemons.heartbeat("nobody") is False
    [d] = await store.daemons.list_all()
    assert (d.owner, d.pid, d.host, d.heartbeat_at - d.started_at, d.stopped_at) == (
        owner, 1234, "box", 30.0, None)
    assert await store.daemons.unregister(owner) is True
    [d] = await store.daemons.list_all()
    assert d.stopped_at == clock.now()
    clock.advance(8 * 86400)
    await store.daemons.register("other", 99, "box")
    assert [d.owner for d in await store.daemons.list_all()] == ["other"]  # week-old row pruned


async def test_meta_set_get_delete(store: Store) -> None:
    assert await store.meta.get("model_pause") is None
    await store.meta.set("model_pause", "auth: 401")
    await store.meta.set("model_pause", "auth: 403")
    assert await store.meta.get("model_pause") == "auth: 403"
    await store.meta.set("model_pause", None)
    assert await store.meta.get("model_pause") is None


async def test_counts(store: Store, clock: FakeClock) -> None:
    await finish(store, "done1")
    await add_thread(store, "exec1", eligible=False)
    await store.jobs.upsert_extract("p1", 100, 1.0)
    await store.jobs.upsert_extract("p2", 100, 0.5)
    job = await store.jobs.claim("extract", "A", 60)
    assert job is not None and job.key == "p1"
    job2 = await store.jobs.claim("extract", "A", 60)
    assert job2 is not None and job2.key == "p2"
    await store.jobs.fail(job2, "x", 1e12, dead=False)
    assert await store.jobs.queue_depth() == 1  # p2 waits for its retry_at
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
        await s.usage.record_usage("extract", "m", 10, 1, 0)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _HOLD_LOCK, str(db_path),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdin is not None and proc.stdout is not None
        try:
            assert (await proc.stdout.readline()).strip() == b"locked"
            with capture_logs() as logs, pytest.raises(StoreError, match="database is locked"):
                await s.usage.record_usage("extract", "m", 20, 2, 0)
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
        await s.usage.record_usage("extract", "m", 20, 2, 0)
        assert await s.usage.tokens_since(0) == 33
        assert await s.meta.get("holder") == "committed"
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
        task = asyncio.create_task(s.usage.record_usage("extract", "m", 1, 1, 0))
        await asyncio.sleep(0.1)  # let it queue BEGIN IMMEDIATE behind the lock (not timed)
        task.cancel()
        # The lock goes away while the cancelled BEGIN is still queued: the BEGIN then succeeds
        # on the connection's thread, and the store must roll it back.
        proc.stdin.write(b"go\n")
        await proc.stdin.drain()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await proc.wait() == 0
        await s.usage.record_usage("extract", "m", 5, 5, 0)  # no "transaction within a transaction"
        assert await s.usage.tokens_since(0) == 10
        assert await s.meta.get("holder") == "committed"
    finally:
        await s.close()


async def test_tasks_sharing_one_store_do_not_interleave_transactions(store: Store) -> None:
    for i in range(20):
        await store.jobs.upsert_extract(f"t{i}", 100, float(i))
    jobs = await asyncio.gather(*(store.jobs.claim("extract", f"w{i}", 60) for i in range(25)))
    claimed = [j.key for j in jobs if j is not None]
    assert sorted(claimed) == sorted(f"t{i}" for i in range(20))


async def test_forget_ends_the_extract_job_and_fences_out_a_running_claim(store: Store) -> None:
    await add_thread(store, "running")
    await store.jobs.upsert_extract("running", 100, 2.0)
    job = await store.jobs.claim("extract", "W", 60)
    assert job is not None and job.key == "running"
    await add_thread(store, "queued")
    await store.jobs.upsert_extract("queued", 100, 1.0)

    assert await store.threads.mark_forgotten("running") and await store.threads.mark_forgotten("queued")

    assert await store.jobs.finish_extract(job, make_memory("running")) is False
    assert await store.memories.get("running") is None
    ended = await store.jobs.get("extract", "running")
    assert ended is not None and (ended.status, ended.last_error, ended.owner) == ("dead", "forgotten", None)
    assert ended.fencing_token == job.fencing_token + 1
    assert await store.jobs.claim("extract", "W", 60) is None  # the queued one is dead too
    assert await store.jobs.retry() == 0 and await store.jobs.retry("queued") == 0


async def test_finishing_the_extraction_of_a_forgotten_thread_writes_nothing(store: Store) -> None:
    """A thread indexed as forgotten (its tombstone read into a rebuilt database) whose job still
    ran: the commit is refused and the job ends dead."""
    thread = dataclasses.replace(make_thread("gone"), eligible=False, reason=Ineligible.parse("forgotten"))
    await store.threads.record(thread, "{}", make_file(thread.path, "gone", 100))
    await store.jobs.upsert_extract("gone", 100, 1.0)
    job = await store.jobs.claim("extract", "W", 60)
    assert job is not None
    assert await store.jobs.finish_extract(job, make_memory("gone")) is False
    assert await store.memories.get("gone") is None
    assert (await store.jobs.get("extract", "gone")).status == "dead"  # type: ignore[union-attr]
