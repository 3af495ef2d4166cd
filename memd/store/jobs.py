"""The jobs repository: claims with fencing tokens, backoff state and fenced commits (SPEC §5, §6.1).

A claim bumps the job's monotonic fencing token. A holder is identified by ``(owner,
fencing_token)``; every write the claim guards (renew, finish, fail, release) checks that pair
inside its transaction and writes nothing when it does not match (event ``job_fence_refused``).
"""

from __future__ import annotations

from typing import Any

import structlog

from memd.rollout.project import ReasonKind
from memd.store.db import Repository
from memd.store.projects import bump_project, short_error
from memd.store.records import JobKind, JobRecord, JobStatus, MemoryRecord

log = structlog.get_logger(__name__)

_UPSERT_MEMORY = """
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
"""


#: The most urgent claimable job of a kind, never reading a ``done`` or ``dead`` job: the first due
#: row of ``jobs_pending`` and of ``jobs_error`` (partial indexes in claim order, schema version 7)
#: and the best expired ``running`` job (through ``jobs_status``), then the best of those three.
#: A waiting job is due when ``retry_at`` is unset or past; a running one when its lease expired.
_CLAIM_CANDIDATE = """
    SELECT rid AS rowid, key, status, owner, fencing_token FROM (
        SELECT * FROM (
            SELECT rowid AS rid, key, status, owner, fencing_token, priority, created_at FROM jobs
            WHERE kind = :kind AND status = 'pending' AND (retry_at IS NULL OR retry_at <= :now)
            ORDER BY priority DESC, created_at ASC, key ASC LIMIT 1)
        UNION ALL
        SELECT * FROM (
            SELECT rowid AS rid, key, status, owner, fencing_token, priority, created_at FROM jobs
            WHERE kind = :kind AND status = 'error' AND (retry_at IS NULL OR retry_at <= :now)
            ORDER BY priority DESC, created_at ASC, key ASC LIMIT 1)
        UNION ALL
        SELECT * FROM (
            SELECT rowid AS rid, key, status, owner, fencing_token, priority, created_at FROM jobs
            WHERE kind = :kind AND status = 'running' AND (lease_until IS NULL OR lease_until <= :now)
            ORDER BY priority DESC, created_at ASC, key ASC LIMIT 1))
    ORDER BY priority DESC, created_at ASC, key ASC
    LIMIT 1
"""


#: The thread was removed by ``memd forget`` (no memory of it may be written again).
_FORGOTTEN = "SELECT 1 FROM threads WHERE id = :id AND NOT eligible AND reason = :reason"
#: A claimed job ends ``dead`` because its thread was forgotten (fenced like every write of a claim).
_END_FENCED = """
    UPDATE jobs SET status = 'dead', owner = NULL, lease_until = NULL, retry_at = NULL,
        last_error = 'forgotten', updated_at = :now
    WHERE kind = :kind AND key = :key AND owner = :owner AND fencing_token = :token AND status = 'running'
"""


def _fence(job: JobRecord) -> dict[str, Any]:
    return {"kind": job.kind, "key": job.key, "owner": job.owner, "token": job.fencing_token}


def _refused(op: str, job: JobRecord) -> None:
    log.warning(
        "job_fence_refused", op=op, kind=job.kind, key=job.key, owner=job.owner, fencing_token=job.fencing_token
    )


