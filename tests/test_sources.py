"""Tests for memd.ingest (files, scan, reader): scan, bounded head read, classification, incremental tail reader."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import tracemalloc
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from structlog.testing import capture_logs

from memd.ingest import files as rollout_files
from memd.ingest import scan
from memd.ingest.files import FileStat, ReadFailure, RolloutReadError, is_rollout_name
from memd.ingest.reader import Change, HeadRead, TailRead, classify_change, read_head, read_lines_until, read_new_lines
from memd.ingest.scan import restat_paths, scan_roots, stat_path
from memd.store.records import FileRecord
from tests.conftest import codex_rollout

MiB = 1 << 20


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def append(path: Path, data: bytes) -> None:
    with path.open("ab") as fh:
        fh.write(data)


def named(logs: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == event]


def record_for(st: FileStat, *, offset: int, head_hash: str = "") -> FileRecord:
    return FileRecord(path=st.path, kind="codex", dev=st.dev, inode=st.inode, size=st.size,
                      mtime=st.mtime, watermark=offset, head_hash=head_hash, thread_id=None)


def deny_open(monkeypatch: pytest.MonkeyPatch, victim: Path) -> None:
    """Make the module's open raise PermissionError for one path (chmod does not deny root)."""
    real_open = rollout_files._open_binary

    def fake_open(path: str) -> Any:
        if os.fspath(path) == os.fspath(victim):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path)

    monkeypatch.setattr(rollout_files, "_open_binary", fake_open)


def skip_unless_chmod_denies(tmp_path: Path) -> None:
    """Skip when mode 000 does not deny this process (root, or CAP_DAC_OVERRIDE)."""
    probe = write(tmp_path / "probe", b"x")
    probe.chmod(0)
    try:
        probe.read_bytes()
    except PermissionError:
        return
    finally:
        probe.chmod(0o600)
    pytest.skip("chmod 000 does not deny this process (root); the monkeypatched test covers it")


def identity_zstandard() -> SimpleNamespace:
    """A stand-in for the ``zstandard`` module whose 'decompression' is the identity.

    ``zstandard`` is not installed here; this exercises the *.jsonl.zst plumbing only.
    """

    class Decompressor:
        def stream_reader(self, source: Any, read_across_frames: bool = False) -> Any:
            assert read_across_frames is True
            return source

    return SimpleNamespace(ZstdDecompressor=Decompressor, ZstdError=ValueError)


# --------------------------------------------------------------------------------------------
# Names and scanning
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("rollout-2026-01-02T18-39-45-019b7f94-51b4-7593-922e-ba12b5b73b52.jsonl", True),
        ("rollout-2026-01-02T18-39-45-019b7f94.jsonl.zst", True),
        ("codemie-turn-2.jsonl", True),
        ("rollout-x.jsonl.tmp", False),
        ("rollout-x.json", False),
        ("notes.txt", False),
        ("jsonl", False),
    ],
)
def test_is_rollout_name(name: str, expected: bool) -> None:
    assert is_rollout_name(name) is expected


def test_scan_finds_nested_rollouts_with_their_stat(tmp_path: Path) -> None:
    sessions = tmp_path / "sessions"
    a = write(sessions / "2026" / "01" / "02" / "rollout-a.jsonl", b'{"a":1}\n')
    b = write(sessions / "2026" / "01" / "03" / "rollout-b.jsonl", b'{"b":2}\n{"c":3}\n')
    write(sessions / "2026" / "01" / "03" / "notes.txt", b"not a rollout\n")
    write(sessions / "2026" / "01" / "03" / "rollout-c.jsonl.tmp", b"{}\n")

    result = scan_roots([sessions])

    assert [f.path for f in result.files] == [str(a), str(b)]
    st = os.stat(b)
    assert result.files[1] == FileStat(str(b), st.st_dev, st.st_ino, st.st_size, st.st_mtime)
    assert result.problems == ()


def test_scan_missing_root_is_reported_and_other_roots_scanned(tmp_path: Path) -> None:
    present = write(tmp_path / "sessions" / "rollout-a.jsonl", b"{}\n")
    missing = tmp_path / "archived_sessions"

    with capture_logs() as logs:
        result = scan_roots([missing, tmp_path / "sessions"])

    assert [f.path for f in result.files] == [str(present)]
    assert [(p.path, p.kind) for p in result.problems] == [(str(missing), "root_missing")]
    events = named(logs, "root_missing")
    assert len(events) == 1 and events[0]["path"] == str(missing)


