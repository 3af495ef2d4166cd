"""Claude Code transcripts on disk (SPEC §3.4): discovery in the Claude layout."""

from __future__ import annotations

from pathlib import Path

from watchfiles import Change as FsEvent

from memd.ingest.scan import restat_paths, scan_roots
from memd.ingest.watch import _watch_filter

SID = "5f0c1d2e-0000-4000-8000-000000000001"


def _layout(root: Path) -> dict[str, Path]:
    """A Claude Code projects root: a 2.1 session with sub-agents and tool results, a 2.0 one."""
    project = root / "-home-me-app"
    paths = {
        "session": project / f"{SID}.jsonl",
        "subagent": project / SID / "subagents" / "agent-a1b2c3d.jsonl",
        "compact": project / SID / "subagents" / "agent-acompact-0a1b2c.jsonl",
        "old_agent": project / "agent-36541525.jsonl",
        "tool_result": project / SID / "tool-results" / "toolu_01.jsonl",
        "tool_result_txt": project / SID / "tool-results" / "toolu_02.txt",
    }
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}\n")
    return paths


def test_scan_finds_sessions_and_sub_agents_but_nothing_under_tool_results(tmp_path: Path) -> None:
    paths = _layout(tmp_path)
    found = {f.path for f in scan_roots([tmp_path]).files}
    assert found == {str(paths[k]) for k in ("session", "subagent", "compact", "old_agent")}
    restat = {f.path for f in restat_paths([str(p) for p in paths.values()] + [str(paths["tool_result"].parent)]).files}
    assert str(paths["tool_result"]) not in restat and str(paths["session"]) in restat


def test_watch_filter_accepts_uuid_sessions_and_ignores_tool_results(tmp_path: Path) -> None:
    paths = _layout(tmp_path)
    roots = frozenset({str(tmp_path)})
    assert _watch_filter(roots, FsEvent.modified, str(paths["session"]))
    assert _watch_filter(roots, FsEvent.added, str(paths["subagent"]))
    assert not _watch_filter(roots, FsEvent.added, str(paths["tool_result"]))
    assert not _watch_filter(roots, FsEvent.added, str(paths["tool_result"].parent))
    assert _watch_filter(roots, FsEvent.added, str(paths["session"].parent / SID))  # a new session folder


# --- indexing -------------------------------------------------------------------------------------

import json  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402
from structlog.testing import capture_logs  # noqa: E402

from memd.bench.corpus_claude import append_claude_turn, generate_claude_session  # noqa: E402
from memd.clock import SystemClock  # noqa: E402
from memd.ingest.indexer import Indexer  # noqa: E402
from memd.rollout.records import Agent  # noqa: E402
from memd.store.records import JobKind  # noqa: E402
from memd.store.store import Store  # noqa: E402
from tests.claude_layout import lay_out  # noqa: E402
from tests.conftest import SHARED_ROLLOUTS  # noqa: E402

INCLUDE = ("cli", "vscode", "unknown", "custom")
CWD = "/home/me/app"


def record(type_: str = "user", sid: str = SID, **extra: object) -> bytes:
    obj: dict[str, object] = {"parentUuid": None, "isSidechain": False, "userType": "external", "cwd": CWD}
    obj.update(sessionId=sid, version="2.1.39", gitBranch="main", type=type_, timestamp="2026-02-10T10:00:00.000Z")
    if type_ == "user":
        obj["message"] = {"role": "user", "content": "fix the login test"}
    obj.update(extra)
    return json.dumps(obj).encode() + b"\n"


def session_file(root: Path, sid: str = SID, *lines: bytes) -> Path:
    path = root / "-home-me-app" / f"{sid}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(lines) or record(sid=sid))
    return path


def indexer(store: Store, *roots: Path) -> Indexer:
    return Indexer(store, SystemClock(), roots=list(roots), max_line_bytes=64 << 20, include_sources=INCLUDE)


def real_claude() -> Path:
    src = SHARED_ROLLOUTS / "claude"
    if not src.is_dir():
        pytest.skip(f"real transcripts not available: {src} is absent (they live in ../shared)")
    return src


