"""Scanning the rollout roots: a recursive ``stat`` walk that reads no content (SPEC §3.3).

:func:`scan_roots` finds every rollout under the roots (the start-up scan and the periodic reconcile);
:func:`restat_paths` stats the paths a watcher batch (:func:`memd.ingest.watch.watch_roots`) named;
:func:`stat_path` stats one file. Problems (a missing root, an unreadable directory, a symlink loop) are
logged once each and never stop the scan.
"""

from __future__ import annotations

import errno
import os
import stat as stat_mod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import structlog

from memd.ingest.files import (
    SKIPPED_DIR_NAMES,
    ZST_SUFFIX,
    FileStat,
    in_skipped_dir,
    is_rollout_name,
    warn_zstd_unavailable,
    zstd_available,
)

log = structlog.get_logger(__name__)


ProblemKind = Literal[
    "root_missing",
    "root_not_dir",
    "dir_unreadable",
    "file_unreadable",
    "symlink_loop",
    "zstd_unavailable",
]


@dataclass(frozen=True, slots=True)
class ScanProblem:
    """A path the scan could not (fully) look at.

    Attributes:
        path: the root, directory or file concerned.
        kind: ``root_missing``, ``root_not_dir``, ``dir_unreadable``, ``file_unreadable``,
            ``symlink_loop`` or ``zstd_unavailable`` (also the name of the log event).
        detail: a short human-readable reason (the OS error text).
    """

    path: str
    kind: ProblemKind
    detail: str


@dataclass(frozen=True, slots=True)
class ScanResult:
    """Outcome of :func:`scan_roots` or :func:`restat_paths`.

    Attributes:
        files: the rollout files found, sorted by path, each found once (a file reached through
            several paths, e.g. via a symlinked directory, is listed under the first path seen).
        problems: what could not be scanned; each was logged once as an event named ``kind``.
        vanished: rollout paths that were asked about (``restat_paths``) but no longer exist.
        unchanged: paths whose stat equals the stamp ``scan_roots`` was given for them (not in
            ``files``; unsorted).
    """

    files: tuple[FileStat, ...]
    problems: tuple[ScanProblem, ...] = ()
    vanished: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()


#: A file's last known ``(st_dev, st_ino, st_size, st_mtime)``, as the reconcile compares it.
Stamp = tuple[int, int, int, float]


# --------------------------------------------------------------------------------------------
# Scanning
# --------------------------------------------------------------------------------------------


def _scandir(path: str) -> Any:
    """``os.scandir`` (a seam for tests that simulate unreadable directories as root)."""
    return os.scandir(path)


class _Scanner:
    """Accumulates files and problems over one scan; walks directories without recursion."""

    def __init__(self, known: Mapping[str, Stamp] | None = None) -> None:
        self.files: list[FileStat] = []
        self.unchanged: list[str] = []
        self._known: Mapping[str, Stamp] = known or {}
        self.problems: list[ScanProblem] = []
        self.vanished: list[str] = []
        self._visited_dirs: set[tuple[int, int]] = set()
        self._seen_files: set[tuple[int, int]] = set()
        self._zstd_ok = zstd_available()

    def problem(self, path: str, kind: ProblemKind, detail: str) -> None:
        self.problems.append(ScanProblem(path=path, kind=kind, detail=detail))
        if kind == "zstd_unavailable":
            warn_zstd_unavailable(path)
        else:
            log.warning(kind, path=path, detail=detail)

    def os_problem(self, path: str, exc: OSError, default: ProblemKind) -> None:
        kind: ProblemKind = "symlink_loop" if exc.errno == errno.ELOOP else default
        self.problem(path, kind, exc.strerror or str(exc))

    def add_file(self, path: str, st: os.stat_result) -> None:
        if path.endswith(ZST_SUFFIX) and not self._zstd_ok:
            self.problem(path, "zstd_unavailable", "zstandard is not installed")
            return
        key = (st.st_dev, st.st_ino)
        if key in self._seen_files:
            return
        self._seen_files.add(key)
        if self._known.get(path) == (st.st_dev, st.st_ino, st.st_size, st.st_mtime):
            self.unchanged.append(path)  # the common case of a reconcile: no record is built
        else:
            self.files.append(FileStat.from_os(path, st))

    def walk(self, top: str, top_st: os.stat_result) -> None:
        """Add every rollout under directory ``top`` (following directory symlinks safely)."""
        top_key = (top_st.st_dev, top_st.st_ino)
        # Real directories first, symlinked ones after, so files get their real paths.
        stack: list[tuple[str, tuple[tuple[int, int], ...]]] = [(top, (top_key,))]
        deferred: list[tuple[str, tuple[tuple[int, int], ...]]] = []
        while stack or deferred:
            dir_path, ancestors = stack.pop() if stack else deferred.pop()
            if ancestors[-1] in self._visited_dirs:
                continue  # reached before by another path (overlapping roots, a second symlink)
            self._visited_dirs.add(ancestors[-1])
            plain: set[str] = set()
            compressed: list[tuple[str, str, os.stat_result]] = []
            try:
                with _scandir(dir_path) as entries:
                    for entry in entries:
                        sub = self._entry(entry, ancestors, plain, compressed)
                        if sub is not None:
                            (deferred if entry.is_symlink() else stack).append(sub)
            except FileNotFoundError:
                continue  # removed while scanning; the watcher or the next scan reports it
            except OSError as exc:
                self.os_problem(dir_path, exc, "dir_unreadable")
                continue
            for name, path, st in compressed:
                if name[: -len(".zst")] in plain:
                    log.debug("zst_shadowed", path=path)  # the plain file wins (SPEC §3.1)
                else:
                    self.add_file(path, st)

    def _entry(
        self,
        entry: os.DirEntry[str],
        ancestors: tuple[tuple[int, int], ...],
        plain: set[str],
        compressed: list[tuple[str, str, os.stat_result]],
    ) -> tuple[str, tuple[tuple[int, int], ...]] | None:
        """Handle one directory entry; return a sub-directory to descend into, if any."""
        name = entry.name
        try:
            if is_rollout_name(name):
                st = entry.stat()  # the only stat of a rollout file (follows symlinks)
                if stat_mod.S_ISREG(st.st_mode):
                    if name.endswith(ZST_SUFFIX):
                        compressed.append((name, entry.path, st))
                    else:
                        plain.add(name)
                        self.add_file(entry.path, st)
                    return None
                if not stat_mod.S_ISDIR(st.st_mode):
                    return None
            else:
                if not entry.is_dir() or name in SKIPPED_DIR_NAMES:  # d_type, no syscall unless a symlink
                    return None
                st = entry.stat()
        except FileNotFoundError:
            return None  # vanished, or a dangling symlink
        except OSError as exc:
            self.os_problem(entry.path, exc, "file_unreadable" if is_rollout_name(name) else "dir_unreadable")
            return None
        key = (st.st_dev, st.st_ino)
        if key in ancestors:
            self.problem(entry.path, "symlink_loop", "directory symlink points to an ancestor")
            return None
        return entry.path, (*ancestors, key)

    def result(self) -> ScanResult:
        self.files.sort(key=lambda f: f.path)
        return ScanResult(
            files=tuple(self.files),
            problems=tuple(self.problems),
            vanished=tuple(sorted(self.vanished)),
            unchanged=tuple(self.unchanged),
        )


