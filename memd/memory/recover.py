"""Repairing memory roots after a crash (SPEC §5 invariant), and renaming legacy trace files.

:func:`recover` removes what interrupted writes left in one memory root: temp files, stale staging
directories and superseded trace files (never one whose thread has no row: the only copy of that
memory). :class:`MemoryRepair` does it for every project of a store at
start-up, writes again from their ``memories`` rows the trace files a crash lost (before each
consolidation too), and renames trace files written before thread ids were kept verbatim in file
names (SPEC §8), once, leaving no duplicate. See :mod:`memd.memory.files` for the write protocol.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import structlog

from memd.clock import Clock
from memd.errors import MemdError
from memd.faults import FaultLog
from memd.memory import files as memory_files
from memd.memory.files import (
    STAGING_PREFIX,
    TEMP_MARKER,
    TRACE_DIR,
    TraceHeader,
    not_a_memory_root,
    parse_trace_file,
    remove_stale_staging,
)
from memd.rollout.records import Agent
from memd.store.records import MemoryRecord, ProjectRecord, ThreadRecord
from memd.store.store import Store

log = structlog.get_logger(__name__)


# --------------------------------------------------------------------------- recovery


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What :func:`recover` removed, as paths relative to the memory root."""

    temp_files: tuple[str, ...] = ()
    staging_dirs: tuple[str, ...] = ()
    orphan_traces: tuple[str, ...] = ()

    @property
    def removed(self) -> int:
        """How many temp files, staging directories and orphan traces were removed in total."""
        return len(self.temp_files) + len(self.staging_dirs) + len(self.orphan_traces)