async def test_real_claude_tree_one_thread_per_session(system_store: Store, tmp_path: Path) -> None:
    placed = lay_out(real_claude(), tmp_path / "projects")
    ix = indexer(system_store, tmp_path / "projects")
    with capture_logs() as logs:
        summary = await ix.scan()
    assert summary.files_seen == 17
    threads = {t.id: t for t in await system_store.threads.list_all()}
    # 13 sessions; the 4 sub-agent transcripts (3 sub-agents + 1 compaction agent) are files of
    # their parents, never threads.
    assert len(threads) == 13
    assert all(t.agent is Agent.CLAUDE for t in threads.values())
    for name in ("codemie-4c2ddfdc-agent-36541525.jsonl", "codemie-e9fb405b-subagents-agent-a485154.jsonl"):
        file = await system_store.threads.get_file(str(placed[name]))
        assert file is not None and file.error == "subagent" and file.kind == "claude"
        assert file.thread_id in threads and threads[file.thread_id].path != file.path
    compact = await system_store.threads.get_file(str(placed["spotter-4d5611e5-subagents-agent-acompact-e1f845.jsonl"]))
    assert compact is not None and compact.error == "compaction_agent"
    assert not [e for e in logs if e["event"] in ("subagent_without_parent", "duplicate_session")]
    for thread_id in threads:
        await ix.catch_up(thread_id)
    threads = {t.id: t for t in await system_store.threads.list_all()}
    # Hand counts of tests/test_rollout_claude.py::REAL_PROMPTS.
    assert threads["624a4a58-b34c-462d-a70d-13421c8125a8"].user_messages == 14
    assert threads["624a4a58-b34c-462d-a70d-13421c8125a8"].cwd == "/Users/user/repo"
    assert str(threads["1af7fc5e-8455-4414-9ccd-011d40f70b2a"].reason) == "no_user_messages"  # /init only
    assert threads["4d5611e5-241a-462a-8d15-5122611a9569"].eligible
    assert threads["4d5611e5-241a-462a-8d15-5122611a9569"].cli_version == "2.1.39"
    assert threads["ses_stage0_small"].user_messages == 5
    # The composite's custom-title record names it (custom > ai > first prompt > summary).
    assert threads["ses_stage0_small"].title == "Stage0 small fixture"
    # Restart with nothing changed: one stat per file.
    again = await indexer(system_store, tmp_path / "projects").scan()
    assert (again.unchanged, again.indexed) == (17, 0)


async def test_sdk_sessions_are_not_eligible(system_store: Store, tmp_path: Path) -> None:
    session_file(tmp_path, SID, record(entrypoint="sdk-cli"))
    ix = indexer(system_store, tmp_path)
    await ix.scan()
    thread = (await ix.catch_up(SID)).thread  # type: ignore[union-attr]
    assert thread is not None and not thread.eligible and str(thread.reason) == "source:sdk:sdk-cli"


async def test_two_files_with_one_session_id_never_make_two_threads(system_store: Store, tmp_path: Path) -> None:
    first = session_file(tmp_path / "a", SID, record(), record(message={"role": "user", "content": "second"}))
    copy = tmp_path / "b" / "-other" / f"{SID}.jsonl"
    copy.parent.mkdir(parents=True)
    shutil.copyfile(first, copy)
    ix = indexer(system_store, tmp_path / "a", tmp_path / "b")
    with capture_logs() as logs:
        await ix.scan()
    assert [e["path"] for e in logs if e["event"] == "duplicate_session"] == [str(copy)]
    await ix.catch_up(SID)
    (thread,) = await system_store.threads.list_all()
    assert (thread.path, thread.watermark, thread.user_messages) == (str(first), first.stat().st_size, 2)
    # The copy grows: still no second thread, and the thread's watermark stays the first file's.
    with open(copy, "ab") as f:
        f.write(record(message={"role": "user", "content": "third"}))
    await ix.scan()
    await ix.catch_up(SID)
    (thread,) = await system_store.threads.list_all()
    assert (thread.path, thread.watermark, thread.user_messages) == (str(first), first.stat().st_size, 2)
    dup = await system_store.threads.get_file(str(copy))
    assert dup is not None and dup.error == "duplicate_session" and dup.watermark == 0


