"""Wiring: builds the components from :class:`~memd.config.Settings` and runs them.

Only this module and :mod:`memd.cli` know every component. :class:`Daemon` owns the store
connection, the indexer, the scheduler, the extraction pool and the consolidation runner, and
runs them either as the long-lived service (:meth:`Daemon.serve`, ``memd run``) or as a single
pass (:meth:`Daemon.once`, ``memd once``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

import structlog

from memd import memory_files, sources
from memd.clock import Clock, SystemClock, iso_utc
from memd.config import Settings
from memd.consolidate.runner import ConsolidationRunner
from memd.budget import TokenEstimator
from memd.extract.base import BuiltInput, ExtractionRequest, Extractor
from memd.extract.input_builder import build_input
from memd.extract.offline import OfflineExtractor
from memd.extract.pool import ExtractionPool
from memd.indexer import Indexer
from memd.rollout.session import RolloutParser
from memd.scheduler import RetryPolicy, Scheduler
from memd.service import Notifier, ShutdownSignals, daemon_status_line, watchdog_interval_s, watchdog_loop
from memd.store.records import ThreadRecord
from memd.store.store import Store, make_owner

if TYPE_CHECKING:
    from memd.llm import LLMConfig

log = structlog.get_logger("memd.daemon")

#: Environment variables never passed to the consolidation subprocess unless it needs the model.
SECRET_ENV = ("OPENAI_API_KEY", "MEMD_LLM__API_KEY", "ANTHROPIC_API_KEY")


@dataclass(frozen=True, slots=True)
class OnceSummary:
    """What ``memd once`` did: threads extracted, no-ops, failures, projects consolidated."""

    extracted: int
    noop: int
    failed: int
    consolidated: int
    consolidation_failed: int
    duration_s: float


def load_rollout(path: str, watermark: int, max_line_bytes: int) -> RolloutParser:
    """Parse a rollout from byte 0 up to ``watermark`` (complete lines only, bounded memory).

    Raises:
        RolloutReadError: the file vanished, became unreadable or was replaced.
    """
    parser = RolloutParser(path=path)
    stream = sources.read_lines_until(path, watermark, max_line_bytes)
    batch: list[bytes] = []
    for line in stream:
        batch.append(line)
        if len(batch) >= 4096:
            parser.feed(batch)
            batch.clear()
    parser.feed(batch)
    if stream.oversized_lines:
        parser.feed_malformed(stream.oversized_lines, "line_too_long")
    return parser


def llm_config(settings: Settings, *, model: str | None = None) -> LLMConfig:
    """The model client configuration from ``[llm]`` (``model`` overrides the model name)."""
    from memd.llm import LLMConfig

    llm = settings.llm
    return LLMConfig(
        api=llm.api,
        base_url=llm.base_url,
        model=model or llm.model,
        api_key=llm.api_key.get_secret_value() if llm.api_key else "",
        timeout_s=llm.timeout_s,
        reasoning_effort=llm.reasoning_effort,
        max_attempts=llm.max_attempts,
        stream=llm.stream,
    )


class Daemon:
    """memd's main job.

    Args:
        settings: the validated settings.
        clock: time source (tests inject a fake one).
    """

    def __init__(self, settings: Settings, *, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        self.owner = make_owner()
        self.store: Store | None = None
        self.extractor: Extractor | None = None
        self.extractor_name, self.extractor_reason = settings.resolved_extractor()
        self._stop = asyncio.Event()
        self._dirty_projects: set[str] = set()
        self._plan_now = asyncio.Event()
        self._queue_depth = 0

    # -- construction ---------------------------------------------------------------------------
    async def open(self) -> None:
        """Open the store, register this daemon, recover half-written memory files."""
        s = self.settings
        self.store = await Store.open(s.db_path, clock=self.clock)
        await self.store.register_daemon(self.owner, os.getpid(), socket.gethostname())
        await self.store.set_meta("extractor", f"{self.extractor_name}: {self.extractor_reason}")
        self.estimator = TokenEstimator.from_json(await self.store.get_meta("token_estimator") or "")
        self.extractor = self._make_extractor()
        self.indexer = Indexer(
            self.store,
            self.clock,
            roots=s.sessions,
            max_line_bytes=s.max_line_bytes,
            include_sources=s.include_sources,
            project_rule=s.project_key,
        )
        self.scheduler = Scheduler(self.store, self.indexer, self.clock, min_idle_s=s.min_idle_s, max_age_days=s.max_age_days)
        self.pool = ExtractionPool(
            self.store,
            self.clock,
            extractor=self.extractor,
            prepare=self._prepare,
            memory_dir=s.memory_dir,
            owner=self.owner,
            concurrency=s.extract_concurrency,
            lease_s=s.extract_lease_s,
            retry=RetryPolicy(base_s=s.retry_base_s, cap_s=s.retry_cap_s, max_attempts=s.max_attempts),
            max_input_tokens=s.llm.max_input_tokens,
            on_done=self._dirty_projects.add,
        )
        self.runner = ConsolidationRunner(
            self.store,
            self.clock,
            memory_dir=s.memory_dir,
            command=s.consolidation.command,
            lease_s=s.consolidation.lease_s,
            timeout_s=s.consolidation.timeout_s,
            kill_grace_s=s.consolidation.kill_grace_s,
            max_traces_per_project=s.consolidation.max_traces_per_project,
            owner=self.owner,
            env=self._consolidation_env(),
        )
        await self._recover()
        log.info(
            "daemon_started",
            owner=self.owner,
            extractor=self.extractor_name,
            extractor_reason=self.extractor_reason,
            sessions=[str(p) for p in s.sessions],
            state_dir=str(s.state_dir),
            memory_dir=str(s.memory_dir),
        )

    def _make_extractor(self) -> Extractor:
        if self.extractor_name == "offline":
            return OfflineExtractor()
        from memd.budget import DailyBudget
        from memd.extract.openai_extractor import OpenAIExtractor
        from memd.llm import LLMClient

        assert self.store is not None
        self.estimator = TokenEstimator()
        client = LLMClient(llm_config(self.settings), usage=self.store, clock=self.clock)
        budget = DailyBudget(self.settings.daily_token_budget, self.store, self.clock)
        return OpenAIExtractor(client, estimator=self.estimator, budget=budget, rebuild=self._rebuild)

    async def _rebuild(self, request: ExtractionRequest, max_input_tokens: int) -> BuiltInput:
        """Build a thread's input again for a smaller budget (after a context-length error)."""
        thread = await self.store.get_thread(request.thread_id) if self.store else None
        if thread is None:
            return request.built
        return (await self._prepare(thread, max_input_tokens)).built

    def _consolidation_env(self) -> dict[str, str]:
        env = dict(os.environ)
        own_command = "memd" in " ".join(self.settings.consolidation.command)
        if not (own_command and self.extractor_name == "openai"):
            for name in SECRET_ENV:
                env.pop(name, None)
        return env

    async def _recover(self) -> None:
        """Finish what a crash interrupted (SPEC §5 invariant).

        Temporary files of interrupted writes are removed. A ``memories`` row is the truth: a
        trace among the project's newest ``max_traces_per_project`` whose file is missing (a crash
        between the row's commit and the rename) is written again from the row.
        """
        assert self.store is not None
        keep_n = self.settings.consolidation.max_traces_per_project
        for project in await self.store.list_projects():
            root = Path(project.memory_root)
            if not root.is_dir():
                continue
            memories = await self.store.list_memories(project.project)
            keep = {m.path for m in memories if m.path}
            report = await asyncio.to_thread(memory_files.recover, root, keep)
            rewritten = 0
            for memory in [m for m in memories if m.path][:keep_n]:
                if memory_files.trace_exists(root, memory.path, memory.trace_memory):  # type: ignore[arg-type]
                    continue
                thread = await self.store.get_thread(memory.thread_id)
                header = memory_files.TraceHeader(
                    thread_id=memory.thread_id,
                    project=memory.project,
                    cwd=thread.cwd if thread else "",
                    rollout_path=thread.path if thread else "",
                    updated_at=thread.updated_at if thread else memory.generated_at,
                )
                content = memory_files.render_trace_file(header, memory.trace_memory)
                staged = await asyncio.to_thread(
                    memory_files.stage_file, root, memory.path, content, thread_id=memory.thread_id
                )
                await asyncio.to_thread(staged.commit)
                rewritten += 1
            if report.removed or rewritten:
                log.info("memory_recovered", project=project.project, removed=report.removed, rewritten=rewritten)

    async def _prepare(self, thread: ThreadRecord, max_input_tokens: int) -> ExtractionRequest:
        s = self.settings

        def work() -> ExtractionRequest:
            parser = load_rollout(thread.path, thread.watermark, s.max_line_bytes)
            built = build_input(
                parser.result,
                tool_output_cap_bytes=s.tool_output_cap_bytes,
                max_input_tokens=max_input_tokens,
                bytes_per_token=self.estimator.bytes_per_token,
            )
            return ExtractionRequest(
                thread_id=thread.id,
                project=thread.project,
                cwd=thread.cwd,
                rollout_path=thread.path,
                updated_at=thread.updated_at,
                agent="codex",
                model=thread.model,
                built=built,
                max_input_tokens=max_input_tokens,
            )

        return await asyncio.to_thread(work)

    async def close(self) -> None:
        """Release everything: extractor clients, daemon registration, the database."""
        if self.extractor is not None:
            with contextlib.suppress(Exception):
                await self.extractor.aclose()
        if self.store is not None and self.estimator.samples:
            with contextlib.suppress(Exception):
                await self.store.set_meta("token_estimator", self.estimator.to_json())
        if self.store is not None:
            with contextlib.suppress(Exception):
                await self.store.unregister_daemon(self.owner)
            await self.store.close()
            self.store = None

    # -- consolidation --------------------------------------------------------------------------
    async def consolidate_due(self, *, delay_s: float, min_interval_s: float) -> tuple[int, int]:
        """Run consolidation for every project that is due; return (succeeded, failed)."""
        assert self.store is not None
        ok = failed = 0
        for project in await self.store.projects_due(delay_s, min_interval_s):
            if self._stop.is_set():
                break
            outcome = await self.runner.run(project.project, project.memory_seq)
            if outcome.ok:
                ok += 1
            elif outcome.error and not outcome.error.startswith("skipped"):
                failed += 1
        return ok, failed

    # -- memd once ------------------------------------------------------------------------------
    async def once(self, *, progress: Callable[[int, int], None] | None = None) -> OnceSummary:
        """Scan, extract every eligible thread, consolidate every touched project, return.

        Args:
            progress: called as ``progress(done, total)`` after each job (for a TTY progress bar).
        """
        assert self.store is not None
        started = time.monotonic()
        await self.indexer.scan()
        plan = await self.scheduler.plan()
        total = plan.queued
        stop = asyncio.Event()
        if progress is not None:
            progress(0, total)
            reporter = asyncio.create_task(self._report_progress(progress, total, stop))
        await self.pool.run(stop, burst=True)
        stop.set()
        if progress is not None:
            await reporter
        ok, failed = await self.consolidate_due(delay_s=0.0, min_interval_s=0.0)
        stats = self.pool.stats
        return OnceSummary(
            extracted=stats.done,
            noop=stats.noop,
            failed=stats.failed,
            consolidated=ok,
            consolidation_failed=failed,
            duration_s=round(time.monotonic() - started, 3),
        )

    async def _report_progress(self, progress: Callable[[int, int], None], total: int, stop: asyncio.Event) -> None:
        last = -1
        while True:
            done = self.pool.stats.done + self.pool.stats.failed
            if done != last:
                progress(done, total)
                last = done
            if stop.is_set():
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)

    # -- memd run -------------------------------------------------------------------------------
    def status_line(self) -> str:
        """The one-line STATUS= text for systemd: queue, running jobs, last activity."""
        last = self.pool.stats.last_activity_at
        paused = self.pool.paused_reason
        line = daemon_status_line(self._queue_depth, self.pool.running, iso_utc(last) if last else "none yet")
        return f"{line}; paused: {paused}" if paused else line

    async def serve(self, signals: ShutdownSignals | None = None) -> int:
        """Run until SIGTERM/SIGINT (or :meth:`stop`); return the exit code (0 on a clean stop)."""
        assert self.store is not None
        s = self.settings
        notifier = Notifier.from_env()
        if signals is not None:
            self._stop = signals.stop_event
        await self.indexer.scan()
        notifier.ready()
        notifier.status(self.status_line())
        tasks = [
            asyncio.create_task(self._watch_loop(), name="watch"),
            asyncio.create_task(self._rescan_loop(), name="rescan"),
            asyncio.create_task(self._plan_loop(), name="plan"),
            asyncio.create_task(self.pool.run(self._stop), name="pool"),
            asyncio.create_task(self._consolidate_loop(), name="consolidate"),
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
        ]
        interval = watchdog_interval_s()
        if interval:
            tasks.append(asyncio.create_task(watchdog_loop(notifier, interval, self._stop, self.status_line), name="watchdog"))
        force = signals.force_event if signals is not None else asyncio.Event()
        await self._stop.wait()
        notifier.stopping()
        notifier.close()
        log.info("daemon_stopping", running=self.pool.running, grace_s=s.shutdown_grace_s)
        drain = asyncio.create_task(self.pool.drain(s.shutdown_grace_s))
        forced = asyncio.create_task(force.wait())
        await asyncio.wait({drain, forced}, return_when=asyncio.FIRST_COMPLETED)
        if not drain.done():
            log.warning("shutdown_forced_cancel")
            drain.cancel()
        forced.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, drain, return_exceptions=True)
        log.info("daemon_stopped")
        return 0

    def stop(self) -> None:
        """Ask :meth:`serve` to stop (as SIGTERM does)."""
        self._stop.set()

    async def _guard(self, name: str, coro_fn: Callable[[], object], every_s: float) -> None:
        """Run ``coro_fn`` every ``every_s`` seconds until stop; log and survive failures."""
        while not self._stop.is_set():
            try:
                await coro_fn()  # type: ignore[misc]
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error(f"{name}_failed", error=f"{type(exc).__name__}: {exc}", exc_info=True)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), every_s)

    async def _watch_loop(self) -> None:
        async for paths in sources.watch_roots(self.settings.sessions, stop_event=self._stop, force_polling=self.settings.force_polling):
            try:
                summary = await self.indexer.refresh_paths(paths)
            except Exception as exc:
                log.error("watch_refresh_failed", error=str(exc), exc_info=True)
                continue
            if summary.indexed:
                self._plan_now.set()

    async def _rescan_loop(self) -> None:
        interval = self.settings.rescan_interval_s
        with contextlib.suppress(asyncio.TimeoutError):  # the start-up scan already ran
            await asyncio.wait_for(self._stop.wait(), interval)

        async def tick() -> None:
            await self.indexer.scan()
            self._plan_now.set()

        await self._guard("rescan", tick, interval)

    async def _plan_loop(self) -> None:
        while not self._stop.is_set():
            wait_s = 60.0
            try:
                plan = await self.scheduler.plan()
                self._queue_depth = await self.store.queue_depth() if self.store else 0
                if plan.queued:
                    self.pool.wake()
                if plan.next_due_s is not None:
                    wait_s = min(wait_s, plan.next_due_s + 0.5)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("plan_failed", error=f"{type(exc).__name__}: {exc}", exc_info=True)
            self._plan_now.clear()
            waiters = [asyncio.ensure_future(self._stop.wait()), asyncio.ensure_future(self._plan_now.wait())]
            await asyncio.wait(waiters, timeout=max(0.1, wait_s), return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()

    async def _consolidate_loop(self) -> None:
        c = self.settings.consolidation

        async def tick() -> None:
            await self.consolidate_due(delay_s=c.delay_s, min_interval_s=c.min_interval_s)

        await self._guard("consolidate", tick, max(1.0, min(30.0, c.delay_s / 4 or 1.0)))

    async def _heartbeat_loop(self) -> None:
        async def tick() -> None:
            if self.store is not None:
                await self.store.heartbeat_daemon(self.owner)

        await self._guard("daemon_heartbeat", tick, 30.0)
