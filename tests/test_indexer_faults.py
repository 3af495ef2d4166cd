"""The indexer and the rollout sniffers against hostile input and transient faults (SPEC §3.3, §4, §13).

One strange file never stops a scan; a read that fails while planning never loses a session; a move to the
archive or a root that is briefly missing never makes memd read a file again from its start.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from memd.clock import ManualClock, SystemClock
from memd.ingest import files as rollout_files
from memd.ingest.indexer import HeadProblem, Indexer, ReadOutcome
from memd.rollout import claude, codex
from memd.rollout.project import NOT_READ_YET
from memd.rollout.records import Agent
from memd.rollout.session import ThreadStats, new_parser
from memd.schedule.scheduler import Scheduler
from memd.store.store import Store
from tests.builders import simple_turns, thread_id, write_rollout

INCLUDE = ("cli", "vscode", "unknown", "custom")
TID = "019b0000-1111-7222-8333-444455556666"


def meta_line(thread_id: str = TID, cwd: str = "/work/proj") -> bytes:
    payload = {
        "id": thread_id,
        "timestamp": "2026-01-02T10:00:00Z",
        "cwd": cwd,
        "originator": "codex_cli_rs",
        "cli_version": "0.77.0",
        "source": "cli",
    }
    return (
        json.dumps({"timestamp": "2026-01-02T10:00:00Z", "type": "session_meta", "payload": payload}).encode() + b"\n"
    )


def user_line(text: str) -> bytes:
    return (
        json.dumps(
            {
                "timestamp": "2026-01-02T10:00:05Z",
                "type": "event_msg",
                "payload": {"type": "user_message", "message": text},
            }
        ).encode()
        + b"\n"
    )


def rollout_path(root: Path, thread_id: str = TID, day: str = "2026/01/02") -> Path:
    path = root / day / f"rollout-2026-01-02T10-00-00-{thread_id}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def make_indexer(store: Store, *roots: Path) -> Indexer:
    return Indexer(store, SystemClock(), roots=list(roots), max_line_bytes=1 << 20, include_sources=INCLUDE)


# --- hostile types in the head --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [["user"], {"a": "user"}, 3, None, 1.5, True])
def test_looks_like_claude_reads_a_hostile_type_as_not_claude(kind: object) -> None:
    assert claude.looks_like_claude([json.dumps({"type": kind}).encode()]) is False
    assert claude.looks_like_claude([json.dumps({"type": kind}).encode(), b'{"type": "user"}']) is True


async def test_a_head_with_a_list_type_does_not_stop_the_scan(system_store: Store, tmp_path: Path) -> None:
    root = tmp_path / "sessions"
    good = rollout_path(root)
    good.write_bytes(meta_line() + user_line("fix the build"))
    weird = root / "weird.jsonl"
    weird.write_bytes(b'{"type": ["user"]}\n{"type": {"nested": 1}, "sessionId": ["s"]}\n')
    ix = make_indexer(system_store, root)
    summary = await ix.scan()
    assert summary.files_seen == 2 and summary.failed == 0
    assert [t.id for t in await system_store.threads.list_all()] == [TID]
    record = await system_store.threads.get_file(str(weird))
    assert record is not None and record.error == HeadProblem.NO_SESSION_META and record.thread_id is None
    # The watcher's path gives the same answer.
    weird.write_bytes(weird.read_bytes() + b'{"type": [1, 2]}\n')
    again = await ix.refresh_paths([str(weird), str(good)])
    assert again.indexed == 1 and again.unchanged == 1


async def test_an_unexpected_head_error_is_one_file_not_the_batch(
    system_store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "sessions"
    good = rollout_path(root)
    good.write_bytes(meta_line() + user_line("fix the build"))
    odd = root / "odd.jsonl"
    odd.write_bytes(b'{"type": "user", "no": "session id"}\n')
    real_session_meta = claude.session_meta

    def exploding(lines: Any, *, name_hint: str | None = None) -> Any:
        if name_hint == "odd":
            raise RuntimeError("a bug met by a strange head")
        return real_session_meta(lines, name_hint=name_hint)

    monkeypatch.setattr(claude, "session_meta", exploding)
    ix = make_indexer(system_store, root)
    with capture_logs() as logs:
        summary = await ix.scan()
    assert summary.files_seen == 2 and summary.indexed == 2 and summary.failed == 1
    assert (await system_store.threads.get(TID)) is not None
    record = await system_store.threads.get_file(str(odd))
    assert record is not None and record.error == HeadProblem.HEAD_FAILED
    failed = [e for e in logs if e["event"] == "head_failed"]
    assert len(failed) == 1 and failed[0]["path"] == str(odd) and "RuntimeError" in failed[0]["error"]
    assert [e["failed"] for e in logs if e["event"] == "scan_done"] == [1]
    # Unchanged, it is not read again; once it changes (and the bug is gone) it is.
    assert (await ix.scan()).unchanged == 2
    monkeypatch.setattr(claude, "session_meta", real_session_meta)
    odd.write_bytes(odd.read_bytes() + b'{"type": "user", "sessionId": "abc", "cwd": "/p"}\n')
    refreshed = await ix.refresh_paths([str(odd)])
    assert refreshed.failed == 0
    record = await system_store.threads.get_file(str(odd))
    assert record is not None and record.error is None and record.thread_id == "abc"


# --- a seeded fuzz of the sniffers and the parsers ------------------------------------------------------------

_HOSTILE: list[object] = [
    None,
    0,
    -1,
    1.5,
    True,
    [],
    ["user"],
    {},
    {"a": 1},
    "",
    "x",
    [{"type": "text"}],
    {"type": ["x"]},
    10**30,
    "2026-01-01T00:00:00Z",
]
_TYPES = [
    "user",
    "assistant",
    "system",
    "summary",
    "progress",
    "attachment",
    "session_meta",
    "response_item",
    "event_msg",
    "turn_context",
    "compacted",
    "message",
    "function_call",
    "function_call_output",
    "custom_tool_call",
    "local_shell_call",
    "web_search_call",
    "reasoning",
    "user_message",
    "agent_message",
    "token_count",
    "task_complete",
    "exec_command_end",
    "patch_apply_end",
    "tool_use",
    "tool_result",
    "text",
    "image",
    "compact_boundary",
    "ai-title",
    "custom-title",
    "file-history-snapshot",
    "thread_rolled_back",
]
_KEYS = [
    "type",
    "payload",
    "sessionId",
    "cwd",
    "version",
    "gitBranch",
    "entrypoint",
    "timestamp",
    "isSidechain",
    "agentId",
    "message",
    "content",
    "subtype",
    "attachment",
    "data",
    "summary",
    "aiTitle",
    "customTitle",
    "isCompactSummary",
    "toolUseResult",
    "isMeta",
    "requestId",
    "usage",
    "id",
    "role",
    "name",
    "arguments",
    "call_id",
    "output",
    "source",
    "originator",
    "cli_version",
    "git",
    "session_id",
    "memory_mode",
    "thread_source",
    "info",
    "record_type",
    "input",
    "tool_use_id",
    "is_error",
    "text",
    "model",
    "action",
    "command",
    "changes",
    "success",
    "exit_code",
    "aggregated_output",
    "phase",
    "isApiErrorMessage",
]


def _value(rng: random.Random, depth: int) -> object:
    roll = rng.random()
    if depth > 3 or roll < 0.4:
        return rng.choice(_HOSTILE + _TYPES)
    if roll < 0.7:
        return _object(rng, depth + 1)
    return [_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]


def _object(rng: random.Random, depth: int = 0) -> dict[str, object]:
    obj = {rng.choice(_KEYS): _value(rng, depth) for _ in range(rng.randint(0, 6))}
    if rng.random() < 0.6:
        obj["type"] = rng.choice(_TYPES + _HOSTILE)
    return obj


def test_sniffers_and_parsers_take_hostile_types_without_raising(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lists, objects, numbers and null where strings belong: the sniffers never raise, and the parsers
    never need their last-resort guard (an error there would silently drop a record as unknown)."""
    errors: list[str] = []
    real_record = claude.ClaudeParser._record
    real_object = codex._parse_object

    def watched_record(self: claude.ClaudeParser, obj: dict[str, Any]) -> bool:
        try:
            return real_record(self, obj)
        except Exception as exc:
            errors.append(f"claude: {exc!r} on {obj!r}")
            raise

    def watched_object(obj: dict[str, Any], first: bool) -> Any:
        try:
            return real_object(obj, first)
        except Exception as exc:
            errors.append(f"codex: {exc!r} on {obj!r}")
            raise

    monkeypatch.setattr(claude.ClaudeParser, "_record", watched_record)
    monkeypatch.setattr(codex, "_parse_object", watched_object)
    rng = random.Random(20261129)
    for _ in range(3000):
        lines = [json.dumps(_object(rng)).encode() for _ in range(rng.randint(1, 4))]
        claude.looks_like_claude(lines)
        claude.session_meta(lines, name_hint=rng.choice([None, "x"]))
        codex.parse_session_meta(lines[0])
        for agent in (Agent.CODEX, Agent.CLAUDE):
            parser = new_parser(agent, path="fuzz.jsonl", from_start=True)
            parser.feed(lines)
            stats = ThreadStats()
            stats.feed(parser.result)
            ThreadStats.from_json(stats.to_json())
    assert errors == []


