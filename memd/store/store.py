"""The state store: one async method per domain operation (SPEC §5).

Every method is self-contained: it takes the store's lock, runs its statements (a
read-modify-write inside one ``BEGIN IMMEDIATE`` transaction) and returns frozen records from
:mod:`memd.store.records`. No transaction is ever held across a caller's ``await``. Times are
epoch seconds (float, UTC) read from the injected :class:`~memd.clock.Clock`.

Fencing: a job claim and a lease acquisition each bump a monotonic ``token``. A holder is
identified by ``(owner, token)``; every write the claim/lease guards (finish, fail, release,
renew, ``mark_consolidated``) checks that pair inside its transaction and writes nothing when it
does not match. Expiry only makes a claim or lease *takeable*: an expired lease that nobody took
over can still be renewed or used by its holder (no one else can have run, since a takeover
bumps the token). A released lease has no owner, so its old token is refused.

Errors: every SQLite failure is raised as :class:`memd.errors.StoreError` (a database locked past
the busy timeout gives ``"database is locked ..."``), with one log event. If the awaiting task is
cancelled, the operation may or may not have committed; the cancellation completes once the
statement in flight ends (at most the busy timeout) and the connection is always left clean.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import secrets
import socket
import sqlite3
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import aiosqlite
import structlog

from memd.clock import Clock
from memd.errors import StoreError
from memd.store.db import open_db, store_error, user_version
from memd.store.records import (
    DaemonRecord,
    FileRecord,
    JobRecord,
    LeaseRecord,
    MemoryRecord,
    ProjectRecord,
    StoreCounts,
    ThreadRecord,
)

log = structlog.get_logger(__name__)

_R = TypeVar("_R")

#: Kind of a phase-1 job (key = thread id).
EXTRACT = "extract"
#: Kind of a phase-2 job (key = project key).
CONSOLIDATE = "consolidate"
#: Job statuses.
JOB_STATUSES = ("pending", "running", "done", "error", "dead")

_ERROR_MAX_CHARS = 2000
_DAEMON_KEEP_S = 7 * 24 * 3600.0


def make_owner() -> str:
    """Return a fresh owner string ``host:pid:random`` (8 hex chars) for jobs and leases."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def _thread(row: Mapping[str, Any]) -> ThreadRecord:
    values = {name: row[name] for name in _field_names(ThreadRecord)}
    values["eligible"] = bool(values["eligible"])
    return ThreadRecord(**values)


def _short(error: str) -> str:
    return error if len(error) <= _ERROR_MAX_CHARS else error[: _ERROR_MAX_CHARS - 1] + "…"


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _field_names(cls: type) -> tuple[str, ...]:
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


def _record(cls: type[_R], row: sqlite3.Row | Mapping[str, Any]) -> _R:
    """``cls.from_row(row)`` for a row that has every field (``SELECT *``), without looking
    the fields up again on every call."""
    return cls(**{name: row[name] for name in _field_names(cls)})


def _params(record: Any) -> dict[str, Any]:
    """A record's fields as SQL parameters (shallow: ``dataclasses.asdict`` deep-copies and is
    several times slower, which matters when indexing thousands of files)."""
    return {name: getattr(record, name) for name in _field_names(type(record))}


def _thread_params(thread: ThreadRecord, stats_json: str) -> dict[str, Any]:
    params = _params(thread)
    params["eligible"] = int(thread.eligible)
    params["stats"] = stats_json
    return params


