"""The projects repository: each project's memory freshness, which drives consolidation (SPEC §7).

``memory_seq`` is bumped on every memory write or delete of the project (by the jobs and memories
repositories, inside their own transactions, through :func:`bump_project`); a consolidation records
the ``memory_seq`` it covered, fenced by its lease.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import structlog

from memd.store.db import Repository, Transaction
from memd.store.leases import holds
from memd.store.records import ProjectRecord, ProjectStatus

log = structlog.get_logger(__name__)

#: Longest error text stored (characters).
ERROR_MAX_CHARS = 2000


def short_error(error: str) -> str:
    """``error`` cut to :data:`ERROR_MAX_CHARS` characters (with an ellipsis when cut)."""
    return error if len(error) <= ERROR_MAX_CHARS else error[: ERROR_MAX_CHARS - 1] + "…"


async def bump_project(tx: Transaction, project: str, now: float) -> None:
    """Bump ``memory_seq`` and set ``last_memory_at`` (creating the row), inside ``tx``."""
    await tx.execute(
        """
        INSERT INTO projects (project, memory_seq, last_memory_at) VALUES (?, 1, ?)
        ON CONFLICT(project) DO UPDATE SET
            memory_seq = projects.memory_seq + 1, last_memory_at = excluded.last_memory_at
        """,
        (project, now),
    )


#: Projects with their trace count, by project key after the keyset cursor ``:after``.
_PROJECT_STATUS = """
    SELECT p.*, (SELECT COUNT(m.path) FROM memories AS m WHERE m.project = p.project) AS traces
    FROM projects AS p
    WHERE {where}
    ORDER BY p.project LIMIT :limit
