"""The extraction worker pool (SPEC §6.1).

A fixed number of workers. Like arq's worker, a worker takes a concurrency slot *before* it claims
a job, so a daemon never holds a claimed job it has no capacity for. A claim is a lease in the
``jobs`` table with a fencing token; it is renewed every ``lease_s / 3`` while the extractor runs,
and the result is committed only if the token still matches (a worker whose lease was taken over
writes nothing). Trace files follow the SPEC §5 invariant: the file is staged under a temporary
name, the ``memories`` row commits, then the file is renamed into place; if the commit is refused
the temporary file is removed. That step finishes even when the job is cancelled (shutdown).

Faults (SPEC §13): one thread's failure becomes ``error`` with an exponential backoff, ``dead``
after ``max_attempts``; a store that fails (the database locked past its busy timeout) is retried
a bounded number of times — a failed claim every ``poll_s``, a commit ``STORE_RETRY_ATTEMPTS``
times — and a job update that still fails leaves the claim to expire, so that the job is claimed
again after its lease. No worker ever dies with an exception: the slot is always given back.
On shutdown a cancelled job gives its claim back (``pending``, the attempt not counted).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from memd.clock import Clock, iso_utc
from memd.errors import (
    BudgetExhausted,
    ExtractorError,
    LeaseLost,
    MemoryWriteError,
    ModelAuthError,
    StoreError,
)
from memd.extract.base import ExtractionRequest, Extractor
from memd.extract.contract import TraceContext, normalise
from memd.memory import files as memory_files
from memd.schedule.retry import RetryPolicy
from memd.store.records import JobKind, JobRecord, MemoryRecord, ThreadRecord
from memd.store.store import Store

log = structlog.get_logger(__name__)

#: Nothing recorded yet: the first look clears a pause a previous process left in the store.
_UNKNOWN = object()

#: Attempts at recording a failure or a release when the database is locked (each attempt
#: already waits up to the store's busy timeout).
STORE_RETRY_ATTEMPTS = 3
#: Pause between those attempts, seconds (real time).
STORE_RETRY_PAUSE_S = 1.0

#: Builds the extractor request for a thread at a token budget (reads and parses the rollout).
PrepareFn = Callable[[ThreadRecord, int], Awaitable[ExtractionRequest]]


@dataclass(slots=True)
class PoolStats:
    """Counters since the pool started: jobs done, no-ops, failures, refused commits, tokens."""

    done: int = 0
    noop: int = 0
    failed: int = 0
    fenced_out: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    last_activity_at: float | None = None
    running: dict[str, float] = field(default_factory=dict)


class ExtractionPool:
    """Runs phase-1 jobs with bounded concurrency.

    Args:
        store: the state store (job claims, fenced commits).
        clock: time source (lease expiry, backoff).
        extractor: the offline or model extractor.
        prepare: builds the :class:`ExtractionRequest` for a thread (``PrepareFn``).
        memory_dir: root of per-project memory folders (SPEC §8).
        owner: this daemon's owner string ``host:pid:random``.
        concurrency: number of workers (``extract_concurrency``).
        lease_s: job lease length in seconds (``extract_lease_s``); renewed every third.
        retry: backoff policy for failures.
        max_input_tokens: the budget requests are built for.
        poll_s: how long an idle worker waits before looking for work again (seconds); a
            :meth:`wake` call ends the wait early.
        on_done: called with the project key after a memory was written or removed.
    """

    def __init__(
        self,
        store: Store,
        clock: Clock,
        *,
        extractor: Extractor,
        prepare: PrepareFn,
        memory_dir: Path,
        owner: str,
        concurrency: int = 4,
        lease_s: float = 900.0,
        retry: RetryPolicy | None = None,
        max_input_tokens: int = 120_000,
        poll_s: float = 5.0,
        on_done: Callable[[str], None] | None = None,
    ) -> None:
        self._store = store
        self._clock = clock
        self._extractor = extractor
        self._prepare = prepare
        self._memory_dir = Path(memory_dir)
        self._owner = owner
        self._concurrency = concurrency
        self._lease_s = lease_s
        self._retry = retry or RetryPolicy()
        self._max_input_tokens = max_input_tokens
        self._poll_s = poll_s
        self._on_done = on_done
        self._slots = asyncio.Semaphore(concurrency)
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._paused_until: float | None = None
        self._pause_reason: str | None = None
        self._recorded_pause: object = _UNKNOWN  # what the store meta ``model_pause`` holds
        self.stats = PoolStats()
        #: The newest infrastructure fault the pool survived (store unavailable, ...):
        #: ``{"at": ISO time, "event": name, "error": text}``, for ``memd status``.
        self.last_fault: dict[str, str] | None = None

    def _note_fault(self, event: str, error: str) -> None:
        self.last_fault = {"at": iso_utc(self._clock.now()), "event": event, "error": error[:500]}

    @property
    def paused_reason(self) -> str | None:
        """Why model work is paused (authentication failure, budget), or ``None``."""
        if self._paused_until is not None and self._clock.now() >= self._paused_until:
            self._paused_until, self._pause_reason = None, None
        return self._pause_reason

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
        claim_failures = 0
        while not stop.is_set():
            await self._record_pause()
            if self.paused_reason is not None:
                if burst:
                    break
                self._wake.clear()
                await self._wait(stop, min(self._poll_s, max(0.0, (self._paused_until or 0) - self._clock.now())))
                continue
            await self._slots.acquire()  # the slot comes before the claim
            if stop.is_set():
                self._slots.release()
                break
            if self.paused_reason is not None:  # paused while this worker waited for its slot
                self._slots.release()
                continue
            self._wake.clear()  # a wake-up from now on (even during the claim) is not lost
            try:
                job = await self._store.jobs.claim(JobKind.EXTRACT, self._owner, self._lease_s)
            except asyncio.CancelledError:
                self._slots.release()
                raise
            except Exception as exc:  # the store logged the details; keep serving
                self._slots.release()
                claim_failures += 1
                self._note_fault("claim_failed", str(exc))
                if claim_failures == 1:
                    log.warning("claim_failed", error=str(exc), action=f"retrying every {self._poll_s:g} s")
                else:
                    log.debug("claim_failed_again", error=str(exc), failures=claim_failures)
                if burst and not self._tasks and claim_failures >= STORE_RETRY_ATTEMPTS:
                    log.error("claim_gave_up", error=str(exc), failures=claim_failures)
                    break
                await self._wait(stop, self._poll_s)
                continue
            if claim_failures:
                log.info("claim_recovered", failures=claim_failures)
                claim_failures = 0
            if job is None:
                self._slots.release()
                if burst:
                    if not self._tasks:
                        break
                    await asyncio.wait(set(self._tasks), return_when=asyncio.FIRST_COMPLETED)
                    continue
                await self._wait(stop, self._poll_s)
                continue
            if stop.is_set():  # stopped while the claim was in flight: give it back
                await self._give_back(job, log.bind(thread_id=job.key, job="extract"), "shutdown")
                self._slots.release()
                break
            task = asyncio.create_task(self._run_job(job), name=f"extract:{job.key}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if burst and self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _wait(self, stop: asyncio.Event, timeout_s: float) -> None:
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wake.wait())]
        try:
            await asyncio.wait(waiters, timeout=max(0.01, timeout_s), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def drain(self, grace_s: float) -> None:
        """Wait up to ``grace_s`` seconds for running jobs, then cancel the rest.

        A cancelled job's claim is released (back to ``pending``, the attempt not counted). If
        this call is itself cancelled, the jobs keep running: call :meth:`cancel_all`.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self._tasks:
            remaining_s = deadline - loop.time()
            if remaining_s <= 0:
                break
            await asyncio.wait(set(self._tasks), timeout=remaining_s)
        await self.cancel_all()

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
            await asyncio.sleep(min(interval, STORE_RETRY_PAUSE_S) if failing else interval)
            try:
                renewed = await self._store.jobs.renew(job, self._lease_s)
            except Exception as exc:
                self._note_fault("job_renew_failed", str(exc))
                if not failing:
                    log.warning("job_renew_failed", thread_id=job.key, error=str(exc), action="retrying every second")
                failing = True
                continue
            failing = False
            if not renewed:
                log.warning("job_lease_lost", thread_id=job.key, fencing_token=job.fencing_token)
                lost.set()
                return

    async def _run_job(self, job: JobRecord) -> None:
        """Run one claimed job to its end. Never raises, except ``CancelledError``."""
        started = time.monotonic()
        bound = log.bind(thread_id=job.key, job="extract", attempt=job.attempts)
        self.stats.running[job.key] = self._clock.now()
        lost = asyncio.Event()
        heartbeat = asyncio.create_task(self._heartbeat(job, lost))
        work = asyncio.create_task(self._extract(job, bound))
        lost_wait = asyncio.ensure_future(lost.wait())
        try:
            try:
                await asyncio.wait({work, lost_wait}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                work.cancel()
                await asyncio.wait({work})  # its commit step finishes first (see _extract)
                if work.cancelled() or work.exception() is not None:
                    await self._give_back(job, bound, "shutdown")
                raise
            if not work.done():  # the claim was taken over: stop, write nothing
                work.cancel()
                await asyncio.wait({work})
                self.stats.fenced_out += 1
                return
            await self._settle(job, work, bound)
        finally:
            lost_wait.cancel()
            heartbeat.cancel()
            self.stats.running.pop(job.key, None)
            self._slots.release()
            bound.debug("extract_slot_released", duration_s=round(time.monotonic() - started, 3))

    async def _settle(self, job: JobRecord, work: asyncio.Task[None], bound: structlog.BoundLogger) -> None:
        """Record the outcome of a finished job (failures, pauses); never raises."""
        try:
            work.result()
        except ModelAuthError as exc:
            first = self.paused_reason is None  # jobs already in flight fail the same way
            self._pause(3600.0, f"model authentication failed: {exc}")
            await self._give_back(job, bound, "model_auth_failed")
            if first:
                bound.error(
                    "model_auth_failed", error=str(exc), action="model work paused for 1 h; fix the API key and restart"
                )
            await self._record_pause()
        except BudgetExhausted as exc:
            first = self.paused_reason is None
            resume_at = getattr(exc, "resume_at", None) or self._clock.now() + 3600.0
            self._pause(resume_at - self._clock.now(), f"daily token budget reached; resumes at {iso_utc(resume_at)}")
            await self._give_back(job, bound, "budget_exhausted")
            if first:
                bound.warning(
                    "budget_exhausted", resume_at=iso_utc(resume_at), action="extraction waits for the next UTC day"
                )
            await self._record_pause()
        except LeaseLost:
            self.stats.fenced_out += 1
            bound.warning("extract_fenced_out", fencing_token=job.fencing_token)
        except asyncio.CancelledError:  # the job cancelled itself; give the claim back
            await self._give_back(job, bound, "cancelled")
        except Exception as exc:  # one thread's failure never stops the pool
            await self._fail(job, exc, bound)
        else:
            self.stats.last_activity_at = self._clock.now()

    def _pause(self, duration_s: float, reason: str) -> None:
        self._paused_until = self._clock.now() + max(1.0, duration_s)
        self._pause_reason = reason

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
        self, op: str, call: Callable[[], Awaitable[bool]], bound: structlog.BoundLogger, *, attempts: int
    ) -> bool | None:
        """Run a fenced job update, retrying a store failure; ``None`` when every attempt failed.

        The update runs to its end even if the caller is cancelled meanwhile (shutdown).
        """
        for attempt in range(1, attempts + 1):
            try:
                return await asyncio.shield(call())
            except StoreError as exc:
                if attempt == attempts:
                    self._note_fault("job_update_failed", str(exc))
                    bound.error(
                        "job_update_failed",
                        op=op,
                        error=str(exc),
                        action="the claim is left to expire; the job is claimed again after its lease",
                    )
                    return None
                await asyncio.sleep(STORE_RETRY_PAUSE_S)
        return None

    async def _give_back(self, job: JobRecord, bound: structlog.BoundLogger, reason: str) -> None:
        """Release the claim (``pending``, the attempt not counted); one attempt, never raises."""
        released = await self._store_call("release_job", lambda: self._store.jobs.release(job), bound, attempts=1)
        bound.info("extract_released", reason=reason, released=bool(released))

    async def _fail(self, job: JobRecord, exc: BaseException, bound: structlog.BoundLogger) -> None:
        """Record a failed attempt: ``error`` with a backoff ``retry_at``, or ``dead``. Never raises."""
        self.stats.failed += 1
        message = f"{type(exc).__name__}: {exc}"[:500]
        dead = self._retry.is_dead(job.attempts)
        retry_at = None if dead else self._clock.now() + self._retry.delay_s(job.attempts)
        expected = isinstance(exc, (ExtractorError, MemoryWriteError, StoreError))
        if isinstance(exc, StoreError):
            self._note_fault("extract_failed", message)
        level = bound.error if dead or not expected else bound.warning
        level(
            "extract_failed",
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

    async def _extract(self, job: JobRecord, bound: structlog.BoundLogger) -> None:
        started = time.monotonic()
        thread = await self._store.threads.get(job.key)
        if thread is None:
            raise ExtractorError(f"thread {job.key} is no longer indexed")
        bound = bound.bind(project=thread.project)
        bound.info("extract_started", watermark=thread.watermark)
        request = await self._prepare(thread, self._max_input_tokens)
        result = await self._extractor.extract(request)
        context = TraceContext(
            project=thread.project,
            date=iso_utc(thread.created_at)[:10],  # the session's date, not the file's mtime
            agent="codex",
            model=thread.model or "unknown model",
        )
        output = normalise(result.trace_memory, result.summary, context=context)
        if output.noop:  # a no-op never creates a memory folder (SPEC §19); an older trace is removed
            root = memory_files.project_root(self._memory_dir, thread.project)
        else:
            root = await asyncio.to_thread(memory_files.ensure_project_root, self._memory_dir, thread.project)
        # The trace file's slug comes from the extractor's name for the main task (SPEC §8).
        relpath = (
            None if output.noop else memory_files.trace_relpath(thread.id, result.title or thread.title or "trace")
        )
        memory = MemoryRecord(
            thread_id=thread.id,
            project=thread.project,
            path=relpath,
            trace_memory=output.trace_memory,
            summary=output.summary,
            source_watermark=thread.watermark,
            generated_at=self._clock.now(),
            extractor=result.extractor,
            tokens_in=result.tokens_in,
            tokens_out=result.tokens_out,
        )
        content = None
        if relpath is not None:
            header = memory_files.TraceHeader(
                thread_id=thread.id,
                project=thread.project,
                cwd=thread.cwd,
                rollout_path=thread.path,
                updated_at=thread.updated_at,
            )
            content = memory_files.render_trace_file(header, output.trace_memory)
        # From here the row and the file change together: a cancellation (shutdown) waits for
        # this step to end instead of leaving a temp file or a committed row without its file.
        commit = asyncio.ensure_future(self._commit(job, memory, content, root, bound))
        while not commit.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(commit)
        commit.result()
        self.stats.done += 1
        self.stats.noop += int(output.noop)
        self.stats.tokens_in += result.tokens_in
        self.stats.tokens_out += result.tokens_out
        bound.info(
            "extract_done",
            extractor=result.extractor,
            noop=output.noop,
            trace=relpath,
            duration_s=round(time.monotonic() - started, 3),
            tokens_in=result.tokens_in,
            tokens_out=result.tokens_out,
            input_bytes=request.built.text_bytes,
            omitted_items=request.built.omitted_items,
        )
        if self._on_done is not None:
            self._on_done(thread.project)

    async def _commit(
        self,
        job: JobRecord,
        memory: MemoryRecord,
        content: str | None,
        root: Path,
        bound: structlog.BoundLogger,
    ) -> None:
        """Stage the trace file, commit the ``memories`` row (fenced), rename the file into place.

        The project's row (with its memory root) is made sure of first, under the same retry.

        ``content`` ``None`` is a no-op memory: the thread's trace files are removed after the
        commit. A store failure is retried (``STORE_RETRY_ATTEMPTS``, event
        ``extract_commit_retry``) while the staged file waits; a final failure or a refused
        commit removes the temp file. If the rename fails after the row committed, the row stays
        the truth: event ``trace_file_commit_failed``, and the file is written again from the row
        before the project's next consolidation (and at start-up).

        Raises:
            MemoryWriteError: the temp file could not be written (disk full); nothing changed.
            LeaseLost: the claim was taken over; nothing was written.
            StoreError: the database stayed unavailable; nothing was written.
        """
        staged = None
        if content is not None:
            assert memory.path is not None
            staged = await asyncio.to_thread(
                memory_files.stage_file, root, memory.path, content, thread_id=memory.thread_id
            )
        try:
            for attempt in range(1, STORE_RETRY_ATTEMPTS + 1):
                try:
                    await self._store.projects.ensure(memory.project, str(root))
                    committed = await self._store.jobs.finish_extract(job, memory)
                    break
                except StoreError as exc:
                    if attempt == STORE_RETRY_ATTEMPTS:
                        raise
                    self._note_fault("extract_commit_retry", str(exc))
                    bound.warning("extract_commit_retry", error=str(exc), attempt=attempt)
                    await asyncio.sleep(STORE_RETRY_PAUSE_S)
        except BaseException:
            if staged is not None:
                await asyncio.to_thread(staged.abort)
            raise
        if not committed:
            if staged is not None:
                await asyncio.to_thread(staged.abort)
            raise LeaseLost(f"extract job for {memory.thread_id} lost its lease (fencing token {job.fencing_token})")
        if staged is None:
            await asyncio.to_thread(memory_files.remove_trace, root, memory.thread_id)
            return
        try:
            await asyncio.to_thread(staged.commit)
        except MemoryWriteError as exc:
            bound.error(
                "trace_file_commit_failed",
                error=str(exc),
                action="the memory is saved in the database; "
                "its trace file is written again before the next consolidation",
            )
