"""Rollout sources: scan, bounded head read, incremental tail reader and watcher (SPEC §3.1, §3.3).

This module does file-system I/O only. It never touches SQL and never parses JSON: it returns
frozen records (:class:`FileStat`, :class:`ScanResult`, :class:`HeadRead`, :class:`TailRead`,
:class:`ReadFailure`) and raw line bytes (without the trailing ``\\n``). Invalid UTF-8 and invalid
JSON are the rollout parser's business.

Faults on a single file never raise :class:`OSError` to the caller. A file that vanished between
stat and read gives a :class:`ReadFailure` with ``reason="vanished"`` and one ``file_vanished``
event; a permission error gives ``reason="unreadable"`` and one ``file_unreadable`` event. The
streaming reader (:func:`read_lines_until`) raises :class:`RolloutReadError` instead, because an
iterator cannot return a result record.

Rollout files (Codex rollout format, SPEC §3.1): ``$CODEX_HOME/sessions/YYYY/MM/DD/rollout-*.jsonl``
and ``$CODEX_HOME/archived_sessions/rollout-*.jsonl`` (optionally ``*.jsonl.zst``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import hashlib
import os
import stat as stat_mod
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import ModuleType
from typing import Any, BinaryIO, Literal

import structlog
from watchfiles import Change as FsEvent
from watchfiles import awatch

from memd.clock import Clock, SystemClock
from memd.errors import RolloutError
from memd.store.records import FileRecord

log = structlog.get_logger("memd.sources")

#: Suffix of a plain rollout file.
PLAIN_SUFFIX = ".jsonl"
#: Suffix of a zstd-compressed rollout file (read only when ``zstandard`` is importable).
ZST_SUFFIX = ".jsonl.zst"
#: Bytes covered by the head hash (the fingerprint that detects a replaced file).
HEAD_HASH_BYTES = 4096
#: Default size of one read in the tail and streaming readers.
DEFAULT_CHUNK_BYTES = 1 << 20

_HEAD_FIRST_BLOCK_BYTES = 16 << 10
_HEAD_MAX_BLOCK_BYTES = 1 << 20
_BACKOFF_MAX_EXPONENT = 30


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


def is_rollout_name(name: str) -> bool:
    """Tell whether a file name is a rollout this module reads.

    Accepted: any ``*.jsonl`` (Codex writes ``rollout-<local time>-<uuid>.jsonl``; test corpora
    and other tools use other stems, so the stem is not checked) and ``*.jsonl.zst``
    (compressed archives). Everything else (``.tmp`` files, ``.json``, directories' names) is not a
    rollout.

    Args:
        name: a bare file name (no directory part).

    Returns:
        ``True`` for ``*.jsonl`` and ``*.jsonl.zst``.
    """
    return name.endswith(PLAIN_SUFFIX) or name.endswith(ZST_SUFFIX)


@dataclass(frozen=True, slots=True)
class FileStat:
    """What one ``stat`` of a rollout file says.

    Attributes:
        path: the path as found (symlinks not resolved).
        dev: device number (``st_dev``).
        inode: inode number (``st_ino``).
        size: size in bytes (compressed size for ``*.jsonl.zst``).
        mtime: modification time, epoch seconds (float).
    """

    path: str
    dev: int
    inode: int
    size: int
    mtime: float

    @classmethod
    def from_os(cls, path: str, st: os.stat_result) -> FileStat:
        """Build from an :class:`os.stat_result` (of ``os.stat``, ``os.fstat`` or ``DirEntry``)."""
        return cls(path=path, dev=st.st_dev, inode=st.st_ino, size=st.st_size, mtime=st.st_mtime)

    @property
    def compressed(self) -> bool:
        """``True`` for a ``*.jsonl.zst`` file (offsets then count decompressed bytes)."""
        return self.path.endswith(ZST_SUFFIX)


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
    """

    files: tuple[FileStat, ...]
    problems: tuple[ScanProblem, ...] = ()
    vanished: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ReadFailure:
    """A rollout that could not be read this time (never raised, returned).

    Attributes:
        path: the file.
        reason: ``vanished`` (deleted or moved between stat and read; the caller forgets it or
            waits for its new path), ``unreadable`` (permission denied, I/O error, corrupt zstd; the
            caller records the error and retries on the next change or scan) or ``unsupported``
            (``*.jsonl.zst`` without ``zstandard`` installed; skipped).
        detail: the OS error text.
    """

    path: str
    reason: Literal["vanished", "unreadable", "unsupported"]
    detail: str


@dataclass(frozen=True, slots=True)
class HeadRead:
    """Result of :func:`read_head`: the first line and the head hash, from one open file.

    Attributes:
        first_line: the first line without its ``\\n``; the bytes read so far when the line is not
            complete yet (``complete=False``); ``None`` for an empty file or an oversized line.
        complete: the first line ended in ``\\n`` within ``max_line_bytes``.
        oversized: the first line is longer than ``max_line_bytes`` (nothing of it is returned).
        head_hash: sha256 hex of the first ``head_hash_bytes`` (4 KiB) bytes, or ``""`` while the
            file is shorter than that. The first 4 KiB of an append-only file never change, so a
            non-empty hash is a stable fingerprint; a file shorter than 4 KiB has none yet and its
            replacement is detected by inode and size only.
        stat: ``fstat`` of the open file, so stat and content agree even if the path was replaced.
        bytes_read: bytes actually read (at most ``max(max_line_bytes + 1, head_hash_bytes)``).
    """

    first_line: bytes | None
    complete: bool
    oversized: bool
    head_hash: str
    stat: FileStat
    bytes_read: int


@dataclass(frozen=True, slots=True)
class TailRead:
    """Result of :func:`read_new_lines`.

    Attributes:
        lines: complete lines read, each without its trailing ``\\n`` (possibly empty lines).
        new_offset: byte offset just past the last complete line consumed (the new watermark of
            the file); a partial last line is not consumed. ``0`` when ``replaced``.
        bytes_read: bytes read from the file in this call (for a plain file: exactly the bytes
            from ``offset`` to the size seen by ``fstat``).
        oversized_lines: complete lines longer than ``max_line_bytes``, skipped and not held in
            memory; they are consumed (``new_offset`` is past them).
        partial_tail: the read ended inside a line that has no ``\\n`` yet.
        replaced: the file is shorter than ``offset`` or its inode is not ``expect_inode``; nothing
            was read and the caller re-reads from 0.
        stat: ``fstat`` of the open file (store it with ``new_offset``).
    """

    lines: list[bytes]
    new_offset: int
    bytes_read: int
    oversized_lines: int
    partial_tail: bool
    replaced: bool
    stat: FileStat


class Change(StrEnum):
    """How a rollout changed since its :class:`~memd.store.records.FileRecord` (see
    :func:`classify_change`)."""

    NEW = "new"
    UNCHANGED = "unchanged"
    GROWN = "grown"
    REPLACED = "replaced"
    TRUNCATED = "truncated"


class RolloutReadError(RolloutError):
    """A rollout could not be streamed by :func:`read_lines_until`.

    Attributes:
        path: the file.
        reason: ``vanished``, ``unreadable``, ``unsupported`` (as :class:`ReadFailure`) or
            ``replaced`` (the file is shorter than the requested end offset or its inode changed).
    """

    def __init__(self, path: str, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {path}: {detail}")
        self.path = path
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------------------------
# zstd support (optional)
# --------------------------------------------------------------------------------------------

_zstd_warned = False


@functools.cache
def _load_zstandard() -> ModuleType | None:
    """Import ``zstandard`` once; ``None`` when it is not installed."""
    try:
        import zstandard  # type: ignore[import-not-found]
    except ImportError:
        return None
    return zstandard


def _warn_zstd_unavailable(path: str) -> None:
    """Log ``zstd_unavailable`` once per process (archives are skipped, not errors)."""
    global _zstd_warned
    if not _zstd_warned:
        _zstd_warned = True
        log.warning(
            "zstd_unavailable",
            path=path,
            action="skipping *.jsonl.zst rollouts",
            hint="install the zstandard package to read them",
        )


# --------------------------------------------------------------------------------------------
# Scanning
# --------------------------------------------------------------------------------------------


def _scandir(path: str) -> Any:
    """``os.scandir`` (a seam for tests that simulate unreadable directories as root)."""
    return os.scandir(path)


def _open_binary(path: str) -> BinaryIO:
    """Open a file for unbuffered binary reading (a seam for fault-injection tests).

    ``O_NONBLOCK`` keeps a FIFO named like a rollout from blocking the open (it is then rejected
    as not a regular file); it has no effect on regular files.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    return os.fdopen(fd, "rb", buffering=0)  # closed by the caller


class _Scanner:
    """Accumulates files and problems over one scan; walks directories without recursion."""

    def __init__(self) -> None:
        self.files: list[FileStat] = []
        self.problems: list[ScanProblem] = []
        self.vanished: list[str] = []
        self._visited_dirs: set[tuple[int, int]] = set()
        self._seen_files: set[tuple[int, int]] = set()
        self._zstd_ok = _load_zstandard() is not None

    def problem(self, path: str, kind: ProblemKind, detail: str) -> None:
        self.problems.append(ScanProblem(path=path, kind=kind, detail=detail))
        if kind == "zstd_unavailable":
            _warn_zstd_unavailable(path)
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
                if not entry.is_dir():  # d_type, no syscall unless it is a symlink
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
        return ScanResult(files=tuple(self.files), problems=tuple(self.problems), vanished=tuple(sorted(self.vanished)))


def scan_roots(roots: Sequence[Path | str]) -> ScanResult:
    """Find every rollout file under the roots (recursive, stat only, no content read).

    Directory symlinks are followed; a loop (a symlink to an ancestor) is reported once as
    ``symlink_loop`` and not followed, and a directory reached twice is scanned once. When both
    ``x.jsonl`` and ``x.jsonl.zst`` exist in one directory the plain file wins. ``*.jsonl.zst``
    files are skipped (problem ``zstd_unavailable``, one warning per process) unless
    ``zstandard`` is importable. Each rollout file costs one ``stat`` (``DirEntry.stat``).

    Args:
        roots: directories to scan, e.g. ``~/.codex/sessions`` and ``~/.codex/archived_sessions``.

    Returns:
        A :class:`ScanResult`. Problems (``root_missing``, ``root_not_dir``, ``dir_unreadable``,
        ``file_unreadable``, ``symlink_loop``) are logged once each as an event of that name and
        never stop the scan of other paths.
    """
    scanner = _Scanner()
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
    """Stat the paths a watcher batch named (see :func:`watch_roots`).

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


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _failure(path: str, exc: Exception) -> ReadFailure:
    """Turn an OS (or zstd) error on one file into a logged :class:`ReadFailure`."""
    detail = (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
        log.info("file_vanished", path=path, detail=detail, action="skipped until it reappears")
        return ReadFailure(path=path, reason="vanished", detail=detail)
    log.warning("file_unreadable", path=path, detail=detail, action="recorded; retried on change")
    return ReadFailure(path=path, reason="unreadable", detail=detail)


def _read_errors() -> tuple[type[Exception], ...]:
    """Exceptions a read of one file may raise: OSError, and ``zstandard.ZstdError``."""
    zstd = _load_zstandard()
    zstd_error = getattr(zstd, "ZstdError", None) if zstd is not None else None
    return (OSError, zstd_error) if isinstance(zstd_error, type) else (OSError,)


def _open_rollout(path: str) -> tuple[BinaryIO, FileStat] | ReadFailure:
    """Open a rollout once and ``fstat`` the open descriptor.

    Returns a readable binary stream (decompressing for ``*.jsonl.zst``) and the stat of the very
    file that was opened, or a :class:`ReadFailure` (already logged).
    """
    compressed = path.endswith(ZST_SUFFIX)
    zstd = _load_zstandard() if compressed else None
    if compressed and zstd is None:
        _warn_zstd_unavailable(path)
        return ReadFailure(path=path, reason="unsupported", detail="zstandard is not installed")
    try:
        raw = _open_binary(path)
    except OSError as exc:
        return _failure(path, exc)
    try:
        st = os.fstat(raw.fileno())
    except OSError as exc:
        raw.close()
        return _failure(path, exc)
    if not stat_mod.S_ISREG(st.st_mode):
        raw.close()
        log.warning("file_unreadable", path=path, detail="not a regular file")
        return ReadFailure(path=path, reason="unreadable", detail="not a regular file")
    if zstd is None:
        return raw, FileStat.from_os(path, st)
    stream = zstd.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    return stream, FileStat.from_os(path, st)


def read_head(
    path: str | Path, *, max_line_bytes: int, head_hash_bytes: int = HEAD_HASH_BYTES
) -> HeadRead | ReadFailure:
    """Read the first line and the head hash with one bounded read (SPEC §3.3).

    Opens the file once and ``fstat``-s the open descriptor, so a file replaced between a
    caller's stat and this read is seen consistently (``HeadRead.stat`` describes the content).
    Reads in growing blocks (16 KiB first) until the first ``\\n`` is found and ``head_hash_bytes``
    are in hand, never more than ``max(max_line_bytes + 1, head_hash_bytes)`` bytes and never
    past the size ``fstat`` reported: indexing a file never reads its body.

    Args:
        path: the rollout file (``*.jsonl``, or ``*.jsonl.zst`` when ``zstandard`` is installed,
            whose first line and hash are taken from the decompressed bytes).
        max_line_bytes: longest first line accepted, in bytes (without the ``\\n``).
        head_hash_bytes: bytes covered by ``head_hash`` (4 KiB; the value stored in
            ``FileRecord.head_hash``).

    Returns:
        A :class:`HeadRead`, or a :class:`ReadFailure` (``vanished`` / ``unreadable`` /
        ``unsupported``, logged once as ``file_vanished`` / ``file_unreadable`` /
        ``zstd_unavailable``). Never raises :class:`OSError`.
    """
    path_s = os.fspath(path)
    opened = _open_rollout(path_s)
    if isinstance(opened, ReadFailure):
        return opened
    stream, st = opened
    limit = max(max_line_bytes + 1, head_hash_bytes)
    if not st.compressed:
        limit = min(limit, st.size)
    buf = bytearray()
    newline = -1
    block = _HEAD_FIRST_BLOCK_BYTES
    try:
        with stream:
            while len(buf) < limit:
                data = stream.read(min(block, limit - len(buf)))
                if not data:
                    break
                start = len(buf)
                buf += data
                if newline < 0:
                    newline = buf.find(b"\n", start)
                if newline >= 0 and len(buf) >= head_hash_bytes:
                    break
                block = min(block * 2, _HEAD_MAX_BLOCK_BYTES)
    except _read_errors() as exc:
        return _failure(path_s, exc)
    head_hash = ""
    if len(buf) >= head_hash_bytes:
        head_hash = hashlib.sha256(buf[:head_hash_bytes]).hexdigest()
    if 0 <= newline <= max_line_bytes:
        first_line, complete, oversized = bytes(buf[:newline]), True, False
    elif newline > max_line_bytes or len(buf) > max_line_bytes:
        first_line, complete, oversized = None, False, True
        log.warning(
            "first_line_oversized",
            path=path_s,
            max_line_bytes=max_line_bytes,
            action="the file is indexed without its first line",
        )
    else:
        first_line, complete, oversized = (bytes(buf) if buf else None), False, False
    return HeadRead(
        first_line=first_line, complete=complete, oversized=oversized, head_hash=head_hash, stat=st, bytes_read=len(buf)
    )


def classify_change(prev: FileRecord | None, st: FileStat, head_hash: str | None) -> Change:
    """Decide what to do with a rollout given its stored record and a fresh stat (pure).

    Rules, in order (SPEC §3.3):

    - no record → ``new``;
    - device or inode differs → ``replaced``;
    - same size and mtime → ``unchanged`` (costs only the stat; ``head_hash`` is ignored);
    - smaller than the stored size or offset → ``truncated`` (re-read from 0);
    - both hashes known (non-empty) and different → ``replaced`` (re-read from 0). A stored
      hash with a fresh ``""`` means the file shrank below 4 KiB: ``truncated`` already caught it;
    - otherwise → ``grown`` (read from the stored offset; the size may be equal when only the
      mtime moved).

    Compressed archives (``*.jsonl.zst``) are immutable and their offsets count decompressed
    bytes, so any change to a known one is ``replaced``.

    Args:
        prev: the stored :class:`~memd.store.records.FileRecord`, or ``None``.
        st: the fresh stat (preferably ``HeadRead.stat``, taken with the hash).
        head_hash: the fresh head hash (``HeadRead.head_hash``), or ``None`` when not read.

    Returns:
        The :class:`Change`.
    """
    if prev is None:
        return Change.NEW
    if st.dev != prev.dev or st.inode != prev.inode:
        return Change.REPLACED
    if st.size == prev.size and st.mtime == prev.mtime:
        return Change.UNCHANGED
    if st.compressed:
        return Change.REPLACED
    if st.size < prev.size or st.size < prev.offset:
        return Change.TRUNCATED
    if head_hash and prev.head_hash and head_hash != prev.head_hash:
        return Change.REPLACED
    return Change.GROWN


@dataclass(slots=True)
class _Progress:
    """Counters a line splitter updates as it goes (offsets are absolute byte positions)."""

    offset: int
    bytes_read: int = 0
    oversized_lines: int = 0
    partial_tail: bool = False


def _split_lines(
    stream: BinaryIO, *, end: int | None, max_line_bytes: int, chunk_bytes: int, progress: _Progress
) -> Iterator[bytes]:
    """Yield complete lines from the stream's current position (= ``progress.offset``).

    Reads ``chunk_bytes`` at a time, up to ``end`` (absolute) or EOF. A line longer than
    ``max_line_bytes`` is streamed past without being held: at most ``max_line_bytes +
    chunk_bytes`` bytes are buffered. ``progress.offset`` is advanced past each complete line
    (kept or oversized) before the line is yielded; a trailing line without ``\\n`` is left
    unconsumed and sets ``partial_tail``.
    """
    carry: list[bytes] = []  # pieces of the current incomplete line (empty while skipping)
    carry_len = 0  # length of the current incomplete line, held or skipped
    skipping = False  # inside an oversized line: count its bytes, keep none
    pos = progress.offset
    while end is None or pos < end:
        want = chunk_bytes if end is None else min(chunk_bytes, end - pos)
        chunk = stream.read(want)
        if not chunk:
            break
        pos += len(chunk)
        progress.bytes_read += len(chunk)
        pieces = chunk.split(b"\n")
        for i, piece in enumerate(pieces[:-1]):
            line: bytes | None
            if i == 0 and carry_len:
                line_len = carry_len + len(piece)
                if skipping or line_len > max_line_bytes:
                    line = None
                else:
                    carry.append(piece)
                    line = b"".join(carry)
                carry, carry_len, skipping = [], 0, False
            else:
                line_len = len(piece)
                line = piece if line_len <= max_line_bytes else None
            if line is None:
                progress.oversized_lines += 1
            progress.offset += line_len + 1
            if line is not None:
                yield line
        tail = pieces[-1]
        if not tail:
            continue
        carry_len += len(tail)
        if skipping:
            continue
        if carry_len > max_line_bytes:
            carry, skipping = [], True  # stream past the rest of this line
        else:
            carry.append(tail)
    progress.partial_tail = carry_len > 0


def _skip_decompressed(stream: BinaryIO, count: int, chunk_bytes: int) -> int:
    """Read and drop ``count`` bytes of a decompressing stream; return how many were dropped."""
    dropped = 0
    while dropped < count:
        data = stream.read(min(chunk_bytes, count - dropped))
        if not data:
            break
        dropped += len(data)
    return dropped


def read_new_lines(
    path: str | Path,
    *,
    offset: int,
    max_line_bytes: int,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    expect_inode: int | None = None,
) -> TailRead | ReadFailure:
    """Read the complete lines appended since ``offset`` (incremental tail read, SPEC §3.3).

    Opens the file once, ``fstat``-s the descriptor, seeks to ``offset`` and reads up to the size
    ``fstat`` reported in ``chunk_bytes`` reads: the cost is proportional to the appended bytes,
    never to the file size. A partial last line is not consumed. Lines over ``max_line_bytes``
    are skipped, counted, and never held in memory.

    For ``*.jsonl.zst`` (immutable archives) offsets count decompressed bytes and the stream is
    decompressed from the start up to ``offset`` first.

    Args:
        path: the rollout file.
        offset: byte offset to resume from (the stored watermark; 0 for a new file).
        max_line_bytes: longest line kept, in bytes without the ``\\n`` (config default 64 MiB).
        chunk_bytes: size of one read, in bytes.
        expect_inode: the stored inode; when the open file has another, it was replaced.

    Returns:
        A :class:`TailRead` (``replaced=True`` and nothing read when the file is shorter than
        ``offset`` or is another inode: re-read from 0), or a :class:`ReadFailure`
        (``vanished`` / ``unreadable`` / ``unsupported``, logged once). Never raises
        :class:`OSError`.
    """
    path_s = os.fspath(path)
    opened = _open_rollout(path_s)
    if isinstance(opened, ReadFailure):
        return opened
    stream, st = opened

    def replaced(reason: str) -> TailRead:
        log.info("file_replaced", path=path_s, reason=reason, offset=offset, action="re-read from offset 0")
        return TailRead(
            lines=[], new_offset=0, bytes_read=0, oversized_lines=0, partial_tail=False, replaced=True, stat=st
        )

    progress = _Progress(offset=offset)
    try:
        with stream:
            if expect_inode is not None and st.inode != expect_inode:
                return replaced("inode_changed")
            if st.compressed:
                progress.bytes_read = _skip_decompressed(stream, offset, chunk_bytes)
                if progress.bytes_read < offset:
                    return replaced("truncated")
                end = None
            else:
                if st.size < offset:
                    return replaced("truncated")
                stream.seek(offset)
                end = st.size
            lines = list(
                _split_lines(stream, end=end, max_line_bytes=max_line_bytes, chunk_bytes=chunk_bytes, progress=progress)
            )
    except _read_errors() as exc:
        return _failure(path_s, exc)
    if progress.oversized_lines:
        log.warning(
            "line_oversized",
            path=path_s,
            count=progress.oversized_lines,
            max_line_bytes=max_line_bytes,
            action="skipped and counted",
        )
    return TailRead(
        lines=lines,
        new_offset=progress.offset,
        bytes_read=progress.bytes_read,
        oversized_lines=progress.oversized_lines,
        partial_tail=progress.partial_tail,
        replaced=False,
        stat=st,
    )


@dataclass(slots=True)
class LineStream:
    """Complete lines of one rollout between two byte offsets, streamed in bounded memory.

    Iterate it once; afterwards the counters describe what was read. Built by
    :func:`read_lines_until`.

    Attributes:
        path: the rollout file.
        start_offset: first byte to read (a line boundary).
        end_offset: stop at this byte offset (a watermark, i.e. a line boundary); ``None`` reads to
            the size seen when the file is opened (EOF for ``*.jsonl.zst``).
        max_line_bytes: longest line yielded; longer lines are skipped and counted.
        chunk_bytes: size of one read.
        expect_inode: when set, a file with another inode raises ``RolloutReadError("replaced")``.
        offset: after iteration, the offset just past the last complete line consumed.
        bytes_read: bytes read so far.
        oversized_lines: lines skipped for being longer than ``max_line_bytes``.
        partial_tail: iteration ended inside a line without ``\\n`` (not yielded).
        stat: ``fstat`` of the opened file (``None`` before iteration starts).
    """

    path: str
    start_offset: int
    end_offset: int | None
    max_line_bytes: int
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    expect_inode: int | None = None
    offset: int = 0
    bytes_read: int = 0
    oversized_lines: int = 0
    partial_tail: bool = False
    stat: FileStat | None = None

    def __iter__(self) -> Iterator[bytes]:
        """Yield each complete line (without ``\\n``) in order.

        Raises:
            RolloutReadError: the file vanished, is unreadable, needs ``zstandard``, or was
                replaced (other inode, or shorter than ``end_offset``). Logged once.
        """
        opened = _open_rollout(self.path)
        if isinstance(opened, ReadFailure):
            raise RolloutReadError(self.path, opened.reason, opened.detail)
        stream, self.stat = opened
        progress = _Progress(offset=self.start_offset)
        try:
            with stream:
                self._check(self.stat)
                if self.stat.compressed:
                    progress.bytes_read = _skip_decompressed(stream, self.start_offset, self.chunk_bytes)
                    end = self.end_offset
                else:
                    stream.seek(self.start_offset)
                    end = self.stat.size if self.end_offset is None else self.end_offset
                for line in _split_lines(
                    stream, end=end, max_line_bytes=self.max_line_bytes, chunk_bytes=self.chunk_bytes, progress=progress
                ):
                    self._sync(progress)
                    yield line
        except _read_errors() as exc:
            failure = _failure(self.path, exc)
            raise RolloutReadError(self.path, failure.reason, failure.detail) from exc
        finally:
            self._sync(progress)
        if self.oversized_lines:
            log.warning(
                "line_oversized",
                path=self.path,
                count=self.oversized_lines,
                max_line_bytes=self.max_line_bytes,
                action="skipped and counted",
            )

    def _check(self, st: FileStat) -> None:
        reason = None
        if self.expect_inode is not None and st.inode != self.expect_inode:
            reason = "inode_changed"
        elif not st.compressed and self.end_offset is not None and st.size < self.end_offset:
            reason = "truncated"
        if reason is not None:
            log.info(
                "file_replaced",
                path=self.path,
                reason=reason,
                end_offset=self.end_offset,
                action="not read; the reader re-indexes it",
            )
            raise RolloutReadError(self.path, "replaced", reason)

    def _sync(self, progress: _Progress) -> None:
        self.offset = progress.offset
        self.bytes_read = progress.bytes_read
        self.oversized_lines = progress.oversized_lines
        self.partial_tail = progress.partial_tail


def read_lines_until(
    path: str | Path,
    end_offset: int | None,
    max_line_bytes: int,
    *,
    start_offset: int = 0,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    expect_inode: int | None = None,
) -> LineStream:
    """Stream the complete lines of a rollout from ``start_offset`` up to ``end_offset``.

    For the extraction worker, which reads whole files (up to hundreds of MB) from 0 to the
    thread's watermark: memory stays bounded by ``max_line_bytes + chunk_bytes``. Oversized lines
    are skipped and counted in ``LineStream.oversized_lines``.

    Args:
        path: the rollout file.
        end_offset: the watermark to stop at (bytes), or ``None`` for the current size.
        max_line_bytes: longest line yielded, in bytes without the ``\\n``.
        start_offset: where to start (bytes, a line boundary).
        chunk_bytes: size of one read, in bytes.
        expect_inode: the inode the watermark belongs to, if known.

    Returns:
        A :class:`LineStream`; iterating it may raise :class:`RolloutReadError` (never
        :class:`OSError`).
    """
    if end_offset is not None and end_offset < start_offset:
        raise ValueError(f"end_offset {end_offset} < start_offset {start_offset}")
    return LineStream(
        path=os.fspath(path),
        start_offset=start_offset,
        end_offset=end_offset,
        max_line_bytes=max_line_bytes,
        chunk_bytes=chunk_bytes,
        expect_inode=expect_inode,
        offset=start_offset,
    )


# --------------------------------------------------------------------------------------------
# Watching
# --------------------------------------------------------------------------------------------


def _watch_filter(roots: frozenset[str], change: FsEvent, path: str) -> bool:
    """Keep rollout paths and the roots themselves (any event), and directories that appeared
    (created or moved in)."""
    if path in roots or is_rollout_name(os.path.basename(path)):
        return True
    return change == FsEvent.added and os.path.isdir(path)


class _StopFlag:
    """The ``stop_event`` handed to ``awatch``: set when the caller's event is set.

    ``awatch`` calls ``set()`` on its stop event when its task is cancelled; that must stop only
    this watcher, not set the daemon's own stop event, so ``set()`` stays local.
    """

    def __init__(self, outer: asyncio.Event) -> None:
        self._outer = outer
        self._local = False

    def is_set(self) -> bool:
        return self._local or self._outer.is_set()

    def set(self) -> None:
        self._local = True


def _existing_roots(roots: Sequence[Path | str]) -> dict[str, tuple[int, int]]:
    """Map each root that is an existing directory to its ``(dev, inode)``."""
    found: dict[str, tuple[int, int]] = {}
    for root in roots:
        path = os.fspath(root)
        try:
            st = os.stat(path)
        except OSError:
            continue
        if stat_mod.S_ISDIR(st.st_mode):
            found[path] = (st.st_dev, st.st_ino)
    return found


async def _sleep_or_stop(clock: Clock, delay_s: float, stop_event: asyncio.Event) -> None:
    """Wait ``delay_s`` on ``clock`` or until ``stop_event`` is set, whichever comes first."""
    sleeper = asyncio.ensure_future(clock.sleep(delay_s))
    stopper = asyncio.ensure_future(stop_event.wait())
    try:
        await asyncio.wait({sleeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (sleeper, stopper):
            task.cancel()
        await asyncio.gather(sleeper, stopper, return_exceptions=True)


async def watch_roots(
    roots: Sequence[Path | str],
    *,
    stop_event: asyncio.Event,
    force_polling: bool = False,
    debounce_ms: int = 1600,
    step_ms: int = 500,
    poll_delay_ms: int = 300,
    root_check_ms: int = 30_000,
    backoff_base_s: float = 1.0,
    backoff_cap_s: float = 60.0,
    clock: Clock | None = None,
) -> AsyncIterator[set[str]]:
    """Watch the rollout roots and yield batches of paths to re-stat (SPEC §3.3).

    Wraps :func:`watchfiles.awatch` (recursive inotify, or polling) over the roots that exist.
    Event kinds are coalesced and unreliable, so a batch is just a set of paths: pass it to
    :func:`restat_paths`. A path in a batch is one of

    - a rollout file (``*.jsonl`` / ``*.jsonl.zst``) that was created, written, moved or deleted;
    - a directory that appeared (e.g. a new ``YYYY/MM/DD``): scan it, files may have been written
      into it before the kernel watch on it existed;
    - a root itself: the first batch after the watch is (re-)established contains every watched
      root, so the caller rescans them (stat only) and nothing written while no watch was in
      place is missed. This batch arrives within ``root_check_ms`` of the (re)start.

    The roots are re-checked after every batch and at least every ``root_check_ms``: a root that
    appears, disappears or is replaced restarts the watch on the roots that exist now. If
    ``awatch`` raises (inotify limit, removed root), one ``watcher_failed`` event is logged and the
    watch restarts after an exponential backoff (``backoff_base_s`` doubling up to
    ``backoff_cap_s``) without ending this generator; the daemon keeps serving from its periodic
    scans meanwhile. The generator ends when ``stop_event`` is set (within ``step_ms``).

    Args:
        roots: the rollout roots (missing ones are watched once they appear).
        stop_event: set it to end the generator.
        force_polling: poll instead of inotify (network file systems); ``False`` lets watchfiles
            decide (it polls on WSL or with ``WATCHFILES_FORCE_POLLING``).
        debounce_ms: longest time changes are grouped into one batch, in milliseconds.
        step_ms: quiet time that ends a batch, in milliseconds. It is also how often the
            watcher thread wakes up while nothing happens (watchfiles sleeps ``step_ms``, then
            takes the GIL to check signals and ``stop_event``): 500 ms keeps an idle daemon's
            CPU low (SPEC §15) and bounds the stop latency to half a second.
        poll_delay_ms: polling interval when polling, in milliseconds.
        root_check_ms: longest time between checks of the roots themselves, in milliseconds
            (each check is a round trip through a worker thread, so not too often; missing
            files are also caught by the periodic rescan).
        backoff_base_s: first restart delay after a failure, in seconds.
        backoff_cap_s: longest restart delay, in seconds.
        clock: time source for the backoff sleeps (default :class:`~memd.clock.SystemClock`).

    Yields:
        Non-empty sets of absolute paths to re-stat.
    """
    clock = clock or SystemClock()
    failures = 0
    while not stop_event.is_set():
        watched = _existing_roots(roots)
        if not watched:
            log.debug("watcher_waiting_for_roots", roots=[os.fspath(r) for r in roots])
            await _sleep_or_stop(clock, root_check_ms / 1000, stop_event)
            continue
        log.info("watcher_started", roots=list(watched), force_polling=force_polling)
        pending: set[str] = set(watched)
        try:
            changes_iter = awatch(
                *watched,
                watch_filter=functools.partial(_watch_filter, frozenset(watched)),
                debounce=debounce_ms,
                step=step_ms,
                stop_event=_StopFlag(stop_event),
                rust_timeout=root_check_ms,
                yield_on_timeout=True,
                force_polling=True if force_polling else None,
                poll_delay_ms=poll_delay_ms,
                ignore_permission_denied=True,
            )
            async with contextlib.aclosing(changes_iter):
                async for changes in changes_iter:
                    failures = 0
                    paths = {path for _, path in changes}
                    batch = pending | paths
                    pending = set()
                    if batch:
                        yield batch
                    # A root's own event (deleted, moved, recreated: its inode may even be reused)
                    # or a root that appeared or vanished: watch the roots that exist now.
                    now_roots = _existing_roots(roots)
                    if now_roots != watched or not paths.isdisjoint(watched):
                        log.info(
                            "watch_roots_changed",
                            watched=list(watched),
                            existing=list(now_roots),
                            action="restarting the watch",
                        )
                        break
                else:
                    if not stop_event.is_set():
                        raise RuntimeError("awatch ended without a stop request")
        except Exception as exc:  # the watcher must never end the daemon
            failures += 1
            delay_s = min(backoff_cap_s, backoff_base_s * 2 ** min(failures - 1, _BACKOFF_MAX_EXPONENT))
            log.warning(
                "watcher_failed",
                error=f"{type(exc).__name__}: {exc}",
                attempt=failures,
                retry_in_s=delay_s,
                roots=list(watched),
                action="restarting after backoff; periodic scans continue",
            )
            await _sleep_or_stop(clock, delay_s, stop_event)
    log.info("watcher_stopped")
