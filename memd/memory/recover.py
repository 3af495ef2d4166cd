"""Repairing memory roots after a crash (SPEC §5 invariant): temp files, stale staging directories and orphan
trace files of interrupted writes are removed. See :mod:`memd.memory.files` for the write protocol.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import structlog

from memd.memory.files import STAGING_PREFIX, TEMP_MARKER, TRACE_DIR

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


def remove_stale_staging(root: Path, *, min_age_s: float = 0.0) -> list[str]:
    """Remove ``<root>/.staging-*`` directories (left by a crashed consolidation).

    Args:
        root: the memory root.
        min_age_s: only directories whose mtime is at least this old are removed.

    Returns:
        The removed directory names.
    """
    removed = []
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return []
    now = time.time()
    for name in names:
        if not name.startswith(STAGING_PREFIX):
            continue
        path = Path(root) / name
        try:
            if path.is_symlink() or not path.is_dir():
                continue
            if now - path.stat().st_mtime < min_age_s:
                continue
            shutil.rmtree(path)
        except OSError as exc:
            log.warning("staging_remove_failed", path=str(path), error=str(exc))
            continue
        removed.append(name)
    return removed


def recover(root: Path, keep: Callable[[str], bool] | Iterable[str], *, min_age_s: float = 0.0) -> RecoveryReport:
    """Clean a memory root at start-up after a possible crash (see the module docstring).

    Removes: stray ``*.tmp-memd-*`` files anywhere under ``root`` (a crash between stage and
    commit), stale ``.staging-*`` directories (a crashed consolidation), and orphan trace files:
    ``trace_summaries/*.md`` whose relpath is not kept (a crash after a rename but before the
    old file of a retitled thread was removed, or a forgotten thread).

    Args:
        root: the memory root (a missing root is an empty report).
        keep: the trace relpaths the database references (``MemoryRecord.path``), as a set or a
            predicate on a relpath such as ``trace_summaries/x_y.md``.
        min_age_s: only temp files and staging dirs at least this old (mtime) are removed —
            pass a positive value when another daemon may be writing the same memory root.

    Returns:
        What was removed. Never raises for a file that vanished meanwhile.
    """
    root = Path(root)
    if not root.is_dir():
        return RecoveryReport()
    kept = keep if callable(keep) else set(keep).__contains__
    now = time.time()
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
    staging = remove_stale_staging(root, min_age_s=min_age_s)
    orphans: list[str] = []
    trace_dir = root / TRACE_DIR
    try:
        names = sorted(os.listdir(trace_dir))
    except OSError:
        names = []
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
