"""The scheduler: which threads get a phase-1 job, and when a failure retries (SPEC §4).

A thread becomes an ``extract`` job when it is eligible (interactive source, at least one real
user message), has been idle for ``min_idle_s`` (the idle gate: no new bytes), its last activity
is within ``max_age_days`` (0 = no limit), and it has no memory or its memory was built from an
older watermark. Jobs carry ``priority = updated_at`` so workers take the newest first.

Planning is driven by change (SPEC §15): a pass looks only at the threads the indexer marked as
changed (a new, grown, replaced or moved rollout, seen by the watcher or the reconcile scan) whose
idle gate has passed, found through an index; it never walks every thread. The idle cost of the
daemon is therefore the same with 20,000 learned threads as with 10.

Failures retry with exponential backoff (``retry_base_s`` doubling, capped at ``retry_cap_s``)
and end ``dead`` after ``max_attempts``; a thread that grows resets its attempts (the store does
this when the input watermark moves).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import structlog

from memd.clock import Clock
from memd.errors import StoreError
from memd.ingest.indexer import Indexer, ReadOutcome
from memd.store.records import JobStatus, PlanCandidate, ThreadRecord
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
        failed: threads skipped this pass because reading them failed (an unreadable rollout:
            event ``plan_thread_unread``; an unexpected error: ``plan_thread_failed``); they keep
            their mark and are looked at again next pass.
        dead: threads whose job exhausted its attempts for this watermark (``memd retry``).
        queued_ids: the ids of the queued threads.
        looked_at: changed threads this pass read and decided on (the others waited).
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
    looked_at: int = 0


#: Changed threads a planning pass reads per page (the first pass after an upgrade marks every thread).
PLAN_PAGE_SIZE = 500


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
        #: Changed threads read and decided per page; a pass that fails keeps the pages it finished.
        self.page_size = PLAN_PAGE_SIZE

    async def plan(self) -> PlanSummary:
        """Plan the threads whose rollout changed since they were last planned.

        Only changed threads past their idle gate and within the age limit are read (catch-up:
        the bytes after their watermark) and decided; the index gives them, and counts the
        changed threads still inside the gate (``idle_wait``, ``next_due_s``) or too old. A
        thread's mark is cleared once it is decided, and only if no change was recorded since it
        was read: a rollout that grows during the pass is looked at by the next one. A thread
        that grew while it was read (its last activity is inside the gate again) and a thread
        whose reading failed keep their mark.

        Raises:
            StoreError: the database failed; the pass is retried as a whole.
        """
        now = self._clock.now()
        summary = PlanSummary()
        ready_before = now - self.min_idle_s
        active_after = now - self.max_age_days * DAY_S if self.max_age_days > 0 else 0.0
        last: PlanCandidate | None = None
        while True:  # a page at a time, each page's marks cleared before the next is read
            page = await self._store.threads.plan_candidates(
                ready_before=ready_before, active_after=active_after, limit=self.page_size, after=last
            )
            await self._plan_page(page, now, summary)
            if len(page) < self.page_size:
                break
            last = page[-1]
        backlog = await self._store.threads.plan_backlog(ready_before=ready_before, active_after=active_after)
        summary.idle_wait = backlog.waiting
        summary.too_old = backlog.too_old
        if backlog.next_ready_at is not None:
            summary.next_due_s = max(0.0, backlog.next_ready_at + self.min_idle_s - now)
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

    async def _plan_page(self, page: list[PlanCandidate], now: float, summary: PlanSummary) -> None:
        """Decide one page of changed threads and clear the marks of those decided."""
        memories = await self._store.memories.watermarks_of(c.thread.id for c in page)
        planned: list[tuple[str, int]] = []
        for candidate in page:
            if await self._decide(candidate.thread, memories, now, summary):
                planned.append((candidate.thread.id, candidate.plan_pending))
        summary.looked_at += len(page)
        await self._store.threads.mark_planned(planned)

    async def _decide(self, thread: ThreadRecord, memories: dict[str, int], now: float, summary: PlanSummary) -> bool:
        """Read one changed thread forward and queue its extraction when it is a candidate.

        Returns:
            Whether it was decided (its mark may be cleared): ``False`` when reading it failed
            or it grew while it was read (it is inside its idle gate again).
        """
        if thread.reason is not None and not thread.reason.provisional:
            summary.not_eligible += 1
            return True
        try:
            caught = await self._indexer.catch_up(thread.id)
        except StoreError:
            raise  # the whole pass fails and is retried (the database is shared by all)
        except Exception as exc:  # one unreadable thread never blocks the others
            log.error("plan_thread_failed", thread_id=thread.id, error=f"{type(exc).__name__}: {exc}", exc_info=exc)
            summary.failed += 1
            return False
        if caught is not None and caught.outcome is ReadOutcome.FAILED:
            # Unreadable this time (already logged): the mark stays, the next pass reads it again.
            log.info("plan_thread_unread", thread_id=thread.id, action="kept for the next pass")
            summary.failed += 1
            return False
        current = caught.thread if caught is not None else thread
        if not current.eligible:
            summary.not_eligible += 1
            return True
        if now - current.updated_at < self.min_idle_s:
            return False  # it grew while we looked: planned again once idle
        done_watermark = memories.get(current.id)
        if done_watermark is not None and done_watermark >= current.watermark:
            summary.up_to_date += 1
            return True
        job = await self._store.jobs.upsert_extract(current.id, current.watermark, priority=current.updated_at)
        if job.status is JobStatus.DEAD:
            summary.dead += 1
        elif job.status in (JobStatus.DONE, JobStatus.RUNNING):
            summary.up_to_date += 1
        else:
            summary.queued += 1
            summary.queued_ids.append(current.id)
        return True