async def test_appending_to_a_claude_session_reads_only_the_appended_bytes(system_store: Store, tmp_path: Path) -> None:
    facts = generate_claude_session(tmp_path, target_bytes=2_000_000, seed=3, subagents=1)
    ix = indexer(system_store, tmp_path)
    await ix.scan()
    await ix.catch_up(facts.session_id)
    assert ix.last_catch_up_bytes == facts.size_bytes
    before = await system_store.threads.get(facts.session_id)
    assert before is not None and before.user_messages == len(facts.user_messages)
    appended = append_claude_turn(facts, seed=1, target_bytes=2_048)
    await ix.refresh_paths([str(facts.path)])
    after = (await ix.catch_up(facts.session_id)).thread  # type: ignore[union-attr]
    assert ix.last_catch_up_bytes == appended.bytes_appended  # not the 2 MB before it
    assert after is not None and after.user_messages == before.user_messages + 1
    assert after.watermark == facts.size_bytes + appended.bytes_appended
    # The sub-agent transcript growing never touches the thread.
    with open(facts.subagent_paths[0], "ab") as f:
        f.write(facts.subagent_paths[0].read_bytes().splitlines(keepends=True)[-1])
    await ix.refresh_paths([str(facts.subagent_paths[0])])
    assert await system_store.threads.get(facts.session_id) == after


# --- bad input: one clear event per file, no crash, the other files still indexed ------------------


async def test_bad_claude_files(system_store: Store, tmp_path: Path) -> None:
    root = tmp_path / "projects"
    session_file(root, SID)
    bad: dict[str, Path] = {}
    # 1. the first 50 lines carry no sessionId
    no_id = root / "-home-me-app" / "11111111-1111-4111-8111-111111111111.jsonl"
    no_id.write_bytes(
        b"".join(json.dumps({"type": "file-history-snapshot", "messageId": str(n)}).encode() + b"\n" for n in range(50))
        + record(sid="11111111-1111-4111-8111-111111111111")
    )
    bad["no_session_id"] = no_id
    # 2. a sub-agent file without its parent
    orphan_sid = "22222222-2222-4222-8222-222222222222"
    orphan = root / "-home-me-app" / orphan_sid / "subagents" / "agent-a0000001.jsonl"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(record(sid=orphan_sid, isSidechain=True, agentId="a0000001"))
    bad["subagent_without_parent"] = orphan
    # 3. a parent and a sub-agent that disagree on cwd
    drift = root / "-home-me-app" / SID / "subagents" / "agent-a0000002.jsonl"
    drift.parent.mkdir(parents=True)
    drift.write_bytes(record(isSidechain=True, agentId="a0000002", cwd="/somewhere/else"))
    bad["subagent_cwd_differs"] = drift
    # 4. a torn last line
    torn_sid = "33333333-3333-4333-8333-333333333333"
    torn = session_file(root, torn_sid, record(sid=torn_sid), record(sid=torn_sid)[:40])
    # 5. a file of only summary records
    summaries = root / "-home-me-app" / "44444444-4444-4444-8444-444444444444.jsonl"
    summaries.write_bytes(
        b"".join(
            json.dumps({"type": "summary", "summary": f"s{n}", "leafUuid": str(n)}).encode() + b"\n" for n in range(3)
        )
    )
    bad["summaries_only"] = summaries
    # 6. a 2.1.220-style file full of unknown record types
    future_sid = "55555555-5555-4555-8555-555555555555"
    session_file(root, future_sid, *(record(f"hologram-{n}", sid=future_sid, payloadish={"x": n}) for n in range(20)))
    # 7. a sessionId that is not a safe file-name component
    evil_sid = "../../etc/passwd\n"
    evil = root / "-home-me-app" / "66666666-6666-4666-8666-666666666666.jsonl"
    evil.write_bytes(record(sid=evil_sid))

    ix = indexer(system_store, root)
    with capture_logs() as logs:
        await ix.scan()
        for thread in await system_store.threads.list_all():
            await ix.catch_up(thread.id)
    events = {(e["event"], e.get("path")) for e in logs}
    # One clear event names each bad file.
    assert ("file_not_indexed", str(no_id)) in events
    assert ("subagent_without_parent", str(orphan)) in events
    assert ("subagent_cwd_differs", str(drift)) in events
    assert ("file_not_indexed", str(summaries)) in events
    assert (await system_store.threads.get_file(str(no_id))).error == "no_session_id"  # type: ignore[union-attr]
    assert (await system_store.threads.get_file(str(summaries))).error == "no_session_id"  # type: ignore[union-attr]
    threads = {t.id: t for t in await system_store.threads.list_all()}
    # The good session and the others are indexed; sub-agents never became threads.
    assert set(threads) == {SID, torn_sid, future_sid, evil_sid}
    assert threads[SID].cwd == CWD and threads[SID].user_messages == 1
    # The torn line is not consumed: the watermark stops at the last complete line.
    assert threads[torn_sid].watermark == len(record(sid=torn_sid)) and threads[torn_sid].user_messages == 1
    with open(torn, "ab") as f:
        f.write(record(sid=torn_sid)[40:])
    await ix.scan()
    assert (await ix.catch_up(torn_sid)).thread.user_messages == 2  # type: ignore[union-attr]
    # Unknown record types are counted, not fatal; the session simply has no prompt.
    assert str(threads[future_sid].reason) == "no_user_messages"
    assert json.loads(await system_store.threads.stats(future_sid) or "{}")["unknown_lines"] == 20
    # The unsafe id is kept verbatim as the thread id (the trace file name slugs it).
    assert threads[evil_sid].user_messages == 1
    from memd.memory.files import trace_relpath

    assert "/" not in trace_relpath(evil_sid, "fix").removeprefix("trace_summaries/")