def test_scan_symlink_loops_terminate_and_files_are_found_once(tmp_path: Path) -> None:
    root = tmp_path / "sessions"
    f1 = write(root / "2026" / "rollout-a.jsonl", b"{}\n")
    f2 = write(root / "2026" / "01" / "rollout-b.jsonl", b"{}\n")
    (root / "2026" / "01" / "up").symlink_to(root, target_is_directory=True)  # loop to the root
    (root / "self").symlink_to(root / "self")  # a symlink that points at itself (ELOOP)

    with capture_logs() as logs:
        result = scan_roots([root])

    assert [f.path for f in result.files] == [str(f2), str(f1)]
    assert sorted((p.path, p.kind) for p in result.problems) == [
        (str(root / "2026" / "01" / "up"), "symlink_loop"),
        (str(root / "self"), "symlink_loop"),
    ]
    assert len(named(logs, "symlink_loop")) == 2


def test_scan_follows_directory_symlinks_and_lists_a_file_once(tmp_path: Path) -> None:
    root = tmp_path / "sessions"
    elsewhere = write(tmp_path / "elsewhere" / "rollout-x.jsonl", b"{}\n")
    real = write(root / "2026" / "rollout-a.jsonl", b"{}\n")
    (root / "linked").symlink_to(elsewhere.parent, target_is_directory=True)
    (root / "again").symlink_to(root / "2026", target_is_directory=True)  # same dir, not a loop

    result = scan_roots([root, root / "2026"])  # overlapping roots too

    assert [f.path for f in result.files] == [str(real), str(root / "linked" / "rollout-x.jsonl")]
    assert result.problems == ()


def test_scan_unreadable_directory_is_reported_and_siblings_scanned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "sessions"
    ok = write(root / "2026" / "01" / "rollout-ok.jsonl", b"{}\n")
    write(root / "2026" / "02" / "rollout-hidden.jsonl", b"{}\n")
    denied = root / "2026" / "02"
    real_scandir = scan._scandir

    def fake_scandir(path: str) -> Any:
        if path == str(denied):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(scan, "_scandir", fake_scandir)
    with capture_logs() as logs:
        result = scan_roots([root])

    assert [f.path for f in result.files] == [str(ok)]
    assert [(p.path, p.kind) for p in result.problems] == [(str(denied), "dir_unreadable")]
    assert len(named(logs, "dir_unreadable")) == 1


def test_scan_chmod_000_directory_is_reported(tmp_path: Path) -> None:
    skip_unless_chmod_denies(tmp_path)
    root = tmp_path / "sessions"
    ok = write(root / "a" / "rollout-ok.jsonl", b"{}\n")
    write(root / "b" / "rollout-hidden.jsonl", b"{}\n")
    (root / "b").chmod(0)
    try:
        result = scan_roots([root])
    finally:
        (root / "b").chmod(0o700)
    assert [f.path for f in result.files] == [str(ok)]
    assert [p.kind for p in result.problems] == ["dir_unreadable"]


def test_plain_file_wins_over_zst(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rollout_files, "load_zstandard", identity_zstandard)
    root = tmp_path / "archived_sessions"
    plain = write(root / "rollout-a.jsonl", b"{}\n")
    write(root / "rollout-a.jsonl.zst", b"{}\n")
    only_zst = write(root / "rollout-b.jsonl.zst", b"{}\n")

    assert [f.path for f in scan_roots([root]).files] == [str(plain), str(only_zst)]
    assert [f.path for f in restat_paths([str(root / "rollout-a.jsonl.zst")]).files] == []


def test_zst_skipped_with_one_warning_without_zstandard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rollout_files, "load_zstandard", lambda: None)
    monkeypatch.setattr(rollout_files, "_zstd_warned", False)
    root = tmp_path / "archived_sessions"
    plain = write(root / "rollout-a.jsonl", b"{}\n")
    z1 = write(root / "rollout-b.jsonl.zst", b"\x28\xb5\x2f\xfd")
    write(root / "rollout-c.jsonl.zst", b"\x28\xb5\x2f\xfd")

    with capture_logs() as logs:
        result = scan_roots([root])
        head = read_head(z1, max_line_bytes=MiB)

    assert [f.path for f in result.files] == [str(plain)]
    assert [p.kind for p in result.problems] == ["zstd_unavailable", "zstd_unavailable"]
    assert isinstance(head, ReadFailure) and head.reason == "unsupported"
    assert len(named(logs, "zstd_unavailable")) == 1


