"""The scheduler: which threads get a phase-1 job, and when a failure retries (SPEC §4).

A thread becomes an ``extract`` job when it is eligible (interactive source, at least one real
user message), has been idle for ``min_idle_s`` (the idle gate: no new bytes), its last activity
is within ``max_age_days`` (0 = no limit), and it has no memory or its memory was built from an
older watermark. Jobs carry ``priority = updated_at`` so workers take the newest first.

Failures retry with exponential backoff (``retry_base_s`` doubling, capped at ``retry_cap_s``)
and end ``dead`` after ``max_attempts``; a thread that grows resets its attempts (the store does
this when the input watermark moves).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import structlog

from memd.clock import Clock
from memd.errors import StoreError
from memd.ingest.indexer import Indexer
from memd.store.records import JobStatus
from memd.store.store import Store

log = structlog.get_logger(__name__)

DAY_S = 86_400.0


@dataclass(slots=True)
class PlanSummary:
    """What one planning pass decided.

    Attributes:
        queued: threads given (or kept with) a claimable extract job (``pending`` or ``error``).
        idle_wait: eligible threads still inside the idle gate.
        too_old: threads whose last activity is older than ``max_age_days``.
        up_to_date: threads whose memory already covers their watermark, whose job already
            covers it (done — e.g. a memory removed by ``memd forget`` — or running elsewhere).
        not_eligible: threads excluded by source or with no user message.
        next_due_s: seconds until the next thread leaves the idle gate (None = none waiting).
        failed: threads skipped this pass because reading them failed unexpectedly (event
            ``plan_thread_failed``; they are looked at again next pass).
        dead: threads whose job exhausted its attempts for this watermark (``memd retry``).
        queued_ids: the ids of the queued threads.
    """

    queued: int = 0
    idle_wait: int = 0
    too_old: int = 0
    up_to_date: int = 0
    not_eligible: int = 0
    next_due_s: float | None = None
    failed: int = 0
    dead: int = 0
    queued_ids: list[str] = field(default_factory=list)


class Scheduler:
    """Turns indexed threads into extract jobs.

    Args:
        store: the state store.
        indexer: used to read a candidate's new bytes before deciding (catch-up).
        clock: time source.
        min_idle_s: the idle gate (seconds without new bytes).
        max_age_days: last activity must be newer than this (0 = no limit).
    """

    def __init__(self, store: Store, indexer: Indexer, clock: Clock, *, min_idle_s: float, max_age_days: float) -> None:
        self._store = store
        self._indexer = indexer
        self._clock = clock
        self.min_idle_s = min_idle_s
        self.max_age_days = max_age_days

    async def plan(self) -> PlanSummary:
        """Check every thread once and upsert extract jobs for the candidates.

        Reads a candidate's body (catch-up) only after the cheap checks (age, idle gate) pass,
        so the cost is proportional to what changed.
        """
        now = self._clock.now()
        summary = PlanSummary()
        memories = await self._store.memories.watermarks()
        for thread in await self._store.threads.list_all():
            if self.max_age_days > 0 and now - thread.updated_at > self.max_age_days * DAY_S:
                summary.too_old += 1
                continue
            if thread.reason is not None and not thread.reason.provisional:
                summary.not_eligible += 1
                continue
            idle_for = now - thread.updated_at
            if idle_for < self.min_idle_s:
                summary.idle_wait += 1
                wait = self.min_idle_s - idle_for
                summary.next_due_s = wait if summary.next_due_s is None else min(summary.next_due_s, wait)
                continue
            try:
                current = await self._indexer.catch_up(thread.id) or thread
            except StoreError:
                raise  # the whole pass fails and is retried (the database is shared by all)
            except Exception as exc:  # one unreadable thread never blocks the others
                log.error("plan_thread_failed", thread_id=thread.id, error=f"{type(exc).__name__}: {exc}", exc_info=exc)
                summary.failed += 1
                continue
            if not current.eligible:
                summary.not_eligible += 1
                continue
            if now - current.updated_at < self.min_idle_s:  # it grew while we looked
                summary.idle_wait += 1
                continue
            done_watermark = memories.get(current.id)
            if done_watermark is not None and done_watermark >= current.watermark:
                summary.up_to_date += 1
                continue
            job = await self._store.jobs.upsert_extract(current.id, current.watermark, priority=current.updated_at)
            if job.status is JobStatus.DEAD:
                summary.dead += 1
            elif job.status in (JobStatus.DONE, JobStatus.RUNNING):
                summary.up_to_date += 1
            else:
                summary.queued += 1
                summary.queued_ids.append(current.id)
        if summary.queued or summary.failed:
            log.info(
                "plan_done",
                queued=summary.queued,
                idle_wait=summary.idle_wait,
                too_old=summary.too_old,
                up_to_date=summary.up_to_date,
                not_eligible=summary.not_eligible,
                failed=summary.failed,
                dead=summary.dead,
            )
        return summary