def _remove_temp_files(root: Path, min_age_s: float) -> list[str]:
    """Remove ``*.tmp-memd-*`` files under ``root`` at least ``min_age_s`` old; return their relpaths."""
    now = time.time()  # compared with file mtimes, which are real time
    temps: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != ".git" and not d.startswith(STAGING_PREFIX))
        for name in sorted(filenames):
            if TEMP_MARKER not in name:
                continue
            path = Path(dirpath) / name
            try:
                if now - path.lstat().st_mtime < min_age_s:
                    continue
                os.unlink(path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("memory_temp_remove_failed", path=str(path), error=str(exc))
                continue
            temps.append(path.relative_to(root).as_posix())
    return temps


def _remove_orphan_traces(root: Path, kept: Callable[[str], bool]) -> list[str]:
    """Remove ``trace_summaries/*.md`` files whose relpath is not kept; return their relpaths."""
    trace_dir = root / TRACE_DIR
    try:
        names = sorted(os.listdir(trace_dir))
    except OSError:
        names = []
    orphans: list[str] = []
    for name in names:
        relpath = f"{TRACE_DIR}/{name}"
        if not name.endswith(".md") or kept(relpath):
            continue
        try:
            os.unlink(trace_dir / name)
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("trace_remove_failed", path=str(trace_dir / name), error=str(exc))
            continue
        orphans.append(relpath)
    return orphans


def recover(root: Path, keep: Callable[[str], bool] | Iterable[str], *, min_age_s: float = 0.0) -> RecoveryReport:
    """Clean a memory root at start-up after a possible crash (see the module docstring).

    Removes: stray ``*.tmp-memd-*`` files anywhere under ``root`` (a crash between stage and
    commit), stale ``.staging-*`` directories (a crashed consolidation), and the trace files
    ``trace_summaries/*.md`` that ``keep`` refuses. :class:`MemoryRepair` refuses only superseded
    ones (a crash after a rename but before the old file of a retitled thread was removed, or a
    forgotten thread), never a trace whose thread has no row.

    Args:
        root: the memory root (a missing root is an empty report).
        keep: the trace relpaths to keep, as a set or a predicate on a relpath such as
            ``trace_summaries/x_y.md``.
        min_age_s: only temp files and staging dirs at least this old (mtime) are removed —
            pass a positive value when another daemon may be writing the same memory root.

    Returns:
        What was removed. Never raises for a file that vanished meanwhile.
    """
    root = Path(root)
    if not root.is_dir():
        return RecoveryReport()
    kept = keep if callable(keep) else set(keep).__contains__
    temps = _remove_temp_files(root, min_age_s)
    staging = remove_stale_staging(root, min_age_s=min_age_s)
    orphans = _remove_orphan_traces(root, kept)
    report = RecoveryReport(tuple(temps), tuple(staging), tuple(orphans))
    if temps or staging or orphans:
        log.info(
            "memory_recovered",
            root=str(root),
            temp_files=len(temps),
            staging_dirs=len(staging),
            orphan_traces=len(orphans),
        )
    return report


def trace_header(thread: ThreadRecord | None, memory: MemoryRecord) -> memory_files.TraceHeader:
    """The header of ``memory``'s trace file, from its thread when it is still indexed."""
    return memory_files.TraceHeader(
        thread_id=memory.thread_id,
        project=memory.project,
        cwd=thread.cwd if thread else "",
        rollout_path=thread.path if thread else "",
        updated_at=thread.updated_at if thread else memory.generated_at,
        agent=thread.agent if thread else Agent.CODEX,
        started_at=thread.created_at if thread else 0.0,
        source_watermark=memory.source_watermark,
    )


def _legacy_relpath(memory: MemoryRecord) -> str | None:
    """The current name of a trace file that still has a legacy (slugged-id) name, else ``None``."""
    if not memory.path or not memory.path.startswith(TRACE_DIR + "/"):
        return None
    name = memory.path[len(TRACE_DIR) + 1 :]
    current = memory_files.file_id(memory.thread_id) + "_"
    legacy = memory_files.legacy_trace_prefix(memory.thread_id)
    if name.startswith(current) or not name.startswith(legacy) or not name.endswith(".md"):
        return None
    return f"{TRACE_DIR}/{current}{name[len(legacy) : -len('.md')]}.md"


class MemoryRepair:
    """Keeps every project's memory root consistent with the store (SPEC §5 invariant).

    Args:
        store: the state store (the ``memories`` rows are the truth).
        clock: time source (whether another daemon is alive).
        memory_dir: the configured ``memory_dir``.
        max_traces_per_project: how many of a project's newest traces must have their file.
        faults: where failures are noted for ``memd status``.
    """

    def __init__(
        self, store: Store, clock: Clock, *, memory_dir: Path, max_traces_per_project: int, faults: FaultLog
    ) -> None:
        self._store = store
        self._clock = clock
        self._memory_dir = Path(memory_dir)
        self._keep_n = max_traces_per_project
        self._faults = faults

    async def recover_all(self, *, min_age_s: float) -> None:
        """Finish what a crash interrupted, in every project's memory root, once at start-up.

        Temporary files of interrupted writes, stale consolidation staging directories and
        superseded trace files (their thread's row names another file, or ``memd forget`` removed
        the thread) are removed — a trace whose thread has no row is kept; legacy trace names are
        migrated; a
        trace among the project's newest ``max_traces_per_project`` whose file is missing or
        differs (a crash between the row's commit and the rename) is written again from the row.

        Args:
            min_age_s: when another daemon runs on the same state, only leftovers older than the
                longest write it may have in flight are removed (its temp files and fresh traces
                are not leftovers); 0 otherwise. A failure is logged per project
                (``memory_recover_failed``) and the others go on.
        """
        for project in await self._store.projects.list_all():
            if project.memory_root is None or not Path(project.memory_root).is_dir():
                continue
            try:
                await self._recover_project(project, min_age_s)
            except (MemdError, OSError) as exc:
                self._faults.note("memory_recover_failed", exc, now_s=self._clock.now())
                log.error("memory_recover_failed", project=project.project, error=str(exc))

    async def _recover_project(self, project: ProjectRecord, min_age_s: float) -> None:
        root = Path(str(project.memory_root))
        migrated = await self.migrate_names(project)
        memories = await self._store.memories.list_for_project(project.project)
        keep = {m.path for m in memories if m.path}
        superseded = await self._superseded(project, root, keep)

        def kept(relpath: str) -> bool:
            if relpath not in superseded:
                return True
            if not min_age_s:
                return False
            try:  # another daemon may have committed it after we listed the rows (file times are real time)
                return time.time() - (root / relpath).lstat().st_mtime < min_age_s
            except OSError:
                return False

        report = await asyncio.to_thread(recover, root, kept, min_age_s=min_age_s)
        rewritten = await self.repair_traces(project, memories)
        if report.removed or rewritten or migrated:
            log.info(
                "memory_recovered",
                project=project.project,
                removed=report.removed,
                rewritten=rewritten,
                renamed=migrated,
            )

    async def _superseded(self, project: ProjectRecord, root: Path, named: set[str]) -> set[str]:
        """The trace files no row of ``project`` names that may go: those whose thread has a
        ``memories`` row naming another file (a retitled or moved thread, a no-op memory) and
        those of a thread ``memd forget`` removed (tombstone). A trace whose thread has no row
        (a database rebuilt after a reinstall, a session ``memd db recover`` could not take back)
        is kept: it is the only copy of that memory."""
        unnamed = await asyncio.to_thread(_unnamed_traces, root, named)
        if not unnamed:
            return set()
        forgotten = await asyncio.to_thread(memory_files.read_tombstones, self._memory_dir)
        superseded: set[str] = set()
        for relpath, thread_id in unnamed.items():
            if thread_id in forgotten:
                superseded.add(relpath)
                continue
            row = await self._store.memories.get(thread_id)
            if row is None:
                log.info("trace_kept_without_row", project=project.project, path=relpath, thread_id=thread_id)
            elif (row.project, row.path) != (project.project, relpath):
                superseded.add(relpath)
        return superseded

    async def repair_traces(self, project: ProjectRecord, memories: list[MemoryRecord] | None = None) -> int:
        """Write again, from their rows, the project's newest trace files that are missing.

        Returns:
            How many files were written.

        Raises:
            MemoryWriteError: a file could not be written (disk full); the row stays the truth.
        """
        if project.memory_root is None:
            return 0
        root = Path(project.memory_root)
        if memories is None:
            memories = await self._store.memories.list_for_project(project.project)
        rewritten = 0
        for memory in [m for m in memories if m.path][: self._keep_n]:
            assert memory.path is not None
            if await asyncio.to_thread(memory_files.trace_exists, root, memory.path, memory.trace_memory):
                continue
            thread = await self._store.threads.get(memory.thread_id)
            content = memory_files.render_trace_file(trace_header(thread, memory), memory.trace_memory)
            await asyncio.to_thread(_write_trace, root, memory.path, content, memory.thread_id)
            rewritten += 1
        if rewritten:
            log.info("trace_files_rewritten", project=project.project, count=rewritten)
        return rewritten

    async def migrate_names(self, project: ProjectRecord) -> int:
        """Rename the project's trace files that still have a legacy (slugged-id) name (SPEC §8).

        Per file: the trace is written under its new name with the full header (agent, session
        date, source watermark), the row is moved to it, and committing the new file removes the
        old one. A crash at any point leaves either name, never both (a file its row no longer
        names is superseded: :func:`recover` removes it), so the migration simply runs again.

        Returns:
            How many files were renamed.
        """
        if project.memory_root is None:
            return 0
        root = Path(project.memory_root)
        renamed = 0
        for memory in await self._store.memories.list_for_project(project.project):
            new_path = _legacy_relpath(memory)
            if new_path is None or memory.path is None:
                continue
            thread = await self._store.threads.get(memory.thread_id)
            content = memory_files.render_trace_file(trace_header(thread, memory), memory.trace_memory)
            staged = await asyncio.to_thread(
                memory_files.stage_file, root, new_path, content, thread_id=memory.thread_id
            )
            try:
                moved = await self._store.memories.move(memory.thread_id, memory.path, new_path)
            except BaseException:
                await asyncio.to_thread(staged.abort)
                raise
            await asyncio.to_thread(staged.commit if moved else staged.abort)
            renamed += int(moved)
        if renamed:
            log.info("trace_files_renamed", project=project.project, count=renamed)
        return renamed


def _unnamed_traces(root: Path, named: set[str]) -> dict[str, str]:
    """``{relpath: thread id}`` of the ``trace_summaries/*.md`` files of ``root`` not in ``named``
    whose header names a thread (a file without one is not memd's and is left alone)."""
    headers = memory_files.trace_headers(root)
    return {rel: header.thread_id for rel, header in headers.items() if rel not in named and header.thread_id}


def _write_trace(root: Path, relpath: str, content: str, thread_id: str) -> None:
    memory_files.stage_file(root, relpath, content, thread_id=thread_id).commit()


# --------------------------------------------------------------------------- database recovery


@dataclass(frozen=True, slots=True)
class TraceOnDisk:
    """A trace file found under ``memory_dir`` (for ``memd db recover``).

    Attributes:
        project: the project key (from the root's ``PROJECT`` file).
        memory_root: the memory root it lives in.
        relpath: the file relative to its memory root.
        header: its header (thread id, project, cwd, rollout path, session's last activity).
        body: the trace memory.
        summary: its line in ``memory_summary.md``, else the trace's first heading.
        mtime: the file's modification time, epoch seconds.
    """

    project: str
    memory_root: str
    relpath: str
    header: TraceHeader
    body: str
    summary: str
    mtime: float


def _summaries(root: Path) -> dict[str, str]:
    """The lines of ``memory_summary.md`` as ``{key: summary}``, keyed by the trace file for the
    ``- <summary> (trace: <file>)`` form and by the short session id for ``- <summary> [<id8> <date>]``."""
    out: dict[str, str] = {}
    try:
        text = (root / "memory_summary.md").read_text("utf-8", "replace")
    except OSError:
        return out
    for line in text.splitlines():
        if not line.startswith("- "):
            continue
        if line.endswith(")") and "(trace: " in line:
            summary, _, ref = line[2:-1].rpartition(" (trace: ")
            out[ref.strip()] = summary.strip()
        elif line.endswith("]") and " [" in line:
            summary, _, ref = line[2:-1].rpartition(" [")
            out[ref.split()[0] if ref.split() else ref] = summary.strip()
    return out


def traces_on_disk(memory_dir: Path) -> tuple[list[TraceOnDisk], set[str]]:
    """Every trace file of every memd memory root under ``memory_dir``.

    Returns:
        ``(traces, consolidated)``: the traces, and the project keys whose consolidation need
        not run again: a ``MEMORY.md`` exists and ``memory_summary.md`` (rebuilt before every
        consolidation) lists every trace on disk.
    """
    traces: list[TraceOnDisk] = []
    consolidated: set[str] = set()
    for marker in sorted(Path(memory_dir).glob("*/memory/PROJECT")):
        root = marker.parent
        if not_a_memory_root(root) is not None:
            continue
        project = marker.read_text("utf-8", "replace").rstrip("\n")
        summaries = _summaries(root)
        listed = True
        for path in sorted((root / TRACE_DIR).glob("*.md")):
            try:
                text = path.read_text("utf-8", "replace")
                mtime = path.stat().st_mtime
            except OSError:
                continue
            header, body = parse_trace_file(text)
            if not header.thread_id:
                continue
            relpath = f"{TRACE_DIR}/{path.name}"
            first = next((line[2:].strip() for line in body.splitlines() if line.startswith("# ")), "")
            short = header.thread_id[:8]
            summary = summaries.get(relpath) or summaries.get(short) or first
            traces.append(TraceOnDisk(project, str(root), relpath, header, body, summary, mtime))
            listed = listed and (relpath in summaries or short in summaries)
        if listed and (root / "MEMORY.md").is_file():
            consolidated.add(project)
    return traces, consolidated
