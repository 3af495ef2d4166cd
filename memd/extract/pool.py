"""The worker pool: a generic runner of fenced jobs (SPEC §6.1).

A fixed number of workers. Like arq's worker, a worker takes a concurrency slot *before* it claims
a job, so a daemon never holds a claimed job it has no capacity for. A claim is a lease in the
``jobs`` table with a fencing token; it is renewed every ``lease_s / 3`` while the handler runs,
and whatever the handler commits is fenced by the token (a worker whose claim was taken over
writes nothing). The pool knows nothing of what a job does: it hands each claimed job to its
handler (for extraction, :class:`memd.extract.job.ExtractJob`) and records the outcome.

Faults (SPEC §13): one job's failure becomes ``error`` with an exponential backoff, ``dead``
after ``max_attempts``; a store that fails (the database locked past its busy timeout) is retried
a bounded number of times — a failed claim every ``poll_s``, a job update ``STORE_RETRY_ATTEMPTS``
times — and a job update that still fails leaves the claim to expire, so that the job is claimed
again after its lease. No worker ever dies with an exception: the slot is always given back.
A model authentication failure or a spent daily budget pauses the pool (the job is given back,
its attempt not counted). On shutdown a cancelled job gives its claim back (``pending``, the
attempt not counted). Every pause and sleep runs on the injected clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum, StrEnum, auto
from typing import Any

import structlog

from memd.clock import Clock, iso_utc, wait_any
from memd.errors import BudgetExhausted, ExtractorError, LeaseLost, MemoryWriteError, ModelAuthError, StoreError
from memd.extract.redact import redact
from memd.faults import FaultLog
from memd.schedule.retry import RetryPolicy
from memd.store.records import JobKind, JobRecord
from memd.store.store import Store

log = structlog.get_logger(__name__)

#: Nothing recorded yet: the first look clears a pause a previous process left in the store.
_UNKNOWN = object()

#: Attempts at recording a failure or a release when the database is locked (each attempt
#: already waits up to the store's busy timeout).
STORE_RETRY_ATTEMPTS = 3
#: Pause between those attempts, seconds (on the injected clock).
STORE_RETRY_PAUSE_S = 1.0
#: How long model work pauses after the endpoint rejected the credentials, seconds.
AUTH_PAUSE_S = 3600.0


@dataclass(frozen=True, slots=True)
class JobResult:
    """What a finished job did, for the pool's counters and its ``on_done`` callback.

    Attributes:
        project: the project whose memory changed (``None`` when nothing was written).
        noop: the job found nothing durable (for extraction: no trace file).
        tokens_in, tokens_out: model tokens spent (0 offline).
    """

    project: str | None
    noop: bool = False
    tokens_in: int = 0
    tokens_out: int = 0


class PauseKind(StrEnum):
    """Why model work is paused (:attr:`JobPool.pause_kind`)."""

    MODEL_AUTH = "model_auth"  # the endpoint rejected the credentials (401/403)
    BUDGET = "budget"  # the daily token budget is spent


class _Next(Enum):
    """What :meth:`JobPool.run` does after one step."""

    CONTINUE = auto()
    STOP = auto()


class _ClaimFailed(Exception):
    """A claim failed in the store (already logged and noted)."""


#: Runs one claimed job: ``handler(job, bound_logger) -> JobResult``. Whatever it writes must be
#: fenced by the job's claim; it raises to fail the attempt.
JobHandler = Callable[[JobRecord, Any], Awaitable[JobResult]]


@dataclass(slots=True)
class PoolStats:
    """Counters since the pool started: jobs done, no-ops, failures, refused commits, tokens.

    ``running`` maps each running job's key to the time it started (epoch s).
    """

    done: int = 0
    noop: int = 0
    failed: int = 0
    fenced_out: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    last_activity_at: float | None = None
    running: dict[str, float] = field(default_factory=dict)
    #: The most recent failures, ``(thread id, error)``, at most :data:`FAILURES_KEPT` (for ``memd once``).
    failures: list[tuple[str, str]] = field(default_factory=list)


#: Failures kept in :attr:`PoolStats.failures`.
FAILURES_KEPT = 20


class JobPool:
    """Claims jobs of one kind and runs them with bounded concurrency.

    Args:
        store: the state store (job claims, fenced updates).
        clock: time source (lease expiry, backoff, pauses and polls).
        kind: the jobs this pool runs.
        handler: runs one claimed job (:data:`JobHandler`).
        owner: this daemon's owner string ``host:pid:random``.
        concurrency: number of workers (``extract_concurrency``).
        lease_s: job lease length in seconds (``extract_lease_s``); renewed every third.
        retry: backoff policy for failures.
        poll_s: how long an idle worker waits before looking for work again (seconds); a
            :meth:`wake` call ends the wait early.
        on_done: called with each finished job's :class:`JobResult`.
        faults: where survived infrastructure faults are noted (default: a log of its own).
    """

    def __init__(
        self,
        store: Store,
        clock: Clock,
        *,
        kind: JobKind,
        handler: JobHandler,
        owner: str,
        concurrency: int = 4,
        lease_s: float = 900.0,
        retry: RetryPolicy | None = None,
        poll_s: float = 5.0,
        on_done: Callable[[JobResult], None] | None = None,
        faults: FaultLog | None = None,
    ) -> None:
        self._store = store
        self._clock = clock
        self._kind = kind
        self._handler = handler
        self._owner = owner
        self._lease_s = lease_s
        self._retry = retry or RetryPolicy()
        self._poll_s = poll_s
        self._on_done = on_done
        self._slots = asyncio.Semaphore(concurrency)
        self._claim_failures = 0
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._paused_until: float | None = None
        self._pause_reason: str | None = None
        self._pause_kind: PauseKind | None = None
        self._recorded_pause: object = _UNKNOWN  # what the store meta ``model_pause`` holds
        self.stats = PoolStats()
        #: The newest infrastructure fault the pool survived (store unavailable, ...).
        self.faults = faults or FaultLog(clean=lambda text: redact(text)[0])

    def _note_fault(self, event: str, error: BaseException | str) -> None:
        self.faults.note(event, error, now_s=self._clock.now())

    @property
    def paused_reason(self) -> str | None:
        """Why model work is paused (authentication failure, budget), or ``None``."""
        if self._paused_until is not None and self._clock.now() >= self._paused_until:
            self._paused_until, self._pause_reason, self._pause_kind = None, None, None
        return self._pause_reason

    @property
    def pause_kind(self) -> PauseKind | None:
        """Why model work is paused, as a :class:`PauseKind` (``None``: not paused)."""
        return self._pause_kind if self.paused_reason is not None else None

    def wake(self) -> None:
        """Ask idle workers to look for work now (new jobs were queued)."""
        self._wake.set()

    async def run(self, stop: asyncio.Event, *, burst: bool = False) -> None:
        """Claim and run jobs until ``stop`` is set.

        A failed claim (the database locked past its busy timeout, ...) is logged once
        (``claim_failed``; ``claim_recovered`` when claims work again) and retried every
        ``poll_s``. A job claimed while ``stop`` was being set is given back at once.

        Args:
            stop: set it to stop claiming; running jobs are left to :meth:`drain`.
            burst: return as soon as no job is claimable and none is running (``memd once``
                and tests).
        """
        self._claim_failures = 0
        while not stop.is_set():
            if await self._step(stop, burst) is _Next.STOP:
                break
        if burst and self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _step(self, stop: asyncio.Event, burst: bool) -> _Next:
        """One turn of :meth:`run`: wait out a pause, take a slot, claim, start the job."""
        await self._record_pause()
        if self.paused_reason is not None:
            if burst:
                return _Next.STOP
            self._wake.clear()
            await self._wait(stop, min(self._poll_s, max(0.0, (self._paused_until or 0) - self._clock.now())))
            return _Next.CONTINUE
        await self._slots.acquire()  # the slot comes before the claim
        if stop.is_set() or self.paused_reason is not None:  # paused while waiting for the slot
            self._slots.release()
            return _Next.STOP if stop.is_set() else _Next.CONTINUE
        self._wake.clear()  # a wake-up from now on (even during the claim) is not lost
        try:
            job = await self._claim()
        except _ClaimFailed:
            self._slots.release()
            if burst and not self._tasks and self._claim_failures >= STORE_RETRY_ATTEMPTS:
                log.error("claim_gave_up", failures=self._claim_failures)
                return _Next.STOP
            await self._wait(stop, self._poll_s)
            return _Next.CONTINUE
        if job is None:
            self._slots.release()
            return await self._idle(stop, burst)
        if stop.is_set():  # stopped while the claim was in flight: give it back
            await self._give_back(job, self._bind(job), "shutdown")
            self._slots.release()
            return _Next.STOP
        task = asyncio.create_task(self._run_job(job), name=f"{self._kind}:{job.key}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return _Next.CONTINUE

    async def _claim(self) -> JobRecord | None:
        """Claim the next due job; a store failure is logged once per run of failures.

        Raises:
            _ClaimFailed: the claim failed (the store logged the details); try again later.
        """
        try:
            job = await self._store.jobs.claim(self._kind, self._owner, self._lease_s)
        except asyncio.CancelledError:
            self._slots.release()
            raise
        except Exception as exc:  # keep serving
            self._claim_failures += 1
            self._note_fault("claim_failed", exc)
            if self._claim_failures == 1:
                log.warning("claim_failed", error=str(exc), action=f"retrying every {self._poll_s:g} s")
            else:
                log.debug("claim_failed_again", error=str(exc), failures=self._claim_failures)
            raise _ClaimFailed from exc
        if self._claim_failures:
            log.info("claim_recovered", failures=self._claim_failures)
            self._claim_failures = 0
        return job

    async def _idle(self, stop: asyncio.Event, burst: bool) -> _Next:
        """Nothing is due: in burst mode, wait for a running job (stop when none); else poll."""
        if burst:
            if not self._tasks:
                return _Next.STOP
            await asyncio.wait(set(self._tasks), return_when=asyncio.FIRST_COMPLETED)
            return _Next.CONTINUE
        await self._wait(stop, self._poll_s)
        return _Next.CONTINUE

    async def _wait(self, stop: asyncio.Event, timeout_s: float) -> None:
        await wait_any(self._clock, (stop, self._wake), max(0.01, timeout_s))

    def _bind(self, job: JobRecord, **context: Any) -> Any:
        """A logger bound to the job: its kind, and its key as ``thread_id`` or ``project``."""
        key = "thread_id" if self._kind is JobKind.EXTRACT else "project"
        return log.bind(job=str(self._kind), **{key: job.key}, **context)

    async def drain(self, grace_s: float) -> None:
        """Wait up to ``grace_s`` seconds for running jobs, then cancel the rest.

        A cancelled job's claim is released (back to ``pending``, the attempt not counted). If
        this call is itself cancelled, the jobs keep running: call :meth:`cancel_all`.
        """
        done = asyncio.Event()
        waiter = asyncio.ensure_future(self._all_done(done))
        try:
            await wait_any(self._clock, (done,), grace_s)
        finally:
            waiter.cancel()
        await self.cancel_all()

    async def _all_done(self, done: asyncio.Event) -> None:
        while self._tasks:
            await asyncio.wait(set(self._tasks))
        done.set()

    async def cancel_all(self) -> None:
        """Cancel every running job and wait until each has given its claim back."""
        pending = set(self._tasks)
        if not pending:
            return
        for task in pending:
            task.cancel()
        log.info("jobs_cancelled", count=len(pending))
        await asyncio.gather(*pending, return_exceptions=True)

    @property
    def running(self) -> int:
        """Jobs running now."""
        return len(self._tasks)

    async def _heartbeat(self, job: JobRecord, lost: asyncio.Event) -> None:
        """Renew the claim every ``lease_s / 3``; set ``lost`` when it was taken over.

        A renewal that fails (database locked) is retried every second; the work goes on, since
        its result is fenced by the claim's token anyway.
        """
        interval = max(0.05, self._lease_s / 3)
        failing = False
        while True:
            await self._clock.sleep(min(interval, STORE_RETRY_PAUSE_S) if failing else interval)
            try:
                renewed = await self._store.jobs.renew(job, self._lease_s)
            except Exception as exc:
                self._note_fault("job_renew_failed", exc)
                if not failing:
                    self._bind(job).warning("job_renew_failed", error=str(exc), action="retrying every second")
                failing = True
                continue
            failing = False
            if not renewed:
                self._bind(job).warning("job_lease_lost", fencing_token=job.fencing_token)
                lost.set()
                return

    async def _run_job(self, job: JobRecord) -> None:
        """Run one claimed job to its end. Never raises, except ``CancelledError``."""
        started = self._clock.now()
        bound = self._bind(job, attempt=job.attempts)
        self.stats.running[job.key] = started
        lost = asyncio.Event()
        heartbeat = asyncio.create_task(self._heartbeat(job, lost))
        work: asyncio.Task[JobResult] = asyncio.ensure_future(self._handler(job, bound))
        lost_wait = asyncio.ensure_future(lost.wait())
        try:
            try:
                await asyncio.wait({work, lost_wait}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                work.cancel()
                await asyncio.wait({work})  # its commit step finishes first (see the handler)
                if work.cancelled() or work.exception() is not None:
                    await self._give_back(job, bound, "shutdown")
                raise
            if not work.done():  # the claim was taken over: stop, write nothing
                work.cancel()
                await asyncio.wait({work})
                if not work.cancelled():  # its shielded commit ended (LeaseLost, ...): retrieve it
                    work.exception()
                self.stats.fenced_out += 1
                return
            await self._settle(job, work, bound)
        finally:
            lost_wait.cancel()
            heartbeat.cancel()
            self.stats.running.pop(job.key, None)
            self._slots.release()
            bound.debug(f"{self._kind}_slot_released", duration_s=round(self._clock.now() - started, 3))

    async def _settle(self, job: JobRecord, work: asyncio.Future[JobResult], bound: Any) -> None:
        """Record the outcome of a finished job (counters, failures, pauses); never raises."""
        try:
            result = work.result()
        except ModelAuthError as exc:
            first = self.paused_reason is None  # jobs already in flight fail the same way
            self._pause(AUTH_PAUSE_S, PauseKind.MODEL_AUTH, f"model authentication failed: {exc}")
            await self._give_back(job, bound, "model_auth_failed")
            if first:
                bound.error(
                    "model_auth_failed", error=str(exc), action="model work paused for 1 h; fix the API key and restart"
                )
            await self._record_pause()
        except BudgetExhausted as exc:
            first = self.paused_reason is None
            resume_at = exc.resume_at or self._clock.now() + AUTH_PAUSE_S
            self._pause(
                resume_at - self._clock.now(),
                PauseKind.BUDGET,
                f"daily token budget reached; resumes at {iso_utc(resume_at)}",
            )
            await self._give_back(job, bound, "budget_exhausted")
            if first:
                bound.warning(
                    "budget_exhausted", resume_at=iso_utc(resume_at), action="extraction waits for the next UTC day"
                )
            await self._record_pause()
        except LeaseLost:
            self.stats.fenced_out += 1
            bound.warning(f"{self._kind}_fenced_out", fencing_token=job.fencing_token)
        except asyncio.CancelledError:  # the job cancelled itself; give the claim back
            await self._give_back(job, bound, "cancelled")
        except Exception as exc:  # one job's failure never stops the pool
            await self._fail(job, exc, bound)
        else:
            self._count(result)

    def _count(self, result: JobResult) -> None:
        """Add a finished job to the counters and tell ``on_done``."""
        self.stats.done += 1
        self.stats.noop += int(result.noop)
        self.stats.tokens_in += result.tokens_in
        self.stats.tokens_out += result.tokens_out
        self.stats.last_activity_at = self._clock.now()
        if self._on_done is not None:
            self._on_done(result)

    def _pause(self, duration_s: float, kind: PauseKind, reason: str) -> None:
        self._pause_kind = kind
        self._paused_until = self._clock.now() + max(1.0, duration_s)
        self._pause_reason = redact(reason)[0]  # stored in meta model_pause (SPEC §14)

    async def _record_pause(self) -> None:
        """Mirror the pause reason into the store meta ``model_pause`` (``memd status`` shows
        it): written only when it changed, cleared when the pause ends. Never raises."""
        reason = self.paused_reason
        if reason == self._recorded_pause:
            return
        try:
            await self._store.meta.set("model_pause", reason)
        except Exception as exc:  # status shows a stale pause at worst
            log.warning("model_pause_record_failed", error=str(exc))
            return
        self._recorded_pause = reason

    async def _store_call(
        self, op: str, call: Callable[[], Awaitable[bool]], bound: Any, *, attempts: int
    ) -> bool | None:
        """Run a fenced job update, retrying a store failure; ``None`` when every attempt failed.

        The update runs to its end even if the caller is cancelled meanwhile (shutdown).
        """
        for attempt in range(1, attempts + 1):
            try:
                return await asyncio.shield(call())
            except StoreError as exc:
                if attempt == attempts:
                    self._note_fault("job_update_failed", exc)
                    bound.error(
                        "job_update_failed",
                        op=op,
                        error=str(exc),
                        action="the claim is left to expire; the job is claimed again after its lease",
                    )
                    return None
                await self._clock.sleep(STORE_RETRY_PAUSE_S)
        return None

    async def _give_back(self, job: JobRecord, bound: Any, reason: str) -> None:
        """Release the claim (``pending``, the attempt not counted); one attempt, never raises."""
        released = await self._store_call("release_job", lambda: self._store.jobs.release(job), bound, attempts=1)
        bound.info(f"{self._kind}_released", reason=reason, released=bool(released))

    async def _fail(self, job: JobRecord, exc: BaseException, bound: Any) -> None:
        """Record a failed attempt: ``error`` with a backoff ``retry_at``, or ``dead``. Never raises."""
        self.stats.failed += 1
        message = redact(f"{type(exc).__name__}: {exc}")[0][:500]  # stored and shown (SPEC §14)
        self.stats.failures = [*self.stats.failures, (job.key, message)][-FAILURES_KEPT:]
        dead = self._retry.is_dead(job.attempts)
        retry_at = None if dead else self._clock.now() + self._retry.delay_s(job.attempts)
        expected = isinstance(exc, (ExtractorError, MemoryWriteError, StoreError))
        if isinstance(exc, StoreError):
            self._note_fault(f"{self._kind}_failed", message)
        level = bound.error if dead or not expected else bound.warning
        level(
            f"{self._kind}_failed",
            error=message,
            dead=dead,
            retry_at=iso_utc(retry_at) if retry_at else None,
            exc_info=exc if not expected else False,
        )
        await self._store_call(
            "fail_job",
            lambda: self._store.jobs.fail(job, message, retry_at, dead),
            bound,
            attempts=STORE_RETRY_ATTEMPTS,
        )