def scan_roots(roots: Sequence[Path | str], known: Mapping[str, Stamp] | None = None) -> ScanResult:
    """Find every rollout file under the roots (recursive, stat only, no content read).

    Directory symlinks are followed; a loop (a symlink to an ancestor) is reported once as
    ``symlink_loop`` and not followed, and a directory reached twice is scanned once. Directories
    named in :data:`~memd.ingest.files.SKIPPED_DIR_NAMES` (``tool-results``) are not entered. When both
    ``x.jsonl`` and ``x.jsonl.zst`` exist in one directory the plain file wins. ``*.jsonl.zst``
    files are skipped (problem ``zstd_unavailable``, one warning per process) unless
    ``zstandard`` is importable. Each rollout file costs one ``stat`` (``DirEntry.stat``).

    Args:
        roots: directories to scan, e.g. ``~/.codex/sessions`` and ``~/.codex/archived_sessions``.
        known: the last stamp of the files already known (the reconcile scan): a file whose stat
            equals its stamp is only listed in ``unchanged``, so an unchanged history costs its
            ``stat`` calls and little else.

    Returns:
        A :class:`ScanResult`. Problems (``root_missing``, ``root_not_dir``, ``dir_unreadable``,
        ``file_unreadable``, ``symlink_loop``) are logged once each as an event of that name and
        never stop the scan of other paths.
    """
    scanner = _Scanner(known)
    for root in roots:
        root_path = os.fspath(root)
        try:
            st = os.stat(root_path)
        except (FileNotFoundError, NotADirectoryError):
            scanner.problem(root_path, "root_missing", "no such directory")
            continue
        except OSError as exc:
            scanner.os_problem(root_path, exc, "dir_unreadable")
            continue
        if not stat_mod.S_ISDIR(st.st_mode):
            scanner.problem(root_path, "root_not_dir", "not a directory")
            continue
        scanner.walk(root_path, st)
    return scanner.result()


def restat_paths(paths: Iterable[str]) -> ScanResult:
    """Stat the paths a watcher batch named (see :func:`memd.ingest.watch.watch_roots`).

    A rollout file is stat-ed; a directory (created, moved in, or a root to rescan) is scanned
    like a root; a rollout path that no longer exists is listed in ``vanished`` (not logged: a
    move to the archive makes the old path vanish); other paths are ignored.

    Args:
        paths: absolute paths, files or directories.

    Returns:
        A :class:`ScanResult` with ``files``, ``problems`` and ``vanished``.
    """
    scanner = _Scanner()
    for path in sorted(set(paths)):
        if in_skipped_dir(path):
            continue
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            if is_rollout_name(os.path.basename(path)):
                scanner.vanished.append(path)
            continue
        except OSError as exc:
            scanner.os_problem(path, exc, "file_unreadable")
            continue
        if stat_mod.S_ISDIR(st.st_mode):
            scanner.walk(path, st)
        elif stat_mod.S_ISREG(st.st_mode) and is_rollout_name(os.path.basename(path)):
            if path.endswith(ZST_SUFFIX) and os.path.isfile(path[: -len(".zst")]):
                continue  # the plain file wins
            scanner.add_file(path, st)
    return scanner.result()


def stat_path(path: str | Path) -> FileStat | None:
    """Stat one rollout file (following symlinks).

    Args:
        path: the file.

    Returns:
        Its :class:`FileStat`, or ``None`` when it vanished, is not a regular file, or cannot be
        stat-ed (the latter logs ``file_unreadable`` once).
    """
    path_s = os.fspath(path)
    try:
        st = os.stat(path_s)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        log.warning("file_unreadable", path=path_s, detail=exc.strerror or str(exc))
        return None
    if not stat_mod.S_ISREG(st.st_mode):
        return None
    return FileStat.from_os(path_s, st)