class JobRepository(Repository):
    """Jobs. See :class:`~memd.store.db.Repository`."""

    async def upsert_extract(self, thread_id: str, input_watermark: int, priority: float) -> JobRecord:
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
        async with self._db.write("upsert_extract_job") as tx:
            await tx.execute(
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
                {"kind": JobKind.EXTRACT, "key": thread_id, "wm": input_watermark, "priority": priority, "now": now},
            )
            row = await tx.one("SELECT * FROM jobs WHERE kind = ? AND key = ?", (JobKind.EXTRACT, thread_id))
        assert row is not None
        return JobRecord.from_row(row)

    async def get(self, kind: JobKind, key: str) -> JobRecord | None:
        """Return the job ``(kind, key)``, or ``None``."""
        async with self._db.read("get_job") as tx:
            row = await tx.one("SELECT * FROM jobs WHERE kind = ? AND key = ?", (kind, key))
        return JobRecord.from_row(row) if row else None

    async def claim(
        self, kind: JobKind, owner: str, lease_s: float, *, max_attempts: int | None = None
    ) -> JobRecord | None:
        """Claim the most urgent claimable job of ``kind`` for ``owner``.

        Claimable: ``pending`` or ``error`` with ``retry_at`` ≤ now (or unset), or ``running``
        with an expired ``lease_until`` (its worker stalled or died; event ``job_reclaimed``).
        Highest ``priority`` first, then oldest. In one ``BEGIN IMMEDIATE`` the job becomes
        ``running`` for ``owner`` with ``fencing_token + 1``, ``lease_until`` = now + ``lease_s``,
        ``attempts + 1`` and ``started_at`` = now.

        Args:
            kind: which jobs.
            owner: the claimant (:func:`~memd.store.store.make_owner`).
            lease_s: how long the claim lasts without :meth:`renew`, seconds.
            max_attempts: when given, a stalled job that already used this many attempts is
                made ``dead`` instead of re-claimed (a job that kills its worker every time
                cannot loop forever; event ``job_dead_stalled``).

        Returns:
            The claimed job (carry it to the fenced calls), or ``None`` when nothing is due.
        """
        now = self._clock.now()
        async with self._db.write("claim_job") as tx:
            if max_attempts is not None:
                buried = await tx.rows(
                    """
                    UPDATE jobs SET status = 'dead', owner = NULL, lease_until = NULL,
                        last_error = 'lease expired ' || attempts || ' times (worker lost)',
                        updated_at = :now
                    WHERE kind = :kind AND status = 'running'
                      AND (lease_until IS NULL OR lease_until <= :now) AND attempts >= :max
                    RETURNING key, owner, attempts
                    """,
                    {"kind": kind, "now": now, "max": max_attempts},
                )
                for dead in buried:
                    log.error("job_dead_stalled", kind=kind, key=dead["key"], attempt=dead["attempts"])
            candidate = await tx.one(_CLAIM_CANDIDATE, {"kind": kind, "now": now})
            if candidate is None:
                return None
            await tx.execute(
                """
                UPDATE jobs SET status = 'running', owner = :owner, fencing_token = fencing_token + 1,
                    lease_until = :until, attempts = attempts + 1, retry_at = NULL,
                    started_at = :now, updated_at = :now
                WHERE rowid = :rowid
                """,
                {"owner": owner, "until": now + lease_s, "now": now, "rowid": candidate["rowid"]},
            )
            # Not ``RETURNING *``: RETURNING skips REAL affinity (1.0 would come back as 1).
            claimed = await tx.one("SELECT * FROM jobs WHERE rowid = ?", (candidate["rowid"],))
        assert claimed is not None
        job = JobRecord.from_row(claimed)
        if candidate["status"] == JobStatus.RUNNING:
            log.warning(
                "job_reclaimed",
                kind=kind,
                key=job.key,
                stale_owner=candidate["owner"],
                stale_fencing_token=candidate["fencing_token"],
                owner=owner,
                fencing_token=job.fencing_token,
                attempt=job.attempts,
            )
        return job

    async def renew(self, job: JobRecord, lease_s: float) -> bool:
        """Extend a claim to now + ``lease_s`` seconds.

        Returns:
            ``False`` when the claim was lost (another owner re-claimed it, or it was finished,
            failed or released): stop the work, nothing it writes will be accepted.
        """
        now = self._clock.now()
        async with self._db.write("renew_job") as tx:
            rows = await tx.rows(
                """
                UPDATE jobs SET lease_until = :until, updated_at = :now
                WHERE kind = :kind AND key = :key AND owner = :owner AND fencing_token = :token
                  AND status = 'running'
                RETURNING 1
                """,
                {"until": now + lease_s, "now": now, **_fence(job)},
            )
        return bool(rows)

    async def finish_extract(self, job: JobRecord, memory: MemoryRecord) -> bool:
        """Commit a successful extraction, fenced by the claim (owner + fencing token, running).

        In one transaction: the memory row is upserted; the job becomes ``done`` with
        ``success_watermark = memory.source_watermark`` (or ``pending`` with attempts reset when
        the thread grew past that watermark meanwhile); the project's ``memory_seq`` is bumped
        and ``last_memory_at`` set (also the old project's, if the thread changed project).

        Args:
            job: the claimed extract job (from :meth:`claim`).
            memory: the new memory; ``memory.thread_id`` must equal ``job.key``. Its thread
                must exist in ``threads``.

        Returns:
            ``False``, writing nothing, when the claim was lost (event ``job_fence_refused``), or
            when ``memd forget`` removed the thread meanwhile (its reason is ``forgotten``): then the
            job becomes ``dead`` and no memory is written (event ``extract_refused_forgotten``).

        Raises:
            ValueError: ``job`` is not the extract job of ``memory.thread_id``.
            StoreError: database failure (nothing written).
        """
        if job.kind != JobKind.EXTRACT or job.key != memory.thread_id:
            raise ValueError(f"job {job.kind}/{job.key} does not match memory {memory.thread_id}")
        now = self._clock.now()
        async with self._db.write("finish_extract") as tx:
            if await tx.one(_FORGOTTEN, {"id": job.key, "reason": ReasonKind.FORGOTTEN}) is not None:
                await tx.execute(_END_FENCED, {"now": now, **_fence(job)})
                log.warning("extract_refused_forgotten", key=job.key, fencing_token=job.fencing_token)
                return False
            rows = await tx.rows(
                """
                UPDATE jobs SET
                    status = CASE WHEN input_watermark <= :sw THEN 'done' ELSE 'pending' END,
                    attempts = CASE WHEN input_watermark <= :sw THEN attempts ELSE 0 END,
                    success_watermark = :sw, owner = NULL, lease_until = NULL, retry_at = NULL,
                    last_error = NULL, updated_at = :now
                WHERE kind = :kind AND key = :key AND owner = :owner AND fencing_token = :token
                  AND status = 'running'
                RETURNING status
                """,
                {"sw": memory.source_watermark, "now": now, **_fence(job)},
            )
            if not rows:
                _refused("finish_extract", job)
                return False
            old = await tx.one("SELECT project FROM memories WHERE thread_id = ?", (memory.thread_id,))
            await tx.execute(_UPSERT_MEMORY, memory.params())
            await bump_project(tx, memory.project, now)
            if old is not None and old["project"] != memory.project:
                await bump_project(tx, old["project"], now)
        return True

    async def fail(self, job: JobRecord, error: str, retry_at: float | None, dead: bool) -> bool:
        """Record a failed attempt, fenced by the claim (owner + fencing token, still running).

        The job becomes ``error`` (claimable again at ``retry_at``; ``None`` = at once) or, with
        ``dead=True``, ``dead`` (never claimed again until :meth:`retry`). If the thread grew
        while the job ran, the failure concerned an old input: the job becomes ``error`` with
        attempts reset even when ``dead`` was asked.

        Args:
            job: the claimed job.
            error: a one-line description (truncated to 2000 chars; never a secret).
            retry_at: when to retry (epoch s), computed by the caller's backoff.
            dead: the attempts are exhausted.

        Returns:
            ``False``, writing nothing, when the claim was lost.
        """
        now = self._clock.now()
        async with self._db.write("fail_job") as tx:
            rows = await tx.rows(
                """
                UPDATE jobs SET
                    status = CASE WHEN input_watermark > :claimed_wm THEN 'error'
                                  WHEN :dead THEN 'dead' ELSE 'error' END,
                    attempts = CASE WHEN input_watermark > :claimed_wm THEN 0 ELSE attempts END,
                    retry_at = CASE WHEN input_watermark > :claimed_wm
                                    THEN COALESCE(:retry_at, :now)
                                    WHEN :dead THEN NULL ELSE :retry_at END,
                    last_error = :error, owner = NULL, lease_until = NULL, updated_at = :now
                WHERE kind = :kind AND key = :key AND owner = :owner AND fencing_token = :token
                  AND status = 'running'
                RETURNING status
                """,
                {
                    "claimed_wm": job.input_watermark,
                    "dead": int(dead),
                    "retry_at": retry_at,
                    "error": short_error(error),
                    "now": now,
                    **_fence(job),
                },
            )
        if not rows:
            _refused("fail_job", job)
        return bool(rows)

    async def release(self, job: JobRecord) -> bool:
        """Give a claimed job back (``pending``) without counting the attempt (shutdown).

        Returns:
            ``False``, writing nothing, when the claim was already lost.
        """
        now = self._clock.now()
        async with self._db.write("release_job") as tx:
            rows = await tx.rows(
                """
                UPDATE jobs SET status = 'pending', attempts = MAX(attempts - 1, 0),
                    owner = NULL, lease_until = NULL, updated_at = :now
                WHERE kind = :kind AND key = :key AND owner = :owner AND fencing_token = :token
                  AND status = 'running'
                RETURNING 1
                """,
                {"now": now, **_fence(job)},
            )
        return bool(rows)

    async def retry(self, thread_id: str | None = None) -> int:
        """Make ``dead``/``error`` extract jobs ``pending`` with attempts 0 (``memd retry``); the job
        of a thread ``memd forget`` removed stays ``dead``.

        Args:
            thread_id: only this thread's job; ``None`` for all.

        Returns:
            How many jobs were reset.
        """
        now = self._clock.now()
        async with self._db.write("retry_jobs") as tx:
            rows = await tx.rows(
                """
                UPDATE jobs SET status = 'pending', attempts = 0, retry_at = NULL,
                    last_error = NULL, updated_at = :now
                WHERE kind = :kind AND status IN ('dead', 'error')
                  AND (:key IS NULL OR key = :key)
                  AND key NOT IN (SELECT id FROM threads WHERE NOT eligible AND reason = :forgotten)
                RETURNING 1
                """,
                {"kind": JobKind.EXTRACT, "key": thread_id, "now": now, "forgotten": ReasonKind.FORGOTTEN},
            )
        return len(rows)

    async def list_all(self, kind: JobKind | None = None, status: JobStatus | None = None) -> list[JobRecord]:
        """Return jobs, optionally of one ``kind`` and/or ``status``, highest priority first."""
        async with self._db.read("list_jobs") as tx:
            rows = await tx.rows(
                """
                SELECT * FROM jobs
                WHERE (:kind IS NULL OR kind = :kind) AND (:status IS NULL OR status = :status)
                ORDER BY priority DESC, created_at ASC, key ASC
                """,
                {"kind": kind, "status": status},
            )
        return [JobRecord.from_row(row) for row in rows]

    async def queue_depth(self) -> int:
        """Return how many extract jobs wait to run (``pending`` or ``error``), due or not."""
        async with self._db.read("queue_depth") as tx:
            return await tx.scalar(
                """
                SELECT (SELECT COUNT(*) FROM jobs WHERE kind = :kind AND status = 'pending')
                     + (SELECT COUNT(*) FROM jobs WHERE kind = :kind AND status = 'error')
                """,
                {"kind": JobKind.EXTRACT},
            )

    async def page(
        self, *, after: tuple[str, str] | None = None, limit: int = 500, status: JobStatus | None = None
    ) -> list[JobRecord]:
        """One page of jobs in ``(kind, key)`` order after the keyset cursor ``after``.

        Args:
            after: ``(kind, key)`` of the previous page's last job, ``None`` for the first page.
            limit: jobs per page.
            status: only jobs in this status (read through ``jobs_status``).
        """
        where = "status = :status AND" if status is not None else ""
        async with self._db.read("jobs_page") as tx:
            rows = await tx.rows(
                f"""
                SELECT * FROM jobs
                WHERE {where} (:after_kind IS NULL OR (kind, key) > (:after_kind, :after_key))
                ORDER BY kind, key LIMIT :limit
                """,
                {
                    "status": status,
                    "after_kind": after[0] if after else None,
                    "after_key": after[1] if after else None,
                    "limit": limit,
                },
            )
        return [JobRecord.from_row(row) for row in rows]
