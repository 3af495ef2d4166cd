"""Feedback-loop guard (SPEC §18): memory memd injected into a session is never learned back from it."""

from __future__ import annotations

import json

from memd.extract.base import ExtractionRequest
from memd.extract.input_builder import build_input
from memd.extract.offline import extract_offline
from memd.rollout.codex import parse_line
from memd.rollout.records import ToolCall
from memd.rollout.session import parse_rollout_bytes, real_user_messages

BLOCK = (
    '<memd-context project="/src/demo" updated="2026-11-20T10:00:00Z" sessions="3">\n'
    "# Memory of /src/demo (memd)\n"
    "## Handbook (MEMORY.md)\n### Recent tasks\n"
    "- 2026-11-20 Add a pause button to the zanzibar timer — partial\n"
    "</memd-context>"
)


def line(kind: str, payload: dict[str, object], ts: str = "2026-11-29T10:00:00.000Z") -> str:
    return json.dumps({"timestamp": ts, "type": kind, "payload": payload})


def message(role: str, text: str) -> str:
    return line("response_item", {"type": "message", "role": role, "content": [{"type": "input_text", "text": text}]})


def rollout(*lines: str) -> bytes:
    meta = line(
        "session_meta",
        {
            "id": "019e0000-0000-7000-8000-000000000001",
            "timestamp": "2026-11-29T10:00:00Z",
            "cwd": "/src/demo",
            "originator": "codex_cli_rs",
            "cli_version": "0.171.0",
            "source": "cli",
        },
    )
    return ("\n".join([meta, *lines]) + "\n").encode()


def extract(data: bytes) -> str:
    parsed = parse_rollout_bytes(data)
    request = ExtractionRequest(
        thread_id="t1",
        project="/src/demo",
        cwd="/src/demo",
        rollout_path="/x.jsonl",
        updated_at=1.8e9,
        agent="codex",
        model="gpt-5",
        built=build_input(parsed),
    )
    return extract_offline(request)[0]


def test_a_later_session_keeps_its_own_request_and_does_not_relearn_the_injected_tasks() -> None:
    data = rollout(
        message("developer", BLOCK),  # the SessionStart hook's additionalContext, as Codex 0.171 records it
        message("user", BLOCK),  # the user pasted it
        line("event_msg", {"type": "user_message", "message": BLOCK}),
        message("user", "add a dark mode toggle"),
        line("event_msg", {"type": "user_message", "message": "add a dark mode toggle"}),
        line(
            "response_item",
            {
                "type": "function_call",
                "name": "shell",
                "call_id": "c1",
                "arguments": json.dumps({"command": ["memd", "context"]}),
            },
        ),
        line(
            "response_item",
            {
                "type": "function_call_output",
                "call_id": "c1",
                "output": json.dumps({"output": "$ memd context\n" + BLOCK, "metadata": {"exit_code": 0}}),
            },
        ),
        message("assistant", "Added the toggle in `theme.js`."),
    )
    parsed = parse_rollout_bytes(data)
    assert [m.text for m in real_user_messages(parsed.items)] == ["add a dark mode toggle"]
    built = build_input(parsed)
    assert "zanzibar" not in built.text and "memd-context" not in built.text
    assert "add a dark mode toggle" in built.text
    trace = extract(data)
    assert "dark mode toggle" in trace and "zanzibar" not in trace and "pause button" not in trace


def test_a_session_whose_only_user_text_was_injected_memory_has_no_real_user_message() -> None:
    data = rollout(
        message("user", BLOCK),
        line("event_msg", {"type": "user_message", "message": "\n" + BLOCK + "\n"}),
        message("assistant", "Noted."),
    )
    assert real_user_messages(parse_rollout_bytes(data).items) == []


def test_codex_namespace_tool_calls_get_their_mcp_name() -> None:
    # Codex 0.171 records an MCP call as a namespace tool call (seen in a real run against memd mcp).
    raw = line(
        "response_item",
        {
            "type": "function_call",
            "name": "memory_search",
            "namespace": "mcp__memd",
            "arguments": '{"query": "jest"}',
            "call_id": "call_1",
        },
    )
    [call] = parse_line(raw.encode()).items
    assert isinstance(call, ToolCall) and call.name == "mcp__memd__memory_search"
    old = line(
        "response_item", {"type": "function_call", "name": "mcp__memd__memory_read", "arguments": "{}", "call_id": "c"}
    )
    assert parse_line(old.encode()).items[0].name == "mcp__memd__memory_read"  # type: ignore[union-attr]