"""


class ProjectRepository(Repository):
    """Projects. See :class:`~memd.store.db.Repository`."""

    async def ensure(self, project: str, memory_root: str) -> ProjectRecord:
        """Create the project row if missing and set its ``memory_root`` (directory path).

        A project already recorded with that root costs one read (every extraction calls this).
        """
        async with self._db.read("ensure_project") as tx:
            row = await tx.one("SELECT * FROM projects WHERE project = ?", (project,))
        if row is not None and row["memory_root"] == memory_root:
            return ProjectRecord.from_row(row)
        async with self._db.write("ensure_project") as tx:
            await tx.execute(
                """
                INSERT INTO projects (project, memory_root) VALUES (?, ?)
                ON CONFLICT(project) DO UPDATE SET memory_root = excluded.memory_root
                """,
                (project, memory_root),
            )
            row = await tx.one("SELECT * FROM projects WHERE project = ?", (project,))
        assert row is not None
        return ProjectRecord.from_row(row)

    async def get(self, project: str) -> ProjectRecord | None:
        """Return the project's record, or ``None``."""
        async with self._db.read("get_project") as tx:
            row = await tx.one("SELECT * FROM projects WHERE project = ?", (project,))
        return ProjectRecord.from_row(row) if row else None

    async def list_all(self) -> list[ProjectRecord]:
        """Return every project, by project key."""
        async with self._db.read("list_projects") as tx:
            rows = await tx.rows("SELECT * FROM projects ORDER BY project")
        return [ProjectRecord.from_row(row) for row in rows]

    async def due(self, delay_s: float, min_interval_s: float) -> list[ProjectRecord]:
        """Return the projects whose consolidation is due (SPEC §7), longest-waiting first.

        Due: ``memory_seq > consolidated_seq`` (new or deleted memories since the last success),
        quiet for ``delay_s`` (now − ``last_memory_at`` ≥ ``delay_s``), and no attempt —
        success or failure — in the last ``min_interval_s`` seconds (a failing project cannot
        spin).
        """
        now = self._clock.now()
        async with self._db.read("projects_due") as tx:
            rows = await tx.rows(
                """
                SELECT * FROM projects
                WHERE memory_seq > consolidated_seq
                  AND last_memory_at IS NOT NULL AND :now - last_memory_at >= :delay
                  AND (last_attempt_at IS NULL OR :now - last_attempt_at >= :interval)
                ORDER BY last_memory_at ASC, project
                """,
                {"now": now, "delay": delay_s, "interval": min_interval_s},
            )
        return [ProjectRecord.from_row(row) for row in rows]

    async def mark_consolidated(self, project: str, seq: int, lease_name: str, owner: str, fencing_token: int) -> bool:
        """Record a successful consolidation, fenced by the lease ``lease_name``.

        In one transaction: if the lease is held by ``(owner, fencing_token)``, set
        ``consolidated_seq = max(consolidated_seq, seq)``, ``last_consolidated_at`` and
        ``last_attempt_at`` to now, and clear ``failures``/``last_error``.

        Args:
            project: the project key.
            seq: the project's ``memory_seq`` read before the consolidation started (memories
                written meanwhile keep the project due).
            lease_name: e.g. ``consolidate:<project>``.
            owner, fencing_token: the lease holder, from
                :meth:`~memd.store.leases.LeaseRepository.acquire`.

        Returns:
            ``False``, writing nothing, when the lease was lost (event ``lease_fence_refused``)
            or the project is unknown.
        """
        now = self._clock.now()
        async with self._db.write("mark_consolidated") as tx:
            if not await holds(tx, lease_name, owner, fencing_token):
                log.warning(
                    "lease_fence_refused",
                    op="mark_consolidated",
                    lease=lease_name,
                    owner=owner,
                    fencing_token=fencing_token,
                    project=project,
                )
                return False
            rows = await tx.rows(
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

    async def mark_failed(self, project: str, error: str, lease_name: str, owner: str, fencing_token: int) -> bool:
        """Record a failed consolidation, fenced by the lease ``lease_name`` (SPEC §5): in one
        transaction, if the lease is held by ``(owner, fencing_token)``, set ``last_error``,
        ``failures + 1`` and ``last_attempt_at``.

        The project stays due and is retried after ``min_interval_s`` (:meth:`due`).

        Args:
            project: the project key.
            error: one line, already redacted by the caller (cut to :data:`ERROR_MAX_CHARS`).
            lease_name, owner, fencing_token: the lease the failed run held.

        Returns:
            ``False``, writing nothing, when the lease was lost (event ``lease_fence_refused``: a
            newer holder's result must not be overwritten) or the project is unknown.
        """
        now = self._clock.now()
        async with self._db.write("mark_consolidation_failed") as tx:
            if not await holds(tx, lease_name, owner, fencing_token):
                log.warning(
                    "lease_fence_refused",
                    op="mark_failed",
                    lease=lease_name,
                    owner=owner,
                    fencing_token=fencing_token,
                    project=project,
                )
                return False
            rows = await tx.rows(
                """
                UPDATE projects SET last_error = ?, failures = failures + 1, last_attempt_at = ?
                WHERE project = ? RETURNING 1
                """,
                (short_error(error), now, project),
            )
        return bool(rows)

    async def status_page(self, *, after: str | None = None, limit: int = 500) -> list[ProjectStatus]:
        """One page of projects with their trace counts, by project key after ``after``."""
        async with self._db.read("project_status_page") as tx:
            rows = await tx.rows(
                _PROJECT_STATUS.format(where=":after IS NULL OR p.project > :after"), {"after": after, "limit": limit}
            )
        return [ProjectStatus.from_row(row) for row in rows]

    async def status_of(self, projects: Sequence[str]) -> dict[str, ProjectStatus]:
        """Those of ``projects`` that have a row, with their trace counts, keyed by project."""
        async with self._db.read("project_status") as tx:
            rows = await tx.rows(
                _PROJECT_STATUS.format(where="p.project IN (SELECT value FROM json_each(:projects))"),
                {"projects": json.dumps(list(projects)), "limit": len(projects)},
            )
        return {row["project"]: ProjectStatus.from_row(row) for row in rows}

    async def failing(self, limit: int) -> tuple[list[ProjectRecord], int]:
        """Projects whose last consolidation failed (most recent attempt first, at most ``limit``),
        and how many there are in all."""
        async with self._db.read("failing_projects") as tx:
            rows = await tx.rows(
                "SELECT * FROM projects WHERE last_error IS NOT NULL ORDER BY last_attempt_at DESC, project LIMIT ?",
                (limit,),
            )
            total = await tx.scalar("SELECT COUNT(*) FROM projects WHERE last_error IS NOT NULL")
        return [ProjectRecord.from_row(row) for row in rows], total
