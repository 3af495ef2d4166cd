"""The consolidation runner: project lease, heartbeat, subprocess supervision (SPEC §7).

One :meth:`ConsolidationRunner.run` per project and trigger:

1. acquire the lease ``consolidate:<project>`` (another holder ⇒ skipped);
2. prune ``trace_summaries/`` to the newest ``max_traces_per_project`` memories and rebuild
   ``memory_summary.md`` (the routing map);
3. run the consolidation command (argv, never a shell) in the memory root, in its own process
   group, with its output streamed to the log and only a bounded tail kept; renew the lease every
   ``lease_s / 3``; a failed renewal or the timeout terminates the whole group (SIGTERM, then
   SIGKILL after ``kill_grace_s``);
4. record the result (fenced by the lease fencing_token) and release the lease on every exit path,
   cancellation included.

Timing of the subprocess (heartbeat, timeout, grace) is real time on the event loop: the child
runs in real time whatever clock the store uses. The injected clock only stamps the outcome.
"""

from __future__ import annotations

import asyncio
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
from memd.consolidate.env import consolidation_env
from memd.errors import LeaseLost, MemdError
from memd.memory.files import TRACE_DIR, ensure_project_root, project_root, safe_target, write_file_atomic
from memd.store.records import MemoryRecord
from memd.store.store import Store

log = structlog.get_logger(__name__)

#: Error texts of the outcomes that have no other detail (``memd status`` shows them).
SKIPPED_LEASE_HELD = "skipped: lease held"
LEASE_LOST = "lease_lost"
TIMEOUT = "timeout"


class ConsolidationStatus(StrEnum):
    """How one consolidation run ended."""

    DONE = "done"
    NOTHING_TO_DO = "nothing_to_do"  # no trace memory and no memory folder: nothing is created
    SKIPPED = "skipped"  # another holder has the project's lease
    LEASE_ERROR = "lease_error"  # the lease could not be taken (database unavailable)
    LEASE_LOST = "lease_lost"
    TIMEOUT = "timeout"
    FAILED = "failed"  # preparation failed, the command failed to start or exited non-zero, ...


_READ_CHUNK_BYTES = 64 * 1024
_LOG_LINE_MAX_CHARS = 1_000
_MAX_LOGGED_LINES = 1_000
_GROUP_POLL_S = 0.05
#: How often the supervisor looks at the leader's exit status while it waits. ``proc.wait()``
#: also waits for the output pipe to close, which a leftover background process can hold open.
_EXIT_POLL_S = 1.0


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


