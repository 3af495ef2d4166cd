"""Codex rollout parser: real rollouts (facts read off the files with jq/grep) and unit cases.

Real files live in ``../shared/rollouts/codex``; every test that needs them skips when absent.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from memd.rollout.codex import (
    INJECTED_PREFIXES,
    MEMD_MEMORY_MARKER,
    is_injected_text,
    parse_line,
    parse_session_meta,
)
from memd.rollout.records import (
    AssistantMessage,
    CommandEnd,
    Compaction,
    PatchApplied,
    Reasoning,
    ToolCall,
    ToolOutput,
    TurnContext,
    TurnEvent,
    UserMessage,
)
from memd.rollout.session import (
    MAX_SKIP_WARNINGS,
    CommandRun,
    RolloutParser,
    ThreadStats,
    commands,
    one_line_title,
    parse_rollout_bytes,
    patched_files,
    real_user_messages,
)
from tests.conftest import CODEX_ROLLOUTS, SKIP_REASON, codex_rollout


def _rollout_names() -> list[object]:
    if not CODEX_ROLLOUTS.is_dir():
        return [pytest.param(None, marks=pytest.mark.skip(reason=SKIP_REASON))]
    return sorted(p.name for p in CODEX_ROLLOUTS.glob("*.jsonl"))


def _parse(name: str):
    return parse_rollout_bytes(codex_rollout(name).read_bytes())


def _line(obj: dict) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def _env(kind: str, payload: dict, ts: str = "2026-01-02T17:00:00.000Z") -> bytes:
    return _line({"timestamp": ts, "type": kind, "payload": payload})


def _items(*lines: bytes) -> list:
    return parse_rollout_bytes(b"".join(lines)).items


# --- every real file ----------------------------------------------------------------------


@pytest.mark.parametrize("name", _rollout_names())
def test_real_rollout_parses_without_error(name: str) -> None:
    data = codex_rollout(name).read_bytes()
    for raw in data.splitlines(keepends=True):
        parse_line(raw)  # never raises, line by line
    parsed = parse_rollout_bytes(data)
    assert parsed.lines == data.count(b"\n")
    assert parsed.skipped_lines == 0
    assert len(parsed.item_line_bytes) == len(parsed.items)
    assert sum(parsed.item_line_bytes) <= len(data)


@pytest.mark.parametrize("name", _rollout_names())
def test_chunked_feeding_matches_whole_file(name: str) -> None:
    data = codex_rollout(name).read_bytes()
    lines = data.splitlines(keepends=True)
    whole = parse_rollout_bytes(data)
    parser = RolloutParser()
    stats = ThreadStats()
    for start in range(0, len(lines), 7):
        chunk = RolloutParser(first_line_is_head=start == 0)
        chunk.feed(lines[start : start + 7])
        stats.feed(chunk.result)
        parser.feed(lines[start : start + 7])
    assert parser.result == whole
    restored = ThreadStats.from_json(stats.to_json())
    whole_stats = ThreadStats()
    whole_stats.feed(whole)
    assert restored == whole_stats == stats
    assert restored.user_messages == len(real_user_messages(whole.items))
    assert restored.lines == whole.lines


@dataclass(frozen=True)
class Facts:
    """Read off each file with jq (session_meta payload, grep -c '"type":"user_message"', wc -l)."""

    thread_id: str | None
    cwd: str | None
    source_label: str | None
    real_user_messages: int
    lines: int


FACTS = {
    "agentsessions-stage0-codex-schema_drift.jsonl": Facts(None, None, None, 0, 6),
    "agentsessions-stage0-codex-small.jsonl": Facts(
        "019fc8be-3658-7ca3-9e29-000000000000", "/tmp/repo", "cli", 3, 118
    ),
    "agtrace-rollout-parent-019b88e0.jsonl": Facts(
        "019b88e0-0b0f-7bb0-a9ba-5cc2d8dffde9", "/test/project", "cli", 1, 4
    ),
    "agtrace-rollout-subagent-019b88e5.jsonl": Facts(
        "019b88e5-a2e4-7b90-8953-38fce393c653", "/test/project", "subagent:review", 1, 2
    ),
    "aisessions-codex-older-format-sample.jsonl": Facts("test-session-789", None, "unknown", 1, 9),
    "aisessions-codex-pomodor-timer.jsonl": Facts(
        "019a085e-04c1-7f81-a09e-9555f6a1fb40", "/Users/yoavfarhi/dev/pomodoro/codex", "cli", 3, 153
    ),
    "codemie-turn-2.jsonl": Facts(
        "a1b2c3d4-e5f6-7890-abcd-ef1234567890", "/home/user/project", "exec", 2, 25
    ),
    "rollout-2026-01-02T18-39-45-019b7f94-51b4-7593-922e-ba12b5b73b52.jsonl": Facts(
        "019b7f94-51b4-7593-922e-ba12b5b73b52",
        "/Users/Nikita_Levyankov/repos/EPMCDME/codemie-ai/codemie-code",
        "exec",
        1,
        26,
    ),
    "rollout-2026-01-02T19-00-00-019b7f95-0000-7000-0000-000000000001.jsonl": Facts(
        "019b7f95-0000-7000-0000-000000000001", "/path/to/codemie-code", "unknown", 0, 11
    ),
    "rollout-2026-02-23T12-54-34-019c8a59-e9dd-71f0-9ae3-4079fe9726a9.jsonl": Facts(
        "019c8a59-e9dd-71f0-9ae3-4079fe9726a9", "/redacted/path/59b923df4d", "vscode", 38, 2722
    ),
    "rollout-2026-02-23T13-19-38-019c8a70-dda7-7f33-98ea-f30553347322.jsonl": Facts(
        "019c8a70-dda7-7f33-98ea-f30553347322", "/redacted/path/da0ba47443", "vscode", 1, 19
    ),
    "rollout-2026-05-11T11-26-55-019e1625-789d-76c0-80ab-3724b5ddb799.jsonl": Facts(
        "019e1625-789d-76c0-80ab-3724b5ddb799",
        "/Users/Sample_User/repos/codemie-ai/codemie-code",
        "cli",
        2,
        386,
    ),
}


@pytest.mark.parametrize("name", sorted(FACTS))
def test_real_rollout_facts(name: str) -> None:
    facts = FACTS[name]
    parsed = _parse(name)
    assert parsed.lines == facts.lines
    assert len(real_user_messages(parsed.items)) == facts.real_user_messages
    if facts.thread_id is None:
        assert parsed.meta is None
        return
    assert parsed.meta is not None
    assert parsed.meta.thread_id == facts.thread_id
    assert parsed.meta.cwd == facts.cwd
    assert parsed.meta.source_label == facts.source_label
    first = codex_rollout(name).read_bytes().split(b"\n", 1)[0]
    assert parse_session_meta(first) == parsed.meta


def test_every_real_file_has_facts(codex_rollouts: Path) -> None:
    assert {p.name for p in codex_rollouts.glob("*.jsonl")} <= set(FACTS)


# --- per-file specifics -------------------------------------------------------------------


def test_error_fixture_commands_and_exit_codes() -> None:
    parsed = _parse("rollout-2026-01-02T19-00-00-019b7f95-0000-7000-0000-000000000001.jsonl")
    runs = commands(parsed.items)
    assert [(r.command, r.exit_code, r.call_id) for r in runs] == [
        ("ls -la", 0, "call_success_1"),
        ("cat nonexistent.txt", 1, "call_failure_1"),
        ("pwd", 0, "call_success_2"),
    ]
    assert runs[1].output == "cat: nonexistent.txt: No such file or directory\n"
    assert parsed.meta is not None
    assert parsed.meta.source_kind == "unknown"  # no `source` key in this session_meta
    assert parsed.meta.git_branch == "codex"
    assert parsed.meta.started_at == 1767373200.0  # 2026-01-02T17:00:00Z
    models = [i.model for i in parsed.items if isinstance(i, TurnContext)]
    assert models == ["gpt-5-1-codex-2025-11-13"]


def test_exec_file_injected_context_and_bash_lc_unwrapping() -> None:
    parsed = _parse("rollout-2026-01-02T18-39-45-019b7f94-51b4-7593-922e-ba12b5b73b52.jsonl")
    responses = [i for i in parsed.items if isinstance(i, UserMessage) and i.origin == "response"]
    assert [m.injected for m in responses] == [True, True, False]  # AGENTS.md, env context, ask
    assert responses[0].text.startswith("# AGENTS.md instructions for ")
    assert [(r.command, r.exit_code) for r in commands(parsed.items)] == [
        ("ls", 0),
        ("rg --files -g 'AGENTS.md'", 0),
        ("sed -n '1,160p' README.md", 0),
    ]
    assert parsed.meta is not None
    assert (parsed.meta.originator, parsed.meta.model_provider) == ("codex_exec", "preview-codex")
    title = one_line_title(real_user_messages(parsed.items)[0].text)
    assert title == "what is current repository about? summarize purpuse and explain goals"


def test_pomodoro_patches_shell_and_titles() -> None:
    parsed = _parse("aisessions-codex-pomodor-timer.jsonl")
    assert patched_files(parsed.items) == ["index.html", "styles.css", "script.js"]
    patches = [i for i in parsed.items if isinstance(i, ToolCall) and i.kind == "patch"]
    assert len(patches) == 11
    assert patches[0].patch_files == ("index.html",)
    assert [(r.command, r.exit_code) for r in commands(parsed.items)] == [
        ("ls", 0),
        ("cat script.js", 0),
        ("cat styles.css", 0),
    ]
    failed = [
        o
        for o in parsed.items
        if isinstance(o, ToolOutput) and o.output.startswith("apply_patch verification failed")
    ]
    assert len(failed) == 1 and failed[0].exit_code is None
    plans = [i for i in parsed.items if isinstance(i, ToolCall) and i.name == "update_plan"]
    assert len(plans) == 4 and {p.kind for p in plans} == {"other"}
    stats = ThreadStats()
    stats.feed(parsed)
    assert stats.title.startswith("Build a simple Pomodoro timer web app using HTML, CSS, and")
    assert "\n" not in stats.title and len(stats.title) <= 120
    assert stats.model == "gpt-5-codex"
    assert stats.user_messages == 3


def test_unified_exec_file_commands_exit_codes_and_patches() -> None:
    parsed = _parse("rollout-2026-05-11T11-26-55-019e1625-789d-76c0-80ab-3724b5ddb799.jsonl")
    runs = commands(parsed.items)
    assert len(runs) == 43  # 43 exec_command calls, 43 exec_command_end events
    nonzero = sorted(r.exit_code for r in runs if r.exit_code != 0)
    assert nonzero == [1, 1, 1, 2]
    by_id = {r.call_id: r for r in runs}
    assert by_id["call_jQYxA5wvjWJ4ZtptybmzrkNm"].command == "git status --short"
    assert by_id["call_jQYxA5wvjWJ4ZtptybmzrkNm"].exit_code == 0
    assert by_id["call_nTBN3WDXOZcJOBB6UsOQHpni"].exit_code == 1
    assert by_id["call_nTBN3WDXOZcJOBB6UsOQHpni"].command.startswith("npm test -- --run ")
    assert patched_files(parsed.items) == [
        "src/agents/plugins/__tests__/codemie-code-reasoning.test.ts",
        "src/agents/plugins/codemie-code.plugin.ts",
        "src/agents/plugins/opencode/opencode.plugin.ts",
    ]
    applied = [i for i in parsed.items if isinstance(i, PatchApplied)]
    assert len(applied) == 3 and all(a.success for a in applied)
    calls = [i for i in parsed.items if isinstance(i, ToolCall)]
    assert sum(c.name == "write_stdin" and c.kind == "other" for c in calls) == 54
    assert sum(c.kind == "web_search" for c in calls) == 3
    users = real_user_messages(parsed.items)
    assert [u.text for u in users] == [
        "show tools",
        "let's update the defailt context compart to 90 in env var",
    ]
    injected = [i for i in parsed.items if isinstance(i, UserMessage) and i.injected]
    assert len(injected) == 1  # one response item: AGENTS.md + <environment_context> parts
    turns = [i.type for i in parsed.items if isinstance(i, TurnEvent)]
    assert turns == ["task_started", "task_complete", "task_started", "task_complete"]


def test_sanitised_desktop_file_counts_events_not_redacted_injections() -> None:
    parsed = _parse("rollout-2026-02-23T12-54-34-019c8a59-e9dd-71f0-9ae3-4079fe9726a9.jsonl")
    responses = [i for i in parsed.items if isinstance(i, UserMessage) and i.origin == "response"]
    assert len(responses) == 46  # redacted injections cannot be spotted by prefix ...
    assert len(real_user_messages(parsed.items)) == 38  # ... so the 38 events are counted
    calls = [i for i in parsed.items if isinstance(i, ToolCall)]
    assert sum(c.kind == "mcp" for c in calls) == 25
    assert sum(c.kind == "web_search" for c in calls) == 7
    assert sum(c.name == "exec_command" and c.kind == "shell" for c in calls) == 212
    compactions = [i for i in parsed.items if isinstance(i, Compaction)]
    assert len(compactions) == 1 and compactions[0].replaced_user_messages == 21
    assert any(isinstance(i, TurnEvent) and i.type == "context_compacted" for i in parsed.items)


def test_interrupted_desktop_file_ends_on_open_call() -> None:
    parsed = _parse("rollout-2026-02-23T13-19-38-019c8a70-dda7-7f33-98ea-f30553347322.jsonl")
    runs = commands(parsed.items)
    assert len(runs) == 1 and runs[0].exit_code is None
    assert runs[0].call_id == "call_UtYwHmwWekzvq83m8Rb9K8jJ"
    assert not any(isinstance(i, TurnEvent) and i.type == "task_complete" for i in parsed.items)
    phases = [i.phase for i in parsed.items if isinstance(i, AssistantMessage)]
    assert phases == [None, "commentary"]  # event agent_message has no phase, response has


def test_exec_fixture_two_turns() -> None:
    parsed = _parse("codemie-turn-2.jsonl")
    done = [i.text for i in parsed.items if isinstance(i, TurnEvent) and i.type == "task_complete"]
    assert done == [
        "I am Codex, an AI coding assistant by OpenAI.",
        "I can work with many programming languages including Python, JavaScript, TypeScript,"
        " Go, and Rust.",
    ]
    assert not any(isinstance(i, Reasoning) for i in parsed.items)  # summaries are empty
    assert parsed.unknown_lines == 0


def test_legacy_format_sample() -> None:
    parsed = _parse("aisessions-codex-older-format-sample.jsonl")
    meta = parsed.meta
    assert meta is not None and meta.legacy
    assert (meta.git_branch, meta.git_commit) == ("main", "abc123")
    assert meta.git_repository_url == "git@github.com:test/repo.git"
    assert parsed.unknown_lines == 3  # three {"record_type":"state"} markers
    kinds = [type(i).__name__ for i in parsed.items]
    assert kinds == ["UserMessage", "Reasoning", "AssistantMessage", "ToolCall", "ToolOutput"]
    call = parsed.items[3]
    assert isinstance(call, ToolCall) and (call.name, call.kind, call.call_id) == (
        "Write",
        "other",
        "call_001",
    )
    assert parsed.items[1] == Reasoning(summary="Planning to create README")
    assert all(i.ts is None for i in parsed.items)


def test_composite_file_first_meta_wins_and_new_variants() -> None:
    parsed = _parse("agentsessions-stage0-codex-small.jsonl")
    assert parsed.meta is not None
    assert (parsed.meta.thread_source, parsed.meta.memory_mode) == ("cli", "off")
    assert len(parsed.extra_metas) == 6
    labels = [m.source_label for m in parsed.extra_metas]
    assert labels.count("subagent:thread_spawn") == 2
    assert "subagent:other" in labels
    # 5 world_state + 1 inter_agent_communication_metadata + 2 response_item agent_message
    assert parsed.unknown_lines == 8
    outputs = {o.call_id: o.output for o in parsed.items if isinstance(o, ToolOutput)}
    assert outputs["call-2"] == "a.txt\n"  # output as a content-item object
    assert outputs["call-1"] == "a.txt\nb.txt\n"  # output as a content-item list
    assert "/tmp/repo/a.txt" in patched_files(parsed.items)
    aborted = [i for i in parsed.items if isinstance(i, TurnEvent) and i.type == "turn_aborted"]
    assert aborted[0].text == "interrupted"
    shell = [i for i in parsed.items if isinstance(i, ToolCall) and i.call_id == "call-1"]
    assert shell[0].kind == "shell" and shell[0].command == "ls"  # shell as custom_tool_call


def test_schema_drift_rows_are_unknown() -> None:
    parsed = _parse("agentsessions-stage0-codex-schema_drift.jsonl")
    assert parsed.meta is None
    assert (parsed.lines, parsed.unknown_lines, parsed.skipped_lines) == (6, 6, 0)
    assert parsed.items == []


# --- malformed and odd lines --------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (
            b'{"type": "event_msg", "payload": {"type": "user_message", "message": "caf\xe9"}}\n',
            "invalid_utf8",
        ),
        (b"\xff\xfe{}\n", "invalid_utf8"),
        (b'{"timestamp": "2026-01-02T17:00:00Z", "type": "event_m', "invalid_json"),
        (b"{not json}\n", "invalid_json"),
        (b"[" * 50_000, "invalid_json"),
        (b"[1, 2]\n", "not_an_object"),
        (b'"session_meta"\n', "not_an_object"),
        (b"42\n", "not_an_object"),
        (b"null\n", "not_an_object"),
    ],
)
def test_malformed_lines(raw: bytes, reason: str) -> None:
    result = parse_line(raw)
    assert result.malformed == reason
    assert result.items == () and result.meta is None


@pytest.mark.parametrize("raw", [b"\n", b"", b"   \r\n", b"\t"])
def test_blank_line_is_unknown_not_malformed(raw: bytes) -> None:
    assert parse_line(raw) == parse_line(b"\n")
    assert parse_line(raw).unknown and parse_line(raw).malformed is None


def test_crlf_and_bom_are_tolerated() -> None:
    line = b"\xef\xbb\xbf" + _env("turn_context", {"model": "m"}).rstrip(b"\n") + b"\r\n"
    assert parse_line(line).items == (TurnContext(model="m", ts=1767373200.0),)


def test_bad_lines_are_counted_logged_once_each_and_nothing_is_lost() -> None:
    good = _env("event_msg", {"type": "user_message", "message": "hello"})
    data = good + b"{broken\n" + b"\xc3\x28\n" + good
    with capture_logs() as logs:
        parsed = parse_rollout_bytes(data, path="/x/rollout.jsonl")
    assert parsed.lines == 4 and parsed.skipped_lines == 2
    assert [i.text for i in parsed.items] == ["hello", "hello"]
    skipped = [e for e in logs if e["event"] == "line_skipped"]
    assert [(e["reason"], e["line"], e["path"]) for e in skipped] == [
        ("invalid_json", 2, "/x/rollout.jsonl"),
        ("invalid_utf8", 3, "/x/rollout.jsonl"),
    ]
    assert all(e["log_level"] == "warning" for e in skipped)


def test_skip_warnings_are_capped_but_all_lines_counted() -> None:
    with capture_logs() as logs:
        parsed = parse_rollout_bytes(b"{bad\n" * (MAX_SKIP_WARNINGS + 10))
    assert parsed.skipped_lines == MAX_SKIP_WARNINGS + 10
    assert sum(e["event"] == "line_skipped" for e in logs) == MAX_SKIP_WARNINGS


def test_feed_malformed_counts_oversize_lines() -> None:
    parser = RolloutParser(path="p")
    parser.feed([_env("turn_context", {"model": "m"})])
    with capture_logs() as logs:
        parser.feed_malformed(2, "line_too_long")
    parser.feed([_env("turn_context", {"model": "n"})])
    assert (parser.result.lines, parser.result.skipped_lines) == (4, 2)
    assert logs == []  # the reader that rejected the lines logs them; no second event
    assert [i.model for i in parser.result.items] == ["m", "n"]


def test_trailing_partial_line_is_ignored() -> None:
    good = _env("event_msg", {"type": "user_message", "message": "hi"})
    parsed = parse_rollout_bytes(good + good[:20])
    assert parsed.lines == 1 and parsed.skipped_lines == 0
    assert parse_rollout_bytes(good[:20]).lines == 0


def test_item_line_bytes_counts_the_source_line_once() -> None:
    a = _env("event_msg", {"type": "user_message", "message": "hi"})
    b = _env("event_msg", {"type": "token_count", "info": None})
    c = _env("turn_context", {"model": "m"})
    parsed = parse_rollout_bytes(a + b + c)
    assert parsed.item_line_bytes == [len(a), len(c)]
    parser = RolloutParser()
    parser.feed([a.rstrip(b"\n")])  # a line fed without its newline still counts it
    assert parser.result.item_line_bytes == [len(a)]


def test_random_bytes_never_raise() -> None:
    rng = random.Random(7)
    for _ in range(3000):
        raw = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 80)))
        result = parse_line(raw, first=rng.random() < 0.5)
        assert result.malformed in (None, "invalid_utf8", "invalid_json", "not_an_object")


def _mutate(value: object, rng: random.Random) -> object:
    odd = [None, 0, -1, 2.5, True, "", "x", [], {}, [None, 3], {"a": {}}, {"subagent": 5}]
    if isinstance(value, dict):
        out = {}
        for key, inner in value.items():
            roll = rng.random()
            if roll < 0.1:
                continue
            out[key] = rng.choice(odd) if roll < 0.25 else _mutate(inner, rng)
        return out
    if isinstance(value, list):
        return [_mutate(v, rng) for v in value]
    return value


def test_mutated_real_lines_never_raise(codex_rollouts: Path) -> None:
    rng = random.Random(11)
    objects = []
    for path in sorted(codex_rollouts.glob("*.jsonl")):
        for raw in path.read_bytes().splitlines():
            if 0 < len(raw) < 20_000:
                try:
                    objects.append(json.loads(raw))
                except ValueError:
                    pass
    for _ in range(3000):
        mutated = _mutate(rng.choice(objects), rng)
        raw = json.dumps(mutated).encode()
        for cut in (len(raw), rng.randint(0, len(raw))):  # whole and truncated
            parse_line(raw[:cut], first=rng.random() < 0.5)


@pytest.mark.parametrize(
    "payload",
    [
        {"type": "message", "role": "user", "content": "plain string content"},
        {"type": "message", "role": "user", "content": None},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": 5}]},
        {"type": "message", "role": ["user"], "content": []},
        {"type": "function_call", "name": "shell", "arguments": {"command": ["ls"]}},
        {"type": "function_call", "name": "shell", "arguments": None, "call_id": 7},
        {"type": "function_call", "name": "exec_command", "arguments": "[REDACTED]"},
        {"type": "function_call_output", "call_id": "c", "output": 12},
        {"type": "function_call_output", "call_id": "c", "output": '{"output": 3, "metadata": 1}'},
        {"type": "reasoning", "summary": "just a string"},
        {"type": ["not", "hashable"]},
        {"type": {"a": 1}},
    ],
)
def test_wrong_field_types_do_not_raise(payload: dict) -> None:
    result = parse_line(_env("response_item", payload))
    assert result.malformed is None


def test_wrong_field_type_values() -> None:
    (msg,) = parse_line(
        _env("response_item", {"type": "message", "role": "user", "content": "hey"})
    ).items
    assert isinstance(msg, UserMessage) and msg.text == "hey"
    (empty,) = parse_line(
        _env("response_item", {"type": "message", "role": "user", "content": None})
    ).items
    assert empty.text == ""
    (call,) = parse_line(
        _env(
            "response_item",
            {"type": "function_call", "name": "shell", "arguments": {"command": ["ls"]}},
        )
    ).items
    assert call.command == "ls"
    (out,) = parse_line(
        _env("response_item", {"type": "function_call_output", "call_id": "c", "output": None})
    ).items
    assert out == ToolOutput(call_id="c", output="", exit_code=None, ts=out.ts)
    (end,) = parse_line(
        _env("event_msg", {"type": "exec_command_end", "exit_code": "1", "command": 5})
    ).items
    assert isinstance(end, CommandEnd) and end.exit_code is None and end.command == ""
    nameless = parse_line(_env("response_item", {"type": "function_call", "name": 3}))
    assert nameless.unknown


# --- variants -----------------------------------------------------------------------------


def test_legacy_header_recognition() -> None:
    header = _line({"id": "s-1", "timestamp": "2025-06-01T10:00:00Z", "cwd": "/w"})
    meta = parse_line(header).meta
    assert meta is not None and meta.legacy and meta.cwd == "/w" and meta.source_kind == "unknown"
    assert meta.started_at == 1748772000.0
    assert parse_line(_line({"id": "s-2"}), first=True).meta is not None
    assert parse_line(_line({"id": "s-2"})).unknown  # no timestamp, not the first line
    assert parse_line(_line({"record_type": "state"}), first=True).unknown
    drift = parse_line(
        _line({"created_at": "2025-09-10T12:00:00Z", "role": "user", "message": "x"})
    )
    assert drift.unknown and drift.meta is None


def test_envelope_extra_keys_are_ignored() -> None:
    raw = _line(
        {
            "timestamp": "2026-08-03T10:48:56.000Z",
            "ordinal": 3,
            "metadata": {"x": 1},
            "type": "event_msg",
            "payload": {"type": "user_message", "message": "go"},
        }
    )
    (msg,) = parse_line(raw).items
    assert msg == UserMessage(text="go", origin="event", ts=1785754136.0)


@pytest.mark.parametrize(
    ("source", "label"),
    [
        ("cli", "cli"),
        ("vscode", "vscode"),
        ("exec", "exec"),
        ("mcp", "mcp"),
        ({"subagent": "review"}, "subagent:review"),
        (
            {"subagent": {"thread_spawn": {"parent_thread_id": "p", "depth": 1}}},
            "subagent:thread_spawn",
        ),
        ({"internal": "memory_consolidation"}, "internal:memory_consolidation"),
        ({"custom": "my-bot"}, "custom:my-bot"),
        ({"subagent": None}, "subagent"),
        ({}, "unknown"),
        (None, "unknown"),
        (17, "unknown"),
        ("something-new", "unknown:something-new"),
        ({"newkind": "x"}, "unknown:newkind"),
    ],
)
def test_session_meta_sources(source: object, label: str) -> None:
    payload = {"id": "t", "timestamp": "2026-01-01T00:00:00Z", "cwd": "/w"}
    if source is not None:
        payload["source"] = source
    meta = parse_line(_env("session_meta", payload)).meta
    assert meta is not None and meta.source_label == label


def test_session_meta_fields_and_missing_id() -> None:
    meta = parse_line(
        _env(
            "session_meta",
            {
                "id": "t",
                "session_id": "t",
                "timestamp": "bogus",
                "thread_source": "user",
                "memory_mode": "disabled",
                "git": {"branch": 5, "commit_hash": "abc"},
                "base_instructions": {"text": "x" * 1000},
            },
            ts="2026-01-01T00:00:00Z",
        )
    ).meta
    assert meta is not None
    assert (meta.thread_source, meta.memory_mode, meta.git_branch, meta.git_commit) == (
        "user",
        "disabled",
        None,
        "abc",
    )
    assert meta.started_at == 1767225600.0  # falls back to the envelope timestamp
    assert parse_line(_env("session_meta", {"cwd": "/w"})).unknown
    assert parse_session_meta(b'{"timestamp":"x","type":"session_meta","payload":{"id":"t"') is None


@pytest.mark.parametrize(
    ("output", "text", "code"),
    [
        ('{"output":"boom\\n","metadata":{"exit_code":3,"duration_seconds":0.1}}', "boom\n", 3),
        ("Exit code: 2\nWall time: 0.3 seconds\nOutput:\nnope\n", None, 2),
        (
            "Chunk ID: ab12\nWall time: 0.0 seconds\nProcess exited with code 127\n"
            "Original token count: 3\nOutput:\nzsh: command not found\n",
            None,
            127,
        ),
        ("Chunk ID: x\nProcess running with session ID 42\nOutput:\n", None, None),
        ("Chunk ID: x\nOutput:\nlog says Process exited with code 5\n", None, None),
        ("plain text mentioning Exit code: 4 later", None, None),
        ('{"output":"x","metadata":{"exit_code":true}}', "x", None),
        ("Plan updated", "Plan updated", None),
    ],
)
def test_tool_output_exit_codes(output: str, text: str | None, code: int | None) -> None:
    (out,) = parse_line(
        _env("response_item", {"type": "function_call_output", "call_id": "c", "output": output})
    ).items
    assert out.exit_code == code
    assert out.output == (text if text is not None else output)


@pytest.mark.parametrize(
    ("name", "arguments", "kind", "command"),
    [
        ("shell", {"command": ["bash", "-lc", "ls -la"]}, "shell", "ls -la"),
        ("shell", {"command": ["/bin/zsh", "-lc", "cat a b"]}, "shell", "cat a b"),
        (
            "shell",
            {"command": ["git", "commit", "-m", "two words"]},
            "shell",
            "git commit -m 'two words'",
        ),
        ("shell", {"command": "pwd"}, "shell", "pwd"),
        ("shell_command", {"command": "npm test", "workdir": "/w"}, "shell", "npm test"),
        ("exec_command", {"cmd": "rg foo", "workdir": "/w"}, "shell", "rg foo"),
        ("write_stdin", {"session_id": 1, "chars": ""}, "other", None),
        ("update_plan", {"plan": []}, "other", None),
        ("mcp__supabase__execute_sql", {"query": "select 1"}, "mcp", None),
    ],
)
def test_function_call_classification(
    name: str, arguments: dict, kind: str, command: str | None
) -> None:
    (call,) = parse_line(
        _env(
            "response_item",
            {
                "type": "function_call",
                "name": name,
                "arguments": json.dumps(arguments),
                "call_id": "c1",
            },
        )
    ).items
    assert (call.name, call.kind, call.command, call.call_id) == (name, kind, command, "c1")


def test_patch_headers_local_shell_and_web_search() -> None:
    patch = (
        "*** Begin Patch\n*** Add File: a.py\n+x\n*** Update File: b.py\n*** Move to: c.py\n"
        "@@\n-x\n+y\n*** Delete File: d.py\n*** Update File: a.py\n*** End Patch\n"
    )
    (call,) = parse_line(
        _env(
            "response_item",
            {"type": "custom_tool_call", "name": "apply_patch", "input": patch, "call_id": "p"},
        )
    ).items
    assert (call.kind, call.patch_files) == ("patch", ("a.py", "b.py", "c.py", "d.py"))
    (old_style,) = parse_line(
        _env(
            "response_item",
            {
                "type": "function_call",
                "name": "shell",
                "arguments": json.dumps({"command": ["apply_patch", patch]}),
            },
        )
    ).items
    assert old_style.kind == "patch" and old_style.patch_files == ("a.py", "b.py", "c.py", "d.py")
    (local,) = parse_line(
        _env(
            "response_item",
            {
                "type": "local_shell_call",
                "call_id": "l",
                "action": {"command": ["bash", "-c", "ls"]},
            },
        )
    ).items
    assert (local.kind, local.command) == ("shell", "ls")
    (search,) = parse_line(
        _env(
            "response_item", {"type": "web_search_call", "action": {"type": "search", "query": "q"}}
        )
    ).items
    assert (search.kind, search.arguments) == ("web_search", "q")


@pytest.mark.parametrize(
    ("kind", "payload"),
    [
        (
            "response_item",
            {
                "type": "message",
                "role": "developer",
                "content": [{"type": "input_text", "text": "x"}],
            },
        ),
        ("response_item", {"type": "message", "role": "system", "content": []}),
        ("response_item", {"type": "ghost_snapshot", "ghost_commit": {}}),
        ("response_item", {"type": "compaction", "encrypted_content": "x"}),
        ("response_item", {"type": "reasoning", "summary": [], "encrypted_content": "x"}),
        ("event_msg", {"type": "token_count", "info": None}),
        ("event_msg", {"type": "agent_reasoning", "text": "x"}),
        ("event_msg", {"type": "entered_review_mode"}),
    ],
)
def test_modelled_noise_is_empty_not_unknown(kind: str, payload: dict) -> None:
    result = parse_line(_env(kind, payload))
    assert result == parse_line(_env("event_msg", {"type": "token_count"}))
    assert not result.unknown and not result.items and result.malformed is None


@pytest.mark.parametrize(
    "raw",
    [
        _env("world_state", {"full": True}),
        _env("inter_agent_communication_metadata", {"trigger_turn": False}),
        _env("event_msg", {"type": "brand_new_event"}),
        _env("response_item", {"type": "brand_new_item"}),
        _env("session_meta", "not a dict"),  # type: ignore[arg-type]
        _line({"created_at": "2025-09-10T12:00:00Z", "type": "function_result", "result": "hola"}),
    ],
)
def test_unknown_shapes(raw: bytes) -> None:
    result = parse_line(raw)
    assert result.unknown and result.malformed is None and not result.items


def test_events_map_to_records() -> None:
    ts = 1767373200.0
    lines = [
        _env("event_msg", {"type": "agent_message", "message": "done", "phase": "final_answer"}),
        _env(
            "event_msg",
            {
                "type": "exec_command_end",
                "call_id": "c",
                "command": ["bash", "-lc", "make"],
                "exit_code": 2,
                "aggregated_output": "err",
            },
        ),
        _env(
            "event_msg",
            {
                "type": "patch_apply_end",
                "call_id": "p",
                "success": False,
                "changes": {"/w/a.py": {"type": "update"}},
            },
        ),
        _env("event_msg", {"type": "task_complete", "last_agent_message": "bye"}),
        _env("event_msg", {"type": "turn_aborted", "reason": "interrupted"}),
        _env("event_msg", {"type": "thread_rolled_back", "num_turns": 2}),
        _env("event_msg", {"type": "error", "message": "rate limited"}),
        _env(
            "compacted",
            {
                "message": "summary",
                "replacement_history": [
                    {
                        "type": "message",
                        "role": "user",
                        "content": [{"type": "input_text", "text": "real"}],
                    },
                    {
                        "type": "message",
                        "role": "user",
                        "content": [{"type": "input_text", "text": "<environment_context>x"}],
                    },
                    {
                        "type": "message",
                        "role": "assistant",
                        "content": [{"type": "output_text", "text": "a"}],
                    },
                ],
            },
        ),
    ]
    assert _items(*lines) == [
        AssistantMessage(text="done", phase="final_answer", origin="event", ts=ts),
        CommandEnd(call_id="c", command="make", exit_code=2, output="err", ts=ts),
        PatchApplied(call_id="p", success=False, files=("/w/a.py",), ts=ts),
        TurnEvent(type="task_complete", text="bye", ts=ts),
        TurnEvent(type="turn_aborted", text="interrupted", ts=ts),
        TurnEvent(type="thread_rolled_back", num_turns=2, ts=ts),
        TurnEvent(type="error", text="rate limited", ts=ts),
        Compaction(message="summary", replaced_user_messages=1, ts=ts),
    ]


def test_user_message_images() -> None:
    (resp,) = parse_line(
        _env(
            "response_item",
            {
                "type": "message",
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "look"},
                    {"type": "input_image", "image_url": "data:..."},
                ],
            },
        )
    ).items
    assert (resp.text, resp.images) == ("look\n[image]", 1)
    (event,) = parse_line(
        _env(
            "event_msg",
            {
                "type": "user_message",
                "message": "look",
                "images": ["x"],
                "local_images": ["/a.png"],
            },
        )
    ).items
    assert event.images == 2


# --- injected context ---------------------------------------------------------------------


@pytest.mark.parametrize("prefix", INJECTED_PREFIXES)
def test_injected_prefixes(prefix: str) -> None:
    assert is_injected_text(prefix + "\nbody")
    assert is_injected_text("  \n" + prefix.upper() + " body")  # leading space, any case
    (msg,) = parse_line(
        _env(
            "response_item",
            {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": prefix}],
            },
        )
    ).items
    assert msg.injected


@pytest.mark.parametrize(
    "text",
    [
        "fix the tests",
        "# Context from my IDE setup:\n\n## My request for Codex:\nrename foo",
        "please read AGENTS.md instructions first",
        "<environment> is not a marker",
    ],
)
def test_real_user_text_is_not_injected(text: str) -> None:
    assert not is_injected_text(text)


def test_memd_marker_and_event_kinds_are_injected() -> None:
    assert MEMD_MEMORY_MARKER == "<memd_memory>"
    (memd,) = parse_line(
        _env("event_msg", {"type": "user_message", "message": MEMD_MEMORY_MARKER + "x"})
    ).items
    assert memd.injected
    (kind,) = parse_line(
        _env(
            "event_msg",
            {"type": "user_message", "message": "cwd: /w", "kind": "environment_context"},
        )
    ).items
    assert kind.injected
    (plain,) = parse_line(
        _env("event_msg", {"type": "user_message", "message": "hi", "kind": "plain"})
    ).items
    assert not plain.injected


# --- dedupe, stats ------------------------------------------------------------------------


def _user(text: str, origin: str, injected: bool = False) -> UserMessage:
    return UserMessage(text=text, origin=origin, injected=injected)  # type: ignore[arg-type]


def test_real_user_messages_dedupe() -> None:
    both = [
        _user("<environment_context>", "response", True),
        _user("do it", "response"),
        _user("do it", "event"),
        _user("do it", "response"),  # the user really sent it twice
        _user("do it", "event"),
    ]
    assert [m.origin for m in real_user_messages(both)] == ["event", "event"]
    legacy = [_user("a", "response"), _user("<skill>x", "response", True), _user("b", "response")]
    assert [m.text for m in real_user_messages(legacy)] == ["a", "b"]
    only_injected_event = [_user("ctx", "event", True), _user("real", "response")]
    assert real_user_messages(only_injected_event) == []


def test_thread_stats_across_chunks_and_json() -> None:
    stats = ThreadStats()
    stats.feed([_user("first ask\nwith two lines", "response")])  # chunk ends before the event
    assert (stats.user_messages, stats.title) == (1, "first ask with two lines")
    stats = ThreadStats.from_json(stats.to_json())
    stats.feed([_user("first ask\nwith two lines", "event"), TurnContext(model="gpt-x", ts=5.0)])
    stats.feed([_user("second", "response"), _user("second", "event", False)])
    assert (stats.user_messages, stats.title, stats.model, stats.last_ts) == (
        2,
        "first ask with two lines",
        "gpt-x",
        5.0,
    )
    assert ThreadStats.from_json(stats.to_json()) == stats


@pytest.mark.parametrize(
    "text", [None, "", "not json", "[1]", '{"lines": "x", "model": 3, "last_ts": true}']
)
def test_thread_stats_from_bad_json_is_fresh(text: str | None) -> None:
    assert ThreadStats.from_json(text) == ThreadStats()


def test_title_is_one_line_and_capped() -> None:
    title = one_line_title("word " * 100)
    assert len(title) == 120 and title.endswith("…") and "\n" not in title
    assert one_line_title("  a\n\tb  ") == "a b"


# --- commands and patches -----------------------------------------------------------------


def _call(call_id: str, name: str, arguments: dict) -> bytes:
    return _env(
        "response_item",
        {
            "type": "function_call",
            "name": name,
            "arguments": json.dumps(arguments),
            "call_id": call_id,
        },
    )


def _output(call_id: str, output: str, kind: str = "function_call_output") -> bytes:
    return _env("response_item", {"type": kind, "call_id": call_id, "output": output})


def test_commands_pair_outputs_and_events_without_duplicates() -> None:
    items = _items(
        _call("a", "shell", {"command": ["bash", "-lc", "make test"]}),
        _output("a", "Exit code: 0\nOutput:\n"),
        _env(
            "event_msg",
            {
                "type": "exec_command_end",
                "call_id": "a",
                "command": ["bash", "-lc", "make test"],
                "exit_code": 3,
                "aggregated_output": "fail",
            },
        ),
        _env(
            "event_msg",
            {"type": "exec_command_end", "call_id": "u", "command": "ls", "exit_code": 0},
        ),
        _call("b", "shell_command", {"command": "pwd"}),
    )
    assert commands(items) == [
        CommandRun(command="make test", exit_code=3, output="Exit code: 0\nOutput:\n", call_id="a"),
        CommandRun(command="ls", exit_code=0, output="", call_id="u"),
        CommandRun(command="pwd", exit_code=None, output="", call_id="b"),
    ]


def test_unified_exec_exit_code_arrives_through_write_stdin() -> None:
    items = _items(
        _call("e", "exec_command", {"cmd": "npm test"}),
        _output("e", "Chunk ID: 1\nProcess running with session ID 7\nOutput:\nstarting\n"),
        _call("w", "write_stdin", {"session_id": 7, "chars": ""}),
        _output("w", "Chunk ID: 2\nProcess exited with code 1\nOutput:\n1 failed\n"),
    )
    (run,) = commands(items)
    assert (run.command, run.exit_code, run.call_id) == ("npm test", 1, "e")
    assert "1 failed" in run.output and "starting" in run.output


def test_redacted_arguments_fall_back_to_raw_text() -> None:
    items = _items(
        _env(
            "response_item",
            {
                "type": "function_call",
                "name": "exec_command",
                "arguments": "[REDACTED_ARGUMENTS len=9]",
                "call_id": "r",
            },
        )
    )
    assert commands(items) == [CommandRun("[REDACTED_ARGUMENTS len=9]", None, "", "r")]


def _patch_call(call_id: str, *files: str) -> bytes:
    body = "".join(f"*** Update File: {f}\n" for f in files)
    return _env(
        "response_item",
        {
            "type": "custom_tool_call",
            "name": "apply_patch",
            "call_id": call_id,
            "input": f"*** Begin Patch\n{body}*** End Patch\n",
        },
    )


def test_patched_files_skip_failed_patches_and_dedupe() -> None:
    items = _items(
        _patch_call("1", "a.py", "b.py"),
        _output("1", '{"output":"Success.","metadata":{"exit_code":0}}', "custom_tool_call_output"),
        _patch_call("2", "c.py"),
        _output(
            "2",
            "apply_patch verification failed: Failed to find expected lines",
            "custom_tool_call_output",
        ),
        _patch_call("3", "d.py"),
        _env(
            "event_msg",
            {
                "type": "patch_apply_end",
                "call_id": "3",
                "success": False,
                "changes": {"/w/d.py": {}},
            },
        ),
        _patch_call("4", "b.py", "e.py"),  # no output yet: unknown counts
        _patch_call("5", "f.py"),
        _output("5", '{"output":"x","metadata":{"exit_code":1}}', "custom_tool_call_output"),
        _env(
            "event_msg",
            {
                "type": "patch_apply_end",
                "call_id": "6",
                "success": True,
                "changes": {"/w/g.py": {}},
            },
        ),
    )
    assert patched_files(items) == ["a.py", "b.py", "e.py", "/w/g.py"]


# --- lines recognised without decoding (noise events, reasoning without summary) -------------


def _compact(kind: str, payload: dict) -> bytes:
    """A line as Codex writes it: compact JSON, timestamp first."""
    obj = {"timestamp": "2026-03-08T10:22:22.981Z", "type": kind, "payload": payload}
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


TOKEN_COUNT = _compact(
    "event_msg",
    {
        "type": "token_count",
        "info": {"total_token_usage": {"input_tokens": 5}},
        "rate_limits": None,
    },
)


def test_compact_noise_lines_are_empty_and_counted_once() -> None:
    reasoning = _compact(
        "response_item", {"type": "reasoning", "summary": [], "encrypted_content": "gAAA" * 50}
    )
    parsed = parse_rollout_bytes(TOKEN_COUNT + reasoning + TOKEN_COUNT)
    assert (parsed.lines, parsed.skipped_lines, parsed.unknown_lines, parsed.items) == (3, 0, 0, [])
    assert parse_line(TOKEN_COUNT) == parse_line(_env("event_msg", {"type": "token_count"}))


def test_cut_or_garbled_compact_noise_lines_are_still_malformed() -> None:
    cut = TOKEN_COUNT[:70] + b"\n"  # ends inside the payload
    unbalanced = TOKEN_COUNT.replace(b"{\"input_tokens\"", b"{{\"input_tokens\"")
    with capture_logs():
        parsed = parse_rollout_bytes(cut + unbalanced + TOKEN_COUNT)
    assert (parsed.lines, parsed.skipped_lines) == (3, 2)
    assert parse_line(cut).malformed == "invalid_json"


@pytest.mark.parametrize(
    "line, expected",
    [
        # A reasoning item with a summary is kept.
        (_compact("response_item", {"type": "reasoning", "summary": [{"text": "plan"}]}),
         (Reasoning(summary="plan", ts=1772965342.981),)),
        # A modelled event that looks like the noise lines is decoded.
        (_compact("event_msg", {"type": "user_message", "message": "fix it"}),
         (UserMessage("fix it", origin="event", injected=False, images=0, ts=1772965342.981),)),
        # Not ASCII: the full path (same result).
        (_compact("event_msg", {"type": "agent_reasoning", "text": "café"}), ()),
        # Another key between timestamp and type (newer files): the full path.
        (b'{"timestamp":"2026-03-08T10:22:22.981Z","ordinal":3,"type":"event_msg",'
         b'"payload":{"type":"token_count","info":null}}\n', ()),
    ],
)
def test_lines_near_the_noise_shape_parse_normally(line: bytes, expected: tuple) -> None:
    result = parse_line(line)
    assert result.items == expected and result.malformed is None and not result.unknown


def test_patch_headers_count_only_at_line_starts() -> None:
    patch = (
        "*** Begin Patch\n*** Update File: src/a.py\n@@\n-x\n+y\n"
        "note: *** Add File: not/a/file.py\n*** Add File: b.txt\n+new\n*** End Patch"
    )
    call = _compact(
        "response_item",
        {"type": "custom_tool_call", "name": "apply_patch", "input": patch, "call_id": "c1"},
    )
    (item,) = parse_line(call).items
    assert isinstance(item, ToolCall) and item.patch_files == ("src/a.py", "b.txt")
