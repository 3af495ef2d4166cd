"""The threads repository: rollout files and the sessions they hold (tables ``files``, ``threads``).

The indexer's aggregate (SPEC §3.3, §5): a file record carries the watermark the reader reached,
and a thread is written together with the file it was read from, in one transaction.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

from memd.rollout.project import FORGOTTEN, Ineligible
from memd.store.db import Database
from memd.store.records import (
    FileRecord,
    JobKind,
    PlanBacklog,
    PlanCandidate,
    ProjectActivity,
    ThreadRecord,
    ThreadStatus,
)

_UPSERT_FILE = """
    INSERT INTO files (path, kind, dev, inode, size, mtime, watermark, head_hash, thread_id, error)
    VALUES (:path, :kind, :dev, :inode, :size, :mtime, :watermark, :head_hash, :thread_id, :error)
    ON CONFLICT(path) DO UPDATE SET
        kind = excluded.kind, dev = excluded.dev, inode = excluded.inode,
        size = excluded.size, mtime = excluded.mtime, watermark = excluded.watermark,
        head_hash = excluded.head_hash, thread_id = excluded.thread_id, error = excluded.error
"""

#: ``:plan_bump`` is 1 when the write records a change of the rollout (the scheduler must look at
#: the thread again), 0 when it records what the scheduler itself read (catch-up).
_UPSERT_THREAD = """
    INSERT INTO threads (id, path, project, cwd, source, originator, cli_version,
        model, title, created_at, updated_at, watermark, user_messages,
        skipped_lines, eligible, reason, agent, stats, plan_pending)
    VALUES (:id, :path, :project, :cwd, :source, :originator, :cli_version,
        :model, :title, :created_at, :updated_at, :watermark, :user_messages,
        :skipped_lines, :eligible, :reason, :agent, :stats, :plan_bump)
    ON CONFLICT(id) DO UPDATE SET
        plan_pending = threads.plan_pending + excluded.plan_pending,
        path = excluded.path, project = excluded.project, cwd = excluded.cwd,
        source = excluded.source, originator = excluded.originator,
        cli_version = excluded.cli_version, model = excluded.model,
        title = excluded.title, created_at = excluded.created_at,
        updated_at = excluded.updated_at, watermark = excluded.watermark,
        user_messages = excluded.user_messages,
        skipped_lines = excluded.skipped_lines, eligible = excluded.eligible,
        reason = excluded.reason, agent = excluded.agent, stats = excluded.stats
"""

#: A thread as the indexer writes it: the record, its opaque stats JSON, and its file.
ThreadWrite = tuple[ThreadRecord, str, FileRecord]


#: A thread with its extract job and memory (:class:`ThreadStatus`), newest activity first, after
#: the keyset cursor ``(:after_at, :after_id)`` (``NULL`` = from the start).
_THREAD_STATUS = """
    SELECT t.*, j.status AS job_status, j.attempts AS job_attempts, j.last_error AS job_last_error,
           m.source_watermark AS memory_watermark
    FROM threads AS t
    LEFT JOIN jobs AS j ON j.kind = :kind AND j.key = t.id
    LEFT JOIN memories AS m ON m.thread_id = t.id
    WHERE {where} (:after_at IS NULL OR (t.updated_at, t.id) < (:after_at, :after_id))
    ORDER BY t.updated_at DESC, t.id DESC
    LIMIT :limit
"""

#: Planning reads only changed threads, through the partial index ``threads_plan`` (schema
#: version 8): those past the idle gate and within the age limit, ...
_PLAN_CANDIDATES = """
    SELECT * FROM threads INDEXED BY threads_plan
    WHERE plan_pending > 0 AND updated_at BETWEEN :after AND :before
    ORDER BY updated_at DESC, id DESC
    LIMIT :limit
"""
#: ... the next page: those after the previous page's last (keyset on last activity, then id).
_PLAN_CANDIDATES_AFTER = """
    SELECT * FROM threads INDEXED BY threads_plan
    WHERE plan_pending > 0 AND updated_at BETWEEN :after AND :before
      AND (updated_at < :cursor_updated_at OR (updated_at = :cursor_updated_at AND id < :cursor_id))
    ORDER BY updated_at DESC, id DESC
    LIMIT :limit