def test_zst_is_read_through_the_decompressor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rollout_files, "load_zstandard", identity_zstandard)
    path = write(tmp_path / "rollout-a.jsonl.zst", b'{"a":1}\n{"b":2}\n{"c":3}\n')

    head = read_head(path, max_line_bytes=MiB)
    tail = read_new_lines(path, watermark=8, max_line_bytes=MiB)

    assert isinstance(head, HeadRead) and head.first_line == b'{"a":1}'
    assert isinstance(tail, TailRead) and tail.lines == [b'{"b":2}', b'{"c":3}']
    assert tail.new_watermark == 24
    beyond = read_new_lines(path, watermark=100, max_line_bytes=MiB)
    assert isinstance(beyond, TailRead) and beyond.replaced


def test_corrupt_zst_is_an_unreadable_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Corrupt:
        def __init__(self, source: Any) -> None:
            self._source = source

        def __enter__(self) -> Corrupt:
            return self

        def __exit__(self, *exc: object) -> None:
            self._source.close()

        def read(self, size: int) -> bytes:
            raise ValueError("Unknown frame descriptor")

    fake = SimpleNamespace(
        ZstdDecompressor=lambda: SimpleNamespace(
            stream_reader=lambda source, read_across_frames: Corrupt(source)),
        ZstdError=ValueError)
    monkeypatch.setattr(rollout_files, "load_zstandard", lambda: fake)
    path = write(tmp_path / "rollout-a.jsonl.zst", b"garbage")

    with capture_logs() as logs:
        head = read_head(path, max_line_bytes=MiB)
        tail = read_new_lines(path, watermark=0, max_line_bytes=MiB)

    assert isinstance(head, ReadFailure) and head.reason == "unreadable"
    assert isinstance(tail, ReadFailure) and tail.detail == "Unknown frame descriptor"
    assert len(named(logs, "file_unreadable")) == 2
    with pytest.raises(RolloutReadError):
        list(read_lines_until(path, None, MiB))


def test_restat_paths_files_directories_and_vanished(tmp_path: Path) -> None:
    root = tmp_path / "sessions"
    a = write(root / "rollout-a.jsonl", b"{}\n")
    day = root / "2026" / "01" / "02"
    b = write(day / "rollout-b.jsonl", b"{}\n")
    gone = root / "rollout-gone.jsonl"

    result = restat_paths([str(a), str(root / "2026"), str(gone), str(root / "x.txt")])

    assert [f.path for f in result.files] == [str(b), str(a)]  # sorted by path
    assert result.vanished == (str(gone),)


def test_stat_path(tmp_path: Path) -> None:
    path = write(tmp_path / "rollout-a.jsonl", b"{}\n")
    st = stat_path(path)
    assert st is not None and st.size == 3 and st.inode == os.stat(path).st_ino
    assert stat_path(tmp_path / "missing.jsonl") is None
    assert stat_path(tmp_path) is None  # not a regular file


# --------------------------------------------------------------------------------------------
# read_head
# --------------------------------------------------------------------------------------------


def test_read_head_first_line_hash_and_bounded_bytes(tmp_path: Path) -> None:
    first = b'{"type":"session_meta","payload":{"id":"t1"}}'
    body = b"".join(b'{"n":%d,"pad":"%s"}\n' % (i, b"p" * 200) for i in range(10_000))
    path = write(tmp_path / "rollout-a.jsonl", first + b"\n" + body)
    data = path.read_bytes()

    head = read_head(path, max_line_bytes=MiB)

    assert isinstance(head, HeadRead)
    assert head.first_line == first and head.complete and not head.oversized
    assert head.head_hash == hashlib.sha256(data[:4096]).hexdigest()
    assert head.stat.size == len(data) > 2 * MiB
    assert 4096 <= head.bytes_read <= 16 << 10  # one small block, not the body


