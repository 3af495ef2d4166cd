"""Acceptance: ``memd once`` on the real Claude Code transcripts laid out as Claude Code does
(SPEC §3.4), then ``memd status --json``: one thread per session, sub-agents attached, traces
that name the agent."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from memd.memory.files import parse_trace_file
from tests.builders import run_memd
from tests.claude_layout import lay_out
from tests.conftest import SHARED_ROLLOUTS


def test_memd_once_on_real_claude_sessions(tmp_path: Path) -> None:
    src = SHARED_ROLLOUTS / "claude"
    if not src.is_dir():
        pytest.skip(f"real transcripts not available: {src} is absent (they live in ../shared)")
    tree = tmp_path / "projects"
    lay_out(src, tree)
    home = tmp_path / "home"
    done = run_memd(home, "once", "--sessions", str(tree), "--min-idle", "0", "--max-age-days", "0", timeout_s=300)
    assert done.returncode == 0, done.stderr[-2000:]
    status = run_memd(home, "status", "--json")
    report = json.loads(status.stdout)
    threads = {t["id"]: t for t in report["threads"]}
    # 17 files: 13 sessions, 3 sub-agent transcripts and 1 compaction agent (never threads).
    assert len(threads) == 13 and {t["agent"] for t in threads.values()} == {"claude"}
    # The only session without a real prompt is the /init-only one (hand count, test_rollout_claude).
    assert [t["id"] for t in threads.values() if not t["eligible"]] == ["1af7fc5e-8455-4414-9ccd-011d40f70b2a"]
    assert {t["state"] for t in threads.values() if t["eligible"]} == {"done"}
    # A Bash call the user rejected (is_error, no exit code) is a failure: spotter-short.jsonl's only
    # task ends so (read off the file: the two tool_results are rejections, then an interrupt).
    short = next((home / "data" / "memd" / "projects").glob("*/memory/trace_summaries/55604662-*.md"), None) or next(
        (home / "data" / "memd" / "projects").glob("*/memory/trace_summaries/55604662_*.md")
    )
    assert "Outcome: fail" in short.read_text()
    traces = sorted((home / "data" / "memd" / "projects").glob("*/memory/trace_summaries/*.md"))
    assert traces
    for path in traces:
        header, body = parse_trace_file(path.read_text())
        assert header.agent == "claude" and header.thread_id in threads
        assert re.search(r"^Trace context: .*, Claude Code \d+\.\d+\.\d+, ", body, re.M), path.name
