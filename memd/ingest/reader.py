"""Reading rollouts: the bounded head read, change classification and the incremental tail read (SPEC §3.3).

The reader returns raw line bytes (without the trailing ``\\n``) and frozen records (:class:`HeadRead`,
:class:`TailRead`); invalid UTF-8 and invalid JSON are the rollout parser's business. Reading resumes from
the stored watermark, so the cost of an append is proportional to the appended bytes, never to the file size.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

import structlog

from memd.ingest.files import (
    DEFAULT_CHUNK_BYTES,
    HEAD_HASH_BYTES,
    FailureReason,
    FileStat,
    ReadFailure,
    RolloutReadError,
    open_rollout,
    read_errors,
    read_failure,
)
from memd.store.records import FileRecord

log = structlog.get_logger(__name__)

_HEAD_FIRST_BLOCK_BYTES = 16 << 10
_HEAD_MAX_BLOCK_BYTES = 1 << 20


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
        new_watermark: byte offset just past the last complete line consumed (the new watermark of
            the file); a partial last line is not consumed. ``0`` when ``replaced``.
        bytes_read: bytes read from the file in this call (for a plain file: exactly the bytes
            from ``watermark`` to the size seen by ``fstat``).
        oversized_lines: complete lines longer than ``max_line_bytes``, skipped and not held in
            memory; they are consumed (``new_watermark`` is past them).
        partial_tail: the read ended inside a line that has no ``\\n`` yet.
        replaced: the file is shorter than ``watermark`` or its inode is not ``expect_inode``; nothing
            was read and the caller re-reads from 0.
        stat: ``fstat`` of the open file (store it with ``new_watermark``).
    """

    lines: list[bytes]
    new_watermark: int
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
    opened = open_rollout(path_s)
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
    except read_errors() as exc:
        return read_failure(path_s, exc)
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
    - smaller than the stored size or watermark → ``truncated`` (re-read from 0);
    - both hashes known (non-empty) and different → ``replaced`` (re-read from 0). A stored
      hash with a fresh ``""`` means the file shrank below 4 KiB: ``truncated`` already caught it;
    - otherwise → ``grown`` (read from the stored watermark; the size may be equal when only the
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
    if st.size < prev.size or st.size < prev.watermark:
        return Change.TRUNCATED
    if head_hash and prev.head_hash and head_hash != prev.head_hash:
        return Change.REPLACED
    return Change.GROWN


@dataclass(slots=True)
class _Progress:
    """Counters a line splitter updates as it goes (``watermark``: the absolute byte position just past the
    last complete line consumed)."""

    watermark: int
    bytes_read: int = 0
    oversized_lines: int = 0
    partial_tail: bool = False


def _split_lines(
    stream: BinaryIO,
    *,
    end: int | None,
    max_line_bytes: int,
    chunk_bytes: int,
    progress: _Progress,
    max_read_bytes: int | None = None,
) -> Iterator[bytes]:
    """Yield complete lines from the stream's current position (= ``progress.watermark``).

    Reads ``chunk_bytes`` at a time, up to ``end`` (absolute) or EOF. A line longer than
    ``max_line_bytes`` is streamed past without being held: at most ``max_line_bytes +
    chunk_bytes`` bytes are buffered. ``progress.watermark`` is advanced past each complete line
    (kept or oversized) before the line is yielded; a trailing line without ``\\n`` is left
    unconsumed and sets ``partial_tail``. Once ``progress.bytes_read`` reaches ``max_read_bytes``
    no further chunk is read, except to finish a line in progress that fits ``max_line_bytes``
    (an oversized one is not followed to its end).
    """
    carry: list[bytes] = []  # pieces of the current incomplete line (empty while skipping)
    carry_len = 0  # length of the current incomplete line, held or skipped
    skipping = False  # inside an oversized line: count its bytes, keep none
    pos = progress.watermark
    while end is None or pos < end:
        if max_read_bytes is not None and progress.bytes_read >= max_read_bytes and (skipping or not carry_len):
            break
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
            progress.watermark += line_len + 1
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
    watermark: int,
    max_line_bytes: int,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    expect_inode: int | None = None,
) -> TailRead | ReadFailure:
    """Read the complete lines appended since ``watermark`` (incremental tail read, SPEC §3.3).

    Opens the file once, ``fstat``-s the descriptor, seeks to ``watermark`` and reads up to the size
    ``fstat`` reported in ``chunk_bytes`` reads: the cost is proportional to the appended bytes,
    never to the file size. A partial last line is not consumed. Lines over ``max_line_bytes``
    are skipped, counted, and never held in memory.

    For ``*.jsonl.zst`` (immutable archives) offsets count decompressed bytes and the stream is
    decompressed from the start up to ``watermark`` first.

    Args:
        path: the rollout file.
        watermark: byte watermark to resume from (the stored watermark; 0 for a new file).
        max_line_bytes: longest line kept, in bytes without the ``\\n`` (config default 64 MiB).
        chunk_bytes: size of one read, in bytes.
        expect_inode: the stored inode; when the open file has another, it was replaced.

    Returns:
        A :class:`TailRead` (``replaced=True`` and nothing read when the file is shorter than
        ``watermark`` or is another inode: re-read from 0), or a :class:`ReadFailure`
        (``vanished`` / ``unreadable`` / ``unsupported``, logged once). Never raises
        :class:`OSError`.
    """
    path_s = os.fspath(path)
    opened = open_rollout(path_s)
    if isinstance(opened, ReadFailure):
        return opened
    stream, st = opened

    def replaced(reason: str) -> TailRead:
        log.info("file_replaced", path=path_s, reason=reason, watermark=watermark, action="re-read from watermark 0")
        return TailRead(
            lines=[], new_watermark=0, bytes_read=0, oversized_lines=0, partial_tail=False, replaced=True, stat=st
        )

    progress = _Progress(watermark=watermark)
    try:
        with stream:
            if expect_inode is not None and st.inode != expect_inode:
                return replaced("inode_changed")
            if st.compressed:
                progress.bytes_read = _skip_decompressed(stream, watermark, chunk_bytes)
                if progress.bytes_read < watermark:
                    return replaced("truncated")
                end = None
            else:
                if st.size < watermark:
                    return replaced("truncated")
                stream.seek(watermark)
                end = st.size
            lines = list(
                _split_lines(stream, end=end, max_line_bytes=max_line_bytes, chunk_bytes=chunk_bytes, progress=progress)
            )
    except read_errors() as exc:
        return read_failure(path_s, exc)
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
        new_watermark=progress.watermark,
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
        start_watermark: first byte to read (a watermark: a line boundary already consumed).
        end_watermark: stop at this watermark (a line boundary); ``None`` reads to the size seen
            when the file is opened (EOF for ``*.jsonl.zst``).
        max_line_bytes: longest line yielded; longer lines are skipped and counted.
        chunk_bytes: size of one read.
        expect_inode: when set, a file with another inode raises ``RolloutReadError("replaced")``.
        max_read_bytes: read no further chunk once this many bytes were read, except to finish a
            line in progress that may still fit ``max_line_bytes`` (at most about ``max_read_bytes +
            max_line_bytes + chunk_bytes`` are read); ``None``: no limit.
        watermark: during and after iteration, the offset just past the last complete line consumed.
        bytes_read: bytes read so far.
        oversized_lines: lines skipped for being longer than ``max_line_bytes``.
        partial_tail: iteration ended inside a line without ``\\n`` (not yielded).
        stat: ``fstat`` of the opened file (``None`` before iteration starts).
    """

    path: str
    start_watermark: int
    end_watermark: int | None
    max_line_bytes: int
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    expect_inode: int | None = None
    max_read_bytes: int | None = None
    watermark: int = 0
    bytes_read: int = 0
    oversized_lines: int = 0
    partial_tail: bool = False
    stat: FileStat | None = None

    def __iter__(self) -> Iterator[bytes]:
        """Yield each complete line (without ``\\n``) in order.

        Raises:
            RolloutReadError: the file vanished, is unreadable, needs ``zstandard``, or was
                replaced (other inode, or shorter than ``end_watermark``). Logged once.
        """
        opened = open_rollout(self.path)
        if isinstance(opened, ReadFailure):
            raise RolloutReadError(self.path, opened.reason, opened.detail)
        stream, self.stat = opened
        progress = _Progress(watermark=self.start_watermark)
        try:
            with stream:
                self._check(self.stat)
                if self.stat.compressed:
                    progress.bytes_read = _skip_decompressed(stream, self.start_watermark, self.chunk_bytes)
                    end = self.end_watermark
                else:
                    stream.seek(self.start_watermark)
                    end = self.stat.size if self.end_watermark is None else self.end_watermark
                for line in _split_lines(
                    stream,
                    end=end,
                    max_line_bytes=self.max_line_bytes,
                    chunk_bytes=self.chunk_bytes,
                    progress=progress,
                    max_read_bytes=self.max_read_bytes,
                ):
                    self._sync(progress)
                    yield line
        except read_errors() as exc:
            failure = read_failure(self.path, exc)
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
        elif not st.compressed and self.end_watermark is not None and st.size < self.end_watermark:
            reason = "truncated"
        if reason is not None:
            log.info(
                "file_replaced",
                path=self.path,
                reason=reason,
                end_watermark=self.end_watermark,
                action="not read; the reader re-indexes it",
            )
            raise RolloutReadError(self.path, FailureReason.REPLACED, reason)

    def _sync(self, progress: _Progress) -> None:
        self.watermark = progress.watermark
        self.bytes_read = progress.bytes_read
        self.oversized_lines = progress.oversized_lines
        self.partial_tail = progress.partial_tail


def read_lines_until(
    path: str | Path,
    end_watermark: int | None,
    max_line_bytes: int,
    *,
    start_watermark: int = 0,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    expect_inode: int | None = None,
    max_read_bytes: int | None = None,
) -> LineStream:
    """Stream the complete lines of a rollout from ``start_watermark`` up to ``end_watermark``.

    For the extraction worker, which reads whole files (up to hundreds of MB) from 0 to the
    thread's watermark: memory stays bounded by ``max_line_bytes + chunk_bytes``. Oversized lines
    are skipped and counted in ``LineStream.oversized_lines``.

    Args:
        path: the rollout file.
        end_watermark: the watermark to stop at (bytes), or ``None`` for the current size.
        max_line_bytes: longest line yielded, in bytes without the ``\\n``.
        start_watermark: where to start (bytes, a line boundary already consumed).
        chunk_bytes: size of one read, in bytes.
        expect_inode: the inode the watermark belongs to, if known.
        max_read_bytes: stop reading once this many bytes were read (see :class:`LineStream`).

    Returns:
        A :class:`LineStream`; iterating it may raise :class:`RolloutReadError` (never
        :class:`OSError`).

    Raises:
        ValueError: ``end_watermark`` is before ``start_watermark``.
    """
    if end_watermark is not None and end_watermark < start_watermark:
        raise ValueError(f"end_watermark {end_watermark} < start_watermark {start_watermark}")
    return LineStream(
        path=os.fspath(path),
        start_watermark=start_watermark,
        end_watermark=end_watermark,
        max_line_bytes=max_line_bytes,
        chunk_bytes=chunk_bytes,
        expect_inode=expect_inode,
        max_read_bytes=max_read_bytes,
        watermark=start_watermark,
    )


#: Read size of :func:`read_head_lines` (small: the head of a transcript is what is wanted).
_HEAD_LINES_CHUNK_BYTES = 64 << 10


def read_head_lines(
    path: str | Path, *, max_lines: int, max_line_bytes: int, max_bytes: int
) -> list[bytes] | ReadFailure:
    """Read the first complete lines of a transcript, bounded (SPEC §3.3, §3.4).

    A Claude Code transcript names its session on the first record that carries ``sessionId``,
    which is often not the first line (``file-history-snapshot``, ``summary``): the indexer reads
    up to ``max_lines`` lines, never more than about ``max_bytes`` bytes; a line longer than
    ``max_line_bytes`` is skipped (not held in memory). A partial last line is not returned.

    Args:
        path: the transcript file.
        max_lines: lines wanted at most (e.g. 50).
        max_line_bytes: longest line returned, in bytes without the ``\\n``.
        max_bytes: stop reading once this many bytes were read (the line in progress is finished
            only if it fits ``max_line_bytes``), also when every line is oversized.

    Returns:
        The lines (without ``\\n``), or a :class:`ReadFailure` (logged once). Never raises
        :class:`OSError`.
    """
    stream = read_lines_until(path, None, max_line_bytes, chunk_bytes=_HEAD_LINES_CHUNK_BYTES, max_read_bytes=max_bytes)
    lines: list[bytes] = []
    it = iter(stream)
    try:
        for line in it:
            lines.append(line)
            if len(lines) >= max_lines or stream.bytes_read >= max_bytes:
                break
    except RolloutReadError as exc:
        reason = FailureReason.UNREADABLE if exc.reason is FailureReason.REPLACED else exc.reason
        return ReadFailure(path=exc.path, reason=reason, detail=exc.detail)
    finally:
        it.close()  # type: ignore[attr-defined]  # a generator: closes the file now
    return lines