def test_read_head_of_a_100_mb_first_line_reads_a_bounded_amount(tmp_path: Path) -> None:
    path = tmp_path / "rollout-big.jsonl"
    with path.open("wb") as fh:  # a sparse 100 MB first line, then a normal line
        fh.write(b'{"type":"session_meta","payload":{"instructions":"')
        fh.seek(100 * MiB)
        fh.write(b'"}}\n{"n":1}\n')

    with capture_logs() as logs:
        head = read_head(path, max_line_bytes=MiB)

    assert isinstance(head, HeadRead)
    assert head.first_line is None and head.oversized and not head.complete
    assert head.bytes_read == MiB + 1
    assert len(named(logs, "first_line_oversized")) == 1


def test_read_head_empty_file(tmp_path: Path) -> None:
    head = read_head(write(tmp_path / "rollout-empty.jsonl", b""), max_line_bytes=MiB)
    assert isinstance(head, HeadRead)
    assert (head.first_line, head.complete, head.oversized, head.head_hash, head.bytes_read) == (
        None, False, False, "", 0)


def test_read_head_partial_first_line_and_short_file_hash(tmp_path: Path) -> None:
    head = read_head(write(tmp_path / "rollout-p.jsonl", b'{"type":"sess'), max_line_bytes=MiB)
    assert isinstance(head, HeadRead)
    assert head.first_line == b'{"type":"sess' and not head.complete
    assert head.head_hash == ""  # shorter than 4 KiB: no fingerprint yet


def test_read_head_of_a_file_deleted_after_stat(tmp_path: Path) -> None:
    path = write(tmp_path / "rollout-a.jsonl", b"{}\n")
    assert stat_path(path) is not None
    path.unlink()

    with capture_logs() as logs:
        head = read_head(path, max_line_bytes=MiB)

    assert head == ReadFailure(path=str(path), reason="vanished", detail=head.detail)
    assert len(named(logs, "file_vanished")) == 1


def test_read_head_permission_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "rollout-a.jsonl", b"{}\n")
    other = write(tmp_path / "rollout-b.jsonl", b'{"b":1}\n')
    deny_open(monkeypatch, path)

    with capture_logs() as logs:
        denied = read_head(path, max_line_bytes=MiB)
        fine = read_head(other, max_line_bytes=MiB)

    assert isinstance(denied, ReadFailure) and denied.reason == "unreadable"
    assert isinstance(fine, HeadRead) and fine.first_line == b'{"b":1}'
    assert len(named(logs, "file_unreadable")) == 1


def test_read_head_chmod_000(tmp_path: Path) -> None:
    skip_unless_chmod_denies(tmp_path)
    path = write(tmp_path / "rollout-a.jsonl", b"{}\n")
    path.chmod(0)
    result = read_head(path, max_line_bytes=MiB)
    assert isinstance(result, ReadFailure) and result.reason == "unreadable"


def test_a_fifo_named_like_a_rollout_does_not_block(tmp_path: Path) -> None:
    fifo = tmp_path / "rollout-fifo.jsonl"
    os.mkfifo(fifo)
    regular = write(tmp_path / "rollout-a.jsonl", b"{}\n")

    assert [f.path for f in scan_roots([tmp_path]).files] == [str(regular)]
    with capture_logs() as logs:
        result = read_new_lines(fifo, watermark=0, max_line_bytes=MiB)
    assert isinstance(result, ReadFailure) and result.reason == "unreadable"
    assert len(named(logs, "file_unreadable")) == 1


def test_read_head_sees_the_file_that_replaced_the_stat_ed_one(tmp_path: Path) -> None:
    path = write(tmp_path / "rollout-a.jsonl", b'{"id":"old"}\n' + b"x" * 5000 + b"\n")
    old = read_head(path, max_line_bytes=MiB)
    assert isinstance(old, HeadRead)
    prev = record_for(old.stat, offset=old.stat.size, head_hash=old.head_hash)
    newer = write(tmp_path / "new.tmp", b'{"id":"new"}\n' + b"y" * 6000 + b"\n")
    os.replace(newer, path)  # replaced between the caller's stat and this read

    head = read_head(path, max_line_bytes=MiB)

    assert isinstance(head, HeadRead)
    assert head.first_line == b'{"id":"new"}'
    assert head.stat.inode == os.stat(path).st_ino != prev.inode
    assert classify_change(prev, head.stat, head.head_hash) is Change.REPLACED


def test_read_head_of_real_rollouts(codex_rollouts: Path) -> None:
    files = scan_roots([codex_rollouts]).files
    assert len(files) == 12  # ls shared/rollouts/codex/*.jsonl | wc -l
    for st in files:
        head = read_head(st.path, max_line_bytes=64 * MiB)
        assert isinstance(head, HeadRead)
        with open(st.path, "rb") as fh:
            assert head.first_line + b"\n" == fh.readline()
        assert head.complete and head.stat == st