class ConsolidationRunner:
    """Runs the consolidation command for one project at a time under its lease (SPEC §7).

    Args:
        store: the state store (lease, memories, project freshness).
        clock: stamps ``started_at`` of the outcome (the store applies its own clock to leases).
        memory_dir: the configured ``memory_dir`` (project roots live below it, SPEC §8).
        command: argv; ``{memory_root}`` and ``{project}`` are substituted in every element.
        lease_s: lease TTL; renewed every ``lease_s / 3`` while the command runs.
        timeout_s: the command's wall-clock limit.
        kill_grace_s: seconds between SIGTERM and SIGKILL of the process group.
        max_traces_per_project: trace files kept by the prune step.
        owner: this daemon's lease owner (``host:pid:random``).
        env: the command's environment; ``None`` ⇒ the allow-list of :mod:`memd.consolidate.env`
            applied to this process's environment.
        output_cap_bytes: bytes of output kept as the tail.
        on_lease_held: called when the project's lease is held by someone else; it takes back
            the claims of dead daemons and returns how many it found (then the lease is tried
            once more). ``None``: no such check.
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
        self.max_traces_per_project = int(max_traces_per_project)
        self.owner = owner
        self.env = dict(env) if env is not None else consolidation_env(self.command, uses_model=False)
        self.output_cap_bytes = int(output_cap_bytes)

    # ------------------------------------------------------------------ public

    async def run(self, project: str, seq: int | None = None) -> ConsolidationOutcome:
        """Consolidate ``project`` once.

        Args:
            project: the project key.
            seq: the project's ``memory_seq`` read before the run (what a success covers);
                ``None`` ⇒ read from ``store.get_project`` after taking the lease.

        Returns:
            The outcome; failures are outcomes (and recorded with
            ``store.mark_consolidation_failed``), never exceptions.

        Raises:
            asyncio.CancelledError: re-raised after the process group was terminated and the
                lease released.
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        started_at = self.clock.now()
        lease_name = f"consolidate:{project}"
        bound = log.bind(project=project)

        def outcome(
            status: ConsolidationStatus, exit_code: int | None, error: str | None, tail: str = ""
        ) -> ConsolidationOutcome:
            return ConsolidationOutcome(
                project=project,
                status=status,
                exit_code=exit_code,
                duration_s=loop.time() - started,
                error=error,
                output_tail=tail,
                started_at=started_at,
            )

        try:
            fencing_token = await self.store.leases.acquire(lease_name, self.owner, self.lease_s)
            if fencing_token is None and self.on_lease_held is not None and await self.on_lease_held():
                fencing_token = await self.store.leases.acquire(lease_name, self.owner, self.lease_s)
        except MemdError as exc:
            bound.warning("consolidate_lease_error", error=str(exc))
            return outcome(ConsolidationStatus.LEASE_ERROR, None, f"lease_error: {exc}")
        if fencing_token is None:
            await self._log_lease_held(lease_name, bound)
            return outcome(ConsolidationStatus.SKIPPED, None, SKIPPED_LEASE_HELD)
        self._held_logged.pop(lease_name, None)
        bound = bound.bind(fencing_token=fencing_token)
        bound.info("consolidate_lease_acquired", lease=lease_name)
        try:
            return outcome(*await self._run_leased(project, seq, lease_name, fencing_token, bound))
        finally:
            await _complete(self._release(lease_name, fencing_token, bound))

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

    # ------------------------------------------------------------------ steps

    async def _run_leased(
        self, project: str, seq: int | None, lease_name: str, fencing_token: int, bound: Any
    ) -> tuple[ConsolidationStatus, int | None, str | None, str]:
        """Prepare, run and record under the lease: ``(status, exit_code, error or None, output tail)``."""
        try:
            if seq is None:
                record = await self.store.projects.get(project)
                seq = record.memory_seq if record is not None else 0
            root = await self._prepare(project, bound)
        except MemdError as exc:
            failure = f"prepare_failed: {exc}"
            bound.error("consolidate_failed", error=failure)
            await self._record_failure(project, failure, bound)
            return ConsolidationStatus.FAILED, None, failure, ""

        exit_code: int | None = None
        error: str | None = None
        tail = ""
        if root is not None:  # None: every session of the project was a no-op, no memory folder (SPEC §19)
            exit_code, error, tail = await self._run_command(root, project, lease_name, fencing_token, bound)
        if error is None:
            try:
                recorded = await self.store.projects.mark_consolidated(
                    project, seq, lease_name, self.owner, fencing_token
                )
            except LeaseLost:
                recorded = False
            except MemdError as exc:
                recorded = True
                error = f"record_failed: {exc}"
            if not recorded:
                error = LEASE_LOST
        if error is None:
            bound.info("consolidate_done", exit_code=exit_code, seq=seq)
            return (ConsolidationStatus.DONE if root else ConsolidationStatus.NOTHING_TO_DO), exit_code, None, tail
        bound.warning("consolidate_failed", error=error, exit_code=exit_code)
        await self._record_failure(project, error, bound)
        status = {TIMEOUT: ConsolidationStatus.TIMEOUT, LEASE_LOST: ConsolidationStatus.LEASE_LOST}
        return status.get(error, ConsolidationStatus.FAILED), exit_code, error, tail

    async def _prepare(self, project: str, bound: Any) -> Path | None:
        """Prune the trace files and write ``memory_summary.md``; return the memory root, or
        ``None`` when the project has no trace memory and no memory folder (nothing to do, and
        nothing is created).

        Raises:
            MemdError: the folder or a file cannot be written, or the store fails.
        """
        memories = await self.store.memories.list_for_project(project)
        return await asyncio.to_thread(self._prepare_files, project, memories, bound)

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

        ``memories`` is newest first. Only files named by an older memory row are removed, so a
        trace file committed by a worker after the list was read is never touched.
        """
        with_files = [m for m in memories if m.path]
        kept = with_files[: max(0, self.max_traces_per_project)]
        kept_paths = {m.path for m in kept}
        pruned = []
        for memory in with_files[len(kept) :]:
            assert memory.path is not None
            if memory.path in kept_paths or not memory.path.startswith(TRACE_DIR + "/"):
                continue
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

    def _argv(self, root: Path, project: str) -> list[str]:
        return [part.replace("{memory_root}", str(root)).replace("{project}", project) for part in self.command]

    async def _run_command(
        self, root: Path, project: str, lease_name: str, fencing_token: int, bound: Any
    ) -> tuple[int | None, str | None, str]:
        """Run and supervise the command. Returns ``(exit_code, error or None, output tail)``."""
        argv = self._argv(root, project)
        if not argv:
            return None, "command_empty", ""
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                cwd=root,
                env=self.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        except FileNotFoundError:
            return None, f"command_not_found: {argv[0]}", ""
        except PermissionError:
            return None, f"command_not_executable: {argv[0]}", ""
        except OSError as exc:
            return None, f"command_failed_to_start: {argv[0]}: {exc.strerror or exc}", ""
        bound.info("consolidate_started", command=argv[0], pid=proc.pid)
        tail = _Tail(self.output_cap_bytes)
        assert proc.stdout is not None
        pump = asyncio.ensure_future(self._pump(proc.stdout, tail, bound))
        error: str | None = None
        try:
            error = await self._supervise(proc, lease_name, fencing_token, bound)
            await self._drain(proc, pump, bound)
        except BaseException:
            await _complete(self._terminate(proc, bound))
            pump.cancel()
            raise
        exit_code = proc.returncode
        if error is None and exit_code != 0:
            error = _exit_error(exit_code, tail.text())
        return exit_code, error, tail.text()

    async def _supervise(self, proc: Any, lease_name: str, fencing_token: int, bound: Any) -> str | None:
        """Wait for the command, renewing the lease; terminate it on timeout or lease loss."""
        loop = asyncio.get_running_loop()
        interval_s = self.lease_s / 3
        deadline = loop.time() + self.timeout_s
        next_renew = loop.time() + interval_s
        last_renewed = loop.time()
        waiter = asyncio.ensure_future(proc.wait())
        try:
            while True:
                wake_s = min(deadline, next_renew, loop.time() + _EXIT_POLL_S) - loop.time()
                await asyncio.wait({waiter}, timeout=max(0.0, wake_s))
                if proc.returncode is not None:
                    return None
                now = loop.time()
                if now >= deadline:
                    bound.warning("consolidate_timeout", timeout_s=self.timeout_s, pid=proc.pid)
                    await self._terminate(proc, bound)
                    return TIMEOUT
                if now < next_renew:
                    continue  # woken only to look at the exit status
                try:
                    renewed: bool | None = await self.store.leases.renew(
                        lease_name, self.owner, fencing_token, self.lease_s
                    )
                except LeaseLost:
                    renewed = False
                except MemdError as exc:
                    bound.warning("consolidate_renew_error", error=str(exc))
                    renewed = None
                if renewed:
                    last_renewed = now
                    next_renew = now + interval_s
                elif renewed is None and now - last_renewed < self.lease_s:
                    next_renew = now + min(interval_s, 1.0)
                else:
                    bound.warning("consolidate_lease_lost", pid=proc.pid)
                    await self._terminate(proc, bound)
                    return LEASE_LOST
        finally:
            if not waiter.done():
                waiter.cancel()

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

    async def _terminate(self, proc: Any, bound: Any) -> None:
        """SIGTERM the process group, SIGKILL it after ``kill_grace_s``; wait for the leader.

        Polls (every 50 ms) the leader's exit status and whether any group member is left.
        """
        loop = asyncio.get_running_loop()
        pgid = proc.pid
        _killpg(pgid, signal.SIGTERM)
        deadline = loop.time() + self.kill_grace_s
        while loop.time() < deadline:
            if proc.returncode is not None and not _group_alive(pgid):
                break
            await asyncio.sleep(_GROUP_POLL_S)
        else:
            bound.warning("consolidate_killed", pgid=pgid, signal="SIGKILL")
            _killpg(pgid, signal.SIGKILL)
            # SIGKILL cannot be ignored: the leader's exit is reported within moments.
            deadline = loop.time() + max(self.kill_grace_s, 5.0)
            while proc.returncode is None and loop.time() < deadline:
                await asyncio.sleep(_GROUP_POLL_S)
        bound.info("consolidate_terminated", pgid=pgid, exit_code=proc.returncode)

    async def _pump(self, stream: asyncio.StreamReader, tail: _Tail, bound: Any) -> None:
        """Read merged output in chunks: keep the tail, log lines (the first 1 000, capped)."""
        pending = bytearray()
        logged = 0
        suppressed = 0

        def emit(raw: bytes) -> None:
            nonlocal logged, suppressed
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

    async def _record_failure(self, project: str, error: str, bound: Any) -> None:
        try:
            await self.store.projects.mark_failed(project, error)
        except MemdError as exc:
            bound.warning("consolidate_record_failed", error=str(exc))

    async def _release(self, lease_name: str, fencing_token: int, bound: Any) -> None:
        try:
            released = await self.store.leases.release(lease_name, self.owner, fencing_token)
        except MemdError as exc:
            bound.warning("consolidate_release_failed", error=str(exc))
            return
        bound.info("consolidate_lease_released", lease=lease_name, held=released is not False)


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


def _exit_error(exit_code: int | None, tail: str) -> str:
    if exit_code is not None and exit_code < 0:
        try:
            name = signal.Signals(-exit_code).name
        except ValueError:
            name = str(-exit_code)
        return f"killed_by_signal: {name}"
    last = next((line.strip() for line in reversed(tail.splitlines()) if line.strip()), "")
    if len(last) > 300:
        last = last[:300] + "…"
    return f"exit_code {exit_code}: {last}" if last else f"exit_code {exit_code}"
