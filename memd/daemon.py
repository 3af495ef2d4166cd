"""Wiring: builds the components from :class:`~memd.config.Settings` and runs them.

Only this module and :mod:`memd.cli` know every component. :func:`build_components` opens the
store and builds the indexer, scheduler, extraction pool, consolidation runner and trigger in one
step (``memd once --dry-run`` and ``memd bench`` use it too); :class:`Daemon` runs them, either as
the long-lived service (:meth:`Daemon.serve`, ``memd run``) or as a single pass
(:meth:`Daemon.once`, ``memd once``), and does nothing else.

Faults (SPEC §13): every loop of the service survives its failures — the first of a run is
logged (``plan_failed``, ``rescan_failed``, ``consolidate_failed``, ``watch_failed``, ...), the
loop retries after a bounded pause, ``<loop>_recovered`` is logged when it works again, and the
newest fault is saved for ``memd status`` (meta ``last_fault``). At start-up the memory roots are
repaired after a crash (:class:`~memd.memory.recover.MemoryRepair`), leaving alone what another
daemon on the same state may be writing. Every wait runs on the injected clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from memd.clock import Clock, SystemClock, iso_utc, wait_any
from memd.config import Settings
from memd.consolidate.env import consolidation_env
from memd.consolidate.runner import BATCH_PROJECTS, ConsolidationRunner, batchable, offline_command
from memd.consolidate.trigger import ConsolidationTrigger, TriggerSummary
from memd.errors import MemdError
from memd.extract.base import Extractor
from memd.extract.job import ExtractJob
from memd.extract.offline import OfflineExtractor
from memd.extract.pool import JobPool
from memd.extract.prepare import InputLimits, RequestBuilder
from memd.extract.redact import redact
from memd.faults import Fault, FaultLog, newest
from memd.ingest.indexer import Indexer
from memd.ingest.watch import watch_roots
from memd.llm.budget import TokenEstimator
from memd.memory import files as memory_files
from memd.memory.recover import MemoryRepair
from memd.read.upkeep import SearchRefresher, UsageRecorder
from memd.schedule.peers import PeerReaper
from memd.schedule.retry import RetryPolicy
from memd.schedule.scheduler import PlanSummary, Scheduler
from memd.service.notify import Notifier, daemon_status_line, watchdog_interval_s, watchdog_loop
from memd.service.signals import ShutdownSignals
from memd.service.unit import STOP_TIMEOUT_S
from memd.store.backup import backup_if_due, is_damage
from memd.store.daemons import process_start_id
from memd.store.records import JobKind
from memd.store.store import Store, make_owner

if TYPE_CHECKING:
    from memd.llm.client import LLMConfig

log = structlog.get_logger(__name__)

#: Pause before planning again after a failed planning pass (database locked, ...), seconds.
PLAN_RETRY_S = 5.0
#: Longest pause between two planning passes when nothing is due, seconds.
PLAN_IDLE_S = 60.0
#: An idle worker looks for due retries this often (seconds); new jobs wake it at once.
POOL_POLL_S = 30.0
#: Longest pause before the watcher is restarted after an unexpected failure, seconds.
WATCH_RESTART_CAP_S = 60.0
#: How often the daemon's registration is refreshed and its newest fault saved, seconds.
HEARTBEAT_S = 30.0
#: Seconds of systemd's stop timeout kept for releasing leases and closing the database after the
#: consolidation was terminated.
STOP_MARGIN_S = 4.0


@dataclass(frozen=True, slots=True)
class OnceSummary:
    """What ``memd once`` did: threads extracted, no-ops, failures, projects consolidated."""

    extracted: int
    noop: int
    failed: int
    consolidated: int
    consolidation_failed: int
    duration_s: float
    plan: PlanSummary | None = None
    failures: tuple[tuple[str, str], ...] = ()


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


@dataclass(slots=True)
class Components:
    """Everything a daemon, ``memd once`` or ``memd bench`` runs, built by :func:`build_components`.

    Attributes:
        settings, clock: what they were built from.
        owner: this process's owner string for claims and leases (``host:pid:random``).
        store: the open state store (close with :meth:`aclose`).
        faults: the newest fault the daemon's loops survived (the pool keeps its own).
        estimator: the calibrated bytes-per-token estimate (persisted in meta ``token_estimator``).
        extractor: the offline or model extractor; ``extractor_name`` / ``extractor_reason`` say
            which and why.
        requests: builds a thread's extraction request (reads the rollout).
        indexer, scheduler, pool, repair, runner, trigger: the pipeline's stages (SPEC §2).
        search: keeps the search index in line with the memory files (SPEC §18).
        peers: takes back what dead daemons on this host still hold.
    """

    settings: Settings
    clock: Clock
    owner: str
    store: Store
    faults: FaultLog
    estimator: TokenEstimator
    extractor: Extractor
    extractor_name: str
    extractor_reason: str
    requests: RequestBuilder
    indexer: Indexer
    scheduler: Scheduler
    pool: JobPool
    repair: MemoryRepair
    runner: ConsolidationRunner
    trigger: ConsolidationTrigger
    search: SearchRefresher
    peers: PeerReaper

    async def aclose(self) -> None:
        """Close the extractor's clients, save the calibration, close the store."""
        with contextlib.suppress(Exception):
            await self.extractor.aclose()
        if self.estimator.samples:
            with contextlib.suppress(Exception):
                await self.store.meta.set("token_estimator", self.estimator.to_json())
        await self.store.close()