# --- idle gate, watermark, project key: the same rules as Codex ---------------------------------


async def test_claude_sessions_follow_the_idle_gate_and_watermark_rules(tmp_path: Path) -> None:
    import os

    from memd.clock import FakeClock
    from memd.schedule.scheduler import Scheduler

    clock = FakeClock(1_767_225_600.0)
    store = await Store.open(tmp_path / "state" / "memd.sqlite3", clock=clock)
    try:
        path = session_file(tmp_path / "projects", SID)
        os.utime(path, (clock.now() - 10, clock.now() - 10))
        ix = Indexer(store, clock, roots=[tmp_path / "projects"], max_line_bytes=1 << 20, include_sources=INCLUDE)
        scheduler = Scheduler(store, ix, clock, min_idle_s=60, max_age_days=30)
        await ix.scan()
        first = await scheduler.plan()
        assert (first.queued, first.idle_wait) == (0, 1)  # inside the idle gate
        clock.advance(60)
        second = await scheduler.plan()
        assert second.queued_ids == [SID]
        job = await store.jobs.get(JobKind.EXTRACT, SID)
        assert job is not None and job.input_watermark == path.stat().st_size
        # The session grows: the job's watermark follows the new bytes once it is quiet again.
        with open(path, "ab") as f:
            f.write(record(message={"role": "user", "content": "and the signup test"}))
        os.utime(path, (clock.now(), clock.now()))
        await ix.refresh_paths([str(path)])
        assert (await scheduler.plan()).idle_wait == 1
        clock.advance(61)
        assert (await scheduler.plan()).queued_ids == [SID]
        job = await store.jobs.get(JobKind.EXTRACT, SID)
        assert job is not None and job.input_watermark == path.stat().st_size
    finally:
        await store.close()


async def test_worktrees_of_one_repository_share_a_project_for_both_agents(system_store: Store, tmp_path: Path) -> None:
    main = tmp_path / "repo"
    (main / ".git" / "worktrees" / "feature").mkdir(parents=True)
    (main / ".git" / "worktrees" / "feature" / "commondir").write_text("../..\n")
    feature = tmp_path / "repo-feature"
    feature.mkdir()
    (feature / ".git").write_text(f"gitdir: {main / '.git' / 'worktrees' / 'feature'}\n")
    claude_root, codex_root = tmp_path / "projects", tmp_path / "sessions"
    session_file(claude_root, SID, record(cwd=str(feature)))
    codex = codex_root / "2026" / "01" / "02" / "rollout-2026-01-02T10-00-00-019b0000-1111-7222-8333-444455556666.jsonl"
    codex.parent.mkdir(parents=True)
    payload = {"id": "019b0000-1111-7222-8333-444455556666", "cwd": str(main), "source": "cli"}
    codex.write_text(
        json.dumps({"timestamp": "2026-01-02T10:00:00Z", "type": "session_meta", "payload": payload}) + "\n"
    )
    await indexer(system_store, claude_root, codex_root).scan()
    threads = {t.agent: t for t in await system_store.threads.list_all()}
    assert threads[Agent.CLAUDE].project == threads[Agent.CODEX].project == str(main.resolve())
