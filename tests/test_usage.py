"""The usage signal (SPEC §18): memd tool calls and Codex citations in later transcripts."""

from __future__ import annotations

import json
from pathlib import Path

from memd.read.context import memory_root_of
from memd.read.usage import citation_uses, tool_uses
from memd.rollout.records import AssistantMessage, ToolCall, ToolOutput
from memd.store.search import SearchIndex, entry_key

SEARCH_ANSWER = {
    "project": "/home/me/app",
    "memory_root": "/m/x/memory",
    "hits": [
        {
            "path": "MEMORY.md",
            "line_start": 4,
            "line_end": 4,
            "kind": "memory",
            "heading": "Start here",
            "snippet": "- Run the tests with `npx jest`.",
            "entry": "aaaa",
            "session_ids": [],
            "date": None,
        },
        {
            "path": "trace_summaries/t1_x.md",
            "line_start": 9,
            "line_end": 12,
            "kind": "trace",
            "heading": "Task: a",
            "snippet": "...",
            "entry": "",
            "session_ids": ["t1"],
            "date": "2026-01-02",
        },
    ],
    "next_cursor": None,
    "note": None,
}
READ_ANSWER = {
    "project": "/home/me/app",
    "path": "MEMORY.md",
    "line_offset": 1,
    "lines_returned": 4,
    "total_lines": 4,
    "text": "## Start here\n- Run the tests with `npx jest`.\n  (twice)\n- API in `api/server.py`.",
    "truncated": False,
    "next_offset": None,
}


def call(call_id: str, name: str) -> ToolCall:
    return ToolCall(call_id=call_id, name=name, kind="mcp", arguments="{}", ts=10.0)


def test_search_and_read_calls_in_any_encoding_become_uses() -> None:
    items = [
        call("c1", "mcp__memd__memory_search"),
        ToolOutput(call_id="c1", output=json.dumps(SEARCH_ANSWER), ts=11.0),  # structured JSON as text
        call("c2", "mcp__memd__memory_read"),
        ToolOutput(call_id="c2", output=json.dumps({"content": [{"type": "text", "text": json.dumps(READ_ANSWER)}]})),
        call("c3", "mcp__memd__memory_read"),
        ToolOutput(
            call_id="c3",
            output=json.dumps(
                [
                    {
                        "type": "text",
                        "text": json.dumps({**READ_ANSWER, "path": "trace_summaries/t1_x.md", "text": "whatever"}),
                    }
                ]
            ),
        ),  # Claude tool_result blocks
        call("c4", "mcp__memd__memory_list"),
        ToolOutput(call_id="c4", output=json.dumps({"project": "/home/me/app", "files": []})),
        call("c5", "mcp__other__memory_search"),
        ToolOutput(call_id="c5", output=json.dumps(SEARCH_ANSWER)),
        call("c6", "mcp__memd__memory_read"),
        ToolOutput(call_id="c6", output="Error executing tool memory_read: path leaves the memory root"),
    ]
    events = tool_uses(items, thread_id="later", default_ts=99.0)
    assert [(e.path, e.entry, e.event_id, e.used_at) for e in events] == [
        ("MEMORY.md", "aaaa", "c1#0", 11.0),
        ("trace_summaries/t1_x.md", "", "c1#1", 11.0),
        (
            "MEMORY.md",
            entry_key("- Run the tests with `npx jest`.\n  (twice)"),
            f"c2#{entry_key('- Run the tests with `npx jest`. (twice)')}",
            10.0,
        ),
        ("MEMORY.md", entry_key("- API in `api/server.py`."), f"c2#{entry_key('- API in `api/server.py`.')}", 10.0),
        ("trace_summaries/t1_x.md", "", "c3", 10.0),
    ]
    assert {e.project for e in events} == {"/home/me/app"} and {e.thread_id for e in events} == {"later"}
    index = SearchIndex.scratch()
    assert index.record_uses(events) == 5
    assert index.record_uses(tool_uses(items, thread_id="later", default_ts=99.0)) == 0  # read again: no double count
    assert index.usage("/home/me/app")[("trace_summaries/t1_x.md", "")].usage_count == 2


def test_codex_citations_of_memd_files_and_traces_count_codex_own_files_do_not(tmp_path: Path) -> None:
    memory_dir = tmp_path / "projects"
    root = memory_root_of(memory_dir, "/home/me/app")
    (root / "trace_summaries").mkdir(parents=True)
    (root / "PROJECT").write_text("/home/me/app\n")
    (root / "MEMORY.md").write_text("# m\n\n## Start here\n- first fact\n- second fact\n- third fact\n")
    (root / "trace_summaries" / "019b7f94-51b4-7593-922e-ba12b5b73b52_pause.md").write_text("x")
    text = (
        "Done.\n<oai-mem-citation>\n<citation_entries>\n"
        f"{root}/MEMORY.md:5-6|note=[second and third]\n"
        "MEMORY.md:1-3|note=[codex's own memory]\n"
        "/etc/passwd:1-1|note=[not memd]\n"
        "</citation_entries>\n<rollout_ids>\n019b7f94-51b4-7593-922e-ba12b5b73b52\n../../etc\n</rollout_ids>\n"
        "</oai-mem-citation>"
    )
    events = citation_uses(
        [AssistantMessage(text=text, ts=50.0)],
        thread_id="s2",
        memory_dir=memory_dir,
        project_root=root,
        project="/home/me/app",
        default_ts=1.0,
    )
    assert [(e.path, e.entry) for e in events] == [
        ("MEMORY.md", entry_key("- second fact")),
        ("MEMORY.md", entry_key("- third fact")),
        ("trace_summaries/019b7f94-51b4-7593-922e-ba12b5b73b52_pause.md", ""),
    ]
    assert all(e.project == "/home/me/app" and e.used_at == 50.0 for e in events)
