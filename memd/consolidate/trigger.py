"""The consolidation trigger: which projects are due, and running them (SPEC §7).

A project is due when its newest memory is newer than its last successful consolidation, after a
quiet period (``delay_s``: a burst of extractions lands first) and at most once per
``min_interval_s``. Each due project is looked at again just before its run (another daemon may
have consolidated it meanwhile), its missing trace files are written again from their rows (a
rename that failed after its row committed), and the runner consolidates it under its lease.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from memd.clock import Clock
from memd.consolidate.runner import ConsolidationRunner, ConsolidationStatus
from memd.errors import MemoryWriteError
from memd.faults import FaultLog
from memd.memory.recover import MemoryRepair
from memd.store.store import Store

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class TriggerSummary:
    """What one pass of :meth:`ConsolidationTrigger.run_due` did: projects consolidated (or with
    nothing to consolidate) and projects whose consolidation failed."""

    consolidated: int = 0
    failed: int = 0


class ConsolidationTrigger:
    """Runs the consolidation of every due project: the runner takes them together (bounded
    concurrency; memd's own consolidator several projects per process), each under its own lease.

    Args:
        store: the state store (which projects are due).
        clock: time source (fault times).
        runner: consolidates the projects, each under its lease.
        repair: writes missing trace files again before a run.
        faults: where survived faults are noted (``memd status``).
        after_run: awaited with the project key after each run (the search index follows).
    """

    def __init__(
        self,
        store: Store,
        clock: Clock,
        *,
        runner: ConsolidationRunner,
        repair: MemoryRepair,
        faults: FaultLog,
        after_run: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self._store = store
        self._clock = clock
        self._runner = runner
        self._repair = repair
        self._faults = faults
        self._after_run = after_run

    async def run_due(
        self, *, delay_s: float, min_interval_s: float, stopped: Callable[[], bool] = lambda: False
    ) -> TriggerSummary:
        """Consolidate every project that is due now.

        Args:
            delay_s: the quiet period after a project's newest memory, seconds.
            min_interval_s: the least time between two attempts on one project, seconds.
            stopped: asked before each project is prepared and before each batch starts; ``True``
                ends the pass early (shutdown).

        Raises:
            StoreError: the list of due projects could not be read.
        """
        ready: list[tuple[str, int | None]] = []
        for due in await self._store.projects.due(delay_s, min_interval_s):
            if stopped():
                break
            project = await self._store.projects.get(due.project)
            if project is None or project.consolidated_seq >= project.memory_seq:
                continue
            try:
                await self._repair.repair_traces(project)
            except (MemoryWriteError, OSError) as exc:
                self._faults.note("trace_repair_failed", exc, now_s=self._clock.now())
                log.warning("trace_repair_failed", project=project.project, error=str(exc))
            ready.append((project.project, project.memory_seq))
        consolidated = failed = 0
        for outcome in await self._runner.run_many(ready, stopped=stopped):
            if self._after_run is not None:
                await self._after_run(outcome.project)
            if outcome.status is ConsolidationStatus.LEASE_ERROR:
                self._faults.note("consolidate_lease_error", outcome.error or "", now_s=self._clock.now())
            consolidated += int(outcome.ok)
            failed += int(outcome.failed)
        return TriggerSummary(consolidated, failed)
