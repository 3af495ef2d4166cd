"""The memories repository: one trace memory per thread (table ``memories``, SPEC §5, §6.3).

A memory row is written by the fenced commit of its extract job
(:meth:`~memd.store.jobs.JobRepository.finish_extract`); this repository reads and deletes them.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Mapping, Sequence

from memd.store.db import Repository
from memd.store.jobs import _UPSERT_MEMORY
from memd.store.projects import bump_project
from memd.store.records import MemoryRecord


class MemoryRepository(Repository):
    """Memories. See :class:`~memd.store.db.Repository`."""

    async def get(self, thread_id: str) -> MemoryRecord | None:
        """Return the thread's memory, or ``None``."""
        async with self._db.read("get_memory") as tx:
            row = await tx.one("SELECT * FROM memories WHERE thread_id = ?", (thread_id,))
        return MemoryRecord.from_row(row) if row else None

    async def list_for_project(self, project: str) -> list[MemoryRecord]:
        """Return the project's memories, newest source first.

        Ordered by the thread's last activity (``threads.updated_at``), then ``generated_at``.
        """
        async with self._db.read("list_memories") as tx:
            rows = await tx.rows(
                """
                SELECT m.* FROM memories AS m LEFT JOIN threads AS t ON t.id = m.thread_id
                WHERE m.project = ?
                ORDER BY COALESCE(t.updated_at, m.generated_at) DESC, m.generated_at DESC,
                         m.thread_id
                """,
                (project,),
            )
        return [MemoryRecord.from_row(row) for row in rows]

    async def watermarks(self) -> dict[str, int]:
        """Return ``{thread id: source_watermark}`` for every memory (scheduler, status)."""
        async with self._db.read("memory_watermarks") as tx:
            rows = await tx.rows("SELECT thread_id, source_watermark FROM memories")
        return {row["thread_id"]: int(row["source_watermark"]) for row in rows}

    async def watermarks_of(self, thread_ids: Iterable[str]) -> dict[str, int]:
        """Return ``{thread id: source_watermark}`` for those of ``thread_ids`` that have a memory
        (one query; the scheduler asks only about the threads it looks at)."""
        async with self._db.read("memory_watermarks_of") as tx:
            rows = await tx.rows(
                "SELECT thread_id, source_watermark FROM memories WHERE thread_id IN (SELECT value FROM json_each(?))",
                (json.dumps(sorted(set(thread_ids))),),
            )
        return {row["thread_id"]: int(row["source_watermark"]) for row in rows}

    async def delete(self, thread_id: str) -> MemoryRecord | None:
        """Delete the thread's memory row (``memd forget``) and bump its project's ``memory_seq``.

        The extract job is left as is (a ``done`` job is not re-extracted until the thread
        grows). The caller removes the trace file named by the returned record's ``path``.

        Returns:
            The deleted memory, or ``None`` if there was none.
        """
        now = self._clock.now()
        async with self._db.write("delete_memory") as tx:
            row = await tx.one("SELECT * FROM memories WHERE thread_id = ?", (thread_id,))
            if row is not None:
                await tx.execute("DELETE FROM memories WHERE thread_id = ?", (thread_id,))
                await bump_project(tx, row["project"], now)
        return MemoryRecord.from_row(row) if row else None

    async def move(self, thread_id: str, old_path: str, new_path: str) -> bool:
        """Point the thread's memory at a renamed trace file (the legacy-name migration).

        Changes nothing unless the row still names ``old_path`` (a newer extraction wins); bumps
        the project's ``memory_seq`` (``memory_summary.md`` names the files).

        Returns:
            Whether the row was moved.
        """
        now = self._clock.now()
        async with self._db.write("move_memory") as tx:
            row = await tx.one(
                "UPDATE memories SET path = ? WHERE thread_id = ? AND path = ? RETURNING project",
                (new_path, thread_id, old_path),
            )
            if row is not None:
                await bump_project(tx, row["project"], now)
        return row is not None

    async def restore(
        self,
        memories: Sequence[MemoryRecord],
        *,
        memory_roots: Mapping[str, str],
        consolidated: Collection[str] = (),
    ) -> int:
        """Recovery (SPEC §5, ``memd db recover``): put back memory rows rebuilt from trace files.

        In one transaction, for each memory whose thread is known and whose row is missing or
        older: the row is upserted, the thread's extract job (if any) becomes ``done`` at that
        watermark (so no finished session goes to a model again), and the project's
        ``memory_seq`` is bumped. Projects listed in ``consolidated`` (their ``MEMORY.md`` already
        covers their traces) are marked consolidated up to the new ``memory_seq``.

        Args:
            memories: rows rebuilt from the trace files (``extractor`` says so).
            memory_roots: project key -> its memory root (recorded on the project rows).
            consolidated: project keys whose consolidation need not run again.

        Returns:
            How many rows were put back.
        """
        now = self._clock.now()
        restored = 0
        async with self._db.write("restore_memories") as tx:
            for project, root in memory_roots.items():
                await tx.execute(
                    "INSERT INTO projects (project, memory_root) VALUES (?, ?)"
                    " ON CONFLICT(project) DO UPDATE SET memory_root = excluded.memory_root",
                    (project, root),
                )
            for memory in memories:
                if await tx.one("SELECT 1 FROM threads WHERE id = ?", (memory.thread_id,)) is None:
                    continue
                row = await tx.one("SELECT source_watermark FROM memories WHERE thread_id = ?", (memory.thread_id,))
                if row is not None and int(row["source_watermark"]) >= memory.source_watermark:
                    continue
                await tx.execute(_UPSERT_MEMORY, memory.params())
                await tx.execute(
                    """
                    UPDATE jobs SET status = 'done', success_watermark = :sw, owner = NULL,
                        lease_until = NULL, retry_at = NULL, last_error = NULL, updated_at = :now
                    WHERE kind = 'extract' AND key = :key AND input_watermark <= :sw
                    """,
                    {"sw": memory.source_watermark, "now": now, "key": memory.thread_id},
                )
                await bump_project(tx, memory.project, now)
                restored += 1
            for project in consolidated:
                await tx.execute("UPDATE projects SET consolidated_seq = memory_seq WHERE project = ?", (project,))
        return restored
