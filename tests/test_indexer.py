"""The indexer over real files: bad input, appends, archive moves, restarts (SPEC §3.3, §4, §13)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from memd.clock import SystemClock
from memd.ingest import files as rollout_files
from memd.ingest import reader
from memd.ingest.indexer import Indexer
from memd.store.store import Store

INCLUDE = ("cli", "vscode", "unknown", "custom")
TID = "019b0000-1111-7222-8333-444455556666"


def meta_line(thread_id: str = TID, source: object = "cli", cwd: str = "/work/proj") -> bytes:
    payload = {"id": thread_id, "timestamp": "2026-01-02T10:00:00Z", "cwd": cwd, "originator": "codex_cli_rs",
               "cli_version": "0.77.0", "source": source}
    return json.dumps({"timestamp": "2026-01-02T10:00:00Z", "type": "session_meta", "payload": payload}).encode() + b"\n"


def user_line(text: str) -> bytes:
    return json.dumps({"timestamp": "2026-01-02T10:00:05Z", "type": "event_msg",
                       "payload": {"type": "user_message", "message": text}}).encode() + b"\n"


def rollout_path(root: Path, thread_id: str = TID, day: str = "2026/01/02") -> Path:
    path = root / day / f"rollout-2026-01-02T10-00-00-{thread_id}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def make_indexer(store: Store, root: Path, **kw: object) -> Indexer:
    return Indexer(store, SystemClock(), roots=[root], max_line_bytes=int(kw.get("max_line_bytes", 64 << 20)),
                   include_sources=INCLUDE)


async def test_real_rollouts_index_heads_then_catch_up(system_store: Store, codex_rollouts: Path, tmp_path: Path) -> None:
    root = tmp_path / "sessions"
    shutil.copytree(codex_rollouts, root)
    ix = make_indexer(system_store, root)
    first = await ix.scan()
    assert first.files_seen == len(list(codex_rollouts.glob("*.jsonl")))
    threads = {t.id: t for t in await system_store.threads.list_all()}
    # Indexing reads heads only: nothing is eligible before the body is read.
    assert all(t.watermark == 0 for t in threads.values())
    for thread_id in threads:
        await ix.catch_up(thread_id)
    threads = {t.id: t for t in await system_store.threads.list_all()}
    pomodoro = threads["019a085e-04c1-7f81-a09e-9555f6a1fb40"]
    assert pomodoro.eligible and pomodoro.user_messages == 3 and pomodoro.source == "cli"
    assert pomodoro.watermark == (codex_rollouts / "aisessions-codex-pomodor-timer.jsonl").stat().st_size
    assert str(threads["019b88e5-a2e4-7b90-8953-38fce393c653"].reason) == "source:subagent:review"
    assert str(threads["019b7f94-51b4-7593-922e-ba12b5b73b52"].reason) == "source:exec"
    assert str(threads["019b7f95-0000-7000-0000-000000000001"].reason) == "no_user_messages"
    assert threads["019c8a59-e9dd-71f0-9ae3-4079fe9726a9"].user_messages == 38
    # Restart with nothing changed: one stat per file, nothing re-read.
    again = await make_indexer(system_store, root).scan()
    assert again.unchanged == again.files_seen and again.indexed == 0


async def test_append_reads_only_the_appended_bytes(system_store: Store, tmp_path: Path) -> None:
    root = tmp_path / "sessions"
    path = rollout_path(root)
    body = user_line("x" * 1000) * 20_000  # ~20 MB
    path.write_bytes(meta_line() + body)
    ix = make_indexer(system_store, root)
    await ix.scan()
    await ix.catch_up(TID)
    assert ix.last_catch_up_bytes == path.stat().st_size
    appended = user_line("one more request")
    with path.open("ab") as handle:
        handle.write(appended)
    summary = await ix.scan()
    assert summary.indexed == 1
    thread = (await ix.catch_up(TID)).thread  # type: ignore[union-attr]
    assert ix.last_catch_up_bytes == len(appended)
    assert thread is not None and thread.user_messages == 20_001
    assert thread.watermark == path.stat().st_size


async def test_partial_last_line_waits_for_its_newline(system_store: Store, tmp_path: Path) -> None:
    root = tmp_path / "sessions"
    path = rollout_path(root)
    full = user_line("finish the parser")
    path.write_bytes(meta_line() + user_line("first") + full[:10])
    ix = make_indexer(system_store, root)
    await ix.scan()
    thread = (await ix.catch_up(TID)).thread  # type: ignore[union-attr]
    assert thread is not None and thread.user_messages == 1
    assert thread.watermark == len(meta_line() + user_line("first"))
    with path.open("ab") as handle:
        handle.write(full[10:])
    await ix.scan()
    thread = (await ix.catch_up(TID)).thread  # type: ignore[union-attr]
    assert thread is not None and thread.user_messages == 2 and thread.watermark == path.stat().st_size


async def test_archived_rollout_stays_the_same_thread(system_store: Store, tmp_path: Path) -> None:
    sessions, archive = tmp_path / "sessions", tmp_path / "archived_sessions"
    archive.mkdir()
    path = rollout_path(sessions)
    path.write_bytes(meta_line() + user_line("hello there"))
    ix = Indexer(system_store, SystemClock(), roots=[sessions, archive], max_line_bytes=1 << 20, include_sources=INCLUDE)
    await ix.scan()
    await ix.catch_up(TID)
    moved = archive / path.name
    os.rename(path, moved)
    await ix.scan()
    threads = await system_store.threads.list_all()
    assert [t.id for t in threads] == [TID]
    assert threads[0].path == str(moved)
    assert threads[0].user_messages == 1 and threads[0].watermark == moved.stat().st_size
    assert await system_store.threads.get_file(str(path)) is None


async def test_replaced_file_is_read_again_from_zero(system_store: Store, tmp_path: Path) -> None:
    root = tmp_path / "sessions"
    path = rollout_path(root)
    path.write_bytes(meta_line() + user_line("a") + user_line("b") + user_line("c"))
    ix = make_indexer(system_store, root)
    await ix.scan()
    await ix.catch_up(TID)
    replacement = path.with_suffix(".tmp")
    replacement.write_bytes(meta_line() + user_line("only one"))
    os.replace(replacement, path)
    await ix.scan()
    thread = (await ix.catch_up(TID)).thread  # type: ignore[union-attr]
    assert thread is not None and thread.user_messages == 1
    assert thread.watermark == path.stat().st_size


async def test_new_day_directory_is_picked_up_by_refresh(system_store: Store, tmp_path: Path) -> None:
    root = tmp_path / "sessions"
    root.mkdir()
    ix = make_indexer(system_store, root)
    await ix.scan()
    path = rollout_path(root, day="2026/11/21")
    path.write_bytes(meta_line() + user_line("new day"))
    summary = await ix.refresh_paths([str(root / "2026")])  # the watcher reports the new directory
    assert summary.indexed == 1
    assert (await system_store.threads.get(TID)) is not None


async def test_bad_files_get_one_event_and_do_not_stop_the_others(system_store: Store, tmp_path: Path) -> None:
    root = tmp_path / "sessions"
    good = rollout_path(root, "019b0000-0000-7000-8000-000000000001")
    good.write_bytes(meta_line("019b0000-0000-7000-8000-000000000001") + user_line("fix it"))
    empty = rollout_path(root, "019b0000-0000-7000-8000-000000000002")
    empty.write_bytes(b"")
    garbage = rollout_path(root, "019b0000-0000-7000-8000-000000000003")
    garbage.write_bytes(b"{not json\n" + user_line("x"))
    bad_utf8 = rollout_path(root, "019b0000-0000-7000-8000-000000000004")
    bad_utf8.write_bytes(b"\xff\xfe\xfa garbage\n")
    bodybad = rollout_path(root, "019b0000-0000-7000-8000-000000000005")
    bodybad.write_bytes(meta_line("019b0000-0000-7000-8000-000000000005") + b"{oops\n" + b"\xff\xff\n" + user_line("still here"))
    (root / "loop").symlink_to(root, target_is_directory=True)
    ix = Indexer(system_store, SystemClock(), roots=[root, tmp_path / "missing"], max_line_bytes=1 << 20, include_sources=INCLUDE)
    with capture_logs() as logs:
        summary = await ix.scan()
        await ix.catch_up("019b0000-0000-7000-8000-000000000005")
    events = [(e["event"], e.get("reason")) for e in logs]
    assert ("file_not_indexed", "empty_file") in events
    assert ("file_not_indexed", "no_session_meta") in events
    assert any(e == "symlink_loop" for e, _ in events)
    assert any(e == "root_missing" for e, _ in events)
    assert any(e["event"] == "line_skipped" for e in logs)
    assert summary.files_seen == 5  # each file once despite the symlink loop
    ok = await system_store.threads.get("019b0000-0000-7000-8000-000000000001")
    assert ok is not None
    survivor = await system_store.threads.get("019b0000-0000-7000-8000-000000000005")
    assert survivor is not None and survivor.skipped_lines == 2 and survivor.user_messages == 1


async def test_oversized_line_is_skipped_and_counted(system_store: Store, tmp_path: Path) -> None:
    root = tmp_path / "sessions"
    path = rollout_path(root)
    with path.open("wb") as handle:
        handle.write(meta_line())
        handle.write(b'{"type":"event_msg","payload":{"type":"user_message","message":"')
        handle.write(b"y" * (100 << 20))  # a single 100 MB line, beyond max_line_bytes
        handle.write(b'"}}\n')
        handle.write(user_line("after the big line"))
    ix = make_indexer(system_store, root, max_line_bytes=1 << 20)
    await ix.scan()
    with capture_logs() as logs:
        thread = (await ix.catch_up(TID)).thread  # type: ignore[union-attr]
    assert thread is not None and thread.skipped_lines == 1 and thread.user_messages == 1
    assert thread.watermark == path.stat().st_size
    assert [e for e in logs if e["event"] == "line_oversized"], logs


async def test_file_deleted_between_scan_and_read(system_store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "sessions"
    doomed = rollout_path(root, "019b0000-0000-7000-8000-00000000000a")
    doomed.write_bytes(meta_line("019b0000-0000-7000-8000-00000000000a") + user_line("bye"))
    keep = rollout_path(root, "019b0000-0000-7000-8000-00000000000b")
    keep.write_bytes(meta_line("019b0000-0000-7000-8000-00000000000b") + user_line("stay"))
    real_read_head = reader.read_head

    def deleting_read_head(path: str, **kw: object):  # type: ignore[no-untyped-def]
        if path == str(doomed) and doomed.exists():
            doomed.unlink()
        return real_read_head(path, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(reader, "read_head", deleting_read_head)
    with capture_logs() as logs:
        await make_indexer(system_store, root).scan()
    assert [e for e in logs if e["event"] == "file_vanished"]
    assert await system_store.threads.get("019b0000-0000-7000-8000-00000000000b") is not None
    assert await system_store.threads.get("019b0000-0000-7000-8000-00000000000a") is None


async def test_unreadable_file_is_recorded_not_fatal(system_store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:

    root = tmp_path / "sessions"
    locked = rollout_path(root, "019b0000-0000-7000-8000-00000000000c")
    locked.write_bytes(meta_line("019b0000-0000-7000-8000-00000000000c") + user_line("secret"))
    fine = rollout_path(root, "019b0000-0000-7000-8000-00000000000d")
    fine.write_bytes(meta_line("019b0000-0000-7000-8000-00000000000d") + user_line("fine"))
    real_open = rollout_files._open_binary

    def denying_open(path: str):  # type: ignore[no-untyped-def]
        if path == str(locked):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path)

    monkeypatch.setattr(rollout_files, "_open_binary", denying_open)
    with capture_logs() as logs:
        await make_indexer(system_store, root).scan()
    assert [e for e in logs if e["event"] == "file_unreadable"]
    record = await system_store.threads.get_file(str(locked))
    assert record is not None and record.error is not None and "unreadable" in record.error
    assert await system_store.threads.get("019b0000-0000-7000-8000-00000000000d") is not None


async def _state(store: Store) -> tuple[list, dict]:
    rows = await store.threads.list_all()
    threads = [(t.id, t.path, t.watermark, t.source, str(t.reason), t.project) for t in rows]
    known = await store.threads.all_files()
    files = {p: (f.thread_id, f.watermark, f.error, f.head_hash) for p, f in known.items()}
    return sorted(threads), files


def _many_rollouts(root: Path) -> None:
    """Seven files: five threads, one of them in sessions and (copied) in the archive, and two
    files that are not sessions."""
    for n in range(5):
        tid = f"019b0000-0000-7000-8000-00000000001{n}"
        rollout_path(root / "sessions", tid, day=f"2026/01/0{n + 1}").write_bytes(
            meta_line(tid, source="exec" if n == 3 else "cli") + user_line(f"task {n}"))
    twin = rollout_path(root / "sessions", "019b0000-0000-7000-8000-000000000010", day="2026/01/01")
    (root / "archived").mkdir(parents=True)
    shutil.copy(twin, root / "archived" / twin.name)
    for tid, day, content in [("ff", "2026/01/06", b""), ("fe", "2026/01/07", b"{oops\n")]:
        path = rollout_path(root / "sessions", f"019b0000-0000-7000-8000-0000000000{tid}", day=day)
        path.write_bytes(content)


@pytest.mark.parametrize("batch_files", [1, 2, 500])
async def test_batch_size_does_not_change_what_is_indexed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batch_files: int
) -> None:
    """Batched indexing (one head-reading round trip and one transaction per batch) ends in the
    same state as one file at a time, also when a thread id repeats inside a batch."""
    import memd.ingest.indexer as indexer_module

    _many_rollouts(tmp_path)
    monkeypatch.setattr(indexer_module, "BATCH_FILES", batch_files)
    store = await Store.open(tmp_path / "state" / "memd.sqlite3", clock=SystemClock())
    try:
        ix = Indexer(store, SystemClock(), roots=[tmp_path / "sessions", tmp_path / "archived"],
                     max_line_bytes=1 << 20, include_sources=INCLUDE)
        with capture_logs() as logs:
            summary = await ix.scan()
        threads, files = await _state(store)
    finally:
        await store.close()
    assert (summary.files_seen, summary.indexed, summary.unchanged) == (8, 8, 0)
    assert len(threads) == 5
    twin_id = "019b0000-0000-7000-8000-000000000010"
    # Files are visited in path order: the archived copy comes first, the sessions copy last.
    assert [t[1] for t in threads if t[0] == twin_id] == [
        str(tmp_path / "sessions/2026/01/01" / f"rollout-2026-01-02T10-00-00-{twin_id}.jsonl")
    ]
    assert {t[0]: t[4] for t in threads}["019b0000-0000-7000-8000-000000000013"] == "source:exec"
    assert sorted(f[2] for f in files.values() if f[2]) == ["empty_file", "no_session_meta"]
    indexed = [e for e in logs if e["event"] == "thread_indexed"]
    assert len(indexed) == 6  # 5 threads + the twin's move
    assert {e["log_level"] for e in indexed} == {"debug"}
    # The second copy of the twin sees the thread the first copy created in the same batch.
    assert [e["thread_id"] for e in indexed if e["moved"]] == [twin_id]
    done = [e for e in logs if e["event"] == "scan_done"]
    assert len(done) == 1 and done[0]["new_threads"] == 6 and done[0]["log_level"] == "info"
    if batch_files == 500:
        return
    # The same corpus indexed in one batch gives the same rows.
    other = await Store.open(tmp_path / "state2" / "memd.sqlite3", clock=SystemClock())
    try:
        monkeypatch.setattr(indexer_module, "BATCH_FILES", 500)
        await Indexer(other, SystemClock(), roots=[tmp_path / "sessions", tmp_path / "archived"],
                      max_line_bytes=1 << 20, include_sources=INCLUDE).scan()
        assert await _state(other) == (threads, files)
    finally:
        await other.close()


async def test_watch_refresh_logs_each_new_thread_at_info(system_store: Store, tmp_path: Path) -> None:
    root = tmp_path / "sessions"
    root.mkdir()
    ix = make_indexer(system_store, root)
    await ix.scan()
    path = rollout_path(root)
    path.write_bytes(meta_line() + user_line("hi"))
    with capture_logs() as logs:
        summary = await ix.refresh_paths([str(path)])
        again = await ix.refresh_paths([str(path)])
    assert summary.indexed == 1 and again.unchanged == 1
    assert [(e["event"], e["log_level"]) for e in logs if e["event"] == "thread_indexed"] == [
        ("thread_indexed", "info")
    ]
    path.unlink()
    gone = await ix.refresh_paths([str(path)])
    assert gone.removed == 1 and await system_store.threads.get_file(str(path)) is None