def _model_extractor(
    settings: Settings, store: Store, clock: Clock, estimator: TokenEstimator, requests: RequestBuilder
) -> Extractor:
    from memd.extract.openai_extractor import OpenAIExtractor
    from memd.llm.budget import DailyBudget
    from memd.llm.client import LLMClient

    client = LLMClient(llm_config(settings), usage=store.usage, clock=clock)
    budget = DailyBudget(settings.daily_token_budget, store.usage, clock)
    return OpenAIExtractor(client, estimator=estimator, budget=budget, rebuild=requests.rebuild)


async def build_components(
    settings: Settings, *, clock: Clock | None = None, extractor: Extractor | None = None
) -> Components:
    """Open the store and build every component from ``settings``, in one step.

    Args:
        settings: the validated settings.
        clock: time source (default the system clock; tests inject a fake one).
        extractor: use this extractor instead of the configured one (benchmarks, tests).

    Raises:
        StoreError: the database cannot be opened or migrated.
    """
    clock = clock or SystemClock()
    s = settings
    store = await Store.open(s.db_path, clock=clock)
    try:
        estimator = TokenEstimator.from_json(await store.meta.get("token_estimator") or "")
    except BaseException:
        await store.close()
        raise
    faults = FaultLog(clean=lambda text: redact(text)[0])
    owner = make_owner()
    name, reason = settings.resolved_extractor()
    requests = RequestBuilder(
        store.threads,
        InputLimits(s.max_line_bytes, s.tool_output_cap_bytes),
        estimator,
        observe=UsageRecorder(s.db_path, s.memory_dir),
    )
    search = SearchRefresher(s.db_path, s.memory_dir)
    if extractor is not None:
        name, reason = extractor.name, "given by the caller"
    elif name == "offline":
        extractor = OfflineExtractor()
    else:
        extractor = _model_extractor(s, store, clock, estimator, requests)
    indexer = Indexer(
        store,
        clock,
        roots=s.sessions,
        max_line_bytes=s.max_line_bytes,
        include_sources=s.include_sources,
        project_rule=s.project_key,
        clean_text=lambda text: redact(text)[0],
        forgotten=memory_files.TombstoneReader(s.memory_dir),
    )
    job = ExtractJob(
        store,
        clock,
        extractor=extractor,
        requests=requests,
        memory_dir=s.memory_dir,
        max_input_tokens=s.llm.max_input_tokens,
        faults=faults,
    )
    pool = JobPool(
        store,
        clock,
        kind=JobKind.EXTRACT,
        handler=job,
        owner=owner,
        concurrency=s.extract_concurrency,
        lease_s=s.extract_lease_s,
        retry=RetryPolicy(base_s=s.retry_base_s, cap_s=s.retry_cap_s, max_attempts=s.max_attempts),
        poll_s=POOL_POLL_S,
        on_done=lambda result: search.mark(result.project),
    )
    c = s.consolidation
    # memd's own consolidator, offline, starts without the configuration and takes several projects
    # per process (interpreter start-up is most of a consolidation's cost, SPEC §15).
    command = c.command
    if name == "offline":
        command = offline_command(command, state_db=s.db_path, max_unused_days=c.max_unused_days)
    peers = PeerReaper(store, clock, owner=owner)
    runner = ConsolidationRunner(
        store,
        clock,
        memory_dir=s.memory_dir,
        command=command,
        concurrency=c.concurrency,
        batch_size=BATCH_PROJECTS if batchable(command) else 1,
        lease_s=c.lease_s,
        timeout_s=c.timeout_s,
        kill_grace_s=c.kill_grace_s,
        max_traces_per_project=c.max_traces_per_project,
        owner=owner,
        env=consolidation_env(c.command, uses_model=name == "openai", extra_names=c.env),
        # A lease held by a daemon that died is taken back before consolidation gives up.
        on_lease_held=peers.take_back,
    )
    repair = MemoryRepair(
        store, clock, memory_dir=s.memory_dir, max_traces_per_project=c.max_traces_per_project, faults=faults
    )

    async def consolidated(project: str) -> None:
        search.mark(project)
        await search.refresh()

    return Components(
        settings=s,
        clock=clock,
        owner=owner,
        store=store,
        faults=faults,
        estimator=estimator,
        extractor=extractor,
        extractor_name=name,
        extractor_reason=reason,
        requests=requests,
        indexer=indexer,
        scheduler=Scheduler(store, indexer, clock, min_idle_s=s.min_idle_s, max_age_days=s.max_age_days),
        pool=pool,
        repair=repair,
        runner=runner,
        trigger=ConsolidationTrigger(store, clock, runner=runner, repair=repair, faults=faults, after_run=consolidated),
        search=search,
        peers=peers,
    )


