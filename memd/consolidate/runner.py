"""The consolidation runner: project leases, heartbeat, subprocess supervision (SPEC §7).

:meth:`ConsolidationRunner.run` consolidates one project, :meth:`ConsolidationRunner.run_many`
several: up to ``concurrency`` commands at once, and — when the command is memd's own consolidator,
which takes several ``--root`` (:func:`batchable`) — up to ``batch_size`` projects per command, so
that the interpreter's start-up is paid once per batch instead of once per project. Each project
keeps its own lease and its own outcome:

1. acquire the lease ``consolidate:<project>`` (another holder ⇒ skipped);
2. prune ``trace_summaries/`` to the newest ``max_traces_per_project`` memories (a trace file whose
   thread has no row counts among them by its header; a file re-extracted after the rows were read
   is never removed) and rebuild ``memory_summary.md`` (the routing map);
3. run the consolidation command (argv, never a shell) in the memory root, in its own process
   group, with its output streamed to the log and only a bounded tail kept; renew the leases every
   ``lease_s / 3``; a failed renewal or the timeout (``timeout_s`` per project: since the start or
   the previous project's result) terminates the whole group (SIGTERM, then SIGKILL after
   ``kill_grace_s``);
4. record each project's result (fenced by its lease's fencing token) as soon as it is known —
   memd's consolidator prints a result line per root (:class:`~memd.consolidate.builtin.RootOutcome`);
   for any other command the exit status decides — and release its lease, on every exit path,
   cancellation included.

Timing of the subprocess (heartbeat, timeout, grace) is real time on the event loop: the child
runs in real time whatever clock the store uses. The injected clock only stamps the outcome.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import structlog

from memd.clock import Clock, iso_utc
from memd.consolidate.builtin import RESULT_PREFIX, RootOutcome
from memd.consolidate.env import consolidation_env, is_own_consolidator
from memd.errors import LeaseLost, MemdError
from memd.extract.redact import redact
from memd.memory.files import (
    TRACE_DIR,
    ensure_project_root,
    project_root,
    read_trace_header,
    safe_target,
    trace_exists,
    trace_headers,
    write_file_atomic,
)
from memd.store.records import MemoryRecord
from memd.store.store import Store

log = structlog.get_logger(__name__)

#: Error texts of the outcomes that have no other detail (``memd status`` shows them).
SKIPPED_LEASE_HELD = "skipped: lease held"
LEASE_LOST = "lease_lost"
TIMEOUT = "timeout"
#: The error of the other projects of a batch whose command was stopped for one project's lease.
INTERRUPTED = "interrupted: the command was stopped for another project of its batch"
#: Projects memd's own consolidator takes per command by default (see :func:`batchable`).
BATCH_PROJECTS = 16


class ConsolidationStatus(StrEnum):
    """How one consolidation run ended."""

    DONE = "done"
    NOTHING_TO_DO = "nothing_to_do"  # no trace memory and no memory folder: nothing is created
    SKIPPED = "skipped"  # another holder has the project's lease
    LEASE_ERROR = "lease_error"  # the lease could not be taken (database unavailable)
    LEASE_LOST = "lease_lost"
    TIMEOUT = "timeout"
    FAILED = "failed"  # preparation failed, the command failed to start or exited non-zero, ...


_RESULT_PREFIX_B = RESULT_PREFIX.encode()
_READ_CHUNK_BYTES = 64 * 1024
_LOG_LINE_MAX_CHARS = 1_000
_MAX_LOGGED_LINES = 1_000
_GROUP_POLL_S = 0.05
#: How often the supervisor looks at the leader's exit status while it waits. ``proc.wait()``
#: also waits for the output pipe to close, which a leftover background process can hold open.
_EXIT_POLL_S = 1.0


def batchable(command: Sequence[str]) -> bool:
    """Whether ``command`` is memd's own consolidator taking its root as ``--root {memory_root}``
    (and no ``{project}``): it then takes several roots at once (``--root A --root B ...``)."""
    joined = " ".join(command)
    return (
        is_own_consolidator(command)
        and "consolidate" in command
        and "{project}" not in joined
        and joined.count("{memory_root}") == 1
        and any(a == "--root" and b == "{memory_root}" for a, b in zip(command, command[1:], strict=False))
    )


def offline_command(command: Sequence[str], *, state_db: Path, max_unused_days: float) -> list[str]:
    """memd's own consolidator told to use the deterministic merge without reading the
    configuration (``--offline``: a faster start, no pydantic-settings), for a daemon whose
    extractor is offline; the daemon passes what consolidation needs from the configuration.
    Any other command is returned unchanged.

    Args:
        command: the configured ``[consolidation] command``.
        state_db: the state database (usage of memory pieces, for retention).
        max_unused_days: ``[consolidation] max_unused_days``.
    """
    argv = list(command)
    if not batchable(argv) or "--offline" in argv:
        return argv
    at = argv.index("consolidate") + 1
    flags = ["--offline", "--state-db", str(state_db), "--max-unused-days", f"{max_unused_days:g}"]
    return [*argv[:at], *flags, *argv[at:]]


@dataclass(frozen=True, slots=True)
class ConsolidationOutcome:
    """The result of one :meth:`ConsolidationRunner.run`.

    Attributes:
        project: the project key.
        status: how the run ended.
        exit_code: the command's exit status (negative: killed by that signal); ``None`` when it
            never ran.
        duration_s: real seconds from lease acquisition to the end.
        error: ``None`` on success, else ``skipped: lease held``, ``timeout``, ``lease_lost``,
            ``command_not_found: <argv0>``, ``exit_code N: <last output line>``, ...
        output_tail: the last ``output_cap_bytes`` of the merged stdout/stderr (UTF-8, invalid
            bytes replaced).
        started_at: the injected clock's time when the run started (epoch s).
    """

    project: str
    status: ConsolidationStatus
    exit_code: int | None
    duration_s: float
    error: str | None
    output_tail: str
    started_at: float = 0.0

    @property
    def ok(self) -> bool:
        """The project's memory is consolidated: the command succeeded and it was recorded under
        the lease, or there was nothing to consolidate."""
        return self.status in (ConsolidationStatus.DONE, ConsolidationStatus.NOTHING_TO_DO)

    @property
    def failed(self) -> bool:
        """The run failed (a skipped run, whose lease another holder has, did not)."""
        return not self.ok and self.status is not ConsolidationStatus.SKIPPED


class _Tail:
    """The last ``cap_bytes`` bytes of a stream."""

    def __init__(self, cap_bytes: int) -> None:
        self.cap_bytes = max(0, cap_bytes)
        self.buf = bytearray()
        self.total_bytes = 0

    def add(self, chunk: bytes) -> None:
        self.total_bytes += len(chunk)
        self.buf += chunk[-self.cap_bytes :] if self.cap_bytes else b""
        if len(self.buf) > self.cap_bytes:
            del self.buf[: len(self.buf) - self.cap_bytes]

    def text(self) -> str:
        return self.buf.decode("utf-8", "replace")


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def _complete(coro: Awaitable[Any]) -> Any:
    """Await ``coro`` to its end even if the caller is cancelled meanwhile, then re-raise."""
    task = asyncio.ensure_future(coro)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return result


@dataclass(slots=True)
class _Item:
    """One project of a batch while it is consolidated.

    Attributes:
        project: the project key.
        seq: the ``memory_seq`` a success covers (``None``: read after the lease is taken).
        bound: the logger bound to the project (and its fencing token once held).
        started: the event loop's time at the start (for ``duration_s``).
        started_at: the injected clock's time at the start.
        fencing_token: the lease's, once acquired.
        root: the memory root to run the command in (``None``: nothing to run).
        status: how it ended (once ``settled``).
        error: the result: ``None`` on success (once ``settled``).
        exit_code: the command's exit status, once known.
        output_tail: the end of the command's output.
        settled: the result was recorded and the lease released.
    """

    project: str
    seq: int | None
    bound: Any
    started: float
    started_at: float
    fencing_token: int | None = None
    root: Path | None = None
    status: ConsolidationStatus | None = None
    error: str | None = None
    exit_code: int | None = None
    output_tail: str = ""
    settled: bool = False

    @property
    def lease_name(self) -> str:
        return f"consolidate:{self.project}"


class ConsolidationRunner:
    """Runs the consolidation command for projects, each under its lease (SPEC §7).

    Args:
        store: the state store (lease, memories, project freshness).
        clock: stamps ``started_at`` of the outcome (the store applies its own clock to leases).
        memory_dir: the configured ``memory_dir`` (project roots live below it, SPEC §8).
        command: argv; ``{memory_root}`` and ``{project}`` are substituted in every element.
        lease_s: lease TTL; renewed every ``lease_s / 3`` while the command runs.
        timeout_s: the command's wall-clock limit per project.
        kill_grace_s: seconds between SIGTERM and SIGKILL of the process group.
        max_traces_per_project: trace files kept by the prune step.
        owner: this daemon's lease owner (``host:pid:random``).
        env: the command's environment; ``None`` ⇒ the allow-list of :mod:`memd.consolidate.env`
            applied to this process's environment.
        output_cap_bytes: bytes of output kept as the tail.
        concurrency: commands :meth:`run_many` runs at once.
        batch_size: projects per command in :meth:`run_many`; more than 1 only for a
            :func:`batchable` command.
        on_lease_held: called when a project's lease is held by someone else; it takes back
            the claims of dead daemons and returns how many it found (then the lease is tried
            once more). ``None``: no such check.

    Raises:
        ValueError: ``batch_size`` > 1 for a command that is not :func:`batchable`.
    """

    def __init__(
        self,
        store: Store,
        clock: Clock,
        *,
        memory_dir: Path,
        command: Sequence[str],
        lease_s: float = 600,
        timeout_s: float = 900,
        kill_grace_s: float = 10,
        max_traces_per_project: int = 10,
        owner: str,
        env: Mapping[str, str] | None = None,
        output_cap_bytes: int = 64 * 1024,
        concurrency: int = 1,
        batch_size: int = 1,
        on_lease_held: Callable[[], Awaitable[int]] | None = None,
    ) -> None:
        self.store = store
        self.on_lease_held = on_lease_held
        # lease name -> the holder last logged: "lease held" is logged once per holder.
        self._held_logged: dict[str, str | None] = {}
        self.clock = clock
        self.memory_dir = Path(memory_dir)
        self.command = tuple(command)
        self.lease_s = float(lease_s)
        self.timeout_s = float(timeout_s)
        self.kill_grace_s = float(kill_grace_s)
        self._stop_by: float | None = None  # event-loop time a shutdown must be done by
        self.max_traces_per_project = int(max_traces_per_project)
        self.owner = owner
        self.env = dict(env) if env is not None else consolidation_env(self.command, uses_model=False)
        self.output_cap_bytes = int(output_cap_bytes)
        self.concurrency = max(1, int(concurrency))
        if batch_size > 1 and not batchable(self.command):
            raise ValueError(f"only memd's own consolidator takes several projects at once, not {self.command[:3]}")
        self.batch_size = max(1, int(batch_size))

    # ------------------------------------------------------------------ public

    async def run(self, project: str, seq: int | None = None) -> ConsolidationOutcome:
        """Consolidate ``project`` once.

        Args:
            project: the project key.
            seq: the project's ``memory_seq`` read before the run (what a success covers);
                ``None`` ⇒ read from the store after taking the lease.

        Returns:
            The outcome; failures are outcomes (and recorded with
            ``store.projects.mark_failed``), never exceptions.

        Raises:
            asyncio.CancelledError: re-raised after the process group was terminated and the
                lease released.
        """
        [outcome] = await self.run_batch([(project, seq)])
        return outcome

    async def run_many(
        self, projects: Sequence[tuple[str, int | None]], *, stopped: Callable[[], bool] = lambda: False
    ) -> list[ConsolidationOutcome]:
        """Consolidate several projects: at most ``concurrency`` commands at once, each taking up
        to ``batch_size`` projects (evenly spread, so that every command has work).

        Args:
            projects: ``(project key, memory_seq or None)`` pairs (see :meth:`run`).
            stopped: asked before each batch starts; ``True`` leaves the batches not started yet
                (shutdown): their projects have no outcome.

        Returns:
            One outcome per project that ran, in the given order.

        Raises:
            asyncio.CancelledError: re-raised once every command was terminated and every lease
                released.
        """
        if not projects:
            return []
        size = max(1, min(self.batch_size, math.ceil(len(projects) / self.concurrency)))
        batches = [list(projects[i : i + size]) for i in range(0, len(projects), size)]
        slots = asyncio.Semaphore(self.concurrency)

        async def one(batch: list[tuple[str, int | None]]) -> list[ConsolidationOutcome]:
            async with slots:
                return [] if stopped() else await self.run_batch(batch)

        tasks = [asyncio.ensure_future(one(batch)) for batch in batches]
        try:
            done = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return [outcome for batch_outcomes in done for outcome in batch_outcomes]

    async def run_batch(self, projects: Sequence[tuple[str, int | None]]) -> list[ConsolidationOutcome]:
        """Consolidate ``projects`` with one command (several only for a :func:`batchable` one),
        each project under its own lease, with its own result recorded and its lease released as
        soon as its result is known.

        Returns:
            One outcome per project, in the given order.

        Raises:
            asyncio.CancelledError: after the process group was terminated and every lease
                released.
        """
        if len(projects) > 1 and not batchable(self.command):
            raise ValueError("only memd's own consolidator takes several projects at once")
        loop = asyncio.get_running_loop()
        items = [
            _Item(project, seq, log.bind(project=project), loop.time(), self.clock.now()) for project, seq in projects
        ]
        try:
            for item in items:
                await self._acquire(item)
            for item in items:
                if item.fencing_token is not None:
                    await self._prepare_item(item)
            to_run = [item for item in items if not item.settled and item.root is not None]
            if to_run:
                await self._run_command(to_run)
            for item in items:  # nothing to run for it (no memory folder): recorded as done
                if not item.settled and item.fencing_token is not None:
                    await self._settle(item, None)
        finally:
            for item in items:
                if item.fencing_token is not None and not item.settled:
                    item.settled = True
                    await _complete(self._release(item.lease_name, item.fencing_token, item.bound))
        return [self._outcome(item, loop.time()) for item in items]

    # ------------------------------------------------------------------ steps

    def _outcome(self, item: _Item, now: float) -> ConsolidationOutcome:
        return ConsolidationOutcome(
            project=item.project,
            status=item.status or ConsolidationStatus.FAILED,
            exit_code=item.exit_code,
            duration_s=now - item.started,
            error=item.error,
            output_tail=item.output_tail,
            started_at=item.started_at,
        )

    async def _acquire(self, item: _Item) -> None:
        """Take the project's lease; a held or failing lease settles the item (skipped)."""
        try:
            fencing_token = await self.store.leases.acquire(item.lease_name, self.owner, self.lease_s)
            if fencing_token is None and self.on_lease_held is not None and await self.on_lease_held():
                fencing_token = await self.store.leases.acquire(item.lease_name, self.owner, self.lease_s)
        except MemdError as exc:
            item.bound.warning("consolidate_lease_error", error=str(exc))
            item.status, item.error, item.settled = ConsolidationStatus.LEASE_ERROR, f"lease_error: {exc}", True
            return
        if fencing_token is None:
            await self._log_lease_held(item.lease_name, item.bound)
            item.status, item.error, item.settled = ConsolidationStatus.SKIPPED, SKIPPED_LEASE_HELD, True
            return
        self._held_logged.pop(item.lease_name, None)
        item.fencing_token = fencing_token
        item.bound = item.bound.bind(fencing_token=fencing_token)
        item.bound.info("consolidate_lease_acquired", lease=item.lease_name)

    async def _log_lease_held(self, lease_name: str, bound: Any) -> None:
        """``consolidate_skipped`` (reason ``lease_held``) at info once per holder, then debug."""
        try:
            lease = await self.store.leases.get(lease_name)
        except MemdError:
            lease = None
        holder = lease.owner if lease is not None else None
        if lease_name in self._held_logged and self._held_logged[lease_name] == holder:
            bound.debug("consolidate_skipped", reason="lease_held", holder=holder)
            return
        self._held_logged[lease_name] = holder
        bound.info("consolidate_skipped", reason="lease_held", holder=holder)

    async def _prepare_item(self, item: _Item) -> None:
        """Read the seq (when not given) and prepare the root; a failure settles the item."""
        try:
            if item.seq is None:
                record = await self.store.projects.get(item.project)
                item.seq = record.memory_seq if record is not None else 0
            item.root = await self._prepare(item.project, item.bound)
        except MemdError as exc:
            error = f"prepare_failed: {exc}"
            item.bound.error("consolidate_failed", error=error)
            await self._record_failure(item, error)
            item.status, item.error = ConsolidationStatus.FAILED, error
            await self._finish(item)

    async def _settle(
        self, item: _Item, error: str | None, status: ConsolidationStatus = ConsolidationStatus.FAILED
    ) -> None:
        """Record the item's result under its lease (a success is fenced by the lease's token),
        log it and release the lease. ``status`` is how a failure (``error``) ended. Never raises
        except ``CancelledError``."""
        if error is None:
            assert item.fencing_token is not None
            try:
                recorded = await self.store.projects.mark_consolidated(
                    item.project, item.seq or 0, item.lease_name, self.owner, item.fencing_token
                )
            except LeaseLost:
                recorded = False
            except MemdError as exc:
                recorded = True
                error = f"record_failed: {exc}"
            if not recorded:
                error, status = LEASE_LOST, ConsolidationStatus.LEASE_LOST
        item.error = error
        if error is None:
            item.status = ConsolidationStatus.DONE if item.root is not None else ConsolidationStatus.NOTHING_TO_DO
            item.bound.info("consolidate_done", exit_code=item.exit_code, seq=item.seq)
        else:
            item.status = status
            item.bound.warning("consolidate_failed", error=error, exit_code=item.exit_code)
            await self._record_failure(item, error)
        await self._finish(item)

    async def _finish(self, item: _Item) -> None:
        """Release the item's lease (once)."""
        if item.settled:
            return
        item.settled = True
        if item.fencing_token is not None:
            await _complete(self._release(item.lease_name, item.fencing_token, item.bound))

    async def _prepare(self, project: str, bound: Any) -> Path | None:
        """Prune the trace files and write ``memory_summary.md``; return the memory root, or
        ``None`` when the project has no trace memory and no memory folder (nothing to do, and
        nothing is created).

        Raises:
            MemdError: the folder or a file cannot be written, or the store fails.
        """
        memories = await self.store.memories.list_for_project(project)
        root = await asyncio.to_thread(self._prepare_files, project, memories, bound)
        if root is not None:
            await self._prune_rowless(root, memories, bound)
        return root

    async def _prune_rowless(self, root: Path, memories: Sequence[MemoryRecord], bound: Any) -> None:
        """Trace files whose thread has no row (kept at start-up: a reinstall, a ``memd db recover``
        that could not take them back) count among the newest ``max_traces_per_project``: each is
        removed once that many newer traces (by the session's last activity in the headers) are on
        disk, as a row's file would be. Rows are read after the files are listed, so a file whose
        row was committed meanwhile is never taken for one without a row."""
        named = {m.path for m in memories if m.path}
        on_disk = await asyncio.to_thread(trace_headers, root)
        candidates = {rel: h for rel, h in on_disk.items() if rel not in named and h.thread_id}
        if not candidates:
            return
        rows = await self.store.memories.watermarks_of(h.thread_id for h in candidates.values())
        rowless = {rel for rel, h in candidates.items() if h.thread_id not in rows}
        keep_n = max(0, self.max_traces_per_project)
        counted = [(h.updated_at, rel) for rel, h in on_disk.items() if rel in rowless or rel in named]
        old = [rel for _, rel in sorted(counted, reverse=True)[keep_n:] if rel in rowless]
        pruned = await asyncio.to_thread(_unlink_traces, root, old, bound)
        if pruned:
            bound.info("traces_pruned", count=pruned, reason="no row, older than the newest traces")

    def _prepare_files(self, project: str, memories: Sequence[MemoryRecord], bound: Any) -> Path | None:
        """The file-system part of :meth:`_prepare` (runs in a worker thread)."""
        if not any(m.path for m in memories) and not project_root(self.memory_dir, project).exists():
            bound.info("consolidate_nothing_to_do", reason="no trace memories; no memory folder is made")
            return None
        root = ensure_project_root(self.memory_dir, project)
        kept = self._prune(root, memories, bound)
        write_file_atomic(root, "memory_summary.md", render_memory_summary(project, kept))
        return root

    def _prune(self, root: Path, memories: Sequence[MemoryRecord], bound: Any) -> list[MemoryRecord]:
        """Delete trace files of memories beyond the newest N; return the kept memories.

        ``memories`` is newest first. Only files named by an older memory row are removed, and only
        while they still hold that row's memory (header ``source_watermark``, else the body), so a
        trace file committed by a worker after the list was read — even under the same name — is
        never touched.
        """
        with_files = [m for m in memories if m.path]
        kept = with_files[: max(0, self.max_traces_per_project)]
        kept_paths = {m.path for m in kept}
        pruned = []
        for memory in with_files[len(kept) :]:
            assert memory.path is not None
            if memory.path in kept_paths or not memory.path.startswith(TRACE_DIR + "/"):
                continue
            if not _holds(root, memory):
                continue  # missing, or re-extracted since the list was read: the fresh file stays
            try:
                os.unlink(safe_target(root, memory.path))
            except FileNotFoundError:
                continue
            except (OSError, MemdError) as exc:
                bound.warning("trace_prune_failed", path=memory.path, error=str(exc))
                continue
            pruned.append(memory.path)
        if pruned:
            bound.info("traces_pruned", count=len(pruned), kept=len(kept))
        return kept

    def _argv(self, items: Sequence[_Item]) -> list[str]:
        """The command for ``items``: placeholders substituted; for several items (a
        :func:`batchable` command) the pair ``--root {memory_root}`` once per item."""
        if len(items) == 1:
            root, project = str(items[0].root), items[0].project
            return [part.replace("{memory_root}", root).replace("{project}", project) for part in self.command]
        at = self.command.index("{memory_root}")
        roots = [arg for item in items for arg in ("--root", str(item.root))]
        return [*self.command[: at - 1], *roots, *self.command[at + 1 :]]

    async def _run_command(self, items: Sequence[_Item]) -> None:
        """Run and supervise the command for ``items`` (their roots prepared); settle each.

        The command runs in the first item's root. Results are settled as they arrive (a result
        line per root); when the command ends, each item still without one is settled by the
        exit status (a single item) or as failed (``no_result``, several items).
        """
        argv = self._argv(items)
        bound = items[0].bound if len(items) == 1 else log.bind(batch=len(items), first_project=items[0].project)
        if not argv:
            for item in items:
                await self._settle(item, "command_empty")
            return
        proc = await self._spawn(argv, items[0].root)
        if isinstance(proc, str):
            for item in items:
                await self._settle(item, proc)
            return
        for item in items:
            item.bound.info("consolidate_started", command=argv[0], pid=proc.pid)
        tail = _Tail(self.output_cap_bytes)
        results: asyncio.Queue[RootOutcome] = asyncio.Queue()
        assert proc.stdout is not None
        on_result = results.put_nowait if is_own_consolidator(self.command) else None
        pump = asyncio.ensure_future(self._pump(proc.stdout, tail, bound, on_result=on_result))
        pending = {str(item.root): item for item in items}
        try:
            stopped = await self._supervise(proc, pending, results, bound)
            await self._drain(proc, pump, bound)
        except BaseException:
            await _complete(self._terminate(proc, bound))
            pump.cancel()
            raise
        text = tail.text()
        while not results.empty():
            await self._result(pending, results.get_nowait())
        for item in items:
            item.exit_code, item.output_tail = proc.returncode, text
        for root, item in list(pending.items()):
            del pending[root]
            error: str | None
            status = ConsolidationStatus.FAILED
            if root in stopped:
                status, error = stopped[root]
            elif len(items) == 1:
                error = None if proc.returncode == 0 else _exit_error(proc.returncode, text)
            else:
                error = _exit_error(proc.returncode, text) if proc.returncode else "no_result"
            await self._settle(item, error, status)

    async def _spawn(self, argv: Sequence[str], cwd: Path | None) -> Any:
        """Start the command in its own process group: the process, or why it could not start
        (``command_not_found: ...``, ``command_not_executable: ...``, ``command_failed_to_start: ...``)."""
        try:
            return await asyncio.create_subprocess_exec(
                *argv,
                cwd=cwd,
                env=self.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        except FileNotFoundError:
            return f"command_not_found: {argv[0]}"
        except PermissionError:
            return f"command_not_executable: {argv[0]}"
        except OSError as exc:
            return f"command_failed_to_start: {argv[0]}: {exc.strerror or exc}"

    async def _result(self, pending: dict[str, _Item], result: RootOutcome) -> None:
        """Settle the item a result line names (unknown roots are ignored)."""
        item = pending.pop(result.root, None)
        if item is None:
            log.warning("consolidate_result_unknown_root", root=result.root)
            return
        await self._settle(item, None if result.ok else f"consolidate_failed: {result.error or 'no reason given'}")

    async def _supervise(
        self, proc: Any, pending: dict[str, _Item], results: asyncio.Queue[RootOutcome], bound: Any
    ) -> dict[str, tuple[ConsolidationStatus, str]]:
        """Wait for the command, settling results as they arrive and renewing the leases of the
        projects still pending; terminate it on a timeout or a lost lease.

        Returns:
            ``{root: (status, error)}`` for the projects still pending when the command was stopped
            (``TIMEOUT``/:data:`TIMEOUT`; ``LEASE_LOST``/:data:`LEASE_LOST` for the project whose
            lease was lost and ``FAILED``/:data:`INTERRUPTED` for the others); ``{}`` when it
            exited by itself.
        """
        loop = asyncio.get_running_loop()
        interval_s = self.lease_s / 3
        deadline = loop.time() + self.timeout_s
        next_renew = loop.time() + interval_s
        last_renewed = loop.time()
        waiter = asyncio.ensure_future(proc.wait())
        getter: asyncio.Future[RootOutcome] | None = None
        try:
            while True:
                if getter is None:
                    getter = asyncio.ensure_future(results.get())
                wake_s = min(deadline, next_renew, loop.time() + _EXIT_POLL_S) - loop.time()
                await asyncio.wait({waiter, getter}, timeout=max(0.0, wake_s), return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    result, getter = getter.result(), None
                    await self._result(pending, result)
                    deadline = loop.time() + self.timeout_s  # each project has timeout_s
                    continue
                if proc.returncode is not None:
                    return {}
                now = loop.time()
                if now >= deadline:
                    bound.warning("consolidate_timeout", timeout_s=self.timeout_s, pid=proc.pid)
                    await self._terminate(proc, bound)
                    return dict.fromkeys(pending, (ConsolidationStatus.TIMEOUT, TIMEOUT))
                if now < next_renew:
                    continue  # woken only to look at the exit status
                renewed, lost = await self._renew(pending)
                if lost is None and renewed:
                    last_renewed = now
                    next_renew = now + interval_s
                elif lost is None and now - last_renewed < self.lease_s:
                    next_renew = now + min(interval_s, 1.0)  # the store failed: try again soon
                else:
                    lost = lost if lost is not None else next(iter(pending))
                    pending[lost].bound.warning("consolidate_lease_lost", pid=proc.pid)
                    await self._terminate(proc, bound)
                    return {
                        root: (ConsolidationStatus.LEASE_LOST, LEASE_LOST)
                        if root == lost
                        else (ConsolidationStatus.FAILED, INTERRUPTED)
                        for root in pending
                    }
        finally:
            if not waiter.done():
                waiter.cancel()
            if getter is not None:
                if getter.done() and not getter.cancelled():
                    results.put_nowait(getter.result())  # settled with the rest
                else:
                    getter.cancel()

    async def _renew(self, pending: dict[str, _Item]) -> tuple[bool, str | None]:
        """Renew the lease of every pending project.

        Returns:
            ``(all renewed, the root of a project whose lease was lost or None)``; a store
            failure is not a loss (``(False, None)``: retried soon, until ``lease_s`` passed).
        """
        ok = True
        for root, item in pending.items():
            assert item.fencing_token is not None
            try:
                renewed = await self.store.leases.renew(item.lease_name, self.owner, item.fencing_token, self.lease_s)
            except LeaseLost:
                renewed = False
            except MemdError as exc:
                item.bound.warning("consolidate_renew_error", error=str(exc))
                ok = False
                continue
            if not renewed:
                return False, root
        return ok, None

    async def _drain(self, proc: Any, pump: asyncio.Future[None], bound: Any) -> None:
        """After the leader exited: collect the rest of the output, kill leftover group members.

        Members still alive once the output ended (or ``kill_grace_s`` after the leader exited)
        are SIGKILLed. A process that left the group and keeps the pipe open is abandoned after
        another ``kill_grace_s`` (event ``consolidate_output_abandoned``).
        """
        done, _ = await asyncio.wait({pump}, timeout=self.kill_grace_s)
        if _group_alive(proc.pid):
            bound.warning("consolidate_stragglers_killed", pgid=proc.pid)
            _killpg(proc.pid, signal.SIGKILL)
        if not done:
            done, _ = await asyncio.wait({pump}, timeout=self.kill_grace_s)
            if not done:
                bound.warning("consolidate_output_abandoned", pid=proc.pid)
                pump.cancel()

    def stop_by(self, deadline_s: float) -> None:
        """Shutdown: commands terminated from now on are done by ``deadline_s`` (event-loop time,
        ``loop.time()``), so that the daemon releases its leases before systemd's
        ``TimeoutStopSec`` ends (SPEC §12): the SIGTERM → SIGKILL grace is cut to half the time
        left (at least :data:`MIN_KILL_GRACE_S`), the wait for the killed leader to the rest."""
        self._stop_by = deadline_s

    def _grace_s(self, loop: asyncio.AbstractEventLoop) -> tuple[float, float]:
        """Seconds from SIGTERM to SIGKILL, and the longest wait for the leader after SIGKILL."""
        term_s, reap_s = self.kill_grace_s, max(self.kill_grace_s, 5.0)
        if self._stop_by is None:
            return term_s, reap_s
        left_s = self._stop_by - loop.time()
        term_s = min(term_s, max(MIN_KILL_GRACE_S, left_s / 2))
        return term_s, min(reap_s, max(MIN_KILL_GRACE_S, left_s - term_s))

    async def _terminate(self, proc: Any, bound: Any) -> None:
        """SIGTERM the process group, SIGKILL it after ``kill_grace_s`` (less during a shutdown,
        see :meth:`stop_by`); wait for the leader.

        Polls (every 50 ms) the leader's exit status and whether any group member is left.
        """
        loop = asyncio.get_running_loop()
        pgid = proc.pid
        term_s, reap_s = self._grace_s(loop)
        _killpg(pgid, signal.SIGTERM)
        deadline = loop.time() + term_s
        while loop.time() < deadline:
            if proc.returncode is not None and not _group_alive(pgid):
                break
            await asyncio.sleep(_GROUP_POLL_S)
        else:
            bound.warning("consolidate_killed", pgid=pgid, signal="SIGKILL")
            _killpg(pgid, signal.SIGKILL)
            # SIGKILL cannot be ignored: the leader's exit is reported within moments.
            deadline = loop.time() + reap_s
            while proc.returncode is None and loop.time() < deadline:
                await asyncio.sleep(_GROUP_POLL_S)
        bound.info("consolidate_terminated", pgid=pgid, exit_code=proc.returncode)

    async def _pump(
        self,
        stream: asyncio.StreamReader,
        tail: _Tail,
        bound: Any,
        *,
        on_result: Callable[[RootOutcome], None] | None = None,
    ) -> None:
        """Read merged output in chunks: keep the tail, log lines (the first 1 000, capped), and
        hand every result line (:class:`RootOutcome`) to ``on_result``."""
        pending = bytearray()
        logged = 0
        suppressed = 0

        def emit(raw: bytes) -> None:
            nonlocal logged, suppressed
            if on_result is not None and raw.startswith(_RESULT_PREFIX_B):
                result = RootOutcome.parse(raw.decode("utf-8", "replace").rstrip("\r"))
                if result is not None:
                    on_result(result)
            if logged >= _MAX_LOGGED_LINES:
                suppressed += 1
                return
            logged += 1
            line = raw.decode("utf-8", "replace").rstrip("\r")
            if len(line) > _LOG_LINE_MAX_CHARS:
                line = line[:_LOG_LINE_MAX_CHARS] + "…"
            bound.debug("consolidate_output", line=line)

        while True:
            chunk = await stream.read(_READ_CHUNK_BYTES)
            if not chunk:
                break
            tail.add(chunk)
            pending += chunk
            *lines, rest = bytes(pending).split(b"\n")
            for line in lines:
                emit(line)
            pending = bytearray(rest)
            if len(pending) > _READ_CHUNK_BYTES:  # one endless line: log its head, drop the rest
                emit(bytes(pending[: _LOG_LINE_MAX_CHARS * 4]))
                pending.clear()
        if pending:
            emit(bytes(pending))
        if suppressed:
            bound.info(
                "consolidate_output_suppressed",
                lines_logged=logged,
                lines_suppressed=suppressed,
                output_bytes=tail.total_bytes,
            )

    async def _record_failure(self, item: _Item, error: str) -> None:
        """Record the failure on the project, fenced by the item's lease (a lost lease is not the
        project's failure: the new holder's result stands). Never raises."""
        if item.status is ConsolidationStatus.LEASE_LOST or item.fencing_token is None:
            return
        try:
            await self.store.projects.mark_failed(
                item.project, redact(error)[0], item.lease_name, self.owner, item.fencing_token
            )  # stored: redacted (SPEC §14)
        except MemdError as exc:
            item.bound.warning("consolidate_record_failed", error=str(exc))

    async def _release(self, lease_name: str, fencing_token: int, bound: Any) -> None:
        try:
            released = await self.store.leases.release(lease_name, self.owner, fencing_token)
        except MemdError as exc:
            bound.warning("consolidate_release_failed", error=str(exc))
            return
        bound.info("consolidate_lease_released", lease=lease_name, held=released is not False)


#: Shortest SIGTERM → SIGKILL grace (and wait after SIGKILL) during a shutdown, seconds.
MIN_KILL_GRACE_S = 0.5

#: ``memory_summary.md`` stays under about this many bytes (≈ 1,800 tokens at 4 bytes a token).
SUMMARY_MAX_BYTES = 7_000
_CONTEXT_DATE = re.compile(r"^Trace context:.*?\b(\d{4}-\d{2}-\d{2})\b", re.MULTILINE)


def render_memory_summary(project: str, memories: Sequence[MemoryRecord]) -> str:
    """Render ``memory_summary.md``: the routing map, one ``- <summary> [<id> <date>]`` line per
    memory, newest first (SPEC §7, §19).

    The provenance is the session's short id and date (the trace's ``Trace context`` date, else the
    memory's generation date); the trace file is ``trace_summaries/<id>…``. A summary is folded to one
    line (``(no summary)`` when empty). Lines past :data:`SUMMARY_MAX_BYTES` are left out and
    counted in a last line.
    """
    lines = [f"# Memory summary: {' '.join(project.split())}", ""]
    if not memories:
        lines.append("No trace memories yet.")
    size = sum(len(line) + 1 for line in lines)
    for n, memory in enumerate(memories):
        summary = " ".join(memory.summary.split()) or "(no summary)"
        match = _CONTEXT_DATE.search(memory.trace_memory)
        date = match.group(1) if match else (iso_utc(memory.generated_at)[:10] if memory.generated_at else "undated")
        line = f"- {summary} [{memory.thread_id[:8]} {date}]"
        if size + len(line.encode()) + 1 > SUMMARY_MAX_BYTES:
            lines.append(f"- … {len(memories) - n} older sessions: see `trace_summaries/` and MEMORY.md")
            break
        lines.append(line)
        size += len(line.encode()) + 1
    return "\n".join(lines) + "\n"


def _holds(root: Path, memory: MemoryRecord) -> bool:
    """Whether ``memory.path`` still holds that row's memory: its header names the thread and the
    row's source watermark (a file written before headers had one: its body is the row's)."""
    assert memory.path is not None
    try:
        header = read_trace_header(safe_target(root, memory.path))
    except MemdError:
        return False
    if header is None or header.thread_id != memory.thread_id:
        return False
    if header.source_watermark:
        return header.source_watermark == memory.source_watermark
    return trace_exists(root, memory.path, memory.trace_memory)


def _unlink_traces(root: Path, relpaths: Sequence[str], bound: Any) -> int:
    """Remove the trace files ``relpaths``; return how many were removed (failures are logged)."""
    removed = 0
    for relpath in relpaths:
        try:
            os.unlink(safe_target(root, relpath))
        except FileNotFoundError:
            continue
        except (OSError, MemdError) as exc:
            bound.warning("trace_prune_failed", path=relpath, error=str(exc))
            continue
        removed += 1
    return removed


def _exit_error(exit_code: int | None, tail: str) -> str:
    if exit_code is not None and exit_code < 0:
        try:
            name = signal.Signals(-exit_code).name
        except ValueError:
            name = str(-exit_code)
        return f"killed_by_signal: {name}"
    lines = (line.strip() for line in reversed(tail.splitlines()))
    last = redact(next((line for line in lines if line and not line.startswith(RESULT_PREFIX)), ""))[0]
    if len(last) > 300:
        last = last[:300] + "…"
    return f"exit_code {exit_code}: {last}" if last else f"exit_code {exit_code}"
