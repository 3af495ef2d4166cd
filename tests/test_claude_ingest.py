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
