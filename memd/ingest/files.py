"""One rollout file: names, ``stat`` records, opening (plain or zstd) and read failures (SPEC §3.1, §3.3).

The lowest layer of :mod:`memd.ingest`: it does file-system I/O only, never SQL and never JSON. Faults on a
single file never raise :class:`OSError` to the caller: a file that vanished between stat and read gives a
:class:`ReadFailure` with ``reason="vanished"`` and one ``file_vanished`` event; a permission error gives
``reason="unreadable"`` and one ``file_unreadable`` event. The streaming reader raises
:class:`RolloutReadError` instead, because an iterator cannot return a result record.

Rollout files: Codex writes ``$CODEX_HOME/sessions/YYYY/MM/DD/rollout-*.jsonl`` and
``$CODEX_HOME/archived_sessions/rollout-*.jsonl`` (optionally ``*.jsonl.zst``); Claude Code writes
``<projects root>/<encoded cwd>/<sessionId>.jsonl`` and sub-agent transcripts beside it
(``agent-*.jsonl``) or under ``<sessionId>/subagents/`` (SPEC §3.4). Which agent wrote a file is read
from its content, never from its name.
"""

from __future__ import annotations

import functools
import os
import stat as stat_mod
from dataclasses import dataclass
from enum import StrEnum
from types import ModuleType
from typing import BinaryIO

import structlog

from memd.errors import RolloutError

log = structlog.get_logger(__name__)

#: Suffix of a plain rollout file.
PLAIN_SUFFIX = ".jsonl"
#: Suffix of a zstd-compressed rollout file (read only when ``zstandard`` is importable).
ZST_SUFFIX = ".jsonl.zst"
#: Bytes covered by the head hash (the fingerprint that detects a replaced file).
HEAD_HASH_BYTES = 4096
#: Default size of one read in the tail and streaming readers.
DEFAULT_CHUNK_BYTES = 1 << 20


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


#: Directories whose files are never transcripts: Claude Code keeps large tool outputs under
#: ``<sessionId>/tool-results/`` (SPEC §3.4); nothing under one counts.
SKIPPED_DIR_NAMES = frozenset({"tool-results"})


def in_skipped_dir(path: str) -> bool:
    """Whether ``path`` is, or lies under, a directory of :data:`SKIPPED_DIR_NAMES` (any depth)."""
    return any(f"/{name}/" in path + "/" for name in SKIPPED_DIR_NAMES)


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


class FailureReason(StrEnum):
    """Why one rollout could not be read (:class:`ReadFailure`, :class:`RolloutReadError`)."""

    #: Deleted or moved between stat and read: the caller forgets it or waits for its new path.
    VANISHED = "vanished"
    #: Permission denied, an I/O error, corrupt zstd, not a regular file: recorded, retried later.
    UNREADABLE = "unreadable"
    #: ``*.jsonl.zst`` without ``zstandard`` installed: skipped.
    UNSUPPORTED = "unsupported"
    #: Shorter than the watermark to read to, or another inode (streaming reader only).
    REPLACED = "replaced"

    def record_error(self, detail: str) -> str:
        """The ``files.error`` text of a file that failed this way: ``"<reason>: <detail>"``."""
        return f"{self.value}: {detail}"

    def recorded_in(self, error: str | None) -> bool:
        """Whether a stored ``files.error`` says the file failed this way (see :meth:`record_error`)."""
        return error is not None and (error == self.value or error.startswith(self.value + ":"))


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
    reason: FailureReason
    detail: str


class RolloutReadError(RolloutError):
    """A rollout could not be streamed by :func:`memd.ingest.reader.read_lines_until`.

    Attributes:
        path: the file.
        reason: ``vanished``, ``unreadable``, ``unsupported`` (as :class:`ReadFailure`) or
            ``replaced`` (the file is shorter than the requested end watermark or its inode changed).
        detail: the OS error text (or what changed).
    """

    def __init__(self, path: str, reason: FailureReason, detail: str) -> None:
        super().__init__(f"{reason}: {path}: {detail}")
        self.path = path
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------------------------
# zstd support (optional)
# --------------------------------------------------------------------------------------------