def test_read_head_of_a_real_22_kb_first_line(codex_rollouts: Path) -> None:
    path = codex_rollout("rollout-2026-05-11T11-26-55-019e1625-789d-76c0-80ab-3724b5ddb799.jsonl")
    head = read_head(path, max_line_bytes=64 * MiB)
    assert isinstance(head, HeadRead) and len(head.first_line) == 22020  # head -1 | wc -c = 22021
    small = read_head(path, max_line_bytes=4096)
    assert isinstance(small, HeadRead) and small.oversized and small.bytes_read == 4097


# --------------------------------------------------------------------------------------------
# classify_change
# --------------------------------------------------------------------------------------------

BASE = FileRecord(path="/r/rollout-a.jsonl", kind="codex", dev=1, inode=10, size=5000, mtime=100.0,
                  watermark=4990, head_hash="h1", thread_id="t1")
ST = FileStat(path="/r/rollout-a.jsonl", dev=1, inode=10, size=5000, mtime=100.0)


@pytest.mark.parametrize(
    ("prev", "st", "head_hash", "expected"),
    [
        (None, ST, "h1", Change.NEW),
        (BASE, ST, None, Change.UNCHANGED),
        (BASE, ST, "other", Change.UNCHANGED),  # unchanged costs only the stat: hash not consulted
        (BASE, replace(ST, size=6000, mtime=101.0), "h1", Change.GROWN),
        (BASE, replace(ST, size=6000, mtime=101.0), None, Change.GROWN),
        (BASE, replace(ST, mtime=101.0), "h1", Change.GROWN),  # touched, same size
        (BASE, replace(ST, size=4000, mtime=101.0), "h1", Change.TRUNCATED),
        (BASE, replace(ST, size=4995, mtime=101.0), "h1", Change.TRUNCATED),  # shrank, > offset
        (BASE, replace(ST, inode=11), "h1", Change.REPLACED),
        (BASE, replace(ST, dev=2), "h1", Change.REPLACED),
        (BASE, replace(ST, size=6000, mtime=101.0), "h2", Change.REPLACED),
        (replace(BASE, head_hash=""), replace(ST, size=6000, mtime=101.0), "h2", Change.GROWN),
        (replace(BASE, path="/r/a.jsonl.zst"), replace(ST, path="/r/a.jsonl.zst", size=6000),
         None, Change.REPLACED),
    ],
)
def test_classify_change(
    prev: FileRecord | None, st: FileStat, head_hash: str | None, expected: Change
) -> None:
    assert classify_change(prev, st, head_hash) is expected


def test_classify_in_place_rewrite_by_head_hash(tmp_path: Path) -> None:
    path = write(tmp_path / "rollout-a.jsonl", b'{"id":"a"}\n' + b"a" * 5000 + b"\n")
    first = read_head(path, max_line_bytes=MiB)
    assert isinstance(first, HeadRead)
    prev = record_for(first.stat, offset=first.stat.size, head_hash=first.head_hash)

    append(path, b'{"more":1}\n')
    grown = read_head(path, max_line_bytes=MiB)
    assert isinstance(grown, HeadRead)
    assert classify_change(prev, grown.stat, grown.head_hash) is Change.GROWN

    with path.open("r+b") as fh:  # same inode, same length prefix, different head
        fh.write(b'{"id":"b"}\n' + b"b" * 6000 + b"\n")
    rewritten = read_head(path, max_line_bytes=MiB)
    assert isinstance(rewritten, HeadRead) and rewritten.stat.inode == prev.inode
    assert classify_change(prev, rewritten.stat, rewritten.head_hash) is Change.REPLACED


# --------------------------------------------------------------------------------------------
# read_new_lines / read_lines_until
# --------------------------------------------------------------------------------------------


