"""Claude Code transcript parsing (SPEC §3.4): the real-prompt rule over every real file, and the
record mapping on small hand-written lines.

Facts about the real files in ``../shared/rollouts/claude`` were read off the files with jq (the
command is given beside each figure), never taken from memd's output.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from memd.rollout.claude import (
    HEAD_LINES,
    ClaudeParser,
    UsageTally,
    parse_claude_bytes,
    real_prompt,
    session_meta,
    source_of_entrypoint,
    total_usage,
)
from memd.rollout.records import (
    Agent,
    AssistantMessage,
    Compaction,
    Reasoning,
    TitleCandidate,
    TokenUsage,
    ToolCall,
    ToolOutput,
    TurnContext,
    TurnEvent,
    UserMessage,
)
from tests.conftest import SHARED_ROLLOUTS

CLAUDE_ROLLOUTS = SHARED_ROLLOUTS / "claude"


def claude_file(name: str) -> Path:
    """One real Claude Code transcript by file name; skips the calling test when absent."""
    path = CLAUDE_ROLLOUTS / name
    if not path.is_file():
        pytest.skip(f"real transcripts not available: {path} is absent (they live in ../shared)")
    return path


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def lines(*objs: dict[str, Any]) -> bytes:
    return b"".join(orjson.dumps(o) + b"\n" for o in objs)


def parse(*objs: dict[str, Any]):  # type: ignore[no-untyped-def]
    return parse_claude_bytes(lines(*objs))


BASE = {"sessionId": "5f0c1d2e-0000-4000-8000-000000000001", "cwd": "/home/me/app", "version": "2.1.7"}


def user(content: Any, **extra: Any) -> dict[str, Any]:
    return {**BASE, "type": "user", "isSidechain": False, "message": {"role": "user", "content": content}, **extra}


def assistant(blocks: list[dict[str, Any]], *, mid: str = "msg_1", rid: str = "req_1", **extra: Any) -> dict[str, Any]:
    usage = extra.pop("usage", {"input_tokens": 10, "output_tokens": 5})
    msg = {"id": mid, "role": "assistant", "model": "claude-sonnet-4-5", "content": blocks, "usage": usage}
    return {**BASE, "type": "assistant", "isSidechain": False, "requestId": rid, "message": msg, **extra}


def tool_result(call_id: str, content: Any, *, is_error: bool | None = None, **extra: Any) -> dict[str, Any]:
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": call_id, "content": content}
    if is_error is not None:
        block["is_error"] = is_error
    return user([block], **extra)


def tool_use(call_id: str, name: str, **input: Any) -> dict[str, Any]:
    return {"type": "tool_use", "id": call_id, "name": name, "input": input}


# --- the real-prompt rule, over every real file --------------------------------------------------
#
# How each count was read: for each file,
#   jq -c 'select(.type=="user" and (.isSidechain|not)) | [input_line_number, .isMeta,
#          .isCompactSummary, (content as text, or the list of block types)]' FILE
# dropping records whose content holds a tool_result, then reading every remaining record against
# the rule of SPEC §3.4 (the line numbers of the records that count are listed).
REAL_PROMPTS: list[tuple[str, int, str]] = [
    # composite: lines 49, 60, 62, 63, 87 ("[trimmed for fixture]" text, not sidechain, not meta);
    # "Hello" (line 7) is isSidechain, line 19 is the isCompactSummary.
    ("agentsessions-stage0-claude-small.jsonl", 5, "trimmed composite"),
    # lines 1, 25, 76; 122 is the isMeta caveat, 123/124 are <bash-input>/<bash-stdout>.
    ("aisessions-claude-code-pomodoro-timer.jsonl", 3, "3 typed prompts"),
    # line 1 is /init without <command-args>, line 2 its isMeta expansion: no request.
    ("ccviewer-1af7fc5e-8455-4414-9ccd-011d40f70b2a.jsonl", 0, "/init only"),
    # line 2 /orchestrator with args "create TODO app by Next.js", line 434 a typed prompt;
    # line 3 is isMeta; the other 161 user records are isSidechain.
    ("ccviewer-fe5e1c67-53e7-4862-81ae-d0e013e3270b.jsonl", 2, "command args + prompt"),
    # lines 6,116,131,137,141,148,164,192,196,200,204,208,212; 2 caveat (isMeta), 3 /clear,
    # 4 <local-command-stdout>.
    ("codemie-196820da-1026-4b6f-a513-a6aae42da1a6.jsonl", 13, "/clear then 13 prompts"),
    # the 2.0.x warm-up sub-agent: its one user record ("Warmup") is isSidechain.
    ("codemie-4c2ddfdc-agent-36541525.jsonl", 0, "sub-agent"),
    # lines 2, 15, 22.
    ("codemie-4c2ddfdc-b619-4525-8d03-1950fb1b0257.jsonl", 3, "3 prompts"),
    # lines 6,29,44,62,69,81,106,113,133,150,171,175,179,183; 67/111/148 are
    # "[Request interrupted by user]", 159 the isCompactSummary, 2-4 caveat + /clear + stdout.
    ("codemie-624a4a58-b34c-462d-a70d-13421c8125a8.jsonl", 14, "compaction, interrupts"),
    # lines 2, 24, 33; 22 is "[Request interrupted by user for tool use]".
    ("codemie-9eda1058-9706-484a-b992-d03f9cfa2546.jsonl", 3, "3 prompts"),
    # line 3.
    ("codemie-e9fb405b-169f-40eb-9396-7e75076f045d.jsonl", 1, "1 prompt"),
    # every record isSidechain.
    ("codemie-e9fb405b-subagents-agent-a485154.jsonl", 0, "sub-agent"),
    # lines 7, 280; 755 is the isCompactSummary, 1502 a <task-notification>.
    ("spotter-4d5611e5-241a-462a-8d15-5122611a9569.jsonl", 2, "compaction, task notification"),
    ("spotter-4d5611e5-subagents-agent-a2898e3.jsonl", 0, "sub-agent"),
    # 3 isMeta + 1 isSidechain prompt to the summariser.
    ("spotter-4d5611e5-subagents-agent-acompact-e1f845.jsonl", 0, "compaction agent"),
    # line 4; 13 is an interrupt marker.
    ("spotter-short.jsonl", 1, "1 prompt"),
    # line 4 (/handgemacht:create-beads with args), 71; 5 isMeta body, 69 interrupt.
    ("spotter-subagent.jsonl", 2, "command args + prompt"),
    # lines 4, 26; 18/39 interrupts, 20 caveat (isMeta), 21 /mcp (empty args), 22 stdout.
    ("spotter-tool_heavy.jsonl", 2, "local command between prompts"),
]


def test_the_table_covers_every_real_claude_file() -> None:
    if not CLAUDE_ROLLOUTS.is_dir():
        pytest.skip(f"real transcripts not available: {CLAUDE_ROLLOUTS} is absent")
    on_disk = sorted(p.name for p in CLAUDE_ROLLOUTS.glob("*.jsonl"))
    assert sorted(name for name, _, _ in REAL_PROMPTS) == on_disk


@pytest.mark.parametrize(("name", "expected", "what"), REAL_PROMPTS, ids=[n for n, _, _ in REAL_PROMPTS])
def test_real_prompts_of_every_real_file(name: str, expected: int, what: str) -> None:
    path = claude_file(name)
    prompts = [p for p in (real_prompt(r) for r in records(path)) if p is not None]
    assert len(prompts) == expected, what
    parsed = parse_claude_bytes(path.read_bytes())
    real = [i for i in parsed.items if isinstance(i, UserMessage) and not i.injected]
    assert [m.text for m in real] == prompts  # the parser applies the same one rule


def test_slash_command_args_are_the_request() -> None:
    parsed = parse_claude_bytes(claude_file("ccviewer-fe5e1c67-53e7-4862-81ae-d0e013e3270b.jsonl").read_bytes())
    real = [i.text for i in parsed.items if isinstance(i, UserMessage) and not i.injected]
    assert real == ["create TODO app by Next.js", "Thanks! Please update CLAUDE.md for current changes"]
    # The expanded command body (isMeta) is injected text, never a request.
    injected = [i.text for i in parsed.items if isinstance(i, UserMessage) and i.injected]
    assert any(t.startswith("Split complex tasks into independent subtasks") for t in injected)


@pytest.mark.parametrize(
    ("content", "extra", "expected"),
    [
        ("fix the login test", {}, "fix the login test"),
        ("<command-name>/review</command-name>\n<command-args>the auth module</command-args>", {}, "the auth module"),
        ("<command-message>review</command-message>\n<command-name>/review</command-name>", {}, None),
        ("<command-name>/clear</command-name>\n<command-args>everything</command-args>", {}, None),
        ("<command-name>/exit</command-name>\n<command-args>now</command-args>", {}, None),
        ("Caveat: The messages below were generated by the user while running local commands.", {}, None),
        ("<local-command-caveat>Caveat: ...</local-command-caveat>", {}, None),
        ("<local-command-stdout>Kept model</local-command-stdout>", {}, None),
        ("<local-command-stderr>oops</local-command-stderr>", {}, None),
        ("<bash-input>ls</bash-input>", {}, None),
        ("<bash-stdout>a</bash-stdout><bash-stderr></bash-stderr>", {}, None),
        ("<task-notification>\n<task-id>b1</task-id></task-notification>", {}, None),
        ("<system-reminder>remember</system-reminder>", {}, None),
        ("<ide_opened_file>The user opened x.py</ide_opened_file>", {}, None),
        ("<ide_selection>lines 3-4</ide_selection>", {}, None),
        ("[Request interrupted by user]", {}, None),
        ("[Request interrupted by user for tool use]", {}, None),
        ("Please analyze this codebase", {"isMeta": True}, None),
        ("This session is being continued from a previous conversation", {"isCompactSummary": True}, None),
        ("Warmup", {"isSidechain": True}, None),
        ([{"type": "text", "text": "<ide_selection>x</ide_selection>"}, {"type": "text", "text": "why?"}], {}, "why?"),
        ([{"type": "image", "source": {}}, {"type": "text", "text": "what is this"}], {}, "what is this"),
        ([{"type": "image", "source": {}}], {}, None),
        ([{"type": "tool_result", "tool_use_id": "t", "content": "ok"}], {}, None),
        ("run it\n<system-reminder>injected</system-reminder>", {}, "run it"),
        ('<memd-context project="/a">\nmemory\n</memd-context>', {}, None),
        ('<memd-context project="/a">\nmemory\n</memd-context>\nnow add a test', {}, "now add a test"),
    ],
)
def test_real_prompt_rule(content: Any, extra: dict[str, Any], expected: str | None) -> None:
    assert real_prompt(user(content, **extra)) == expected


def test_only_user_records_can_be_prompts() -> None:
    assert real_prompt({"type": "assistant", "message": {"content": "hi"}}) is None
    assert real_prompt({"type": "summary", "summary": "hi"}) is None
    assert real_prompt({"type": "user", "message": "not an object"}) is None


# --- assistant messages, usage ------------------------------------------------------------------


def test_lines_sharing_a_message_id_are_one_message() -> None:
    first = assistant([{"type": "text", "text": "First part."}], mid="msg_A")
    thinking = assistant([{"type": "thinking", "thinking": "secret reasoning", "signature": "x"}], mid="msg_A")
    second = assistant([{"type": "text", "text": "Second part."}], mid="msg_A")
    other = assistant([{"type": "text", "text": "Another message."}], mid="msg_B", rid="req_2")
    parsed = parse(user("explain"), first, thinking, second, other)
    texts = [i.text for i in parsed.items if isinstance(i, AssistantMessage)]
    assert texts == ["First part.\nSecond part.", "Another message."]
    # The merged message carries the bytes of both text lines (input-ratio accounting); usage and
    # model items carry none.
    index = next(n for n, i in enumerate(parsed.items) if isinstance(i, AssistantMessage))
    assert parsed.item_line_bytes[index] == len(lines(first)) + len(lines(second))
    aux = [n for n, i in enumerate(parsed.items) if isinstance(i, (TokenUsage, TurnContext))]
    assert aux and all(parsed.item_line_bytes[n] == 0 for n in aux)


def test_thinking_is_dropped() -> None:
    parsed = parse(
        assistant([{"type": "thinking", "thinking": "let me think", "signature": "s"}]),
        assistant([{"type": "redacted_thinking", "data": "xx"}]),
    )
    assert not [i for i in parsed.items if isinstance(i, (AssistantMessage, Reasoning))]
    assert "let me think" not in repr(parsed.items)


def test_usage_is_counted_once_per_message_and_request() -> None:
    parsed = parse(
        assistant([{"type": "text", "text": "a"}], mid="m1", rid="r1", usage={"input_tokens": 3, "output_tokens": 4}),
        assistant(
            [tool_use("t1", "Read", file_path="/x")], mid="m1", rid="r1", usage={"input_tokens": 3, "output_tokens": 4}
        ),
        assistant(
            [tool_use("t2", "Read", file_path="/y")], mid="m1", rid="r1", usage={"input_tokens": 3, "output_tokens": 90}
        ),
        assistant(
            [{"type": "text", "text": "b"}],
            mid="m2",
            rid="r2",
            usage={"input_tokens": 7, "output_tokens": 1, "cache_read_input_tokens": 100},
        ),
        # the same message id under another request (a retry) is another response
        assistant([{"type": "text", "text": "c"}], mid="m2", rid="r3", usage={"input_tokens": 7, "output_tokens": 1}),
    )
    tally = total_usage(parsed.items)
    assert (tally.input_tokens, tally.output_tokens, tally.cache_read_tokens) == (3 + 7 + 7, 90 + 1 + 1, 100)


def test_usage_tally_resumes_across_chunks() -> None:
    items = [
        TokenUsage("m1", "r1", 3, 4),
        TokenUsage("m1", "r1", 3, 50),
        TokenUsage("m2", "r2", 1, 1),
    ]
    whole = UsageTally()
    for it in items:
        whole.add(it)
    first = UsageTally()
    first.add(items[0])
    resumed = UsageTally.from_obj(json.loads(json.dumps(first.to_obj())))
    for it in items[1:]:
        resumed.add(it)
    assert resumed.to_obj() == whole.to_obj()
    assert (whole.input_tokens, whole.output_tokens) == (4, 51)
    assert UsageTally.from_obj({"input_tokens": "x", "recent": [["k", 1]]}).to_obj() == UsageTally().to_obj()


def test_usage_on_a_real_bedrock_session() -> None:
    # Bedrock responses have no requestId and a growing output_tokens on later lines; read with
    #   jq -s '[.[]|select(.type=="assistant" and .message.usage)|{k:(.message.id+"/"+(.requestId//"")),
    #          o:.message.usage.output_tokens,i:.message.usage.input_tokens}]|group_by(.k)
    #          |{out:(map(map(.o)|max)|add),inp:(map(map(.i)|max)|add)}'
    parsed = parse_claude_bytes(claude_file("codemie-4c2ddfdc-b619-4525-8d03-1950fb1b0257.jsonl").read_bytes())
    tally = total_usage(parsed.items)
    assert (tally.input_tokens, tally.output_tokens) == (33, 806)


def test_model_changes_become_turn_contexts() -> None:
    first = assistant([{"type": "text", "text": "a"}], mid="m1")
    second = assistant([{"type": "text", "text": "b"}], mid="m2")
    second["message"]["model"] = "claude-opus-4-6"
    synthetic = assistant([{"type": "text", "text": "c"}], mid="m3")
    synthetic["message"]["model"] = "<synthetic>"
    parsed = parse(first, second, synthetic)
    assert [i.model for i in parsed.items if isinstance(i, TurnContext)] == ["claude-sonnet-4-5", "claude-opus-4-6"]


def test_api_error_message_is_an_error_event() -> None:
    parsed = parse(assistant([{"type": "text", "text": "API Error: 529 overloaded"}], isApiErrorMessage=True))
    assert [(i.type, i.text) for i in parsed.items if isinstance(i, TurnEvent)] == [
        ("error", "API Error: 529 overloaded")
    ]
    assert not [i for i in parsed.items if isinstance(i, AssistantMessage)]


# --- tool calls and results ---------------------------------------------------------------------


def test_tool_use_and_tool_result_mapping() -> None:
    parsed = parse(
        assistant(
            [
                tool_use("b1", "Bash", command="pytest -q", description="run tests"),
                tool_use("e1", "Edit", file_path="/app/a.py", old_string="x = 1\ny = 2", new_string="x = 3"),
                tool_use("w1", "Write", file_path="/app/new.md", content="# Title\nbody\n"),
                tool_use(
                    "m1",
                    "MultiEdit",
                    file_path="/app/b.py",
                    edits=[{"old_string": "a", "new_string": "b"}, {"old_string": "c", "new_string": "d"}],
                ),
                tool_use("n1", "NotebookEdit", notebook_path="/app/nb.ipynb", new_source="print(1)"),
                tool_use("r1", "Read", file_path="/app/a.py"),
                tool_use("s1", "WebSearch", query="xterm.js tmux scroll"),
                tool_use("p1", "mcp__memd__memory_search", query="auth"),
            ]
        ),
        tool_result(
            "b1", "Exit code 1\nFAILED test_a\n<system-reminder>\nbe careful\n</system-reminder>", is_error=True
        ),
        tool_result("e1", "<tool_use_error>File has not been read yet.</tool_use_error>", is_error=True),
        tool_result("w1", [{"type": "text", "text": "File created successfully at: /app/new.md"}]),
        tool_result("r1", "     1→x = 1\n\n<system-reminder>\nconsider malware\n</system-reminder>\n"),
    )
    calls = {c.call_id: c for c in parsed.items if isinstance(c, ToolCall)}
    assert (calls["b1"].kind, calls["b1"].command) == ("shell", "pytest -q")
    assert {cid: calls[cid].patch_files for cid in ("e1", "w1", "m1", "n1")} == {
        "e1": ("/app/a.py",),
        "w1": ("/app/new.md",),
        "m1": ("/app/b.py",),
        "n1": ("/app/nb.ipynb",),
    }
    assert all(calls[cid].kind == "patch" for cid in ("e1", "w1", "m1", "n1"))
    assert calls["e1"].arguments.splitlines()[1:5] == ["*** Update File: /app/a.py", "@@", "-x = 1", "-y = 2"]
    assert "*** Add File: /app/new.md\n+# Title\n+body" in calls["w1"].arguments
    assert calls["m1"].arguments.count("@@") == 2
    assert (calls["r1"].kind, json.loads(calls["r1"].arguments)) == ("other", {"file_path": "/app/a.py"})
    assert (calls["s1"].kind, calls["s1"].arguments) == ("web_search", "xterm.js tmux scroll")
    assert calls["p1"].kind == "mcp"

    outputs = {o.call_id: o for o in parsed.items if isinstance(o, ToolOutput)}
    assert (outputs["b1"].is_error, outputs["b1"].exit_code) == (True, 1)
    assert "system-reminder" not in outputs["b1"].output and "be careful" not in outputs["b1"].output
    assert outputs["b1"].output.startswith("Exit code 1\nFAILED test_a")
    assert (outputs["e1"].is_error, outputs["e1"].exit_code) == (True, None)  # a failure without exit code
    assert (outputs["w1"].is_error, outputs["w1"].output) == (False, "File created successfully at: /app/new.md")
    assert "consider malware" not in outputs["r1"].output and outputs["r1"].output.startswith("     1→x = 1")


@pytest.mark.parametrize(
    ("content", "is_error", "tool_use_result", "exit_code"),
    [
        ("ok\n", False, {"stdout": "ok", "interrupted": False}, 0),
        ("", False, None, 0),
        ("Exit code 2\nnope", True, None, 2),
        ("The user doesn't want to proceed with this tool use.", True, None, None),
        ("Command running in background with ID: bash_1", False, {"backgroundTaskId": "bash_1"}, None),
        ("", False, {"returnCodeInterpretation": "No matches found", "interrupted": False}, None),
        ("partial", False, {"interrupted": True}, None),
    ],
)
def test_bash_exit_codes(content: str, is_error: bool, tool_use_result: Any, exit_code: int | None) -> None:
    extra = {"toolUseResult": tool_use_result} if tool_use_result is not None else {}
    parsed = parse(
        assistant([tool_use("b", "Bash", command="grep x")]), tool_result("b", content, is_error=is_error, **extra)
    )
    (out,) = [o for o in parsed.items if isinstance(o, ToolOutput)]
    assert (out.exit_code, out.is_error) == (exit_code, is_error)


def test_real_tool_mapping() -> None:
    # jq: the Edit/Write file_path inputs of this file are hello.py, hello.md, hello.js, hello.py
    # and its one Bash command is "rm hello.js"; the Read result (line 17) ends in a
    # <system-reminder> about malware.
    parsed = parse_claude_bytes(claude_file("codemie-4c2ddfdc-b619-4525-8d03-1950fb1b0257.jsonl").read_bytes())
    calls = [i for i in parsed.items if isinstance(i, ToolCall)]
    assert [f for c in calls if c.kind == "patch" for f in c.patch_files] == [
        "/tmp/private/hello.py",
        "/tmp/private/hello.md",
        "/tmp/private/hello.js",
        "/tmp/private/hello.py",
    ]
    assert [c.command for c in calls if c.kind == "shell"] == ["rm hello.js"]
    outputs = [o for o in parsed.items if isinstance(o, ToolOutput)]
    assert len(outputs) == 6
    assert not any("system-reminder" in o.output or "malware" in o.output for o in outputs)


def test_real_tool_errors_are_kept() -> None:
    # jq -c '.message.content[]? | select(.type=="tool_result" and .is_error==true)' counts 2 in
    # this file (SOURCES.md says the same); "Exit code 1" heads both.
    parsed = parse_claude_bytes(claude_file("codemie-196820da-1026-4b6f-a513-a6aae42da1a6.jsonl").read_bytes())
    errors = [o for o in parsed.items if isinstance(o, ToolOutput) and o.is_error]
    assert [o.exit_code for o in errors] == [1, 1]


# --- compaction, titles ----------------------------------------------------------------------------


def test_compact_boundary_and_summary_are_a_compaction() -> None:
    parsed = parse(
        user("build the thing"),
        {**BASE, "type": "system", "subtype": "compact_boundary", "content": "Conversation compacted"},
        user(
            "This session is being continued from a previous conversation. Summary: built half.", isCompactSummary=True
        ),
        user("continue"),
    )
    kinds = [type(i).__name__ for i in parsed.items]
    assert kinds == ["UserMessage", "TurnEvent", "Compaction", "UserMessage"]
    assert isinstance(parsed.items[1], TurnEvent) and parsed.items[1].type == "context_compacted"
    assert isinstance(parsed.items[2], Compaction) and parsed.items[2].message.endswith("built half.")
    assert [i.text for i in parsed.items if isinstance(i, UserMessage) and not i.injected] == [
        "build the thing",
        "continue",
    ]


def test_real_compaction() -> None:
    # jq: one system/compact_boundary (line 158) and one isCompactSummary user record (line 159)
    # whose text starts "This session is being continued from a previous conversation".
    parsed = parse_claude_bytes(claude_file("codemie-624a4a58-b34c-462d-a70d-13421c8125a8.jsonl").read_bytes())
    compactions = [i for i in parsed.items if isinstance(i, Compaction)]
    assert len(compactions) == 1
    assert compactions[0].message.startswith("This session is being continued from a previous conversation")


def test_titles_are_candidates_not_compactions() -> None:
    parsed = parse(
        {"type": "summary", "summary": "Fix login flow", "leafUuid": "u1"},
        {"type": "ai-title", "sessionId": BASE["sessionId"], "aiTitle": "Login fix"},
        {"type": "custom-title", "sessionId": BASE["sessionId"], "customTitle": "my login work"},
        {"type": "custom-title", "sessionId": BASE["sessionId"], "customTitle": "  "},
    )
    assert [(i.kind, i.text) for i in parsed.items if isinstance(i, TitleCandidate)] == [
        ("summary", "Fix login flow"),
        ("ai", "Login fix"),
        ("custom", "my login work"),
    ]
    assert not [i for i in parsed.items if isinstance(i, Compaction)]


# --- tolerance ---------------------------------------------------------------------------------------


def test_unknown_types_bad_values_and_malformed_lines_are_skipped_and_counted() -> None:
    data = lines(
        user("do it"),
        {**BASE, "type": "brand-new-record", "payload": {"x": 1}},
        {**BASE, "type": "system", "subtype": "quantum_flux"},
        {**BASE, "type": "attachment", "attachment": {"type": "holographic_reminder"}},
        {**BASE, "type": "attachment", "attachment": {"type": "todo_reminder", "content": []}},
        {**BASE, "type": "progress", "data": '{"type":"hook_progress"}'},
        assistant(
            [{"type": "text", "text": "done"}],
            usage={"input_tokens": "[trimmed for fixture]", "output_tokens": 5, "cache_read_input_tokens": -1},
        ),
        {"no_type": True},
    )
    data += b"not json\n" + b"\xff\xfe\n" + b"[1, 2]\n" + b"\n"
    parsed = parse_claude_bytes(data)
    assert parsed.unknown_lines == 4  # the new record type, the subtype, the attachment kind, no type
    assert parsed.bad_values == 3  # data as a JSON string, the placeholder and the negative count
    assert parsed.skipped_lines == 3  # invalid JSON, invalid UTF-8, not an object
    assert parsed.lines == 12
    assert [i.text for i in parsed.items if isinstance(i, (UserMessage, AssistantMessage))] == ["do it", "done"]
    assert total_usage(parsed.items).output_tokens == 5


def test_a_real_composite_of_many_record_types_parses_without_unknowns() -> None:
    # The composite holds every record type and attachment kind seen up to 2.1.220.
    parsed = parse_claude_bytes(claude_file("agentsessions-stage0-claude-small.jsonl").read_bytes())
    assert (parsed.skipped_lines, parsed.unknown_lines) == (0, 0)
    # jq -c 'select(.type=="summary" or .type=="ai-title" or .type=="custom-title")' -> 3 records
    assert len([i for i in parsed.items if isinstance(i, TitleCandidate)]) == 3


def test_inline_sidechain_records_are_excluded() -> None:
    # jq: 405 isSidechain records in this 1.0.98 file; its non-sidechain tool_use blocks are
    # Glob 2, Task 5, TodoWrite 3, Write 1 (11 calls).
    parsed = parse_claude_bytes(claude_file("ccviewer-fe5e1c67-53e7-4862-81ae-d0e013e3270b.jsonl").read_bytes())
    calls = [i.name for i in parsed.items if isinstance(i, ToolCall)]
    assert sorted(calls) == sorted(["Glob"] * 2 + ["Task"] * 5 + ["TodoWrite"] * 3 + ["Write"])
    assert len([i for i in parsed.items if isinstance(i, ToolOutput)]) == 11


def test_sidechain_lines_yield_nothing() -> None:
    parsed = parse(
        user("Warmup", isSidechain=True, agentId="a1"),
        assistant([{"type": "text", "text": "ready"}], isSidechain=True, agentId="a1"),
    )
    assert parsed.items == [] and parsed.unknown_lines == 0


def test_interrupts_and_meta_bodies_are_not_prompts() -> None:
    parsed = parse(
        user("<command-message>init is analyzing</command-message>\n<command-name>/init</command-name>"),
        user([{"type": "text", "text": "Please analyze this codebase and create a CLAUDE.md"}], isMeta=True),
        user([{"type": "text", "text": "[Request interrupted by user for tool use]"}]),
    )
    assert not [i for i in parsed.items if isinstance(i, UserMessage) and not i.injected]
    assert [(i.type, i.text) for i in parsed.items if isinstance(i, TurnEvent)] == [
        ("turn_aborted", "interrupted by user for tool use")
    ]


# --- feedback-loop guard -------------------------------------------------------------------------------

MEMD_BLOCK = (
    '<memd-context project="/home/me/app" generated="2026-11-29T07:00:00Z">\n# Memory\n- use pnpm\n</memd-context>'
)


def test_memd_context_never_counts_or_reaches_the_input() -> None:
    parsed = parse(
        {
            **BASE,
            "type": "attachment",
            "attachment": {"type": "hook_additional_context", "hookEvent": "SessionStart", "content": [MEMD_BLOCK]},
        },
        user(MEMD_BLOCK),
        assistant([tool_use("b", "Bash", command="memd context")]),
        tool_result("b", "header\n" + MEMD_BLOCK + "\ntrailer"),
        assistant([{"type": "text", "text": MEMD_BLOCK + "\nI read the memory."}], mid="m9"),
    )
    assert not [i for i in parsed.items if isinstance(i, UserMessage) and not i.injected]
    assert "use pnpm" not in repr(parsed.items)
    (out,) = [o for o in parsed.items if isinstance(o, ToolOutput)]
    assert out.output == "header\ntrailer"


# --- session identity ----------------------------------------------------------------------------------


def test_session_meta_from_the_first_records() -> None:
    head = lines(
        {"type": "file-history-snapshot", "messageId": "m", "snapshot": {}},
        {"type": "queue-operation", "operation": "enqueue", "sessionId": BASE["sessionId"], "content": "x"},
        {**user("hi"), "entrypoint": "cli", "gitBranch": "main", "timestamp": "2026-01-02T17:00:00.000Z"},
    ).splitlines()
    meta = session_meta(head)
    assert meta is not None
    assert (meta.thread_id, meta.cwd, meta.cli_version, meta.git_branch, meta.entrypoint) == (
        BASE["sessionId"],
        "/home/me/app",
        "2.1.7",
        "main",
        "cli",
    )
    assert (meta.agent, meta.source_label, meta.subagent_id) == (Agent.CLAUDE, "cli", None)
    assert meta.started_at == 1767373200.0


def test_session_meta_needs_a_session_id() -> None:
    assert session_meta([orjson.dumps({"type": "summary", "summary": "x"})] * HEAD_LINES) is None
    assert session_meta([b"garbage", b""]) is None


@pytest.mark.parametrize(
    ("entrypoint", "label"),
    [
        (None, "cli"),
        ("cli", "cli"),
        ("sdk-cli", "sdk:sdk-cli"),
        ("sdk-ts", "sdk:sdk-ts"),
        ("sdk-py", "sdk:sdk-py"),
        ("claude-vscode", "vscode"),
        ("claude-desktop", "custom:claude-desktop"),
    ],
)
def test_entrypoints(entrypoint: str | None, label: str) -> None:
    kind, detail = source_of_entrypoint(entrypoint)
    assert (f"{kind}:{detail}" if detail else kind) == label


def test_sub_agent_and_compaction_transcripts_are_recognised_by_content() -> None:
    # jq: every record of these files is isSidechain with agentId 36541525 / a485154 /
    # acompact-e1f845, and their sessionId is the parent's.
    cases = {
        "codemie-4c2ddfdc-agent-36541525.jsonl": ("4c2ddfdc-b619-4525-8d03-1950fb1b0257", "subagent:36541525"),
        "codemie-e9fb405b-subagents-agent-a485154.jsonl": ("e9fb405b-169f-40eb-9396-7e75076f045d", "subagent:a485154"),
        "spotter-4d5611e5-subagents-agent-acompact-e1f845.jsonl": (
            "4d5611e5-241a-462a-8d15-5122611a9569",
            "internal:compaction",
        ),
    }
    for name, (thread_id, label) in cases.items():
        meta = session_meta(claude_file(name).read_bytes().splitlines()[:HEAD_LINES])
        assert meta is not None and (meta.thread_id, meta.source_label) == (thread_id, label), name
        assert meta.subagent_id is not None


def test_real_main_sessions_take_cwd_from_the_records() -> None:
    # jq -r '.cwd // empty' FILE | head -1 ; the first line of these files has no cwd
    # (file-history-snapshot / summary).
    cases = {
        "codemie-196820da-1026-4b6f-a513-a6aae42da1a6.jsonl": (
            "196820da-1026-4b6f-a513-a6aae42da1a6",
            "/Users/user/repo",
        ),
        "ccviewer-fe5e1c67-53e7-4862-81ae-d0e013e3270b.jsonl": (
            "fe5e1c67-53e7-4862-81ae-d0e013e3270b",
            "/path/to/Demo",
        ),
        "spotter-4d5611e5-241a-462a-8d15-5122611a9569.jsonl": (
            "4d5611e5-241a-462a-8d15-5122611a9569",
            "/home/USER/projects/spotter-worktrees/spotter-dov",
        ),
    }
    for name, (thread_id, cwd) in cases.items():
        meta = session_meta(claude_file(name).read_bytes().splitlines()[:HEAD_LINES])
        assert meta is not None and (meta.thread_id, meta.cwd, meta.source_label) == (thread_id, cwd, "cli"), name


def test_the_file_name_wins_when_it_is_one_of_the_session_ids() -> None:
    old, new = "11111111-0000-4000-8000-000000000000", "22222222-0000-4000-8000-000000000000"
    head = lines({**user("old"), "sessionId": old}, {**user("new"), "sessionId": new}).splitlines()
    assert session_meta(head).thread_id == old  # type: ignore[union-attr]
    assert session_meta(head, name_hint=new).thread_id == new  # type: ignore[union-attr]
    assert session_meta(head, name_hint="agent-x").thread_id == old  # type: ignore[union-attr]


def test_the_parser_result_carries_the_meta_and_resumes() -> None:
    data = lines(user("one"), assistant([{"type": "text", "text": "a"}]), user("two"))
    parser = ClaudeParser()
    parts = data.splitlines(keepends=True)
    parser.feed(parts[:1])
    parser.feed(parts[1:])
    assert parser.result.meta is not None and parser.result.meta.thread_id == BASE["sessionId"]
    assert [i.text for i in parser.result.items if isinstance(i, UserMessage)] == ["one", "two"]
    parser.feed_malformed(2, "line_too_long")
    assert (parser.result.lines, parser.result.skipped_lines) == (5, 2)


# --- aggregates: ThreadStats, commands, patched files ----------------------------------------------


def test_thread_stats_fold_a_real_file_chunk_by_chunk_like_the_whole() -> None:
    from memd.rollout.session import ThreadStats

    data = claude_file("codemie-624a4a58-b34c-462d-a70d-13421c8125a8.jsonl").read_bytes()
    whole = ThreadStats()
    whole.feed(parse_claude_bytes(data))
    chunked = ThreadStats()
    parts = data.splitlines(keepends=True)
    for start in range(0, len(parts), 37):  # a fresh parser per chunk, stats through JSON, as the indexer does
        parser = ClaudeParser()
        parser.feed(parts[start : start + 37])
        chunked = ThreadStats.from_json(chunked.to_json())
        chunked.feed(parser.result)
    assert chunked.to_json() == whole.to_json()
    assert whole.user_messages == 14  # the hand count of the table above
    assert whole.title.startswith("@src/providers/plugins/sso/ARCHITECTURE-REFACTORING.md review old")
    # jq, grouped by message.id/requestId taking each group's largest output_tokens: 69127
    assert whole.usage.output_tokens == 69127


def test_thread_title_prefers_the_users_name_then_claudes_then_the_first_prompt() -> None:
    from memd.rollout.session import ThreadStats

    summary = {"type": "summary", "summary": "An earlier session", "leafUuid": "x"}
    ai = {"type": "ai-title", "sessionId": BASE["sessionId"], "aiTitle": "Login fix"}
    custom = {"type": "custom-title", "sessionId": BASE["sessionId"], "customTitle": "my   login\nwork"}
    cases = [
        ([summary], "An earlier session"),
        ([summary, user("fix the login")], "fix the login"),
        ([summary, user("fix the login"), ai], "Login fix"),
        ([summary, custom, user("fix the login"), ai], "my login work"),
    ]
    for objs, title in cases:
        stats = ThreadStats()
        stats.feed(parse(*objs))
        assert ThreadStats.from_json(stats.to_json()).title == title


def test_tool_errors_without_exit_codes_are_failed_commands_and_patches() -> None:
    from memd.rollout.session import commands, patched_files

    parsed = parse(
        assistant(
            [
                tool_use("b1", "Bash", command="npm test"),
                tool_use("b2", "Bash", command="rm -rf /"),
                tool_use("b3", "Bash", command="ls"),
                tool_use("e1", "Edit", file_path="/app/a.py", old_string="a", new_string="b"),
                tool_use("e2", "Edit", file_path="/app/b.py", old_string="a", new_string="b"),
            ]
        ),
        tool_result("b1", "Exit code 1\njest: not found", is_error=True),
        tool_result("b2", "The user doesn't want to proceed with this tool use.", is_error=True),
        tool_result("b3", "a.py\n", is_error=False, toolUseResult={"stdout": "a.py", "interrupted": False}),
        tool_result("e1", "<tool_use_error>File has not been read yet.</tool_use_error>", is_error=True),
        tool_result("e2", "The file /app/b.py has been updated."),
    )
    runs = {r.command: r for r in commands(parsed.items)}
    assert [(c, runs[c].exit_code, runs[c].failed) for c in ("npm test", "rm -rf /", "ls")] == [
        ("npm test", 1, True),
        ("rm -rf /", None, True),
        ("ls", 0, False),
    ]
    assert patched_files(parsed.items) == ["/app/b.py"]


@pytest.mark.parametrize(
    ("entrypoint", "reason"),
    [(None, None), ("cli", None), ("sdk-cli", "source:sdk:sdk-cli"), ("sdk-ts", "source:sdk:sdk-ts")],
)
def test_claude_eligibility_by_entrypoint(entrypoint: str | None, reason: str | None) -> None:
    from memd.rollout.project import eligibility

    record = user("do it") if entrypoint is None else {**user("do it"), "entrypoint": entrypoint}
    meta = session_meta([orjson.dumps(record)])
    verdict = eligibility(meta, 1, ("cli", "vscode", "unknown", "custom"))
    assert (str(verdict.reason) if verdict.reason else None) == reason
    assert verdict.eligible is (reason is None)
    assert eligibility(meta, 1, ("cli", "sdk")).eligible  # include_sources can opt the SDK in


def test_parser_factory_picks_the_agents_parser() -> None:
    from memd.rollout.session import RolloutParser, new_parser, parse_transcript_bytes

    assert isinstance(new_parser(Agent.CLAUDE, path="/p/x.jsonl"), ClaudeParser)
    assert isinstance(new_parser("codex"), RolloutParser)
    data = lines(user("hello"))
    assert [i.text for i in parse_transcript_bytes(data, Agent.CLAUDE).items if isinstance(i, UserMessage)] == ["hello"]
    assert parse_transcript_bytes(data, Agent.CODEX).items == []  # not a Codex rollout
