"""One extraction job: thread → trace file + ``memories`` row, in one transaction (SPEC §5, §6).

:class:`ExtractJob` is what the worker pool (:mod:`memd.extract.pool`) runs for every claimed
``extract`` job. It builds the request (:mod:`memd.extract.prepare`), calls the extractor,
normalises the answer (:mod:`memd.extract.contract`) and commits it under the SPEC §5 invariant:
the trace file is staged under a temporary name, the ``memories`` row commits (fenced by the
claim), then the file is renamed into place; if the commit is refused the temporary file is
removed. That step finishes even when the job is cancelled (shutdown).
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import structlog

from memd.clock import Clock, iso_utc
from memd.errors import ExtractorError, LeaseLost, MemoryWriteError, StoreError
from memd.extract.base import ExtractionRequest, ExtractionResult, Extractor
from memd.extract.contract import NormalisedOutput, TraceContext, first_task_name, normalise
from memd.extract.pool import JobResult
from memd.extract.prepare import RequestBuilder
from memd.faults import FaultLog
from memd.memory import files as memory_files
from memd.rollout.records import Agent
from memd.store.records import JobRecord, MemoryRecord, ThreadRecord
from memd.store.store import Store

log = structlog.get_logger(__name__)

#: Attempts at committing when the database is locked (each already waits the busy timeout).
COMMIT_ATTEMPTS = 3
#: Pause between those attempts, seconds (on the injected clock).
COMMIT_RETRY_PAUSE_S = 1.0


class ExtractJob:
    """Runs claimed ``extract`` jobs (the pool's handler).

    Args:
        store: the state store (thread lookup, fenced commit).
        clock: time source (``generated_at``, commit retry pauses).
        extractor: the offline or model extractor.
        requests: builds a thread's request (reads the rollout).
        memory_dir: root of the per-project memory folders (SPEC §8).
        max_input_tokens: the budget requests are built for.
        faults: where survived infrastructure faults are noted (for ``memd status``).
    """

    def __init__(
        self,
        store: Store,
        clock: Clock,
        *,
        extractor: Extractor,
        requests: RequestBuilder,
        memory_dir: Path,
        max_input_tokens: int,
        faults: FaultLog,
    ) -> None:
        self._store = store
        self._clock = clock
        self._extractor = extractor
        self._requests = requests
        self._memory_dir = Path(memory_dir)
        self._max_input_tokens = max_input_tokens
        self._faults = faults

    async def __call__(self, job: JobRecord, bound: Any) -> JobResult:
        """Extract the job's thread and commit its memory.

        Args:
            job: the claimed job (its key is the thread id).
            bound: the logger bound to the job's context.

        Returns:
            What was written.

        Raises:
            ExtractorError: the thread is gone, or the extractor failed (retried with backoff).
            ModelAuthError, BudgetExhausted: model work must pause (the pool pauses it).
            RolloutReadError: the rollout could not be read.
            MemoryWriteError: the trace file could not be written; nothing changed.
            LeaseLost: the claim was taken over; nothing was written.
            StoreError: the database stayed unavailable; nothing was written.
        """
        started = self._clock.now()
        thread = await self._store.threads.get(job.key)
        if thread is None:
            raise ExtractorError(f"thread {job.key} is no longer indexed")
        bound = bound.bind(project=thread.project)
        bound.info("extract_started", watermark=thread.watermark)
        request = await self._requests.build(thread, self._max_input_tokens)
        result = await self._extractor.extract(request)
        output = normalise(result.trace_memory, result.summary, context=_context(thread, request))
        memory, content = self._memory(thread, request, result, output)
        # From here the row and the file change together: a cancellation (shutdown, a lost claim)
        # waits for this step to end instead of leaving a temp file or a row without its file.
        commit = asyncio.ensure_future(self._commit(job, memory, content, bound))
        while not commit.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(commit)
        commit.result()
        bound.info(
            "extract_done",
            extractor=result.extractor,
            noop=output.noop,
            trace=memory.path,
            duration_s=round(self._clock.now() - started, 3),
            tokens_in=result.tokens_in,
            tokens_out=result.tokens_out,
            input_bytes=request.built.text_bytes,
            omitted_items=request.built.omitted_items,
        )
        return JobResult(thread.project, output.noop, result.tokens_in, result.tokens_out)

    def _memory(
        self, thread: ThreadRecord, request: ExtractionRequest, result: ExtractionResult, output: NormalisedOutput
    ) -> tuple[MemoryRecord, str | None]:
        """The memory row and the trace file's content (``None`` for a no-op)."""
        # The trace file's slug comes from the main task: the extractor's name for it, else the
        # trace's first task (a model's output), else the thread's title (SPEC §8).
        title = result.title or first_task_name(output.trace_memory) or thread.title or "trace"
        relpath = None if output.noop else memory_files.trace_relpath(thread.id, title)
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
            header = trace_header(thread, thread.agent, thread.watermark)
            content = memory_files.render_trace_file(header, output.trace_memory)
        return memory, content

    async def _commit(
        self,
        job: JobRecord,
        memory: MemoryRecord,
        content: str | None,
        bound: Any,
    ) -> None:
        """Stage the trace file, commit the ``memories`` row (fenced), rename the file into place.

        The project's row (with its memory root) is made sure of first, under the same retry.

        ``content`` ``None`` is a no-op memory: the thread's trace files are removed after the
        commit, and no memory folder is created for it (SPEC §19). A store failure is retried
        (:data:`COMMIT_ATTEMPTS`, event ``extract_commit_retry``) while the staged file waits; a
        final failure or a refused commit removes the temp file. If the rename fails after the row
        committed, the row stays the truth: event ``trace_file_commit_failed``, and the file is
        written again from the row before the project's next consolidation (and at start-up).

        Raises:
            MemoryWriteError: the temp file could not be written (disk full); nothing changed.
            LeaseLost: the claim was taken over; nothing was written.
            StoreError: the database stayed unavailable; nothing was written.
        """
        staged = None
        if content is None:
            root = memory_files.project_root(self._memory_dir, memory.project)
        else:
            assert memory.path is not None
            root = await asyncio.to_thread(memory_files.ensure_project_root, self._memory_dir, memory.project)
            staged = await asyncio.to_thread(
                memory_files.stage_file, root, memory.path, content, thread_id=memory.thread_id
            )
        try:
            committed = await self._commit_row(job, memory, root, bound)
        except BaseException:
            if staged is not None:
                await asyncio.to_thread(staged.abort)
            raise
        if not committed:
            if staged is not None:
                await asyncio.to_thread(staged.abort)
            raise LeaseLost(
                f"extract job for {memory.thread_id} lost its lease or its thread was forgotten"
                f" (fencing token {job.fencing_token}); nothing was written"
            )
        if staged is None:
            await asyncio.to_thread(memory_files.remove_trace, root, memory.thread_id)
            return
        try:
            await asyncio.to_thread(staged.commit)
        except MemoryWriteError as exc:
            self._faults.note("trace_file_commit_failed", exc, now_s=self._clock.now())
            bound.error(
                "trace_file_commit_failed",
                error=str(exc),
                action="the memory is saved in the database; "
                "its trace file is written again before the next consolidation",
            )

    async def _commit_row(self, job: JobRecord, memory: MemoryRecord, root: Path, bound: Any) -> bool:
        """Make sure of the project's row, then commit the memory fenced by the claim."""
        for attempt in range(1, COMMIT_ATTEMPTS + 1):
            try:
                await self._store.projects.ensure(memory.project, str(root))
                return await self._store.jobs.finish_extract(job, memory)
            except StoreError as exc:
                if attempt == COMMIT_ATTEMPTS:
                    raise
                self._faults.note("extract_commit_retry", exc, now_s=self._clock.now())
                bound.warning("extract_commit_retry", error=str(exc), attempt=attempt)
                await self._clock.sleep(COMMIT_RETRY_PAUSE_S)
        raise AssertionError("unreachable")  # pragma: no cover


def trace_header(thread: ThreadRecord, agent: Agent, source_watermark: int) -> memory_files.TraceHeader:
    """The trace file header of a thread's memory (SPEC §8)."""
    return memory_files.TraceHeader(
        thread_id=thread.id,
        project=thread.project,
        cwd=thread.cwd,
        rollout_path=thread.path,
        updated_at=thread.updated_at,
        agent=agent,
        started_at=thread.created_at,
        source_watermark=source_watermark,
    )


def _context(thread: ThreadRecord, request: ExtractionRequest) -> TraceContext:
    """The trace context line: project, the session's date (not the file's mtime), agent, model."""
    return TraceContext(
        project=thread.project,
        date=iso_utc(thread.created_at)[:10],
        agent=request.agent,
        model=thread.model or "unknown model",
    )