def test_partial_last_line_is_not_consumed_and_yielded_once_when_complete(tmp_path: Path) -> None:
    path = write(tmp_path / "rollout-a.jsonl", b'{"a":1}\n{"b":2}\n{"c":')

    first = read_new_lines(path, watermark=0, max_line_bytes=MiB)
    assert isinstance(first, TailRead)
    assert first.lines == [b'{"a":1}', b'{"b":2}']
    assert first.new_watermark == 16 and first.partial_tail

    again = read_new_lines(path, watermark=first.new_watermark, max_line_bytes=MiB)
    assert isinstance(again, TailRead) and again.lines == [] and again.new_watermark == 16

    append(path, b'3}\n{"d":4}\n')
    rest = read_new_lines(path, watermark=again.new_watermark, max_line_bytes=MiB)
    assert isinstance(rest, TailRead)
    assert rest.lines == [b'{"c":3}', b'{"d":4}']
    assert rest.new_watermark == path.stat().st_size and not rest.partial_tail


def test_empty_file_reads_nothing(tmp_path: Path) -> None:
    result = read_new_lines(write(tmp_path / "rollout-e.jsonl", b""), watermark=0, max_line_bytes=MiB)
    assert isinstance(result, TailRead)
    assert (result.lines, result.new_watermark, result.bytes_read) == ([], 0, 0)
    assert not result.replaced and not result.partial_tail


def test_append_costs_only_the_appended_bytes(tmp_path: Path) -> None:
    path = tmp_path / "rollout-big.jsonl"
    line = b'{"type":"response_item","payload":{"text":"' + b"z" * 980 + b'"}}\n'
    with path.open("wb") as fh:
        for _ in range(50):
            fh.write(line * 1024)  # 50 x ~1 MiB of complete lines
    size = path.stat().st_size

    stream = read_lines_until(path, None, MiB)
    assert sum(1 for _ in stream) == 50 * 1024
    assert stream.watermark == size and stream.bytes_read == size

    appended = b'{"type":"event_msg","payload":{"message":"' + b"m" * 978 + b'"}}\n'
    assert len(appended) == 1024
    append(path, appended)

    tail = read_new_lines(path, watermark=stream.watermark, max_line_bytes=MiB)
    assert isinstance(tail, TailRead)
    assert tail.bytes_read == len(appended)
    assert tail.lines == [appended[:-1]]
    assert tail.new_watermark == size + len(appended)


def test_100_mb_line_is_skipped_counted_and_not_held(tmp_path: Path) -> None:
    path = tmp_path / "rollout-huge.jsonl"
    with path.open("wb") as fh:  # a sparse 100 MB line between two normal lines
        fh.write(b'{"a":1}\n{"big":"')
        fh.seek(100 * MiB)
        fh.write(b'"}\n{"b":2}\n')
    size = path.stat().st_size

    with capture_logs() as logs:
        tracemalloc.start()
        try:
            result = read_new_lines(path, watermark=0, max_line_bytes=MiB, chunk_bytes=MiB)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()

    assert isinstance(result, TailRead)
    assert result.lines == [b'{"a":1}', b'{"b":2}']
    assert result.oversized_lines == 1
    assert result.new_watermark == size and result.bytes_read == size
    assert peak < 8 * MiB  # a few chunks, never the 100 MB line
    assert len(named(logs, "line_oversized")) == 1

    stream = read_lines_until(path, size, MiB)
    assert list(stream) == [b'{"a":1}', b'{"b":2}'] and stream.oversized_lines == 1


def test_oversized_partial_tail_is_counted_once_when_complete(tmp_path: Path) -> None:
    path = write(tmp_path / "rollout-a.jsonl", b'{"a":1}\n' + b"x" * 3000)

    first = read_new_lines(path, watermark=0, max_line_bytes=1000, chunk_bytes=512)
    assert isinstance(first, TailRead)
    assert first.lines == [b'{"a":1}'] and first.oversized_lines == 0
    assert first.partial_tail and first.new_watermark == 8

    append(path, b"x" * 10 + b'\n{"b":2}\n')
    second = read_new_lines(path, watermark=first.new_watermark, max_line_bytes=1000, chunk_bytes=512)
    assert isinstance(second, TailRead)
    assert second.lines == [b'{"b":2}'] and second.oversized_lines == 1
    assert second.new_watermark == path.stat().st_size


@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 7, 64, 4096])
def test_lines_are_split_exactly_at_any_chunk_size(tmp_path: Path, chunk_bytes: int) -> None:
    rng = random.Random(chunk_bytes)
    lines = [bytes(rng.choice(b"ab{}") for _ in range(rng.randrange(0, 40))) for _ in range(200)]
    data = b"\n".join(lines) + b"\n"
    path = write(tmp_path / "rollout-r.jsonl", data)
    kept = [line for line in lines if len(line) <= 30]

    result = read_new_lines(path, watermark=0, max_line_bytes=30, chunk_bytes=chunk_bytes)

    assert isinstance(result, TailRead)
    assert result.lines == kept
    assert result.oversized_lines == len(lines) - len(kept)
    assert result.new_watermark == len(data) and not result.partial_tail