# --- a read that fails while planning -------------------------------------------------------------------------


def _deny_once(monkeypatch: pytest.MonkeyPatch, path: Path) -> list[str]:
    """Make the next binary open of ``path`` fail with EACCES (once); returns the paths denied."""
    denied: list[str] = []
    real_open = rollout_files._open_binary

    def denying_open(target: str) -> Any:
        if target == str(path) and not denied:
            denied.append(target)
            raise PermissionError(13, "Permission denied", target)
        return real_open(target)

    monkeypatch.setattr(rollout_files, "_open_binary", denying_open)
    return denied


async def test_a_read_error_while_planning_keeps_the_thread_for_the_next_pass(
    tmp_path: Path, manual_store: Store, manual_clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    tid = thread_id(1)
    path = write_rollout(tmp_path / "sessions", tid, tmp_path / "proj", simple_turns("t1"))
    os.utime(path, (manual_clock.now() - 600, manual_clock.now() - 600))  # finished, idle
    indexer = Indexer(manual_store, manual_clock, roots=[tmp_path / "sessions"], max_line_bytes=1 << 20,
                      include_sources=INCLUDE, project_rule="cwd")  # fmt: skip
    scheduler = Scheduler(manual_store, indexer, manual_clock, min_idle_s=60, max_age_days=30)
    await indexer.scan()
    denied = _deny_once(monkeypatch, path)
    with capture_logs() as logs:
        first = await scheduler.plan()
    assert denied == [str(path)]
    assert (first.failed, first.queued, first.not_eligible) == (1, 0, 0)
    assert [e["thread_id"] for e in logs if e["event"] == "plan_thread_unread"] == [tid]
    stored = await manual_store.threads.get(tid)
    assert stored is not None and stored.reason == NOT_READ_YET and stored.watermark == 0  # nothing lost
    # The error cleared: the next pass reads the session and queues its extraction.
    second = await scheduler.plan()
    assert (second.failed, second.queued_ids) == (0, [tid])
    job = await manual_store.jobs.get("extract", tid)
    assert job is not None and job.input_watermark == path.stat().st_size


async def test_catch_up_says_whether_it_read(
    system_store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "sessions"
    path = rollout_path(root)
    path.write_bytes(meta_line() + user_line("fix the build"))
    ix = make_indexer(system_store, root)
    await ix.scan()
    _deny_once(monkeypatch, path)
    failed = await ix.catch_up(TID)
    assert failed is not None and failed.outcome is ReadOutcome.FAILED and not failed.read_ok
    assert failed.thread.watermark == 0 and failed.thread.reason == NOT_READ_YET
    read = await ix.catch_up(TID)
    assert read is not None and read.read_ok and read.thread.watermark == path.stat().st_size
    path.unlink()
    gone = await ix.catch_up(TID)
    assert gone is not None and gone.outcome is ReadOutcome.VANISHED and gone.thread == read.thread
    assert await ix.catch_up("no-such-thread") is None


# --- moves and missing roots never cost a re-read -------------------------------------------------------------


async def test_an_archive_move_seen_by_the_watcher_keeps_the_thread(system_store: Store, tmp_path: Path) -> None:
    sessions, archive = tmp_path / "sessions", tmp_path / "archived_sessions"
    archive.mkdir()
    path = rollout_path(sessions)
    path.write_bytes(meta_line() + user_line("fix the build") + user_line("and the docs"))
    ix = make_indexer(system_store, sessions, archive)
    await ix.scan()
    before = await ix.catch_up(TID)
    assert before is not None and before.thread.eligible and before.thread.user_messages == 2
    moved = archive / path.name
    os.rename(path, moved)
    with capture_logs() as logs:
        summary = await ix.refresh_paths([str(path), str(moved)])  # one watcher batch names both
    assert summary.removed == 1 and summary.indexed == 1
    assert [e["moved"] for e in logs if e["event"] == "thread_indexed"] == [True]
    thread = await system_store.threads.get(TID)
    assert thread is not None and thread.path == str(moved)
    # Same thread, same statistics, same watermark: nothing is read again.
    assert (thread.watermark, thread.user_messages, thread.eligible) == (moved.stat().st_size, 2, True)
    record = await system_store.threads.get_file(str(moved))
    assert record is not None and record.watermark == moved.stat().st_size
    after = await ix.catch_up(TID)
    assert after is not None and after.read_ok and ix.last_catch_up_bytes == 0


async def test_a_missing_root_does_not_forget_its_files(system_store: Store, tmp_path: Path) -> None:
    sessions = tmp_path / "sessions"
    path = rollout_path(sessions)
    path.write_bytes(meta_line() + user_line("fix the build"))
    ix = make_indexer(system_store, sessions)
    await ix.scan()
    read = await ix.catch_up(TID)
    assert read is not None and read.read_ok
    sessions.rename(tmp_path / "unmounted")  # a network share away, a disk not mounted yet
    with capture_logs() as logs:
        away = await ix.scan()
    assert away.removed == 0 and away.files_seen == 0
    assert [e["event"] for e in logs if e["event"] == "root_missing"] == ["root_missing"]
    assert await system_store.threads.get_file(str(path)) is not None
    (tmp_path / "unmounted").rename(sessions)
    back = await ix.scan()
    assert (back.unchanged, back.indexed) == (1, 0)  # not new: its watermark stands
    thread = await system_store.threads.get(TID)
    assert thread is not None and thread.watermark == path.stat().st_size and thread.eligible


async def test_an_unreadable_directory_does_not_forget_its_files(
    system_store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from memd.ingest import scan as scan_module

    sessions = tmp_path / "sessions"
    hidden = rollout_path(sessions, thread_id(1), day="2026/01/01")
    hidden.write_bytes(meta_line(thread_id(1)) + user_line("one"))
    deleted = rollout_path(sessions, thread_id(2), day="2026/01/02")
    deleted.write_bytes(meta_line(thread_id(2)) + user_line("two"))
    ix = make_indexer(system_store, sessions)
    await ix.scan()
    deleted.unlink()
    real_scandir = scan_module._scandir

    def denying_scandir(path: str) -> Any:
        if path == str(hidden.parent):
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    real_exists = os.path.exists

    def exists(path: Any) -> bool:  # what stat says under a directory without search permission
        return False if str(path).startswith(str(hidden.parent) + "/") else real_exists(path)

    monkeypatch.setattr(scan_module, "_scandir", denying_scandir)
    monkeypatch.setattr(os.path, "exists", exists)
    summary = await ix.scan()
    assert summary.removed == 1  # the deleted file is forgotten ...
    assert await system_store.threads.get_file(str(deleted)) is None
    assert await system_store.threads.get_file(str(hidden)) is not None  # ... the unseen one is kept


async def test_an_append_keeps_an_eligible_thread_eligible(system_store: Store, tmp_path: Path) -> None:
    sessions = tmp_path / "sessions"
    path = rollout_path(sessions)
    path.write_bytes(meta_line() + user_line("fix the build"))
    quiet = rollout_path(sessions, thread_id(3))
    quiet.write_bytes(meta_line(thread_id(3)))
    ix = make_indexer(system_store, sessions)
    await ix.scan()
    await ix.catch_up(TID)
    await ix.catch_up(thread_id(3))
    with path.open("ab") as handle:
        handle.write(user_line("and the docs"))
    with quiet.open("ab") as handle:
        handle.write(b'{"type": "event_msg", "payload": {"type": "token_count", "info": null}}\n')
    summary = await ix.refresh_paths([str(path), str(quiet)])
    assert summary.indexed == 2
    # The stored statistics stand for the bytes already read: the verdict comes from them.
    grown = await system_store.threads.get(TID)
    assert grown is not None and (grown.eligible, grown.reason, grown.user_messages) == (True, None, 1)
    silent = await system_store.threads.get(thread_id(3))
    assert silent is not None and not silent.eligible and str(silent.reason) == "no_user_messages"
    read = await ix.catch_up(TID)
    assert (
        read is not None and read.thread.user_messages == 2 and ix.last_catch_up_bytes == len(user_line("and the docs"))
    )


# --- the head read is bounded even when every line is oversized ------------------------------------------------


def test_head_lines_stop_at_max_bytes_when_every_line_is_oversized(tmp_path: Path) -> None:
    from memd.ingest.reader import read_head_lines

    path = tmp_path / "huge-lines.jsonl"
    line = b'{"type": "user", "pasted": "' + b"x" * (5 << 20) + b'"}\n'  # each line over 4 MiB
    path.write_bytes(line * 3)  # 15 MB
    reads: list[int] = []
    real_open = rollout_files._open_binary

    def counting_open(target: str) -> Any:
        handle = real_open(target)
        real_read = handle.read

        def read(size: int = -1) -> bytes:
            data = real_read(size)
            reads.append(len(data))
            return data

        handle.read = read  # type: ignore[method-assign]
        return handle

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rollout_files, "_open_binary", counting_open)
        lines = read_head_lines(path, max_lines=50, max_line_bytes=4 << 20, max_bytes=100_000)
    assert lines == []
    # Reading stops once past max_bytes, the line in progress followed only until it is known to be
    # oversized (past max_line_bytes): about 4 MiB read of 15 MB, never the whole file.
    assert sum(reads) <= 100_000 + (4 << 20) + (64 << 10)
    # A line in progress that fits is still finished past max_bytes.
    small = tmp_path / "small-lines.jsonl"
    small.write_bytes(b'{"type": "user", "n": 1}\n' + b'{"type": "user", "pad": "' + b"y" * 200_000 + b'"}\n')
    assert len(read_head_lines(small, max_lines=50, max_line_bytes=4 << 20, max_bytes=100_000)) == 2


async def test_memd_once_extracts_the_good_session_beside_a_hostile_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import asyncio

    from memd.cli import main

    sessions = tmp_path / "sessions"
    monkeypatch.setenv("MEMD_SESSIONS", str(sessions))
    monkeypatch.setenv("MEMD_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("MEMD_MEMORY_DIR", str(tmp_path / "memory"))
    monkeypatch.setenv("MEMD_MIN_IDLE_S", "0")
    monkeypatch.setenv("MEMD_MAX_AGE_DAYS", "0")
    monkeypatch.setenv("MEMD_CONSOLIDATION__COMMAND", json.dumps(["true"]))
    (tmp_path / "proj").mkdir()
    write_rollout(sessions, thread_id(1), tmp_path / "proj", simple_turns("hostile"))
    (sessions / "weird.jsonl").write_bytes(b'{"type": ["user"]}\n')
    assert await asyncio.to_thread(main, ["once"]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    traces = list((tmp_path / "memory").rglob("trace_summaries/*.md"))
    assert len(traces) == 1 and thread_id(1) in traces[0].name
