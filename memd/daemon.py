"""Wiring: builds the components from :class:`~memd.config.Settings` and runs them.

Only this module and :mod:`memd.cli` know every component. :class:`Daemon` owns the store
connection, the indexer, the scheduler, the extraction pool and the consolidation runner, and
runs them either as the long-lived service (:meth:`Daemon.serve`, ``memd run``) or as a single
pass (:meth:`Daemon.once`, ``memd once``).

Faults (SPEC §13): every loop of the service survives its failures — the first of a run is
logged (``plan_failed``, ``rescan_failed``, ``consolidate_failed``, ``watch_failed``, ...), the
loop retries after a bounded pause, ``<loop>_recovered`` is logged when it works again, and the
newest fault is saved for ``memd status`` (meta ``last_fault``). At start-up the memory roots are
repaired after a crash (:meth:`Daemon._recover`), leaving alone what another daemon on the same
state may be writing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from memd.clock import Clock, SystemClock, iso_utc
from memd.config import Settings
from memd.consolidate.runner import ConsolidationRunner
from memd.errors import MemdError, MemoryWriteError
from memd.extract.base import BuiltInput, ExtractionRequest, Extractor
from memd.extract.input_builder import build_input
from memd.extract.offline import OfflineExtractor
from memd.extract.pool import ExtractionPool
from memd.ingest import reader, watch
from memd.ingest.indexer import Indexer
from memd.llm.budget import TokenEstimator
from memd.memory import files as memory_files
from memd.memory import recover as memory_recover
from memd.read.usage import citation_uses, tool_uses
from memd.rollout.session import RolloutParser
from memd.schedule.retry import RetryPolicy
from memd.schedule.scheduler import Scheduler
from memd.service.notify import Notifier, daemon_status_line, watchdog_interval_s, watchdog_loop
from memd.service.signals import ShutdownSignals
from memd.status import daemon_alive
from memd.store.records import ProjectRecord, ThreadRecord
from memd.store.search import SearchIndex
from memd.store.store import Store, make_owner

if TYPE_CHECKING:
    from memd.llm.client import LLMConfig

log = structlog.get_logger(__name__)

#: Environment variables never passed to the consolidation subprocess unless it needs the model.
SECRET_ENV = ("OPENAI_API_KEY", "MEMD_LLM__API_KEY", "ANTHROPIC_API_KEY")
#: Pause before planning again after a failed planning pass (database locked, ...), seconds.
PLAN_RETRY_S = 5.0
#: An idle worker looks for due retries this often (seconds); new jobs wake it at once.
POOL_POLL_S = 30.0
#: Longest pause before the watcher is restarted after an unexpected failure, seconds.
WATCH_RESTART_CAP_S = 60.0


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
    stream = reader.read_lines_until(path, watermark, max_line_bytes)
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
    from memd.llm.client import LLMConfig

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
        self.estimator = TokenEstimator()
        self._last_fault: dict[str, str] | None = None
        self._saved_fault: dict[str, str] | None = None

    # -- construction ---------------------------------------------------------------------------
    async def open(self) -> None:
        """Open the store, register this daemon, recover half-written memory files."""
        self.store = await Store.open(self.settings.db_path, clock=self.clock)
        try:
            await self._open()
        except BaseException:
            await self.close()
            raise

    async def _open(self) -> None:
        assert self.store is not None
        s = self.settings
        await self.store.daemons.register(self.owner, os.getpid(), socket.gethostname())
        await self.store.meta.set("extractor", f"{self.extractor_name}: {self.extractor_reason}")
        self.estimator = TokenEstimator.from_json(await self.store.meta.get("token_estimator") or "")
        self.extractor = self._make_extractor()
        self.indexer = Indexer(
            self.store,
            self.clock,
            roots=s.sessions,
            max_line_bytes=s.max_line_bytes,
            include_sources=s.include_sources,
            project_rule=s.project_key,
        )
        self.scheduler = Scheduler(
            self.store, self.indexer, self.clock, min_idle_s=s.min_idle_s, max_age_days=s.max_age_days
        )
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
            poll_s=POOL_POLL_S,
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
        # The search index follows the memory files: checked once per project at start (a stat per file),
        # then after each extraction and consolidation (SPEC §18).
        self._dirty_projects.update(p.project for p in await self.store.projects.list_all())
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
        from memd.extract.openai_extractor import OpenAIExtractor
        from memd.llm.budget import DailyBudget
        from memd.llm.client import LLMClient

        assert self.store is not None
        # self.estimator holds the calibration persisted by the previous run (meta token_estimator).
        client = LLMClient(llm_config(self.settings), usage=self.store.usage, clock=self.clock)
        budget = DailyBudget(self.settings.daily_token_budget, self.store.usage, self.clock)
        return OpenAIExtractor(client, estimator=self.estimator, budget=budget, rebuild=self._rebuild)

    async def _rebuild(self, request: ExtractionRequest, max_input_tokens: int) -> BuiltInput:
        """Build a thread's input again for a smaller budget (after a context-length error)."""
        thread = await self.store.threads.get(request.thread_id) if self.store else None
        if thread is None:
            return request.built
        return (await self._prepare(thread, max_input_tokens)).built

    def _consolidation_env(self) -> dict[str, str]:
        """The consolidation command's environment: memd's own without the API keys, except the
        OpenAI ones when the command is memd's own consolidator using the model (SPEC §14)."""
        env = dict(os.environ)
        argv = self.settings.consolidation.command
        own_command = argv[1:3] == ["-m", "memd"] or Path(argv[0]).name == "memd"
        needed = {"OPENAI_API_KEY", "MEMD_LLM__API_KEY"} if own_command and self.extractor_name == "openai" else set()
        for name in SECRET_ENV:
            if name not in needed:
                env.pop(name, None)
        return env

    async def _other_daemon_alive(self) -> bool:
        """Whether another registered daemon is running on this state (it may be writing)."""
        assert self.store is not None
        now = self.clock.now()
        return any(d.owner != self.owner and daemon_alive(d, now) for d in await self.store.daemons.list_all())

    async def _recover(self) -> None:
        """Finish what a crash interrupted (SPEC §5 invariant), once at start-up.

        Temporary files of interrupted writes, stale consolidation staging directories and
        trace files no ``memories`` row names are removed; a ``memories`` row is the truth, and a
        trace among the project's newest ``max_traces_per_project`` whose file is missing or
        differs (a crash between the row's commit and the rename) is written again from the row.

        When another daemon is running on the same state, only leftovers older than the longest
        write it may have in flight are removed (its temp files and fresh traces are not
        leftovers). A failure is logged per project (``memory_recover_failed``) and start-up
        goes on.
        """
        assert self.store is not None
        s = self.settings
        shared = await self._other_daemon_alive()
        min_age_s = max(s.extract_lease_s, s.consolidation.timeout_s) if shared else 0.0
        for project in await self.store.projects.list_all():
            root = Path(project.memory_root)
            if not root.is_dir():
                continue
            try:
                memories = await self.store.memories.list_for_project(project.project)
                keep = {m.path for m in memories if m.path}

                def kept(relpath: str, keep: set[str | None] = keep, root: Path = root) -> bool:
                    if relpath in keep:
                        return True
                    if not min_age_s:
                        return False
                    try:  # another daemon may have committed it after we listed the rows
                        return time.time() - (root / relpath).lstat().st_mtime < min_age_s
                    except OSError:
                        return False

                report = await asyncio.to_thread(memory_recover.recover, root, kept, min_age_s=min_age_s)
                rewritten = await self._repair_traces(project, memories)
            except (MemdError, OSError) as exc:
                self._note_fault("memory_recover_failed", exc)
                log.error("memory_recover_failed", project=project.project, error=str(exc))
                continue
            if report.removed or rewritten:
                log.info("memory_recovered", project=project.project, removed=report.removed, rewritten=rewritten)

    async def _repair_traces(self, project: ProjectRecord, memories: list | None = None) -> int:  # type: ignore[type-arg]
        """Write again, from their rows, the project's newest trace files that are missing.

        Returns:
            How many files were written.

        Raises:
            MemoryWriteError: a file could not be written (disk full); the row stays the truth.
        """
        assert self.store is not None
        root = Path(project.memory_root)
        if memories is None:
            memories = await self.store.memories.list_for_project(project.project)
        keep_n = self.settings.consolidation.max_traces_per_project
        rewritten = 0
        for memory in [m for m in memories if m.path][:keep_n]:
            if await asyncio.to_thread(memory_files.trace_exists, root, memory.path, memory.trace_memory):
                continue
            thread = await self.store.threads.get(memory.thread_id)
            header = memory_files.TraceHeader(
                thread_id=memory.thread_id,
                project=memory.project,
                cwd=thread.cwd if thread else "",
                rollout_path=thread.path if thread else "",
                updated_at=thread.updated_at if thread else memory.generated_at,
            )
            content = memory_files.render_trace_file(header, memory.trace_memory)

            def write(relpath: str = memory.path, content: str = content, thread_id: str = memory.thread_id) -> None:
                memory_files.stage_file(root, relpath, content, thread_id=thread_id).commit()

            await asyncio.to_thread(write)
            rewritten += 1
        if rewritten:
            log.info("trace_files_rewritten", project=project.project, count=rewritten)
        return rewritten

    async def _prepare(self, thread: ThreadRecord, max_input_tokens: int) -> ExtractionRequest:
        s = self.settings

        def work() -> ExtractionRequest:
            parser = load_rollout(thread.path, thread.watermark, s.max_line_bytes)
            self._record_uses(thread, parser.result.items)
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
                started_at=thread.created_at,
                agent="codex",
                model=thread.model,
                built=built,
                max_input_tokens=max_input_tokens,
            )

        return await asyncio.to_thread(work)

    # -- the read path (SPEC §18): search index and usage signal ------------------------------------
    def _record_uses(self, thread: ThreadRecord, items: Sequence[object]) -> None:
        """Record the memd memory this session used (memd MCP calls, Codex citations); blocking, idempotent."""
        s = self.settings
        root = memory_files.project_root(s.memory_dir, thread.project)
        events = tool_uses(items, thread_id=thread.id, default_ts=thread.updated_at)
        events += citation_uses(
            items,
            thread_id=thread.id,
            memory_dir=s.memory_dir,
            project_root=root,
            project=thread.project,
            default_ts=thread.updated_at,
        )
        if not events:
            return
        try:
            index = SearchIndex.open(s.db_path)
            if index is None:
                return
            try:
                new = index.record_uses(events)
            finally:
                index.close()
        except Exception as exc:  # the usage signal must never fail an extraction
            log.warning("usage_record_failed", thread_id=thread.id, error=str(exc))
            return
        log.info("memory_used", thread_id=thread.id, uses=len(events), new=new)

    def _refresh_index(self, projects: set[str]) -> None:
        """Bring the search index in line with these projects' memory files (blocking; a few stats each)."""
        s = self.settings
        try:
            index = SearchIndex.open(s.db_path)
            if index is None:
                return
            try:
                for project in sorted(projects):
                    report = index.refresh(project, memory_files.project_root(s.memory_dir, project), full=True)
                    if report.indexed or report.removed:
                        log.debug("search_indexed", project=project, indexed=report.indexed, removed=report.removed)
            finally:
                index.close()
        except Exception as exc:  # a stale index is served until the next refresh; MCP refreshes on demand
            log.warning("search_index_failed", error=str(exc))

    async def refresh_search_index(self) -> None:
        """Refresh the index for every project whose memory files changed since the last call."""
        projects, self._dirty_projects = self._dirty_projects, set()
        if projects:
            await asyncio.to_thread(self._refresh_index, projects)

    async def close(self) -> None:
        """Release everything: extractor clients, daemon registration, the database."""
        if self.extractor is not None:
            with contextlib.suppress(Exception):
                await self.extractor.aclose()
        if self.store is not None:
            with contextlib.suppress(Exception):
                await self._save_fault()
        if self.store is not None and self.estimator.samples:
            with contextlib.suppress(Exception):
                await self.store.meta.set("token_estimator", self.estimator.to_json())
        if self.store is not None:
            with contextlib.suppress(Exception):
                await self.store.daemons.unregister(self.owner)
            await self.store.close()
            self.store = None

    # -- consolidation --------------------------------------------------------------------------
    async def consolidate_due(self, *, delay_s: float, min_interval_s: float) -> tuple[int, int]:
        """Run consolidation for every project that is due; return (succeeded, failed).

        Each project is looked at again just before its run (another daemon may have
        consolidated it meanwhile), and its missing trace files are written again from their
        rows first (a rename that failed after its row committed).
        """
        assert self.store is not None
        ok = failed = 0
        for due in await self.store.projects.due(delay_s, min_interval_s):
            if self._stop.is_set():
                break
            project = await self.store.projects.get(due.project)
            if project is None or project.consolidated_seq >= project.memory_seq:
                continue
            try:
                await self._repair_traces(project)
            except (MemoryWriteError, OSError) as exc:
                self._note_fault("trace_repair_failed", exc)
                log.warning("trace_repair_failed", project=project.project, error=str(exc))
            outcome = await self.runner.run(project.project, project.memory_seq)
            self._dirty_projects.add(project.project)
            await self.refresh_search_index()
            if outcome.error and outcome.error.startswith("lease_error"):
                self._note_fault("consolidate_lease_error", outcome.error)
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
        base = self.pool.stats
        base_done, base_noop, base_failed = base.done, base.noop, base.failed
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
        await self.refresh_search_index()
        stats = self.pool.stats
        return OnceSummary(
            extracted=stats.done - base_done,
            noop=stats.noop - base_noop,
            failed=stats.failed - base_failed,
            consolidated=ok,
            consolidation_failed=failed,
            duration_s=round(time.monotonic() - started, 3),
        )

    async def _report_progress(self, progress: Callable[[int, int], None], total: int, stop: asyncio.Event) -> None:
        last = -1
        base = self.pool.stats.done + self.pool.stats.failed
        while True:
            done = self.pool.stats.done + self.pool.stats.failed - base
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
        """Run until SIGTERM/SIGINT (or :meth:`stop`); return the exit code (0 on a clean stop,
        1 when one of its loops ended with an unexpected error — event ``daemon_loop_crashed`` —
        so that systemd's ``Restart=on-failure`` starts it again).

        Shutdown (SPEC §12): stop claiming; let running extractions and the running
        consolidation finish within ``shutdown_grace_s``; then cancel what is left — job claims
        are given back, the consolidation's process group gets SIGTERM then SIGKILL and its
        lease is released. A second signal (``signals.force_event``) skips the rest of the grace
        period. The caller closes the store (:meth:`close`).
        """
        assert self.store is not None
        s = self.settings
        notifier = Notifier.from_env()
        if signals is not None:
            self._stop = signals.stop_event
        try:
            await self.indexer.scan()
        except MemdError as exc:  # e.g. the database locked: the periodic rescan tries again
            self._failure("scan_failed", exc, 1, retry_in_s=s.rescan_interval_s)
        notifier.ready()
        notifier.status(self.status_line())
        pool_task = asyncio.create_task(self.pool.run(self._stop), name="pool")
        consolidate_task = asyncio.create_task(self._consolidate_loop(), name="consolidate")
        tasks = [
            asyncio.create_task(self._watch_loop(), name="watch"),
            asyncio.create_task(self._rescan_loop(), name="rescan"),
            asyncio.create_task(self._plan_loop(), name="plan"),
            pool_task,
            consolidate_task,
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
        ]
        interval = watchdog_interval_s()
        if interval:
            tasks.append(
                asyncio.create_task(watchdog_loop(notifier, interval, self._stop, self.status_line), name="watchdog")
            )
        crashed: list[str] = []

        def watch(task: asyncio.Task[object]) -> None:  # a loop must never end on its own
            if task.cancelled() or self._stop.is_set():
                return
            exc = task.exception()
            crashed.append(task.get_name())
            log.error(
                "daemon_loop_crashed",
                loop=task.get_name(),
                error=repr(exc),
                exc_info=exc,
                action="stopping; the service manager restarts memd",
            )
            self._stop.set()

        for task in tasks:
            task.add_done_callback(watch)
        force = signals.force_event if signals is not None else asyncio.Event()
        await self._stop.wait()
        notifier.stopping()
        notifier.close()
        log.info("daemon_stopping", running=self.pool.running, grace_s=s.shutdown_grace_s)

        async def wind_down() -> None:
            # The pool loop ends by itself (a claim in flight is given back), the consolidation
            # loop after the project it is running; jobs get the grace period.
            await asyncio.gather(
                self.pool.drain(s.shutdown_grace_s),
                asyncio.wait({pool_task, consolidate_task}, timeout=s.shutdown_grace_s),
            )

        graceful = asyncio.create_task(wind_down())
        forced = asyncio.create_task(force.wait())
        await asyncio.wait({graceful, forced}, return_when=asyncio.FIRST_COMPLETED)
        if not graceful.done():
            log.warning("shutdown_forced_cancel", running=self.pool.running)
            graceful.cancel()
        forced.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(graceful, self.pool.cancel_all(), *tasks, return_exceptions=True)
        log.info("daemon_stopped", crashed=crashed or None)
        return 1 if crashed else 0

    def stop(self) -> None:
        """Ask :meth:`serve` to stop (as SIGTERM does)."""
        self._stop.set()

    def _note_fault(self, event: str, error: BaseException | str) -> None:
        """Remember the newest fault survived, for ``memd status`` (saved by :meth:`_save_fault`)."""
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        self._last_fault = {"at": iso_utc(self.clock.now()), "event": event, "error": text[:500]}

    def _failure(self, event: str, exc: BaseException, failures: int, *, retry_in_s: float) -> None:
        self._note_fault(event, exc)
        _log_failure(event, exc, failures, retry_in_s=retry_in_s)

    async def _save_fault(self) -> None:
        """Store the newest fault the daemon or its pool survived as meta ``last_fault`` (JSON
        ``{"at", "event", "error"}``) once the database takes writes again; ``memd status``
        shows it."""
        pool = getattr(self, "pool", None)
        faults = [f for f in (self._last_fault, pool.last_fault if pool else None) if f]
        if not faults or self.store is None:
            return
        newest = max(faults, key=lambda f: f["at"])
        if newest != self._saved_fault:
            await self.store.meta.set("last_fault", json.dumps(newest))
            self._saved_fault = newest

    async def _guard(self, name: str, coro_fn: Callable[[], object], every_s: float) -> None:
        """Run ``coro_fn`` every ``every_s`` seconds until stop; log and survive failures.

        The first failure of a run of failures is logged (``<name>_failed``; a traceback only
        for an unexpected error), repeats at debug level, and ``<name>_recovered`` when it works
        again.
        """
        failures = 0
        while not self._stop.is_set():
            try:
                await coro_fn()  # type: ignore[misc]
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                self._failure(f"{name}_failed", exc, failures, retry_in_s=every_s)
            else:
                if failures:
                    log.info(f"{name}_recovered", failures=failures)
                    failures = 0
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), every_s)

    async def _watch_loop(self) -> None:
        restarts = 0
        while not self._stop.is_set():
            try:
                async for paths in watch.watch_roots(
                    self.settings.sessions, stop_event=self._stop, force_polling=self.settings.force_polling
                ):
                    restarts = 0
                    try:
                        summary = await self.indexer.refresh_paths(paths)
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:
                        self._failure("watch_refresh_failed", exc, 1, retry_in_s=self.settings.rescan_interval_s)
                        continue
                    if summary.indexed:
                        self._plan_now.set()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                restarts += 1
                delay_s = min(WATCH_RESTART_CAP_S, 2.0**restarts)
                self._failure("watch_failed", exc, 1, retry_in_s=delay_s)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay_s)

    async def _rescan_loop(self) -> None:
        interval = self.settings.rescan_interval_s
        with contextlib.suppress(asyncio.TimeoutError):  # the start-up scan already ran
            await asyncio.wait_for(self._stop.wait(), interval)

        async def tick() -> None:
            await self.indexer.scan()
            self._plan_now.set()

        await self._guard("rescan", tick, interval)

    async def _plan_loop(self) -> None:
        failures = 0
        while not self._stop.is_set():
            wait_s = 60.0
            try:
                plan = await self.scheduler.plan()
                self._queue_depth = await self.store.jobs.queue_depth() if self.store else 0
                if plan.queued:
                    self.pool.wake()
                if plan.next_due_s is not None:
                    wait_s = min(wait_s, plan.next_due_s + 0.5)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                wait_s = PLAN_RETRY_S
                self._failure("plan_failed", exc, failures, retry_in_s=wait_s)
            else:
                if failures:
                    log.info("plan_recovered", failures=failures)
                    failures = 0
            self._plan_now.clear()
            waiters = [asyncio.ensure_future(self._stop.wait()), asyncio.ensure_future(self._plan_now.wait())]
            await asyncio.wait(waiters, timeout=max(0.1, wait_s), return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()

    async def _consolidate_loop(self) -> None:
        c = self.settings.consolidation

        async def tick() -> None:
            await self.refresh_search_index()  # new trace files are searchable before consolidation
            await self.consolidate_due(delay_s=c.delay_s, min_interval_s=c.min_interval_s)

        await self._guard("consolidate", tick, max(1.0, min(30.0, c.delay_s / 4 or 1.0)))

    async def _heartbeat_loop(self) -> None:
        async def tick() -> None:
            if self.store is not None:
                await self.store.daemons.heartbeat(self.owner)
                await self._save_fault()

        await self._guard("daemon_heartbeat", tick, 30.0)


def _log_failure(event: str, exc: BaseException, failures: int, *, retry_in_s: float) -> None:
    """Log a loop's failure: the first of a run at error level, repeats at debug level.

    memd's own errors (a locked database, a failed write) are expected faults: no traceback.
    """
    error = f"{type(exc).__name__}: {exc}"
    if failures > 1:
        log.debug(event, error=error, failures=failures, retry_in_s=retry_in_s)
        return
    log.error(event, error=error, retry_in_s=retry_in_s, exc_info=exc if not isinstance(exc, MemdError) else False)