class Store:
    """The SQLite state store. Create with :meth:`open`; close with :meth:`close` or ``async with``.

    One ``Store`` owns one aiosqlite connection; its methods may be called from many tasks (an
    :class:`asyncio.Lock` serialises them). Several ``Store`` objects — in one process or many —
    may share one file: SQLite's locks and the fencing tokens keep them consistent.
    """

    def __init__(self, conn: aiosqlite.Connection, *, path: Path, clock: Clock, busy_timeout_s: float) -> None:
        """Wrap an open, migrated connection. Use :meth:`open` instead."""
        self._conn: aiosqlite.Connection | None = conn
        self._path = path
        self._clock = clock
        self._busy_timeout_s = busy_timeout_s
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    async def open(cls, path: Path, *, clock: Clock, busy_timeout_s: float = 5.0) -> Store:
        """Open (creating and migrating if needed) the database file at ``path``.

        Creates the parent directory with mode 0700 and the file with mode 0600 when missing;
        sets WAL, ``synchronous=NORMAL``, ``foreign_keys=ON`` and the busy timeout; applies the
        migrations of :mod:`memd.store.schema` in one transaction.

        Args:
            path: the database file (e.g. ``state_dir/memd.sqlite3``).
            clock: the time source for every timestamp the store writes or compares.
            busy_timeout_s: how long an operation waits for another connection's lock, seconds.

        Raises:
            StoreError: unwritable path, not a database, written by a newer memd (schema
                version too high), or locked past the busy timeout.
        """
        path = Path(path)
        conn = await open_db(path, busy_timeout_s=busy_timeout_s)
        try:
            version = await user_version(conn)
        except sqlite3.Error as exc:
            await conn.close()
            raise store_error(exc, path=path, op="open", busy_timeout_s=busy_timeout_s) from exc
        log.debug("store_opened", path=str(path), schema_version=version)
        return cls(conn, path=path, clock=clock, busy_timeout_s=busy_timeout_s)

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return self._conn is None

    async def close(self) -> None:
        """Close the connection (idempotent); an open aiosqlite connection hangs exit."""
        conn, self._conn = self._conn, None
        if conn is not None:
            async with self._lock:
                await conn.close()

    async def __aenter__(self) -> Self:
        """Return the open store."""
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the store."""
        await self.close()

    # ------------------------------------------------------------------ plumbing

    def _connection(self) -> aiosqlite.Connection:
        if self._conn is None:
            raise StoreError(f"the store {self._path} is closed")
        return self._conn

    async def _rollback_quietly(self, conn: aiosqlite.Connection) -> None:
        # Queued after whatever is still in flight on the connection's thread (FIFO), so it also
        # undoes a BEGIN whose await was cancelled. "no transaction is active" is fine.
        try:
            await conn.execute("ROLLBACK")
        except (sqlite3.Error, ValueError):
            pass

    @asynccontextmanager
    async def _write(self, op: str) -> AsyncIterator[aiosqlite.Connection]:
        """Run the body inside ``BEGIN IMMEDIATE`` ... ``COMMIT`` (rolled back on any error)."""
        async with self._lock:
            conn = self._connection()
            try:
                try:
                    await conn.execute("BEGIN IMMEDIATE")
                    yield conn
                    await conn.execute("COMMIT")
                except BaseException:
                    await self._rollback_quietly(conn)
                    raise
            except sqlite3.Error as exc:
                raise store_error(exc, path=self._path, op=op, busy_timeout_s=self._busy_timeout_s) from exc

    @asynccontextmanager
    async def _read(self, op: str) -> AsyncIterator[aiosqlite.Connection]:
        """Run autocommit reads (each statement sees a consistent snapshot)."""
        async with self._lock:
            conn = self._connection()
            try:
                yield conn
            except sqlite3.Error as exc:
                raise store_error(exc, path=self._path, op=op, busy_timeout_s=self._busy_timeout_s) from exc

    @staticmethod
    async def _rows(
        conn: aiosqlite.Connection, sql: str, params: Mapping[str, Any] | Iterable[Any] = ()
    ) -> list[sqlite3.Row]:
        return list(await conn.execute_fetchall(sql, params))

    async def _one(
        self, conn: aiosqlite.Connection, sql: str, params: Mapping[str, Any] | Iterable[Any] = ()
    ) -> sqlite3.Row | None:
        rows = await self._rows(conn, sql, params)
        return rows[0] if rows else None

    # ------------------------------------------------------------------ files and threads

    _UPSERT_FILE = """
        INSERT INTO files (path, kind, dev, inode, size, mtime, offset, head_hash, thread_id, error)
        VALUES (:path, :kind, :dev, :inode, :size, :mtime, :offset, :head_hash, :thread_id, :error)
        ON CONFLICT(path) DO UPDATE SET
            kind = excluded.kind, dev = excluded.dev, inode = excluded.inode,
            size = excluded.size, mtime = excluded.mtime, offset = excluded.offset,
            head_hash = excluded.head_hash, thread_id = excluded.thread_id, error = excluded.error
    """

    _UPSERT_THREAD = """
        INSERT INTO threads (id, path, project, cwd, source, originator, cli_version,
            model, title, created_at, updated_at, watermark, user_messages,
            skipped_lines, eligible, reason, stats)
        VALUES (:id, :path, :project, :cwd, :source, :originator, :cli_version,
            :model, :title, :created_at, :updated_at, :watermark, :user_messages,
            :skipped_lines, :eligible, :reason, :stats)
        ON CONFLICT(id) DO UPDATE SET
            path = excluded.path, project = excluded.project, cwd = excluded.cwd,
            source = excluded.source, originator = excluded.originator,
            cli_version = excluded.cli_version, model = excluded.model,
            title = excluded.title, created_at = excluded.created_at,
            updated_at = excluded.updated_at, watermark = excluded.watermark,
            user_messages = excluded.user_messages,
            skipped_lines = excluded.skipped_lines, eligible = excluded.eligible,
            reason = excluded.reason, stats = excluded.stats
    """

    async def get_file(self, path: str) -> FileRecord | None:
        """Return the file record for ``path`` (absolute path string), or ``None``."""
        async with self._read("get_file") as conn:
            row = await self._one(conn, "SELECT * FROM files WHERE path = ?", (path,))
        return _record(FileRecord, row) if row else None

    async def get_files(self, paths: Iterable[str]) -> dict[str, FileRecord]:
        """Return the records of those ``paths`` that are known, keyed by path (one query)."""
        wanted = json.dumps(sorted(set(paths)))
        async with self._read("get_files") as conn:
            rows = await self._rows(
                conn,
                "SELECT * FROM files WHERE path IN (SELECT value FROM json_each(?))",
                (wanted,),
            )
        return {row["path"]: _record(FileRecord, row) for row in rows}

    async def all_files(self) -> dict[str, FileRecord]:
        """Return every known file, keyed by path."""
        async with self._read("all_files") as conn:
            rows = await self._rows(conn, "SELECT * FROM files ORDER BY path")
        return {row["path"]: _record(FileRecord, row) for row in rows}

    async def record_file(self, file: FileRecord) -> None:
        """Insert or replace the record of one file (keyed by ``file.path``)."""
        async with self._write("record_file") as conn:
            await conn.execute(self._UPSERT_FILE, _params(file))

    async def forget_file(self, path: str) -> bool:
        """Delete the record of ``path`` (its thread is kept). Returns whether it existed."""
        return await self.forget_files([path]) == 1

    async def forget_files(self, paths: Iterable[str]) -> int:
        """Delete the records of ``paths`` in one transaction (their threads are kept).

        Returns:
            How many of them existed.
        """
        wanted = json.dumps(sorted(set(paths)))
        async with self._write("forget_files") as conn:
            rows = await self._rows(
                conn,
                "DELETE FROM files WHERE path IN (SELECT value FROM json_each(?)) RETURNING 1",
                (wanted,),
            )
        return len(rows)

    async def record_thread(self, thread: ThreadRecord, stats_json: str, file: FileRecord) -> None:
        """Upsert a thread and the file it was read from, in one transaction.

        A thread seen at a new path (archived: moved to ``archived_sessions``) keeps its id and
        gets the new ``path``; the old path's file record is left to the reader
        (:meth:`forget_file`).

        Args:
            thread: the thread's metadata and watermark.
            stats_json: an opaque JSON string the indexer persists with the thread.
            file: the rollout file's record (its ``offset`` is normally ``thread.watermark``).
        """
        await self.record_threads([(thread, stats_json, file)])

    async def record_threads(
        self,
        threads: Sequence[tuple[ThreadRecord, str, FileRecord]],
        *,
        files: Sequence[FileRecord] = (),
    ) -> None:
        """Upsert many threads with their files, and files without a thread, in one transaction.

        The batch form of :meth:`record_thread` and :meth:`record_file` for the indexer: one
        ``BEGIN IMMEDIATE`` for the whole batch instead of one per file. Rows are written in
        order (``files`` first), so a later entry for the same path or thread id wins.

        Args:
            threads: ``(thread, stats_json, file)`` triples as for :meth:`record_thread`.
            files: file records without a thread (unreadable or not a session, with ``error``).
        """
        if not threads and not files:
            return
        file_rows = [_params(f) for f in files] + [_params(f) for _, _, f in threads]
        thread_rows = [_thread_params(t, stats) for t, stats, _ in threads]
        async with self._write("record_threads") as conn:
            await conn.executemany(self._UPSERT_FILE, file_rows)
            if thread_rows:
                await conn.executemany(self._UPSERT_THREAD, thread_rows)

    async def get_thread(self, thread_id: str) -> ThreadRecord | None:
        """Return the thread with id ``thread_id``, or ``None``."""
        async with self._read("get_thread") as conn:
            row = await self._one(conn, "SELECT * FROM threads WHERE id = ?", (thread_id,))
        return _thread(row) if row else None

    async def get_threads(self, thread_ids: Iterable[str]) -> dict[str, ThreadRecord]:
        """Return those of ``thread_ids`` that are known, keyed by id (one query)."""
        wanted = json.dumps(sorted(set(thread_ids)))
        async with self._read("get_threads") as conn:
            rows = await self._rows(
                conn,
                "SELECT * FROM threads WHERE id IN (SELECT value FROM json_each(?))",
                (wanted,),
            )
        return {row["id"]: _thread(row) for row in rows}

    async def get_thread_stats(self, thread_id: str) -> str | None:
        """Return the opaque stats JSON string stored with the thread, or ``None``."""
        async with self._read("get_thread_stats") as conn:
            row = await self._one(conn, "SELECT stats FROM threads WHERE id = ?", (thread_id,))
        return row["stats"] if row else None

    async def list_threads(self) -> list[ThreadRecord]:
        """Return every thread, most recent activity (``updated_at``) first."""
        async with self._read("list_threads") as conn:
            rows = await self._rows(conn, "SELECT * FROM threads ORDER BY updated_at DESC, id")
        return [_thread(row) for row in rows]

    # ------------------------------------------------------------------ jobs

    async def upsert_extract_job(self, thread_id: str, input_watermark: int, priority: float) -> JobRecord:
        """Make sure an extract job covers ``input_watermark`` bytes of the thread.

        - No job yet: create it ``pending``.
        - The job already covers it (``input_watermark`` or ``success_watermark`` ≥ the given
          one, e.g. done and up to date, or ``dead`` for this same input): left as is.
        - The thread grew: ``input_watermark`` and ``priority`` are updated and the job becomes
          ``pending`` with attempts, ``retry_at`` and ``last_error`` reset. A ``running`` job
          stays running (its holder is not disturbed); when it finishes short of the new
          watermark it goes back to ``pending`` (:meth:`finish_extract`).

        Args:
            thread_id: the thread (job key).
            input_watermark: bytes of the rollout the memory must cover.
            priority: claim order, highest first (pass the thread's ``updated_at``).

        Returns:
            The job as stored after the call.
        """
        now = self._clock.now()
        async with self._write("upsert_extract_job") as conn:
            await conn.execute(
                """
                INSERT INTO jobs (kind, key, status, input_watermark, priority,
                                  created_at, updated_at)
                VALUES (:kind, :key, 'pending', :wm, :priority, :now, :now)
                ON CONFLICT(kind, key) DO UPDATE SET
                    input_watermark = excluded.input_watermark,
                    priority = excluded.priority,
                    status = CASE WHEN jobs.status = 'running' THEN 'running' ELSE 'pending' END,
                    attempts = CASE WHEN jobs.status = 'running' THEN jobs.attempts ELSE 0 END,
                    retry_at = NULL,
                    last_error = NULL,
                    updated_at = excluded.updated_at
                WHERE excluded.input_watermark > MAX(jobs.input_watermark, jobs.success_watermark)
                """,
                {"kind": EXTRACT, "key": thread_id, "wm": input_watermark, "priority": priority, "now": now},
            )
            row = await self._one(conn, "SELECT * FROM jobs WHERE kind = ? AND key = ?", (EXTRACT, thread_id))
        assert row is not None
        return _record(JobRecord, row)

    async def get_job(self, kind: str, key: str) -> JobRecord | None:
        """Return the job ``(kind, key)``, or ``None``."""
        async with self._read("get_job") as conn:
            row = await self._one(conn, "SELECT * FROM jobs WHERE kind = ? AND key = ?", (kind, key))
        return _record(JobRecord, row) if row else None

    async def claim_job(
        self, kind: str, owner: str, lease_s: float, *, max_attempts: int | None = None
    ) -> JobRecord | None:
        """Claim the most urgent claimable job of ``kind`` for ``owner``.

        Claimable: ``pending`` or ``error`` with ``retry_at`` ≤ now (or unset), or ``running``
        with an expired ``lease_until`` (its worker stalled or died; event ``job_reclaimed``).
        Highest ``priority`` first, then oldest. In one ``BEGIN IMMEDIATE`` the job becomes
        ``running`` for ``owner`` with ``token + 1`` (the fencing token), ``lease_until`` =
        now + ``lease_s``, ``attempts + 1`` and ``started_at`` = now.

        Args:
            kind: ``extract`` or ``consolidate``.
            owner: the claimant (:func:`make_owner`).
            lease_s: how long the claim lasts without :meth:`renew_job`, seconds.
            max_attempts: when given, a stalled job that already used this many attempts is
                made ``dead`` instead of re-claimed (a job that kills its worker every time
                cannot loop forever; event ``job_dead_stalled``).

        Returns:
            The claimed job (carry it to the fenced calls), or ``None`` when nothing is due.
        """
        now = self._clock.now()
        async with self._write("claim_job") as conn:
            if max_attempts is not None:
                buried = await self._rows(
                    conn,
                    """
                    UPDATE jobs SET status = 'dead', owner = NULL, lease_until = NULL,
                        last_error = 'lease expired ' || attempts || ' times (worker lost)',
                        updated_at = :now
                    WHERE kind = :kind AND status = 'running'
                      AND COALESCE(lease_until, 0) <= :now AND attempts >= :max
                    RETURNING key, owner, attempts
                    """,
                    {"kind": kind, "now": now, "max": max_attempts},
                )
                for row in buried:
                    log.error("job_dead_stalled", kind=kind, key=row["key"], attempt=row["attempts"])
            candidate = await self._one(
                conn,
                """
                SELECT rowid, key, status, owner, token FROM jobs
                WHERE kind = :kind AND (
                    (status IN ('pending', 'error') AND COALESCE(retry_at, 0) <= :now)
                    OR (status = 'running' AND COALESCE(lease_until, 0) <= :now))
                ORDER BY priority DESC, created_at ASC, key ASC
                LIMIT 1
                """,
                {"kind": kind, "now": now},
            )
            if candidate is None:
                return None
            await conn.execute(
                """
                UPDATE jobs SET status = 'running', owner = :owner, token = token + 1,
                    lease_until = :until, attempts = attempts + 1, retry_at = NULL,
                    started_at = :now, updated_at = :now
                WHERE rowid = :rowid
                """,
                {"owner": owner, "until": now + lease_s, "now": now, "rowid": candidate["rowid"]},
            )
            # Not ``RETURNING *``: RETURNING skips REAL affinity (1.0 would come back as 1).
            row = await self._one(conn, "SELECT * FROM jobs WHERE rowid = ?", (candidate["rowid"],))
        assert row is not None
        job = _record(JobRecord, row)
        if candidate["status"] == "running":
            log.warning(
                "job_reclaimed",
                kind=kind,
                key=job.key,
                stale_owner=candidate["owner"],
                stale_token=candidate["token"],
                owner=owner,
                token=job.token,
                attempt=job.attempts,
            )
        return job

    async def renew_job(self, job: JobRecord, lease_s: float) -> bool:
        """Extend a claim to now + ``lease_s`` seconds.

        Returns:
            ``False`` when the claim was lost (another owner re-claimed it, or it was finished,
            failed or released): stop the work, nothing it writes will be accepted.
        """
        now = self._clock.now()
        async with self._write("renew_job") as conn:
            rows = await self._rows(
                conn,
                """
                UPDATE jobs SET lease_until = :until, updated_at = :now
                WHERE kind = :kind AND key = :key AND owner = :owner AND token = :token
                  AND status = 'running'
                RETURNING 1
                """,
                {"until": now + lease_s, "now": now, **self._fence(job)},
            )
        return bool(rows)

    @staticmethod
    def _fence(job: JobRecord) -> dict[str, Any]:
        return {"kind": job.kind, "key": job.key, "owner": job.owner, "token": job.token}

    def _refused(self, op: str, job: JobRecord) -> None:
        log.warning("job_fence_refused", op=op, kind=job.kind, key=job.key, owner=job.owner, token=job.token)

    async def finish_extract(self, job: JobRecord, memory: MemoryRecord) -> bool:
        """Commit a successful extraction, fenced by the claim (owner + token, still running).

        In one transaction: the memory row is upserted; the job becomes ``done`` with
        ``success_watermark = memory.source_watermark`` (or ``pending`` with attempts reset when
        the thread grew past that watermark meanwhile); the project's ``memory_seq`` is bumped
        and ``last_memory_at`` set (also the old project's, if the thread changed project).

        Args:
            job: the claimed extract job (from :meth:`claim_job`).
            memory: the new memory; ``memory.thread_id`` must equal ``job.key``. Its thread
                must exist in ``threads``.

        Returns:
            ``False``, writing nothing, when the claim was lost (event ``job_fence_refused``).

        Raises:
            ValueError: ``job`` is not the extract job of ``memory.thread_id``.
            StoreError: database failure (nothing written).
        """
        if job.kind != EXTRACT or job.key != memory.thread_id:
            raise ValueError(f"job {job.kind}/{job.key} does not match memory {memory.thread_id}")
        now = self._clock.now()
        async with self._write("finish_extract") as conn:
            rows = await self._rows(
                conn,
                """
                UPDATE jobs SET
                    status = CASE WHEN input_watermark <= :sw THEN 'done' ELSE 'pending' END,
                    attempts = CASE WHEN input_watermark <= :sw THEN attempts ELSE 0 END,
                    success_watermark = :sw, owner = NULL, lease_until = NULL, retry_at = NULL,
                    last_error = NULL, updated_at = :now
                WHERE kind = :kind AND key = :key AND owner = :owner AND token = :token
                  AND status = 'running'
                RETURNING status
                """,
                {"sw": memory.source_watermark, "now": now, **self._fence(job)},
            )
            if not rows:
                self._refused("finish_extract", job)
                return False
            old = await self._one(conn, "SELECT project FROM memories WHERE thread_id = ?", (memory.thread_id,))
            await conn.execute(
                """
                INSERT INTO memories (thread_id, project, path, trace_memory, summary,
                    source_watermark, generated_at, extractor, tokens_in, tokens_out)
                VALUES (:thread_id, :project, :path, :trace_memory, :summary,
                    :source_watermark, :generated_at, :extractor, :tokens_in, :tokens_out)
                ON CONFLICT(thread_id) DO UPDATE SET
                    project = excluded.project, path = excluded.path,
                    trace_memory = excluded.trace_memory, summary = excluded.summary,
                    source_watermark = excluded.source_watermark,
                    generated_at = excluded.generated_at, extractor = excluded.extractor,
                    tokens_in = excluded.tokens_in, tokens_out = excluded.tokens_out
                """,
                dataclasses.asdict(memory),
            )
            await self._bump_project(conn, memory.project, now)
            if old is not None and old["project"] != memory.project:
                await self._bump_project(conn, old["project"], now)
        return True

    async def fail_job(self, job: JobRecord, error: str, retry_at: float | None, dead: bool) -> bool:
        """Record a failed attempt, fenced by the claim (owner + token, still running).

        The job becomes ``error`` (claimable again at ``retry_at``; ``None`` = at once) or, with
        ``dead=True``, ``dead`` (never claimed again until :meth:`retry_jobs`). If the thread
        grew while the job ran, the failure concerned an old input: the job becomes ``error``
        with attempts reset even when ``dead`` was asked.

        Args:
            job: the claimed job.
            error: a one-line description (truncated to 2000 chars; never a secret).
            retry_at: when to retry (epoch s), computed by the caller's backoff.
            dead: the attempts are exhausted.

        Returns:
            ``False``, writing nothing, when the claim was lost.
        """
        now = self._clock.now()
        async with self._write("fail_job") as conn:
            rows = await self._rows(
                conn,
                """
                UPDATE jobs SET
                    status = CASE WHEN input_watermark > :claimed_wm THEN 'error'
                                  WHEN :dead THEN 'dead' ELSE 'error' END,
                    attempts = CASE WHEN input_watermark > :claimed_wm THEN 0 ELSE attempts END,
                    retry_at = CASE WHEN input_watermark > :claimed_wm
                                    THEN COALESCE(:retry_at, :now)
                                    WHEN :dead THEN NULL ELSE :retry_at END,
                    last_error = :error, owner = NULL, lease_until = NULL, updated_at = :now
                WHERE kind = :kind AND key = :key AND owner = :owner AND token = :token
                  AND status = 'running'
                RETURNING status
                """,
                {
                    "claimed_wm": job.input_watermark,
                    "dead": int(dead),
                    "retry_at": retry_at,
                    "error": _short(error),
                    "now": now,
                    **self._fence(job),
                },
            )
        if not rows:
            self._refused("fail_job", job)
        return bool(rows)

    async def release_job(self, job: JobRecord) -> bool:
        """Give a claimed job back (``pending``) without counting the attempt (shutdown).

        Returns:
            ``False``, writing nothing, when the claim was already lost.
        """
        now = self._clock.now()
        async with self._write("release_job") as conn:
            rows = await self._rows(
                conn,
                """
                UPDATE jobs SET status = 'pending', attempts = MAX(attempts - 1, 0),
                    owner = NULL, lease_until = NULL, updated_at = :now
                WHERE kind = :kind AND key = :key AND owner = :owner AND token = :token
                  AND status = 'running'
                RETURNING 1
                """,
                {"now": now, **self._fence(job)},
            )
        return bool(rows)

    async def retry_jobs(self, thread_id: str | None = None) -> int:
        """Make ``dead``/``error`` extract jobs ``pending`` with attempts 0 (``memd retry``).

        Args:
            thread_id: only this thread's job; ``None`` for all.

        Returns:
            How many jobs were reset.
        """
        now = self._clock.now()
        async with self._write("retry_jobs") as conn:
            rows = await self._rows(
                conn,
                """
                UPDATE jobs SET status = 'pending', attempts = 0, retry_at = NULL,
                    last_error = NULL, updated_at = :now
                WHERE kind = :kind AND status IN ('dead', 'error')
                  AND (:key IS NULL OR key = :key)
                RETURNING 1
                """,
                {"kind": EXTRACT, "key": thread_id, "now": now},
            )
        return len(rows)

    async def list_jobs(self, kind: str | None = None, status: str | None = None) -> list[JobRecord]:
        """Return jobs, optionally of one ``kind`` and/or ``status``, highest priority first."""
        async with self._read("list_jobs") as conn:
            rows = await self._rows(
                conn,
                """
                SELECT * FROM jobs
                WHERE (:kind IS NULL OR kind = :kind) AND (:status IS NULL OR status = :status)
                ORDER BY priority DESC, created_at ASC, key ASC
                """,
                {"kind": kind, "status": status},
            )
        return [_record(JobRecord, row) for row in rows]

    async def queue_depth(self) -> int:
        """Return how many extract jobs wait to run (``pending`` or ``error``), due or not."""
        async with self._read("queue_depth") as conn:
            row = await self._one(
                conn,
                "SELECT COUNT(*) FROM jobs WHERE kind = ? AND status IN ('pending', 'error')",
                (EXTRACT,),
            )
        return int(row[0]) if row else 0

    # ------------------------------------------------------------------ memories

    async def get_memory(self, thread_id: str) -> MemoryRecord | None:
        """Return the thread's memory, or ``None``."""
        async with self._read("get_memory") as conn:
            row = await self._one(conn, "SELECT * FROM memories WHERE thread_id = ?", (thread_id,))
        return _record(MemoryRecord, row) if row else None

    async def list_memories(self, project: str) -> list[MemoryRecord]:
        """Return the project's memories, newest source first.

        Ordered by the thread's last activity (``threads.updated_at``), then ``generated_at``.
        """
        async with self._read("list_memories") as conn:
            rows = await self._rows(
                conn,
                """
                SELECT m.* FROM memories AS m LEFT JOIN threads AS t ON t.id = m.thread_id
                WHERE m.project = ?
                ORDER BY COALESCE(t.updated_at, m.generated_at) DESC, m.generated_at DESC,
                         m.thread_id
                """,
                (project,),
            )
        return [_record(MemoryRecord, row) for row in rows]

    async def memory_watermarks(self) -> dict[str, int]:
        """Return ``{thread id: source_watermark}`` for every memory (scheduler, status)."""
        async with self._read("memory_watermarks") as conn:
            rows = await self._rows(conn, "SELECT thread_id, source_watermark FROM memories")
        return {row["thread_id"]: int(row["source_watermark"]) for row in rows}

    async def delete_memory(self, thread_id: str) -> MemoryRecord | None:
        """Delete the thread's memory row (``memd forget``) and bump its project's ``memory_seq``.

        The extract job is left as is (a ``done`` job is not re-extracted until the thread
        grows). The caller removes the trace file named by the returned record's ``path``.

        Returns:
            The deleted memory, or ``None`` if there was none.
        """
        now = self._clock.now()
        async with self._write("delete_memory") as conn:
            row = await self._one(conn, "SELECT * FROM memories WHERE thread_id = ?", (thread_id,))
            if row is not None:
                await conn.execute("DELETE FROM memories WHERE thread_id = ?", (thread_id,))
                await self._bump_project(conn, row["project"], now)
        return _record(MemoryRecord, row) if row else None

    # ------------------------------------------------------------------ projects

    @staticmethod
    async def _bump_project(conn: aiosqlite.Connection, project: str, now: float) -> None:
        await conn.execute(
            """
            INSERT INTO projects (project, memory_seq, last_memory_at) VALUES (?, 1, ?)
            ON CONFLICT(project) DO UPDATE SET
                memory_seq = projects.memory_seq + 1, last_memory_at = excluded.last_memory_at
            """,
            (project, now),
        )

    async def ensure_project(self, project: str, memory_root: str) -> ProjectRecord:
        """Create the project row if missing and set its ``memory_root`` (directory path).

        A project already recorded with that root costs one read (every extraction calls this).
        """
        async with self._read("ensure_project") as conn:
            row = await self._one(conn, "SELECT * FROM projects WHERE project = ?", (project,))
        if row is not None and row["memory_root"] == memory_root:
            return _record(ProjectRecord, row)
        async with self._write("ensure_project") as conn:
            await conn.execute(
                """
                INSERT INTO projects (project, memory_root) VALUES (?, ?)
                ON CONFLICT(project) DO UPDATE SET memory_root = excluded.memory_root
                """,
                (project, memory_root),
            )
            row = await self._one(conn, "SELECT * FROM projects WHERE project = ?", (project,))
        assert row is not None
        return _record(ProjectRecord, row)

    async def get_project(self, project: str) -> ProjectRecord | None:
        """Return the project's record, or ``None``."""
        async with self._read("get_project") as conn:
            row = await self._one(conn, "SELECT * FROM projects WHERE project = ?", (project,))
        return _record(ProjectRecord, row) if row else None

    async def list_projects(self) -> list[ProjectRecord]:
        """Return every project, by project key."""
        async with self._read("list_projects") as conn:
            rows = await self._rows(conn, "SELECT * FROM projects ORDER BY project")
        return [_record(ProjectRecord, row) for row in rows]

    async def projects_due(self, delay_s: float, min_interval_s: float) -> list[ProjectRecord]:
        """Return the projects whose consolidation is due (SPEC §7), longest-waiting first.

        Due: ``memory_seq > consolidated_seq`` (new or deleted memories since the last success),
        quiet for ``delay_s`` (now − ``last_memory_at`` ≥ ``delay_s``), and no attempt —
        success or failure — in the last ``min_interval_s`` seconds (a failing project cannot
        spin).
        """
        now = self._clock.now()
        async with self._read("projects_due") as conn:
            rows = await self._rows(
                conn,
                """
                SELECT * FROM projects
                WHERE memory_seq > consolidated_seq
                  AND last_memory_at IS NOT NULL AND :now - last_memory_at >= :delay
                  AND (last_attempt_at IS NULL OR :now - last_attempt_at >= :interval)
                ORDER BY last_memory_at ASC, project
                """,
                {"now": now, "delay": delay_s, "interval": min_interval_s},
            )
        return [_record(ProjectRecord, row) for row in rows]

    async def mark_consolidated(self, project: str, seq: int, lease_name: str, owner: str, token: int) -> bool:
        """Record a successful consolidation, fenced by the lease ``lease_name``.

        In one transaction: if the lease is held by ``(owner, token)``, set
        ``consolidated_seq = max(consolidated_seq, seq)``, ``last_consolidated_at`` and
        ``last_attempt_at`` to now, and clear ``failures``/``last_error``.

        Args:
            project: the project key.
            seq: the project's ``memory_seq`` read before the consolidation started (memories
                written meanwhile keep the project due).
            lease_name: e.g. ``consolidate:<project>``.
            owner, token: the lease holder, from :meth:`acquire_lease`.

        Returns:
            ``False``, writing nothing, when the lease was lost (event ``lease_fence_refused``)
            or the project is unknown.
        """
        now = self._clock.now()
        async with self._write("mark_consolidated") as conn:
            if not await self._holds(conn, lease_name, owner, token):
                log.warning(
                    "lease_fence_refused",
                    op="mark_consolidated",
                    lease=lease_name,
                    owner=owner,
                    token=token,
                    project=project,
                )
                return False
            rows = await self._rows(
                conn,
                """
                UPDATE projects SET consolidated_seq = MAX(consolidated_seq, :seq),
                    last_consolidated_at = :now, last_attempt_at = :now, failures = 0,
                    last_error = NULL
                WHERE project = :project
                RETURNING 1
                """,
                {"seq": seq, "now": now, "project": project},
            )
        return bool(rows)

    async def mark_consolidation_failed(self, project: str, error: str) -> None:
        """Record a failed consolidation: ``last_error``, ``failures + 1``, ``last_attempt_at``.

        The project stays due and is retried after ``min_interval_s`` (:meth:`projects_due`).
        """
        now = self._clock.now()
        async with self._write("mark_consolidation_failed") as conn:
            await conn.execute(
                """
                UPDATE projects SET last_error = ?, failures = failures + 1, last_attempt_at = ?
                WHERE project = ?
                """,
                (_short(error), now, project),
            )

    # ------------------------------------------------------------------ leases

    @staticmethod
    async def _holds(conn: aiosqlite.Connection, name: str, owner: str, token: int) -> bool:
        rows = await conn.execute_fetchall(
            "SELECT 1 FROM leases WHERE name = ? AND owner = ? AND token = ?", (name, owner, token)
        )
        return bool(list(rows))

    async def acquire_lease(self, name: str, owner: str, ttl_s: float) -> int | None:
        """Take the lease ``name`` for ``ttl_s`` seconds if it is free, released or expired.

        One upsert: a new row starts at token 1; an existing row is taken only when its owner
        is ``NULL`` (released) or ``expires_at`` ≤ now, and its token is bumped (monotonic across
        owners, never reset). A lease its owner still holds is *not* re-acquired (use
        :meth:`renew_lease`).

        Returns:
            The new fencing token, or ``None`` when someone else holds the lease.
        """
        now = self._clock.now()
        async with self._write("acquire_lease") as conn:
            row = await self._one(
                conn,
                """
                INSERT INTO leases (name, owner, token, expires_at, heartbeat_at)
                VALUES (:name, :owner, 1, :expires, :now)
                ON CONFLICT(name) DO UPDATE SET
                    owner = excluded.owner, token = leases.token + 1,
                    expires_at = excluded.expires_at, heartbeat_at = excluded.heartbeat_at
                WHERE leases.owner IS NULL OR leases.expires_at <= :now
                RETURNING token
                """,
                {"name": name, "owner": owner, "expires": now + ttl_s, "now": now},
            )
        return int(row["token"]) if row else None

    async def renew_lease(self, name: str, owner: str, token: int, ttl_s: float) -> bool:
        """Extend the lease to now + ``ttl_s`` if ``(owner, token)`` still holds it.

        An expired lease that nobody took over can still be renewed (a takeover bumps the
        token, so a match proves nobody else held it meanwhile).

        Returns:
            ``False`` when the lease was lost (taken over or released): stop the guarded work.
        """
        now = self._clock.now()
        async with self._write("renew_lease") as conn:
            rows = await self._rows(
                conn,
                """
                UPDATE leases SET expires_at = :expires, heartbeat_at = :now
                WHERE name = :name AND owner = :owner AND token = :token
                RETURNING 1
                """,
                {"expires": now + ttl_s, "now": now, "name": name, "owner": owner, "token": token},
            )
        return bool(rows)

    async def release_lease(self, name: str, owner: str, token: int) -> bool:
        """Release the lease held by ``(owner, token)``: owner cleared, expired now, row and token
        kept (the next holder gets ``token + 1``).

        Returns:
            ``False`` when ``(owner, token)`` no longer held it (nothing changed).
        """
        now = self._clock.now()
        async with self._write("release_lease") as conn:
            rows = await self._rows(
                conn,
                """
                UPDATE leases SET owner = NULL, expires_at = :now
                WHERE name = :name AND owner = :owner AND token = :token
                RETURNING 1
                """,
                {"now": now, "name": name, "owner": owner, "token": token},
            )
        return bool(rows)

    async def check_lease(self, name: str, owner: str, token: int) -> bool:
        """Return whether ``(owner, token)`` still holds the lease ``name`` (fencing check)."""
        async with self._read("check_lease") as conn:
            return await self._holds(conn, name, owner, token)

    async def get_lease(self, name: str) -> LeaseRecord | None:
        """Return the lease row ``name``, or ``None`` if it was never acquired."""
        async with self._read("get_lease") as conn:
            row = await self._one(conn, "SELECT * FROM leases WHERE name = ?", (name,))
        return _record(LeaseRecord, row) if row else None

    async def list_leases(self) -> list[LeaseRecord]:
        """Return every lease row (held, expired or released), by name."""
        async with self._read("list_leases") as conn:
            rows = await self._rows(conn, "SELECT * FROM leases ORDER BY name")
        return [_record(LeaseRecord, row) for row in rows]

    # ------------------------------------------------------------------ usage

    async def record_usage(
        self, phase: str, model: str, input_tokens: int, output_tokens: int, cached_tokens: int
    ) -> None:
        """Record one model request's token usage at now.

        Args:
            phase: ``extract`` or ``consolidate``.
            model: the model name.
            input_tokens, output_tokens: as reported by the endpoint.
            cached_tokens: the part of ``input_tokens`` served from the prompt cache.
        """
        now = self._clock.now()
        async with self._write("record_usage") as conn:
            await conn.execute(
                """
                INSERT INTO usage (at, phase, model, input_tokens, output_tokens, cached_tokens)
                VALUES (?, ?, ?, ?, ?, ?)
                """,
                (now, phase, model, input_tokens, output_tokens, cached_tokens),
            )

    async def tokens_since(self, since: float) -> int:
        """Return input + output tokens of the requests at or after ``since`` (epoch s)."""
        async with self._read("tokens_since") as conn:
            row = await self._one(
                conn,
                "SELECT COALESCE(SUM(input_tokens + output_tokens), 0) FROM usage WHERE at >= ?",
                (since,),
            )
        return int(row[0]) if row else 0

    # ------------------------------------------------------------------ daemons

    async def register_daemon(self, owner: str, pid: int, host: str) -> None:
        """Record a daemon start (``started_at`` = ``heartbeat_at`` = now).

        Rows whose last heartbeat is older than 7 days are pruned.
        """
        now = self._clock.now()
        async with self._write("register_daemon") as conn:
            await conn.execute("DELETE FROM daemons WHERE heartbeat_at < ?", (now - _DAEMON_KEEP_S,))
            await conn.execute(
                """
                INSERT INTO daemons (owner, pid, host, started_at, heartbeat_at, stopped_at)
                VALUES (?, ?, ?, ?, ?, NULL)
                ON CONFLICT(owner) DO UPDATE SET pid = excluded.pid, host = excluded.host,
                    started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at,
                    stopped_at = NULL
                """,
                (owner, pid, host, now, now),
            )

    async def heartbeat_daemon(self, owner: str) -> bool:
        """Set the daemon's ``heartbeat_at`` to now. Returns whether it is registered."""
        now = self._clock.now()
        async with self._write("heartbeat_daemon") as conn:
            rows = await self._rows(
                conn,
                "UPDATE daemons SET heartbeat_at = ? WHERE owner = ? RETURNING 1",
                (now, owner),
            )
        return bool(rows)

    async def unregister_daemon(self, owner: str) -> bool:
        """Mark the daemon stopped (``stopped_at`` = now). Returns whether it was registered."""
        now = self._clock.now()
        async with self._write("unregister_daemon") as conn:
            rows = await self._rows(
                conn,
                "UPDATE daemons SET stopped_at = ? WHERE owner = ? RETURNING 1",
                (now, owner),
            )
        return bool(rows)

    async def list_daemons(self) -> list[DaemonRecord]:
        """Return the registered daemons, most recently started first."""
        async with self._read("list_daemons") as conn:
            rows = await self._rows(conn, "SELECT * FROM daemons ORDER BY started_at DESC, owner")
        return [_record(DaemonRecord, row) for row in rows]

    # ------------------------------------------------------------------ meta and status

    async def get_meta(self, key: str) -> str | None:
        """Return the meta value for ``key``, or ``None``."""
        async with self._read("get_meta") as conn:
            row = await self._one(conn, "SELECT value FROM meta WHERE key = ?", (key,))
        return row["value"] if row else None

    async def set_meta(self, key: str, value: str | None) -> None:
        """Set the meta value for ``key``; ``None`` deletes it."""
        async with self._write("set_meta") as conn:
            if value is None:
                await conn.execute("DELETE FROM meta WHERE key = ?", (key,))
            else:
                await conn.execute(
                    "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (key, value),
                )

    async def counts(self) -> StoreCounts:
        """Return totals for ``memd status`` (one consistent snapshot)."""
        async with self._read("counts") as conn:
            row = await self._one(
                conn,
                """
                SELECT
                    (SELECT COUNT(*) FROM threads) AS threads,
                    (SELECT COUNT(*) FROM threads WHERE eligible) AS eligible,
                    (SELECT COUNT(*) FROM memories) AS memories,
                    (SELECT COUNT(*) FROM projects) AS projects,
                    (SELECT COUNT(*) FROM jobs WHERE status = 'pending') AS jobs_pending,
                    (SELECT COUNT(*) FROM jobs WHERE status = 'running') AS jobs_running,
                    (SELECT COUNT(*) FROM jobs WHERE status = 'done') AS jobs_done,
                    (SELECT COUNT(*) FROM jobs WHERE status = 'error') AS jobs_error,
                    (SELECT COUNT(*) FROM jobs WHERE status = 'dead') AS jobs_dead
                """,
            )
        assert row is not None
        return _record(StoreCounts, row)