_zstd_warned = False


@functools.cache
def load_zstandard() -> ModuleType | None:
    """Import ``zstandard`` once; ``None`` when it is not installed."""
    try:
        import zstandard
    except ImportError:
        return None
    module: ModuleType = zstandard
    return module


def zstd_available() -> bool:
    """Whether ``*.jsonl.zst`` rollouts can be read (the ``zstandard`` package imports)."""
    return load_zstandard() is not None


def warn_zstd_unavailable(path: str) -> None:
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


def _open_binary(path: str) -> BinaryIO:
    """Open a file for unbuffered binary reading (a seam for fault-injection tests).

    ``O_NONBLOCK`` keeps a FIFO named like a rollout from blocking the open (it is then rejected
    as not a regular file); it has no effect on regular files.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    return os.fdopen(fd, "rb", buffering=0)  # closed by the caller


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def read_failure(path: str, exc: Exception) -> ReadFailure:
    """Turn an OS (or zstd) error on one file into a logged :class:`ReadFailure`."""
    detail = (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
        log.info("file_vanished", path=path, detail=detail, action="skipped until it reappears")
        return ReadFailure(path=path, reason=FailureReason.VANISHED, detail=detail)
    log.warning("file_unreadable", path=path, detail=detail, action="recorded; retried on change")
    return ReadFailure(path=path, reason=FailureReason.UNREADABLE, detail=detail)


def read_errors() -> tuple[type[Exception], ...]:
    """Exceptions a read of one file may raise: OSError, and ``zstandard.ZstdError``."""
    zstd = load_zstandard()
    zstd_error = getattr(zstd, "ZstdError", None) if zstd is not None else None
    return (OSError, zstd_error) if isinstance(zstd_error, type) else (OSError,)


def stat_rollout(path: str) -> FileStat | ReadFailure:
    """``stat`` one rollout file (following symlinks), telling a vanished file from an unreadable one.

    Returns:
        Its :class:`FileStat`, or a :class:`ReadFailure` (logged once): ``vanished`` when no file is
        at ``path``, ``unreadable`` when it cannot be stat-ed or is not a regular file.
    """
    try:
        st = os.stat(path)
    except OSError as exc:
        return read_failure(path, exc)
    if not stat_mod.S_ISREG(st.st_mode):
        log.warning("file_unreadable", path=path, detail="not a regular file")
        return ReadFailure(path=path, reason=FailureReason.UNREADABLE, detail="not a regular file")
    return FileStat.from_os(path, st)


def open_rollout(path: str) -> tuple[BinaryIO, FileStat] | ReadFailure:
    """Open a rollout once and ``fstat`` the open descriptor.

    Returns a readable binary stream (decompressing for ``*.jsonl.zst``) and the stat of the very
    file that was opened, or a :class:`ReadFailure` (already logged).
    """
    compressed = path.endswith(ZST_SUFFIX)
    zstd = load_zstandard() if compressed else None
    if compressed and zstd is None:
        warn_zstd_unavailable(path)
        return ReadFailure(path=path, reason=FailureReason.UNSUPPORTED, detail="zstandard is not installed")
    try:
        raw = _open_binary(path)
    except OSError as exc:
        return read_failure(path, exc)
    try:
        st = os.fstat(raw.fileno())
    except OSError as exc:
        raw.close()
        return read_failure(path, exc)
    if not stat_mod.S_ISREG(st.st_mode):
        raw.close()
        log.warning("file_unreadable", path=path, detail="not a regular file")
        return ReadFailure(path=path, reason=FailureReason.UNREADABLE, detail="not a regular file")
    if zstd is None:
        return raw, FileStat.from_os(path, st)
    stream = zstd.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    return stream, FileStat.from_os(path, st)