def test_file_deleted_between_stat_and_read(tmp_path: Path) -> None:
    path = write(tmp_path / "rollout-a.jsonl", b"{}\n")
    other = write(tmp_path / "rollout-b.jsonl", b"{}\n")
    assert stat_path(path) is not None
    path.unlink()

    with capture_logs() as logs:
        gone = read_new_lines(path, watermark=0, max_line_bytes=MiB)
        fine = read_new_lines(other, watermark=0, max_line_bytes=MiB)

    assert isinstance(gone, ReadFailure) and gone.reason == "vanished"
    assert isinstance(fine, TailRead) and fine.lines == [b"{}"]
    assert len(named(logs, "file_vanished")) == 1
    with pytest.raises(RolloutReadError) as info:
        list(read_lines_until(path, 3, MiB))
    assert info.value.reason == "vanished"


def test_file_truncated_between_stat_and_read_is_replaced(tmp_path: Path) -> None:
    path = write(tmp_path / "rollout-a.jsonl", b'{"a":1}\n{"b":2}\n')
    first = read_new_lines(path, watermark=0, max_line_bytes=MiB)
    assert isinstance(first, TailRead) and first.new_watermark == 16
    os.truncate(path, 4)

    with capture_logs() as logs:
        result = read_new_lines(path, watermark=first.new_watermark, max_line_bytes=MiB)

    assert isinstance(result, TailRead)
    assert result.replaced and result.lines == [] and result.bytes_read == 0
    assert result.new_watermark == 0
    assert [e["reason"] for e in named(logs, "file_replaced")] == ["truncated"]
    with pytest.raises(RolloutReadError) as info:
        list(read_lines_until(path, 16, MiB))
    assert info.value.reason == "replaced"


def test_inode_mismatch_is_replaced(tmp_path: Path) -> None:
    path = write(tmp_path / "rollout-a.jsonl", b'{"a":1}\n')
    old_inode = os.stat(path).st_ino
    os.replace(write(tmp_path / "x.tmp", b'{"z":9}\n{"y":8}\n'), path)

    result = read_new_lines(path, watermark=8, max_line_bytes=MiB, expect_inode=old_inode)

    assert isinstance(result, TailRead) and result.replaced and result.lines == []
    assert result.stat.inode == os.stat(path).st_ino
    with pytest.raises(RolloutReadError):
        list(read_lines_until(path, 8, MiB, expect_inode=old_inode))


def test_read_new_lines_permission_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "rollout-a.jsonl", b"{}\n")
    deny_open(monkeypatch, path)

    with capture_logs() as logs:
        result = read_new_lines(path, watermark=0, max_line_bytes=MiB)

    assert isinstance(result, ReadFailure) and result.reason == "unreadable"
    assert len(named(logs, "file_unreadable")) == 1
    with pytest.raises(RolloutReadError) as info:
        list(read_lines_until(path, 3, MiB))
    assert info.value.reason == "unreadable"


def test_read_lines_until_stops_at_the_watermark(tmp_path: Path) -> None:
    path = write(tmp_path / "rollout-a.jsonl", b'{"a":1}\n{"b":2}\n{"c":3}\n')
    stream = read_lines_until(path, 16, MiB, chunk_bytes=5)
    assert list(stream) == [b'{"a":1}', b'{"b":2}']
    assert stream.watermark == 16 and stream.bytes_read == 16
    later = read_lines_until(path, None, MiB, start_watermark=16)
    assert list(later) == [b'{"c":3}'] and later.watermark == 24


def test_read_lines_until_counts_real_rollout_lines(codex_rollouts: Path) -> None:
    path = codex_rollout("rollout-2026-02-23T12-54-34-019c8a59-e9dd-71f0-9ae3-4079fe9726a9.jsonl")
    size = path.stat().st_size
    stream = read_lines_until(path, size, 64 * MiB, chunk_bytes=64 << 10)
    assert sum(1 for _ in stream) == 2722  # wc -l
    assert stream.watermark == size == 1_041_630 and stream.oversized_lines == 0
