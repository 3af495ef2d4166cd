"""The extraction worker pool (SPEC §6.1).

A fixed number of workers. Like arq's worker, a worker takes a concurrency slot *before* it claims
a job, so a daemon never holds a claimed job it has no capacity for. A claim is a lease in the
``jobs`` table with a fencing token; it is renewed every ``lease_s / 3`` while the extractor runs,
and the result is committed only if the token still matches (a worker whose lease was taken over
writes nothing). Trace files follow the SPEC §5 invariant: the file is staged under a temporary
name, the ``memories`` row commits, then the file is renamed into place; if the commit is refused
the temporary file is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from memd import memory_files
from memd.clock import Clock, iso_utc
from memd.errors import BudgetExhausted, ExtractorError, LeaseLost, MemoryWriteError, ModelAuthError
from memd.extract.base import ExtractionRequest, Extractor
from memd.extract.contract import TraceContext, normalise
from memd.scheduler import RetryPolicy
from memd.store.records import JobRecord, MemoryRecord, ThreadRecord
from memd.store.store import Store

log = structlog.get_logger("memd.pool")

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
        self.stats = PoolStats()

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

        Args:
            stop: set it to stop claiming; running jobs are left to :meth:`drain`.
            burst: return as soon as no job is claimable and none is running (``memd once``
                and tests).
        """
        while not stop.is_set():
            if self.paused_reason is not None:
                if burst:
                    break
                await self._wait(stop, min(self._poll_s, max(0.0, (self._paused_until or 0) - self._clock.now())))
                continue
            await self._slots.acquire()  # the slot comes before the claim
            if stop.is_set():
                self._slots.release()
                break
            try:
                job = await self._store.claim_job("extract", self._owner, self._lease_s)
            except Exception as exc:  # the store logs details; keep serving
                self._slots.release()
                log.warning("claim_failed", error=str(exc))
                await self._wait(stop, self._poll_s)
                continue
            if job is None:
                self._slots.release()
                if burst:
                    if not self._tasks:
                        break
                    await asyncio.wait(set(self._tasks), return_when=asyncio.FIRST_COMPLETED)
                    continue
                await self._wait(stop, self._poll_s)
                continue
            task = asyncio.create_task(self._run_job(job), name=f"extract:{job.key}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if burst and self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _wait(self, stop: asyncio.Event, timeout_s: float) -> None:
        self._wake.clear()
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wake.wait())]
        try:
            await asyncio.wait(waiters, timeout=max(0.01, timeout_s), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def drain(self, grace_s: float) -> None:
        """Wait up to ``grace_s`` seconds for running jobs, then cancel them.

        A cancelled job's claim is released (back to pending, the attempt not counted).
        """
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=grace_s)
        for task in pending:
            task.cancel()
        if pending:
            log.info("jobs_cancelled", count=len(pending))
            await asyncio.gather(*pending, return_exceptions=True)

    @property
    def running(self) -> int:
        """Jobs running now."""
        return len(self._tasks)

    async def _heartbeat(self, job: JobRecord, lost: asyncio.Event) -> None:
        interval = max(0.05, self._lease_s / 3)
        while True:
            await asyncio.sleep(interval)
            if not await self._store.renew_job(job, self._lease_s):
                log.warning("job_lease_lost", thread_id=job.key, token=job.token)
                lost.set()
                return

    async def _run_job(self, job: JobRecord) -> None:
        started = time.monotonic()
        bound = log.bind(thread_id=job.key, job="extract", attempt=job.attempts)
        self.stats.running[job.key] = self._clock.now()
        lost = asyncio.Event()
        heartbeat = asyncio.create_task(self._heartbeat(job, lost))
        try:
            work = asyncio.create_task(self._extract(job, bound))
            lost_wait = asyncio.create_task(lost.wait())
            done, _ = await asyncio.wait({work, lost_wait}, return_when=asyncio.FIRST_COMPLETED)
            lost_wait.cancel()
            if work not in done:
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await work
                self.stats.fenced_out += 1
                return
            await work
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._store.release_job(job))
            bound.info("extract_released", reason="shutdown")
            raise
        except ModelAuthError as exc:
            self._pause(3600.0, f"model authentication failed: {exc}")
            await self._store.release_job(job)
            bound.error("model_auth_failed", error=str(exc), action="model work paused for 1 h; fix the API key and restart")
        except BudgetExhausted as exc:
            resume_at = getattr(exc, "resume_at", None) or self._clock.now() + 3600.0
            self._pause(resume_at - self._clock.now(), f"daily token budget reached; resumes at {iso_utc(resume_at)}")
            await self._store.release_job(job)
            bound.warning("budget_exhausted", resume_at=iso_utc(resume_at))
        except LeaseLost:
            self.stats.fenced_out += 1
            bound.warning("extract_fenced_out", token=job.token)
        except Exception as exc:  # one thread's failure never stops the pool
            await self._fail(job, exc, bound)
        else:
            self.stats.last_activity_at = self._clock.now()
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            self.stats.running.pop(job.key, None)
            self._slots.release()
            bound.debug("extract_slot_released", duration_s=round(time.monotonic() - started, 3))

    def _pause(self, duration_s: float, reason: str) -> None:
        self._paused_until = self._clock.now() + max(1.0, duration_s)
        self._pause_reason = reason

    async def _fail(self, job: JobRecord, exc: BaseException, bound: structlog.BoundLogger) -> None:
        self.stats.failed += 1
        message = f"{type(exc).__name__}: {exc}"[:500]
        dead = self._retry.is_dead(job.attempts)
        retry_at = None if dead else self._clock.now() + self._retry.delay_s(job.attempts)
        await self._store.fail_job(job, message, retry_at, dead)
        level = bound.error if dead or not isinstance(exc, (ExtractorError, MemoryWriteError)) else bound.warning
        level(
            "extract_failed",
            error=message,
            dead=dead,
            retry_at=iso_utc(retry_at) if retry_at else None,
            exc_info=not isinstance(exc, (ExtractorError, MemoryWriteError)),
        )

    async def _extract(self, job: JobRecord, bound: structlog.BoundLogger) -> None:
        started = time.monotonic()
        thread = await self._store.get_thread(job.key)
        if thread is None:
            raise ExtractorError(f"thread {job.key} is no longer indexed")
        bound = bound.bind(project=thread.project)
        bound.info("extract_started", watermark=thread.watermark)
        request = await self._prepare(thread, self._max_input_tokens)
        result = await self._extractor.extract(request)
        context = TraceContext(
            project=thread.project,
            date=iso_utc(thread.updated_at)[:10],
            agent="codex",
            model=thread.model or "unknown model",
        )
        output = normalise(result.trace_memory, result.summary, context=context)
        root = memory_files.ensure_project_root(self._memory_dir, thread.project)
        await self._store.ensure_project(thread.project, str(root))
        relpath = None if output.noop else memory_files.trace_relpath(thread.id, thread.title or "trace")
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
        staged = None
        if relpath is not None:
            header = memory_files.TraceHeader(
                thread_id=thread.id,
                project=thread.project,
                cwd=thread.cwd,
                rollout_path=thread.path,
                updated_at=thread.updated_at,
            )
            content = memory_files.render_trace_file(header, output.trace_memory)
            staged = await asyncio.to_thread(memory_files.stage_file, root, relpath, content, thread_id=thread.id)
        try:
            committed = await self._store.finish_extract(job, memory)
        except BaseException:
            if staged is not None:
                await asyncio.to_thread(staged.abort)
            raise
        if not committed:
            if staged is not None:
                await asyncio.to_thread(staged.abort)
            raise LeaseLost(f"extract job for {thread.id} lost its lease (token {job.token})")
        if staged is not None:
            await asyncio.to_thread(staged.commit)
        else:
            await asyncio.to_thread(memory_files.remove_trace, root, thread.id)
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