class Daemon:
    """memd's main job: runs the components (build one with :meth:`open`).

    Args:
        components: what to run (from :func:`build_components`).
    """

    def __init__(self, components: Components) -> None:
        self.components = components
        self._stop = asyncio.Event()
        self._plan_now = asyncio.Event()
        self._queue_depth = 0
        self._saved_fault: Fault | None = None
        #: Set when a loop met a damaged database: serve() stops and returns 1.
        self.damaged = False

    @classmethod
    async def open(
        cls, settings: Settings, *, clock: Clock | None = None, extractor: Extractor | None = None
    ) -> Daemon:
        """Build the components, register this daemon, and repair the memory roots after a crash.

        Raises:
            StoreError: the database cannot be opened or written.
        """
        components = await build_components(settings, clock=clock, extractor=extractor)
        daemon = cls(components)
        try:
            await daemon._start()
        except BaseException:
            await components.aclose()
            raise
        return daemon

    async def _start(self) -> None:
        c = self.components
        s = c.settings
        await c.store.daemons.register(c.owner, os.getpid(), socket.gethostname(), process_start_id(os.getpid()))
        # What a daemon killed on this host still holds is taken back now, not when it expires.
        await c.peers.take_back()
        await c.store.meta.set("extractor", f"{c.extractor_name}: {c.extractor_reason}")
        others_alive = await c.peers.other_alive()
        await c.repair.recover_all(min_age_s=max(s.extract_lease_s, s.consolidation.timeout_s) if others_alive else 0.0)
        # The search index follows the memory files: checked once per project at start (a stat per
        # file), then after each extraction and consolidation (SPEC §18).
        c.search.mark(p.project for p in await c.store.projects.list_all())
        log.info(
            "daemon_started",
            owner=c.owner,
            extractor=c.extractor_name,
            extractor_reason=c.extractor_reason,
            sessions=[str(p) for p in s.sessions],
            state_dir=str(s.state_dir),
            memory_dir=str(s.memory_dir),
        )

    async def close(self) -> None:
        """Save the newest fault, unregister, and release every component (the database last)."""
        c = self.components
        with contextlib.suppress(Exception):
            await self._save_fault()
        with contextlib.suppress(Exception):
            await c.store.daemons.unregister(c.owner)
        await c.aclose()

    # -- consolidation --------------------------------------------------------------------------
    async def consolidate_due(self, *, delay_s: float, min_interval_s: float) -> TriggerSummary:
        """Consolidate every project that is due (see :class:`~memd.consolidate.trigger.ConsolidationTrigger`)."""
        return await self.components.trigger.run_due(
            delay_s=delay_s, min_interval_s=min_interval_s, stopped=self._stop.is_set
        )

    # -- memd once ------------------------------------------------------------------------------
    async def once(self, *, progress: Callable[[int, int], None] | None = None) -> OnceSummary:
        """Scan, extract every eligible thread, consolidate every touched project, return.

        Args:
            progress: called as ``progress(done, total)`` after each job (for a TTY progress bar).
        """
        c = self.components
        started = c.clock.now()
        base = c.pool.stats
        base_done, base_noop, base_failed = base.done, base.noop, base.failed
        await c.indexer.scan()
        plan = await c.scheduler.plan()
        stop = asyncio.Event()
        reporter = None
        if progress is not None:
            progress(0, plan.queued)
            reporter = asyncio.create_task(self._report_progress(progress, plan.queued, stop))
        await c.pool.run(stop, burst=True)
        stop.set()
        if reporter is not None:
            await reporter
        consolidation = await self.consolidate_due(delay_s=0.0, min_interval_s=0.0)
        await c.search.refresh()
        stats = c.pool.stats
        return OnceSummary(
            extracted=stats.done - base_done,
            noop=stats.noop - base_noop,
            failed=stats.failed - base_failed,
            consolidated=consolidation.consolidated,
            consolidation_failed=consolidation.failed,
            duration_s=round(c.clock.now() - started, 3),
            plan=plan,
            failures=tuple(stats.failures[-(stats.failed - base_failed) :]) if stats.failed > base_failed else (),
        )

    async def _report_progress(self, progress: Callable[[int, int], None], total: int, stop: asyncio.Event) -> None:
        pool = self.components.pool
        last = -1
        base = pool.stats.done + pool.stats.failed
        while True:
            done = pool.stats.done + pool.stats.failed - base
            if done != last:
                progress(done, total)
                last = done
            if stop.is_set():
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)  # a terminal's refresh rate, not a timer

    # -- memd run -------------------------------------------------------------------------------
    def status_line(self) -> str:
        """The one-line STATUS= text for systemd: queue, running jobs, last activity."""
        pool = self.components.pool
        last = pool.stats.last_activity_at
        paused = pool.paused_reason
        line = daemon_status_line(self._queue_depth, pool.running, iso_utc(last) if last else "none yet")
        return f"{line}; paused: {paused}" if paused else line

    async def serve(self, signals: ShutdownSignals | None = None) -> int:
        """Run until SIGTERM/SIGINT (or :meth:`stop`); return the exit code (0 on a clean stop,
        1 when one of its loops ended with an unexpected error — event ``daemon_loop_crashed`` —
        so that systemd's ``Restart=on-failure`` starts it again).

        Shutdown (SPEC §12): stop claiming; let running extractions and the running
        consolidation finish within ``shutdown_grace_s``; then cancel what is left — job claims
        are given back, the consolidation's process group gets SIGTERM then SIGKILL and its
        lease is released. A second signal (``signals.force_event``) skips the rest of the grace
        period. The caller closes the daemon (:meth:`close`).
        """
        c = self.components
        notifier = Notifier.from_env()
        if signals is not None:
            self._stop = signals.stop_event
        try:
            await c.indexer.scan()
        except MemdError as exc:  # e.g. the database locked: the periodic rescan tries again
            self._failure("scan_failed", exc, 1, retry_in_s=c.settings.rescan_interval_s)
        notifier.ready()
        notifier.status(self.status_line())
        tasks, crashed = self._start_loops(notifier)
        force = signals.force_event if signals is not None else asyncio.Event()
        await self._stop.wait()
        notifier.stopping()
        notifier.close()
        await self._wind_down(tasks, force)
        log.info("daemon_stopped", crashed=crashed or None, database_damaged=self.damaged or None)
        return 1 if crashed or self.damaged else 0

    def _start_loops(self, notifier: Notifier) -> tuple[dict[str, asyncio.Task[None]], list[str]]:
        """Start the service's loops; a loop that ends by itself stops the daemon (``crashed``)."""
        loops: dict[str, Awaitable[None]] = {
            "watch": self._watch_loop(),
            "rescan": self._rescan_loop(),
            "plan": self._plan_loop(),
            "pool": self.components.pool.run(self._stop),
            "consolidate": self._consolidate_loop(),
            "heartbeat": self._heartbeat_loop(),
        }
        interval = watchdog_interval_s()
        if interval:
            loops["watchdog"] = watchdog_loop(notifier, interval, self._stop, self.status_line)
        tasks = {name: asyncio.ensure_future(loop) for name, loop in loops.items()}
        crashed: list[str] = []

        def watch(name: str, task: asyncio.Task[None]) -> None:  # a loop must never end on its own
            if task.cancelled() or self._stop.is_set():
                return
            exc = task.exception()
            crashed.append(name)
            log.error(
                "daemon_loop_crashed",
                loop=name,
                error=repr(exc),
                exc_info=exc,
                action="stopping; the service manager restarts memd",
            )
            self._stop.set()

        for name, task in tasks.items():
            task.add_done_callback(functools.partial(watch, name))
        return tasks, crashed

    async def _wind_down(self, tasks: dict[str, asyncio.Task[None]], force: asyncio.Event) -> None:
        """Give running jobs the grace period (cut short by ``force``), then cancel the rest."""
        c = self.components
        grace_s = c.settings.shutdown_grace_s
        # Whatever the grace period, a consolidation that ignores SIGTERM is killed in time to
        # release its lease and close the database before systemd's SIGKILL.
        c.runner.stop_by(asyncio.get_running_loop().time() + STOP_TIMEOUT_S - STOP_MARGIN_S)
        log.info("daemon_stopping", running=c.pool.running, grace_s=grace_s)
        finished = asyncio.Event()

        async def wind_down() -> None:
            # The pool loop ends by itself (a claim in flight is given back), the consolidation
            # loop after the project it is running; jobs get the grace period.
            await asyncio.gather(c.pool.drain(grace_s), asyncio.wait({tasks["pool"], tasks["consolidate"]}))
            finished.set()

        graceful = asyncio.ensure_future(wind_down())
        await wait_any(c.clock, (finished, force), grace_s)
        if not graceful.done():
            log.warning("shutdown_forced_cancel", running=c.pool.running)
            graceful.cancel()
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(graceful, c.pool.cancel_all(), *tasks.values(), return_exceptions=True)

    def stop(self) -> None:
        """Ask :meth:`serve` to stop (as SIGTERM does)."""
        self._stop.set()

    def _failure(self, event: str, exc: BaseException, failures: int, *, retry_in_s: float) -> None:
        self.components.faults.note(event, exc, now_s=self.components.clock.now())
        if is_damage(exc) and not self.damaged:
            # A damaged database never heals by waiting: stop (exit 1) and say what to run (SPEC §5).
            self.damaged = True
            log.error("database_damaged", error=str(exc), action="stopping; run `memd db recover`")
            self._stop.set()
            return
        _log_failure(event, exc, failures, retry_in_s=retry_in_s)

    async def _save_fault(self) -> None:
        """Store the newest fault the daemon or its pool survived as meta ``last_fault`` (JSON
        ``{"at", "event", "error"}``) once the database takes writes again; ``memd status``
        shows it."""
        c = self.components
        fault = newest(c.faults.newest, c.pool.faults.newest)
        if fault is not None and fault != self._saved_fault:
            await c.store.meta.set("last_fault", fault.to_json())
            self._saved_fault = fault

    async def _wait(self, delay_s: float, *events: asyncio.Event) -> None:
        """Wait ``delay_s`` on the clock, or until stop (or one of ``events``) is set."""
        await wait_any(self.components.clock, (self._stop, *events), delay_s)

    async def _guard(self, name: str, tick: Callable[[], Awaitable[object]], every_s: float) -> None:
        """Run ``tick`` every ``every_s`` seconds until stop; log and survive failures.

        The first failure of a run of failures is logged (``<name>_failed``; a traceback only
        for an unexpected error), repeats at debug level, and ``<name>_recovered`` when it works
        again.
        """
        failures = 0
        while not self._stop.is_set():
            try:
                await tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                self._failure(f"{name}_failed", exc, failures, retry_in_s=every_s)
            else:
                if failures:
                    log.info(f"{name}_recovered", failures=failures)
                    failures = 0
            await self._wait(every_s)

    async def _watch_loop(self) -> None:
        c = self.components
        restarts = 0
        while not self._stop.is_set():
            try:
                async for paths in watch_roots(
                    c.settings.sessions, stop_event=self._stop, force_polling=c.settings.force_polling, clock=c.clock
                ):
                    restarts = 0
                    await self._refresh(paths)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                restarts += 1
                delay_s = min(WATCH_RESTART_CAP_S, 2.0**restarts)
                self._failure("watch_failed", exc, 1, retry_in_s=delay_s)
                await self._wait(delay_s)

    async def _refresh(self, paths: set[str]) -> None:
        """Index what a watcher batch named; plan at once when something changed."""
        try:
            summary = await self.components.indexer.refresh_paths(paths)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failure("watch_refresh_failed", exc, 1, retry_in_s=self.components.settings.rescan_interval_s)
            return
        if summary.indexed:
            self._plan_now.set()

    async def _rescan_loop(self) -> None:
        interval = self.components.settings.rescan_interval_s
        await self._wait(interval)  # the start-up scan already ran

        async def tick() -> None:
            await self.components.indexer.scan()
            self._plan_now.set()

        await self._guard("rescan", tick, interval)

    async def _plan_loop(self) -> None:
        c = self.components
        failures = 0
        while not self._stop.is_set():
            self._plan_now.clear()  # a wake-up during the pass is kept for the next one
            wait_s = PLAN_IDLE_S
            try:
                plan = await c.scheduler.plan()
                self._queue_depth = await c.store.jobs.queue_depth()
                if plan.queued:
                    c.pool.wake()
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
            await self._wait(max(0.1, wait_s), self._plan_now)

    async def _consolidate_loop(self) -> None:
        c = self.components.settings.consolidation

        async def tick() -> None:
            await self.components.search.refresh()  # new trace files are searchable before consolidation
            await self.consolidate_due(delay_s=c.delay_s, min_interval_s=c.min_interval_s)

        await self._guard("consolidate", tick, max(1.0, min(30.0, c.delay_s / 4 or 1.0)))

    async def _heartbeat_loop(self) -> None:
        c = self.components

        async def tick() -> None:
            await c.store.daemons.heartbeat(c.owner)
            await c.peers.take_back()
            saved = await asyncio.to_thread(backup_if_due, c.settings.db_path)
            if saved is not None:
                log.info("store_backed_up", path=str(saved), reason="daily")
            await self._save_fault()

        await self._guard("daemon_heartbeat", tick, HEARTBEAT_S)


def _log_failure(event: str, exc: BaseException, failures: int, *, retry_in_s: float) -> None:
    """Log a loop's failure: the first of a run at error level, repeats at debug level.

    memd's own errors (a locked database, a failed write) are expected faults: no traceback.
    """
    error = f"{type(exc).__name__}: {exc}"
    if failures > 1:
        log.debug(event, error=error, failures=failures, retry_in_s=retry_in_s)
        return
    log.error(event, error=error, retry_in_s=retry_in_s, exc_info=exc if not isinstance(exc, MemdError) else False)
