"""Input building (SPEC §6.2): filter, cap, redact, render, budget; checked on the real rollouts."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from memd.extract.input_builder import build_input
from memd.extract.redact import REDACTED
from memd.rollout.codex import MEMD_MEMORY_MARKER
from memd.rollout.records import (
    AssistantMessage,
    CommandEnd,
    Compaction,
    Item,
    ParsedRollout,
    PatchApplied,
    Reasoning,
    ToolCall,
    ToolOutput,
    TurnContext,
    TurnEvent,
    UserMessage,
)
from memd.rollout.session import parse_rollout_bytes, real_user_messages
from tests.conftest import codex_rollout

INJECTED_MARKERS = (
    "<environment_context>",
    "# AGENTS.md instructions",
    "<permissions instructions>",
)


def _parsed(items: list[Item], line_bytes: int = 300) -> ParsedRollout:
    return ParsedRollout(items=list(items), item_line_bytes=[line_bytes] * len(items))


def _build_real(path: Path, **kwargs):
    parsed = parse_rollout_bytes(path.read_bytes())
    return parsed, build_input(parsed, **kwargs)


def _developer_and_injected_texts(path: Path) -> list[str]:
    """Developer/system message texts and injected user texts, read straight from the JSON."""
    texts = []
    for line in path.read_bytes().splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        payload = obj.get("payload", obj) if isinstance(obj, dict) else None
        if not isinstance(payload, dict) or payload.get("type") != "message":
            continue
        content = payload.get("content")
        parts = (
            [c.get("text", "") for c in content if isinstance(c, dict)]
            if isinstance(content, list)
            else []
        )
        text = "\n".join(p for p in parts if isinstance(p, str))
        role = payload.get("role")
        if role in ("developer", "system") or (
            role == "user" and text.lstrip().startswith(INJECTED_MARKERS[:2])
        ):
            texts.append(text)
    # Placeholders shared with kept text in trimmed fixtures say nothing about filtering.
    return [t for t in texts if len(t) >= 20 and t != "[trimmed for fixture]"]


def test_every_real_rollout_keeps_user_messages_and_drops_injected_context(
    codex_rollouts: Path,
) -> None:
    files = sorted(codex_rollouts.glob("*.jsonl"))
    assert files
    checked_users = 0
    for path in files:
        parsed, built = _build_real(path)
        for msg in real_user_messages(parsed.items):
            expected = build_input(_parsed([msg])).text.removeprefix("user: ")
            assert expected in built.text, (path.name, msg.text[:80])
            checked_users += 1
        for marker in INJECTED_MARKERS:
            assert marker not in built.text, (path.name, marker)
        for text in _developer_and_injected_texts(path):
            assert text[:200] not in built.text, (path.name, text[:80])
        assert built.text_bytes == len(built.text.encode())
        assert built.est_tokens == int(built.text_bytes / 4)
    assert checked_users >= 50


def test_input_is_at_most_a_third_of_the_raw_json_over_the_real_set(codex_rollouts: Path) -> None:
    raw = text = 0
    rows = []
    for path in sorted(codex_rollouts.glob("*.jsonl")):
        _, built = _build_real(path)
        raw += built.raw_json_bytes
        text += built.text_bytes
        rows.append((path.name, built.raw_json_bytes, built.text_bytes))
    assert raw > 0
    assert text * 3 <= raw, rows


def test_user_messages_are_counted_once(codex_rollouts: Path) -> None:
    _, built = _build_real(codex_rollout("aisessions-codex-pomodor-timer.jsonl"))
    # Read off the file: the two follow-up requests, each present as a response item and an event.
    for request in ("add smooth transitions between states", "add a Pause/Resume feature"):
        assert built.text.count(f"user: {request}") == 1
    users = [it for it in built.items if isinstance(it, UserMessage)]
    assert len(users) == 3 and all(u.origin == "event" for u in users)


def test_assistant_messages_are_counted_once(codex_rollouts: Path) -> None:
    _, built = _build_real(codex_rollout("aisessions-codex-pomodor-timer.jsonl"))
    # Read off the file: the final answer of the second turn (agent_message event + response item).
    answer = "Added mode-based color themes with smooth transitions"
    assert built.text.count(answer) == 1


def test_failed_command_keeps_exit_code(codex_rollouts: Path) -> None:
    _, built = _build_real(
        codex_rollout("rollout-2026-01-02T19-00-00-019b7f95-0000-7000-0000-000000000001.jsonl")
    )
    # Read off the file: `cat nonexistent.txt` exits 1 with "No such file or directory".
    assert (
        "$ cat nonexistent.txt\n  cat: nonexistent.txt: No such file or directory\nexit 1"
        in built.text
    )
    assert "$ pwd\n  /path/to/codemie-code\nexit 0" in built.text


def test_unified_exec_polls_fold_into_their_command(codex_rollouts: Path) -> None:
    _, built = _build_real(
        codex_rollout("rollout-2026-05-11T11-26-55-019e1625-789d-76c0-80ab-3724b5ddb799.jsonl")
    )
    text = built.text
    # Read off the file: the focused test first fails (exit 1), later passes (exit 0); the
    # exit codes only arrive in exec_command_end events / write_stdin poll outputs.
    cmd = '$ npm test -- --run src/agents/plugins/__tests__/codemie-code-reasoning.test.ts -t "Compaction Config"'
    first = text.index(cmd)
    second = text.index(cmd, first + 1)
    assert "exit 1" in text[first:second]
    assert "exit 0" in text[second : text.index("\n$ ", second + 1)]
    assert "Chunk ID:" not in text and "Process running with session ID" not in text
    assert "tool write_stdin" not in text  # polls are folded, not rendered as tool calls


def test_patches_render_file_headers_with_counts(codex_rollouts: Path) -> None:
    _, built = _build_real(codex_rollout("aisessions-codex-pomodor-timer.jsonl"))
    # Read off the file: the first patch adds index.html (27 "+" lines), later ones update files.
    assert "patch: index.html (add, +27 -0)" in built.text
    assert "patch: styles.css (add, " in built.text
    assert "patch failed:" in built.text  # the apply_patch verification failure on script.js
    assert "apply_patch verification failed" in built.text


def test_drops_noise_and_renders_turn_blocks() -> None:
    items: list[Item] = [
        UserMessage(
            "<environment_context>cwd</environment_context>", origin="response", injected=True
        ),
        UserMessage(f"{MEMD_MEMORY_MARKER} old memory", origin="response", injected=True),
        UserMessage("fix the build", origin="response"),
        TurnContext(model="gpt-5"),
        Reasoning("**Checking the build**\nmore detail"),
        ToolCall("c1", "shell", "shell", command="make", arguments='{"command":["make"]}'),
        ToolOutput("c1", "ok\n", exit_code=0),
        TurnEvent("error", text="stream disconnected"),
        AssistantMessage("Build fixed.", phase="final_answer"),
        TurnEvent("task_complete", text="Build fixed."),
        UserMessage("look at this [image]", origin="response", images=1),
        Compaction("summary of earlier work"),
    ]
    built = build_input(_parsed(items))
    assert built.text == (
        "user: fix the build\n"
        "thinking: **Checking the build** more detail\n"
        "$ make\n  ok\nexit 0\n"
        "error: stream disconnected\n"
        "assistant: Build fixed.\n"
        "\n"
        "user: look at this [image]\n"
        "compaction summary: summary of earlier work"
    )
    assert "old memory" not in built.text and "environment_context" not in built.text
    assert not any(isinstance(it, (TurnContext,)) for it in built.items)
    assert built.raw_json_bytes == 300 * len(built.items)


def test_commentary_is_trimmed_and_final_answer_kept_whole() -> None:
    long = "word " * 400
    items: list[Item] = [
        UserMessage("do it", origin="event"),
        AssistantMessage("progress " + long, phase="commentary"),
        AssistantMessage("final " + long),  # no phase: final because it ends the turn
        UserMessage("next", origin="event"),
    ]
    built = build_input(_parsed(items))
    commentary = next(
        line for line in built.text.splitlines() if line.startswith("assistant (commentary):")
    )
    assert len(commentary.encode()) <= 650
    assert "bytes cut" in built.text.split("assistant: final")[0]
    assert ("final " + long).strip() in built.text


def test_tool_output_is_capped_head_and_tail_with_exit_code() -> None:
    output = "HEAD-LINE\n" + "".join(f"row {i}\n" for i in range(20000)) + "TAIL-LINE\n"
    items: list[Item] = [
        UserMessage("run it", origin="event"),
        ToolCall("c1", "exec_command", "shell", command="./gen.sh"),
        ToolOutput("c1", output, exit_code=3),
    ]
    built = build_input(_parsed(items), tool_output_cap_bytes=1024)
    assert "HEAD-LINE" in built.text and "TAIL-LINE" in built.text and "bytes cut" in built.text
    assert built.text.rstrip().endswith("exit 3")
    assert len(built.text.encode()) < 1024 + 300
    out_item = next(it for it in built.items if isinstance(it, ToolOutput))
    assert len(out_item.output.encode()) <= 1024 and out_item.exit_code == 3


def test_command_end_event_supplies_exit_code_and_output() -> None:
    items: list[Item] = [
        UserMessage("test", origin="event"),
        ToolCall("c1", "exec_command", "shell", command="pytest -q"),
        ToolOutput(
            "c1",
            "Chunk ID: 1\nWall time: 1.0 seconds\nProcess running with session ID 7\nOriginal token count: 0\nOutput:\n",
        ),
        ToolCall("c2", "write_stdin", "other", arguments='{"session_id": 7, "chars": ""}'),
        ToolOutput(
            "c2",
            "Chunk ID: 2\nWall time: 3.0 seconds\nProcess exited with code 1\nOriginal token count: 9\nOutput:\n1 failed\n",
            exit_code=1,
        ),
        CommandEnd("c1", "pytest -q", exit_code=1, output="F\n1 failed\n"),
    ]
    built = build_input(_parsed(items))
    assert built.text == "user: test\n$ pytest -q\n  F\n  1 failed\nexit 1"
    assert len(built.items) == len(items)  # the poll and the event are kept (folded) items


def test_budget_keeps_user_messages_and_last_final_answer() -> None:
    items: list[Item] = []
    for turn in range(30):
        items.append(UserMessage(f"request number {turn}", origin="event"))
        for k in range(5):
            items.append(ToolCall(f"c{turn}-{k}", "shell", "shell", command=f"step {turn}.{k}"))
            items.append(ToolOutput(f"c{turn}-{k}", "x" * 500, exit_code=0))
        items.append(AssistantMessage(f"answer for turn {turn}", phase="final_answer"))
    built = build_input(_parsed(items), max_input_tokens=600)
    for turn in range(30):
        assert f"user: request number {turn}" in built.text
    assert "assistant: answer for turn 29" in built.text
    assert "assistant: answer for turn 3\n" not in built.text
    assert "items omitted ...]" in built.text
    assert built.omitted_items > 0
    assert len(built.items) == len(items) - built.omitted_items
    assert built.est_tokens <= 600 * 1.5  # only the mandatory part may exceed the budget
    full = build_input(_parsed(items))
    assert full.omitted_items == 0 and "omitted" not in full.text
    assert built.raw_json_bytes < full.raw_json_bytes


def test_secrets_are_redacted_in_text_and_items() -> None:
    key = "sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv_wXyZ-12345678"
    gh = "ghp_A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"
    aws = "AKIAIOSFODNN7EXAMPLE"
    items: list[Item] = [
        UserMessage(f"my key is {key}, please set it", origin="event"),
        ToolCall(
            "c1",
            "shell",
            "shell",
            command=f"export GITHUB_TOKEN={gh}",
            arguments=json.dumps({"command": f"export GITHUB_TOKEN={gh}"}),
        ),
        ToolOutput("c1", f"aws id {aws}\nDB_PASSWORD=hunter2\n", exit_code=0),
        CommandEnd("c1", f"export GITHUB_TOKEN={gh}", exit_code=0, output=f"{aws}"),
        AssistantMessage(f"Set {key} in .env", phase="final_answer"),
        Compaction(f"earlier the user pasted {gh}"),
    ]
    built = build_input(_parsed(items))
    for secret in (key, gh, aws, "hunter2"):
        assert secret not in built.text
        for item in built.items:
            for f in dataclasses.fields(item):
                value = getattr(item, f.name)
                assert not (isinstance(value, str) and secret in value), (
                    type(item).__name__,
                    f.name,
                )
    assert REDACTED in built.text
    assert built.redactions >= 8
    assert "please set it" in built.text and ".env" in built.text


def test_empty_rollout_builds_empty_input() -> None:
    built = build_input(ParsedRollout())
    assert (built.text, built.items, built.raw_json_bytes, built.omitted_items) == ("", (), 0, 0)


def test_user_messages_alone_over_budget_are_kept_with_one_warning() -> None:
    from structlog.testing import capture_logs

    items: list[Item] = [
        UserMessage(f"message {n} " + "x" * 2000, origin="event") for n in range(10)
    ]
    items.append(AssistantMessage("the last answer", phase="final_answer"))
    with capture_logs() as logs:
        built = build_input(_parsed(items), max_input_tokens=100)
    assert all(f"user: message {n} " in built.text for n in range(10))
    assert "assistant: the last answer" in built.text
    events = [e for e in logs if e["event"] == "input_over_budget"]
    assert len(events) == 1 and events[0]["log_level"] == "warning"
    assert events[0]["max_input_tokens"] == 100 and events[0]["est_tokens"] > 100


def test_orphans_and_odd_items_render_without_losing_anything() -> None:
    items: list[Item] = [
        UserMessage("go", origin="event"),
        ToolOutput("unknown-call", "stray output", exit_code=4),
        CommandEnd("", "make lint", exit_code=2, output="lint error"),
        PatchApplied("", success=False, files=("a.py",)),
        AssistantMessage("   ", phase="final_answer"),
        ToolCall("w1", "web_search", "web_search", arguments="python 3.11 tomllib"),
        ToolCall("m1", "mcp__db__query", "mcp", arguments='{"sql": "select 1"}'),
        ToolOutput("m1", "1 row"),
        TurnEvent("thread_rolled_back", num_turns=2),
        TurnEvent("turn_aborted", text="interrupted"),
    ]
    built = build_input(_parsed(items))
    assert built.text == (
        "user: go\n"
        "output:\n  stray output\nexit 4\n"
        "$ make lint\n  lint error\nexit 2\n"
        "patch FAILED: a.py\n"
        "web_search: python 3.11 tomllib\n"
        'tool mcp__db__query: {"sql": "select 1"}\n  1 row\n'
        "[rolled back 2 turns]\n"
        "[turn aborted: interrupted]"
    )


def test_memd_memory_block_inside_a_user_message_is_omitted() -> None:
    text = f"context:\n{MEMD_MEMORY_MARKER}\nold trace memory\n</memd_memory>\nnow fix the bug"
    built = build_input(_parsed([UserMessage(text, origin="event")]))
    assert built.text == "user: context:\n[memd memory omitted]\nnow fix the bug"


def test_a_secret_repeated_in_several_items_is_counted_each_time() -> None:
    gh = "ghp_A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"
    command = f"export GITHUB_TOKEN={gh}"
    items: list[Item] = [
        UserMessage("deploy please", origin="event"),
        ToolCall(
            "c1", "shell", "shell", command=command, arguments=json.dumps({"command": command})
        ),
        CommandEnd("c1", command, exit_code=0, output="ok"),  # the same text as the call's command
        AssistantMessage("done", phase="final_answer"),
    ]
    built = build_input(_parsed(items))
    assert built.redactions == 3  # the call's command and arguments, and the end event's command
    assert all(gh not in getattr(it, "command", "") for it in built.items)


def test_only_kept_text_is_redacted_and_counted() -> None:
    old_secret = "ghp_A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"
    items: list[Item] = [UserMessage("start", origin="event")]
    items.append(ToolCall("c0", "shell", "shell", command="cat .env"))
    items.append(ToolOutput("c0", f"GH={old_secret}\n" + "y" * 3000, exit_code=0))
    for k in range(1, 12):  # newer work fills the budget; the first command is dropped
        items.append(ToolCall(f"c{k}", "shell", "shell", command=f"step {k}"))
        items.append(ToolOutput(f"c{k}", "z" * 300, exit_code=0))
    items.append(AssistantMessage("finished", phase="final_answer"))
    built = build_input(_parsed(items), max_input_tokens=700)
    assert "cat .env" not in built.text and built.omitted_items >= 2
    assert built.redactions == 0
    assert build_input(_parsed(items)).redactions == 1  # kept when everything fits


def test_budget_holds_when_redaction_makes_the_text_longer() -> None:
    # Short secrets grow into "[REDACTED_SECRET]": the budget is checked again after redaction.
    items: list[Item] = [UserMessage("go", origin="event")]
    for k in range(40):
        items.append(ToolCall(f"c{k}", "shell", "shell", command=f"run {k}"))
        output = "\n".join(f"API_TOKEN=q{i}" for i in range(6))
        items.append(ToolOutput(f"c{k}", output, exit_code=0))
    items.append(AssistantMessage("finished", phase="final_answer"))
    budget_tokens = 1500
    plain = build_input(_parsed(items), max_input_tokens=10**6)
    assert plain.omitted_items == 0 and plain.redactions == 240
    unredacted_bytes = len(plain.text.replace(REDACTED, "q0"))
    assert unredacted_bytes < budget_tokens * 4 < plain.text_bytes  # fits only before redaction
    built = build_input(_parsed(items), max_input_tokens=budget_tokens)
    assert "API_TOKEN=q" not in built.text and built.redactions > 0
    assert built.text_bytes <= budget_tokens * 4 and built.omitted_items > 0
    assert "user: go" in built.text and "assistant: finished" in built.text