"""
#: ... those still inside the idle gate (how many, and the earliest last activity) ...
_PLAN_WAITING = (
    "SELECT COUNT(*) AS n, MIN(updated_at) AS first FROM threads WHERE plan_pending > 0 AND updated_at > :before"
)
#: ... and those older than the age limit.
_PLAN_TOO_OLD = "SELECT COUNT(*) FROM threads WHERE plan_pending > 0 AND updated_at < :after"

#: ``memd forget`` ends the thread's extract job: dead, unclaimed, its fencing token bumped.
_END_FORGOTTEN_JOB = """
    UPDATE jobs SET status = 'dead', owner = NULL, lease_until = NULL, retry_at = NULL,
        fencing_token = fencing_token + 1, last_error = 'forgotten'
    WHERE kind = :kind AND key = :key
"""

#: A keyset cursor over threads: ``(updated_at, id)`` of the last row of a page.
ThreadCursor = tuple[float, str]


def _json_list(values: Iterable[str]) -> str:
    """A JSON array of the distinct values, for ``IN (SELECT value FROM json_each(?))``."""
    return json.dumps(sorted(set(values)))


class ThreadRepository:
    """Files and threads. Built by :class:`~memd.store.store.Store`; see :class:`Database` for errors.

    Args:
        db: the database.
    """

    def __init__(self, db: Database) -> None:
        self._db = db

    # ------------------------------------------------------------------ files

    async def get_file(self, path: str) -> FileRecord | None:
        """Return the file record for ``path`` (absolute path string), or ``None``."""
        async with self._db.read("get_file") as tx:
            row = await tx.one("SELECT * FROM files WHERE path = ?", (path,))
        return FileRecord.from_row(row) if row else None

    async def get_files(self, paths: Iterable[str]) -> dict[str, FileRecord]:
        """Return the records of those ``paths`` that are known, keyed by path (one query)."""
        async with self._db.read("get_files") as tx:
            rows = await tx.rows(
                "SELECT * FROM files WHERE path IN (SELECT value FROM json_each(?))", (_json_list(paths),)
            )
        return {row["path"]: FileRecord.from_row(row) for row in rows}

    async def all_files(self) -> dict[str, FileRecord]:
        """Return every known file, keyed by path."""
        async with self._db.read("all_files") as tx:
            rows = await tx.rows("SELECT * FROM files ORDER BY path")
        return {row["path"]: FileRecord.from_row(row) for row in rows}

    async def file_stamps(self) -> dict[str, tuple[int, int, int, float]]:
        """Return ``{path: (dev, inode, size, mtime)}`` of every known file: what the periodic
        reconcile compares with a fresh ``stat`` (plain tuples: at 20,000 files a record each
        would cost as much as the query). A file whose last read failed (``error`` starts with
        ``unreadable``) has size -1, so it never compares equal and is read again."""
        async with self._db.read("file_stamps") as tx:
            rows = await tx.rows(
                "SELECT path, dev, inode, CASE WHEN error LIKE 'unreadable%' THEN -1 ELSE size END, mtime FROM files"
            )
        return {row[0]: (row[1], row[2], row[3], row[4]) for row in rows}

    async def record_file(self, file: FileRecord) -> None:
        """Insert or replace the record of one file (keyed by ``file.path``)."""
        async with self._db.write("record_file") as tx:
            await tx.execute(_UPSERT_FILE, file.params())

    async def forget_file(self, path: str) -> bool:
        """Delete the record of ``path`` (its thread is kept). Returns whether it existed."""
        return await self.forget_files([path]) == 1

    async def forget_files(self, paths: Iterable[str]) -> int:
        """Delete the records of ``paths`` in one transaction (their threads are kept).

        Returns:
            How many of them existed.
        """
        async with self._db.write("forget_files") as tx:
            rows = await tx.rows(
                "DELETE FROM files WHERE path IN (SELECT value FROM json_each(?)) RETURNING 1", (_json_list(paths),)
            )
        return len(rows)

    # ------------------------------------------------------------------ threads

    async def record(self, thread: ThreadRecord, stats_json: str, file: FileRecord, *, changed: bool = True) -> None:
        """Upsert a thread and the file it was read from, in one transaction.

        A thread seen at a new path (archived: moved to ``archived_sessions``) keeps its id and
        gets the new ``path``; the old path's file record is left to the reader
        (:meth:`forget_file`).

        Args:
            thread: the thread's metadata and watermark.
            stats_json: an opaque JSON string the indexer persists with the thread.
            file: the rollout file's record (its ``watermark`` is normally ``thread.watermark``).
            changed: the write records a change of the rollout, so the scheduler looks at the
                thread again (``plan_pending`` + 1); ``False`` for what the scheduler's own
                catch-up read.
        """
        await self.record_many([(thread, stats_json, file)], changed=changed)

    async def record_many(
        self, threads: Sequence[ThreadWrite], *, files: Sequence[FileRecord] = (), changed: bool = True
    ) -> None:
        """Upsert many threads with their files, and files without a thread, in one transaction.

        The batch form of :meth:`record` and :meth:`record_file` for the indexer: one
        ``BEGIN IMMEDIATE`` for the whole batch instead of one per file. Rows are written in
        order (``files`` first), so a later entry for the same path or thread id wins.

        Args:
            threads: ``(thread, stats_json, file)`` triples as for :meth:`record`.
            files: file records without a thread (unreadable or not a session, with ``error``).
            changed: see :meth:`record`.
        """
        if not threads and not files:
            return
        file_rows = [f.params() for f in files] + [f.params() for _, _, f in threads]
        thread_rows = [{**t.params(stats), "plan_bump": int(changed)} for t, stats, _ in threads]
        async with self._db.write("record_threads") as tx:
            await tx.executemany(_UPSERT_FILE, file_rows)
            if thread_rows:
                await tx.executemany(_UPSERT_THREAD, thread_rows)

    async def get(self, thread_id: str) -> ThreadRecord | None:
        """Return the thread with id ``thread_id``, or ``None``."""
        async with self._db.read("get_thread") as tx:
            row = await tx.one("SELECT * FROM threads WHERE id = ?", (thread_id,))
        return ThreadRecord.from_row(row) if row else None

    async def get_many(self, thread_ids: Iterable[str]) -> dict[str, ThreadRecord]:
        """Return those of ``thread_ids`` that are known, keyed by id (one query)."""
        async with self._db.read("get_threads") as tx:
            rows = await tx.rows(
                "SELECT * FROM threads WHERE id IN (SELECT value FROM json_each(?))", (_json_list(thread_ids),)
            )
        return {row["id"]: ThreadRecord.from_row(row) for row in rows}

    async def stats(self, thread_id: str) -> str | None:
        """Return the opaque stats JSON string stored with the thread, or ``None``."""
        async with self._db.read("get_thread_stats") as tx:
            row = await tx.one("SELECT stats FROM threads WHERE id = ?", (thread_id,))
        return str(row["stats"]) if row else None

    async def count(self) -> int:
        """Return how many threads are known (one index count)."""
        async with self._db.read("count_threads") as tx:
            return int(await tx.scalar("SELECT COUNT(*) FROM threads"))

    async def list_all(self) -> list[ThreadRecord]:
        """Return every thread, most recent activity (``updated_at``) first."""
        async with self._db.read("list_threads") as tx:
            rows = await tx.rows("SELECT * FROM threads ORDER BY updated_at DESC, id")
        return [ThreadRecord.from_row(row) for row in rows]

    async def mark_forgotten(self, thread_id: str, reason: Ineligible = FORGOTTEN) -> bool:
        """Make a thread ineligible for good (``memd forget``): ``eligible = 0`` and ``reason``.

        In the same transaction its extract job ends: ``dead`` (``last_error`` ``forgotten``), its
        claim dropped and its fencing token bumped, so a queued or retrying job is never claimed
        and a running one is fenced out (its commit writes nothing).

        Returns:
            Whether the thread exists.
        """
        async with self._db.write("mark_forgotten") as tx:
            rows = await tx.rows(
                "UPDATE threads SET eligible = 0, reason = ? WHERE id = ? RETURNING 1", (str(reason), thread_id)
            )
            await tx.execute(_END_FORGOTTEN_JOB, {"kind": JobKind.EXTRACT, "key": thread_id})
        return bool(rows)

    async def status_page(
        self, *, after: ThreadCursor | None = None, limit: int = 500, project: str | None = None
    ) -> list[ThreadStatus]:
        """One page of threads with their extract job and memory, newest activity first.

        Pages are read by keyset (each call is one short query), so listing every thread holds at
        most one page in memory however long the history.

        Args:
            after: the cursor of the previous page's last row (``(updated_at, id)``), ``None``
                for the first page.
            limit: rows per page.
            project: only this project's threads.
        """
        where = "t.project = :project AND" if project is not None else ""
        params = {
            "kind": JobKind.EXTRACT,
            "after_at": after[0] if after else None,
            "after_id": after[1] if after else None,
            "limit": limit,
            "project": project,
        }
        async with self._db.read("thread_status_page") as tx:
            rows = await tx.rows(_THREAD_STATUS.format(where=where), params)
        return [ThreadStatus.from_row(row) for row in rows]

    async def recent_projects(self, limit: int) -> list[ProjectActivity]:
        """The ``limit`` projects whose threads were active most recently, most recent first.

        One pass over the ``(project, updated_at)`` index, never over the threads themselves.
        """
        async with self._db.read("recent_projects") as tx:
            rows = await tx.rows(
                """
                SELECT project, COUNT(*) AS threads, MAX(updated_at) AS last_active_at
                FROM threads GROUP BY project ORDER BY last_active_at DESC, project LIMIT ?
                """,
                (limit,),
            )
        return [ProjectActivity.from_row(row) for row in rows]

    async def project_activity(self, project: str) -> ProjectActivity | None:
        """The project's thread count and last activity, or ``None`` when it has no thread."""
        async with self._db.read("project_activity") as tx:
            row = await tx.one(
                """
                SELECT project, COUNT(*) AS threads, MAX(updated_at) AS last_active_at
                FROM threads WHERE project = ? GROUP BY project
                """,
                (project,),
            )
        return ProjectActivity.from_row(row) if row else None

    # ------------------------------------------------------------------ planning (SPEC §15)

    async def plan_candidates(
        self,
        *,
        ready_before: float,
        active_after: float,
        limit: int = -1,
        after: PlanCandidate | None = None,
    ) -> list[PlanCandidate]:
        """The threads whose rollout changed since they were last planned and whose last activity
        lies in ``[active_after, ready_before]`` (past the idle gate, within the age limit), newest
        first — read through the ``threads_plan`` index, never by walking every thread.

        Args:
            ready_before: the idle gate's cut-off (now − ``min_idle_s``), epoch s.
            active_after: the age limit's cut-off (now − ``max_age_days``; 0 for no limit).
            limit: at most this many (a page; negative: all).
            after: the last candidate of the previous page (keyset paging on last activity, id).
        """
        params = {
            "after": active_after,
            "before": ready_before,
            "limit": limit,
            "cursor_updated_at": after.thread.updated_at if after else None,
            "cursor_id": after.thread.id if after else None,
        }
        async with self._db.read("plan_candidates") as tx:
            rows = await tx.rows(_PLAN_CANDIDATES if after is None else _PLAN_CANDIDATES_AFTER, params)
        return [PlanCandidate.from_row(row) for row in rows]

    async def plan_backlog(self, *, ready_before: float, active_after: float) -> PlanBacklog:
        """Count the changed threads left out of :meth:`plan_candidates` (two index ranges)."""
        async with self._db.read("plan_backlog") as tx:
            waiting = await tx.one(_PLAN_WAITING, {"before": ready_before})
            too_old = await tx.scalar(_PLAN_TOO_OLD, {"after": active_after})
        assert waiting is not None
        first = waiting["first"]
        return PlanBacklog(int(waiting["n"]), float(first) if first is not None else None, too_old)

    async def mark_planned(self, planned: Sequence[tuple[str, int]]) -> int:
        """Clear the planning mark of threads the scheduler decided on, in one transaction — each
        only if its ``plan_pending`` is still the value read before deciding (a change recorded
        meanwhile keeps it marked for the next pass).

        Args:
            planned: ``(thread id, plan_pending as read)`` pairs.

        Returns:
            How many marks were cleared.
        """
        if not planned:
            return 0
        async with self._db.write("mark_planned") as tx:
            before = await tx.scalar("SELECT total_changes()")
            await tx.executemany(
                "UPDATE threads SET plan_pending = 0 WHERE id = ? AND plan_pending = ?", [tuple(p) for p in planned]
            )
            return await tx.scalar("SELECT total_changes()") - before
