"""Input building from Claude Code transcripts (SPEC §6.2, §15): every user message, command and
error is kept, tool errors without exit codes are marked, and the model input is at most a third
of the raw JSON of the same items on the real Claude files."""

from __future__ import annotations

import json
import re

import orjson
import pytest

from memd.extract.input_builder import build_input
from memd.rollout.claude import parse_claude_bytes, real_prompt
from memd.rollout.records import ToolCall, ToolOutput
from tests.conftest import SHARED_ROLLOUTS

CLAUDE_ROLLOUTS = SHARED_ROLLOUTS / "claude"

BASE = {"sessionId": "5f0c1d2e-0000-4000-8000-000000000001", "cwd": "/app", "isSidechain": False}


def _lines(*objs: dict) -> bytes:
    return b"".join(orjson.dumps({**BASE, **o}) + b"\n" for o in objs)


def test_tool_errors_without_exit_codes_render_as_errors() -> None:
    data = _lines(
        {"type": "user", "message": {"role": "user", "content": "fix it"}},
        {
            "type": "assistant",
            "message": {
                "id": "m1",
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": "b1", "name": "Bash", "input": {"command": "npm test"}},
                    {
                        "type": "tool_use",
                        "id": "e1",
                        "name": "Edit",
                        "input": {"file_path": "/app/a.js", "old_string": "a", "new_string": "b"},
                    },
                    {"type": "tool_use", "id": "g1", "name": "Grep", "input": {"pattern": "x"}},
                ],
            },
        },
        {
            "type": "user",
            "message": {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "b1", "content": "Permission denied", "is_error": True}
                ],
            },
        },
        {
            "type": "user",
            "message": {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "e1",
                        "content": "<tool_use_error>File has not been read yet.</tool_use_error>",
                        "is_error": True,
                    }
                ],
            },
        },
        {
            "type": "user",
            "message": {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "g1", "content": "No files found", "is_error": True}
                ],
            },
        },
    )
    text = build_input(parse_claude_bytes(data)).text
    assert "$ npm test\n  Permission denied\nerror" in text
    assert "patch: /app/a.js (+1 -1)" in text and "patch failed:\n  <tool_use_error>File has not been read yet." in text
    assert 'tool Grep: {"pattern":"x"}\n  No files found\nerror' in text


def test_real_claude_input_keeps_prompts_commands_errors_within_a_third() -> None:
    if not CLAUDE_ROLLOUTS.is_dir():
        pytest.skip(f"real transcripts not available: {CLAUDE_ROLLOUTS} is absent")
    text_bytes = raw_bytes = 0
    for path in sorted(CLAUDE_ROLLOUTS.glob("*.jsonl")):
        data = path.read_bytes()
        parsed = parse_claude_bytes(data)
        built = build_input(parsed)
        text_bytes += built.text_bytes
        raw_bytes += built.raw_json_bytes
        records = [json.loads(line) for line in data.splitlines() if line.strip()]
        for prompt in filter(None, map(real_prompt, records)):
            assert f"user: {prompt.strip()[:200]}" in built.text, (path.name, prompt[:60])
        for item in parsed.items:
            if isinstance(item, ToolCall) and item.kind == "shell" and item.command:
                assert f"$ {item.command.strip()[:200]}" in built.text, (path.name, item.command[:60])
        # Every tool error is visible: a failed patch, an exit code, or an "error" line.
        patch_calls = {c.call_id for c in parsed.items if isinstance(c, ToolCall) and c.kind == "patch"}
        errors = [o for o in parsed.items if isinstance(o, ToolOutput) and o.is_error]
        patch_errors = sum(o.call_id in patch_calls for o in errors)
        coded = sum(o.call_id not in patch_calls and o.exit_code is not None for o in errors)
        uncoded = len(errors) - patch_errors - coded
        assert built.text.count("patch failed:") == patch_errors, path.name
        assert len(re.findall(r"^error$", built.text, re.M)) == uncoded, path.name
        assert len(re.findall(r"^exit [1-9]\d*$", built.text, re.M)) >= coded, path.name
        assert built.omitted_items == 0, path.name  # all of them fit the default budget
    ratio = text_bytes / raw_bytes
    print(f"input_ratio_real_claude={ratio:.3f} ({text_bytes} / {raw_bytes} bytes)")
    assert ratio <= 1 / 3


def test_the_model_prompt_names_the_agent() -> None:
    from memd.extract.base import ExtractionRequest
    from memd.extract.openai_extractor import render_prompt

    built = build_input(parse_claude_bytes(_lines({"type": "user", "message": {"role": "user", "content": "hi"}})))
    request = ExtractionRequest(
        thread_id=BASE["sessionId"],
        project="/app",
        cwd="/app",
        rollout_path="/x.jsonl",
        updated_at=0.0,
        agent="Claude Code 2.1.39",
        model="claude-sonnet-4-5",
        built=built,
    )
    _, user = render_prompt(request, built)
    assert "Agent: Claude Code 2.1.39 (model claude-sonnet-4-5)" in user
    assert "`assistant:` for the agent (Claude Code 2.1.39)" in user and "`error` marks a tool call" in user
