"""Streaming input building (SPEC §6.2, §15 "memory bounded by the output").

:func:`memd.extract.prepare.build_request` streams a rollout through an
:class:`~memd.extract.input_builder.InputBuilder` in batches, dropping what can no longer fit the
budget as it goes. What it builds must be what :func:`build_input` builds from the whole parsed
rollout (the path before streaming): compared here over every real transcript, synthetic ones of
every variant and random item sequences, at budgets that drop most of a session; and what it holds
stays bounded while the file grows.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

import pytest

from memd.bench import corpus, corpus_claude
from memd.extract import prepare
from memd.extract.base import BuiltInput
from memd.extract.input_builder import InputBuilder, build_input
from memd.extract.prepare import InputLimits, build_request, load_rollout, stream_items
from memd.read.upkeep import UsageRecorder
from memd.read.usage import SEARCH_TOOL, tool_uses
from memd.rollout.claude import ClaudeParser
from memd.rollout.records import (
    Agent,
    AssistantMessage,
    CommandEnd,
    Compaction,
    Item,
    ParsedRollout,
    PatchApplied,
    Reasoning,
    ToolCall,
    ToolOutput,
    TurnEvent,
    UserMessage,
)
from memd.store.records import ThreadRecord
from tests.conftest import SHARED_ROLLOUTS

MAX_LINE_BYTES = 64 << 20
#: (max_input_tokens, tool_output_cap_bytes): the default budget, and budgets that drop most items.
BUDGETS = ((120_000, 4096), (5_000, 4096), (800, 300))


def _thread(path: Path, agent: Agent) -> ThreadRecord:
    return ThreadRecord(
        id="t1",
        path=str(path),
        project="/p",
        cwd="/p",
        source="cli",
        originator="",
        cli_version="",
        model="",
        title="",
        created_at=0.0,
        updated_at=0.0,
        watermark=path.stat().st_size,
        user_messages=1,
        skipped_lines=0,
        eligible=True,
        reason=None,
        agent=agent,
    )


def _whole(path: Path, agent: Agent, tokens: int, cap: int) -> BuiltInput:
    """The input built from the whole parsed rollout."""
    parsed = load_rollout(str(path), path.stat().st_size, MAX_LINE_BYTES, agent)
    return build_input(parsed, max_input_tokens=tokens, tool_output_cap_bytes=cap)


def _streamed(path: Path, agent: Agent, tokens: int, cap: int) -> BuiltInput:
    """The input :func:`build_request` streams the rollout into."""
    limits = InputLimits(max_line_bytes=MAX_LINE_BYTES, tool_output_cap_bytes=cap)
    return build_request(_thread(path, agent), limits, max_input_tokens=tokens, bytes_per_token=4.0).built


def _assert_same(path: Path, agent: Agent, monkeypatch: pytest.MonkeyPatch, batches: tuple[int, ...]) -> int:
    """Compare both paths at every budget and batch size; returns how many builds dropped items."""
    dropped = 0
    for tokens, cap in BUDGETS:
        whole = _whole(path, agent, tokens, cap)
        dropped += whole.omitted_items > 0
        for lines in batches:
            monkeypatch.setattr(prepare, "PARSE_BATCH_LINES", lines)
            streamed = _streamed(path, agent, tokens, cap)
            assert streamed.text == whole.text, (path.name, tokens, lines)
            assert streamed.items == whole.items, (path.name, tokens, lines)
            assert streamed == whole, (path.name, tokens, lines)
    return dropped


def test_every_real_transcript_streams_to_the_same_input(monkeypatch: pytest.MonkeyPatch) -> None:
    files = [(p, Agent.CODEX) for p in sorted((SHARED_ROLLOUTS / "codex").glob("*.jsonl"))]
    files += [(p, Agent.CLAUDE) for p in sorted((SHARED_ROLLOUTS / "claude").glob("*.jsonl"))]
    if not files:
        pytest.skip(f"real transcripts not available: {SHARED_ROLLOUTS} is absent (they live in ../shared)")
    dropped = sum(_assert_same(path, agent, monkeypatch, (1, 64, 4096)) for path, agent in files)
    assert dropped > len(files) // 2  # the small budgets drop items from many sessions: pruning ran


@pytest.mark.parametrize("variant", corpus.VARIANTS)
def test_synthetic_codex_rollouts_stream_to_the_same_input(
    variant: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "rollout.jsonl"
    corpus.generate_rollout(path, target_bytes=400_000, variant=variant, seed=7)
    assert _assert_same(path, Agent.CODEX, monkeypatch, (1, 50)) == 2  # both small budgets drop items


@pytest.mark.parametrize("variant", corpus_claude.CLAUDE_VARIANTS)
def test_synthetic_claude_sessions_stream_to_the_same_input(
    variant: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    facts = corpus_claude.generate_claude_session(tmp_path, target_bytes=400_000, variant=variant, seed=5, subagents=0)
    assert _assert_same(facts.path, Agent.CLAUDE, monkeypatch, (1, 50)) == 2


# --- random item sequences -------------------------------------------------------------------


def _words(r: random.Random, n: int) -> str:
    return " ".join(r.choice(("alpha", "beta", "gamma", "delta", "token=abc", "\n", "é")) for _ in range(n))


def _random_item(r: random.Random, origins: tuple[str, ...]) -> Item:  # noqa: C901 - one branch per shape
    call_id = f"c{r.randrange(12)}"
    roll = r.random()
    if roll < 0.10:
        return UserMessage(_words(r, r.randrange(1, 40)), origin=r.choice(origins), injected=r.random() < 0.1)  # type: ignore[arg-type]
    if roll < 0.22:
        phase = r.choice((None, "commentary", "final_answer"))
        origin = r.choice(("response", "event")) if r.random() < 0.3 else "response"
        return AssistantMessage(_words(r, r.randrange(0, 300)), phase=phase, origin=origin)  # type: ignore[arg-type]
    if roll < 0.27:
        return Reasoning(_words(r, r.randrange(0, 80)))
    if roll < 0.42:
        return ToolCall(call_id, "exec_command", "shell", command=r.choice(("", "ls", _words(r, 9))), arguments="{}")
    if roll < 0.46:
        args = json.dumps({"session_id": r.randrange(3), "chars": r.choice(("", "", "y\n"))})
        return ToolCall(call_id, "write_stdin", "other", arguments=args)
    if roll < 0.50:
        patch = "*** Begin Patch\n*** Update File: a.py\n+x\n-y\n" + "+z\n" * r.randrange(50) + "*** End Patch"
        return ToolCall(call_id, "apply_patch", "patch", arguments=patch, patch_files=("a.py",))
    if roll < 0.53:
        return ToolCall(call_id, r.choice(("update_plan", "mcp__x__y", "web_search")), "other", arguments='{"q": 1}')
    if roll < 0.72:
        head = "Process running with session ID 1\nOutput:\n" if r.random() < 0.2 else ""
        code = r.choice((None, 0, 1, 127))
        return ToolOutput(call_id, head + _words(r, r.randrange(0, 400)), exit_code=code, is_error=r.random() < 0.1)
    if roll < 0.84:
        code = r.choice((None, 0, 2))
        return CommandEnd(call_id, _words(r, 3), exit_code=code, output=_words(r, r.randrange(0, 400)))
    if roll < 0.88:
        return PatchApplied(call_id, success=r.random() < 0.7, files=("a.py",))
    if roll < 0.90:
        return Compaction(_words(r, r.randrange(0, 50)))
    return TurnEvent(r.choice(("task_complete", "task_complete", "error", "turn_aborted", "thread_rolled_back")))


def test_random_item_sequences_stream_to_the_same_input() -> None:
    r = random.Random(20260301)
    dropped = 0
    for case in range(400):
        origins = r.choice((("event", "response"), ("response",), ("event",)))
        items = [_random_item(r, origins) for _ in range(r.randrange(1, 160))]
        sizes = [r.randrange(0, 2000) for _ in items]
        tokens = r.choice((40, 150, 600, 5000))
        whole = build_input(ParsedRollout(items=items, item_line_bytes=sizes), max_input_tokens=tokens)
        builder = InputBuilder(max_input_tokens=tokens)
        start = 0
        while start < len(items):
            end = start + r.randrange(1, 30)
            builder.add(items[start:end], sizes[start:end])
            start = end
        assert builder.finish() == whole, case
        dropped += whole.omitted_items > 0
    assert dropped > 150


# --- the rules streaming relies on -----------------------------------------------------------


def test_the_last_final_answer_is_kept_however_much_follows() -> None:
    items: list[Item] = [
        UserMessage("fix the build", origin="event"),
        AssistantMessage("Fixed: the build passes.", phase="final_answer"),
    ]
    for n in range(300):
        items += [ToolCall(f"c{n}", "exec_command", "shell", command=f"make step{n}"), ToolOutput(f"c{n}", "x " * 500)]
        items.append(CommandEnd(f"c{n}", f"make step{n}", exit_code=0, output="x " * 500))
    builder = InputBuilder(max_input_tokens=2_000)
    for n in range(0, len(items), 10):
        builder.add(items[n : n + 10], [1000] * len(items[n : n + 10]))
    assert builder.held_items < 100  # most commands were dropped as they came
    built = builder.finish()
    assert "assistant: Fixed: the build passes." in built.text
    assert built == build_input(ParsedRollout(items=items, item_line_bytes=[1000] * len(items)), max_input_tokens=2_000)


def test_response_copies_vanish_when_an_event_copy_comes_late() -> None:
    items: list[Item] = []
    for n in range(200):
        items += [UserMessage(f"question {n}", origin="response"), ToolCall(f"c{n}", "shell", "shell", command="ls")]
        items.append(ToolOutput(f"c{n}", "file " * 200))
    items.append(UserMessage("the only event copy", origin="event"))
    builder = InputBuilder(max_input_tokens=1_000)
    for n in range(0, len(items), 7):
        builder.add(items[n : n + 7], [500] * len(items[n : n + 7]))
    built = builder.finish()
    assert "question" not in built.text and "user: the only event copy" in built.text
    assert built == build_input(ParsedRollout(items=items, item_line_bytes=[500] * len(items)), max_input_tokens=1_000)


def test_an_end_event_can_shrink_a_command_back_into_the_budget() -> None:
    # Unified exec: polled chunks, then the end event whose aggregated output replaces them.
    items: list[Item] = [
        UserMessage("build it", origin="event"),
        ToolCall("c1", "exec_command", "shell", command="make"),
    ]
    items += [ToolOutput("c1", f"chunk {n} " + "x " * 1500) for n in range(8)]
    items += [Reasoning("checking"), CommandEnd("c1", "make", exit_code=0, output="build ok")]
    whole = build_input(ParsedRollout(items=items, item_line_bytes=[5_000] * len(items)), max_input_tokens=1_000)
    assert "$ make\n  build ok\nexit 0" in whole.text and whole.omitted_items == 0
    builder = InputBuilder(max_input_tokens=1_000)
    for item in items:
        builder.add([item], [5_000])  # a pruning pass after every item
    assert builder.finish() == whole


def test_a_second_end_event_of_one_call_renders_on_its_own() -> None:
    items: list[Item] = [
        ToolCall("c1", "exec_command", "shell", command="make"),
        CommandEnd("c1", "make", exit_code=0, output="built"),
        CommandEnd("c1", "make again", exit_code=2, output="failed"),
    ]
    assert build_input(ParsedRollout(items=items)).text == "$ make\n  built\nexit 0\n$ make again\n  failed\nexit 2"


def test_an_output_after_its_command_was_dropped_is_counted_as_omitted() -> None:
    items: list[Item] = [UserMessage("go", origin="event"), ToolCall("old", "exec_command", "shell", command="serve")]
    items += [ToolOutput("old", "started " * 100), CommandEnd("old", "serve", exit_code=0, output="up " * 100)]
    for n in range(100):
        items += [ToolCall(f"c{n}", "exec_command", "shell", command="ls"), CommandEnd(f"c{n}", "ls", 0, "a " * 300)]
    items.append(ToolOutput("old", "late chunk"))
    whole = build_input(ParsedRollout(items=items), max_input_tokens=500)
    builder = InputBuilder(max_input_tokens=500)
    for n in range(0, len(items), 5):
        builder.add(items[n : n + 5], [400] * len(items[n : n + 5]))
    built = builder.finish()
    assert built.text == whole.text and built.omitted_items == whole.omitted_items
    assert "late chunk" not in built.text and built.text.startswith("user: go\n[... ")


def test_add_or_finish_after_finish_is_an_error() -> None:
    builder = InputBuilder()
    builder.add([UserMessage("hi", origin="event")])
    assert builder.finish().text == "user: hi"
    with pytest.raises(RuntimeError):
        builder.add([UserMessage("again", origin="event")])
    with pytest.raises(RuntimeError):
        builder.finish()


def _claude_line(obj: dict[str, object]) -> bytes:
    base = {"sessionId": "s1", "cwd": "/p", "timestamp": "2026-01-02T10:00:00Z", "isSidechain": False}
    return json.dumps({**base, **obj}).encode()


def test_the_claude_parser_hands_on_a_message_once_another_one_began() -> None:
    def assistant(message_id: str, block: dict[str, object]) -> bytes:
        return _claude_line(
            {"type": "assistant", "message": {"id": message_id, "role": "assistant", "content": [block]}}
        )

    parser = ClaudeParser()
    parser.feed([assistant("m1", {"type": "text", "text": "Looking."})])
    parser.feed([assistant("m1", {"type": "tool_use", "id": "tu1", "name": "Bash", "input": {"command": "ls"}})])
    tool_result = {"type": "tool_result", "tool_use_id": "tu1", "content": "a.py"}
    parser.feed([_claude_line({"type": "user", "message": {"role": "user", "content": [tool_result]}})])
    parser.feed([assistant("m1", {"type": "text", "text": "Found a.py."})])
    held, _ = parser.take_items()
    assert not any(isinstance(it, AssistantMessage) for it in held)  # m1 may still grow
    parser.feed([assistant("m2", {"type": "text", "text": "Done."})])
    items, sizes = parser.take_items()
    assert [type(it).__name__ for it in items] == ["AssistantMessage", "ToolCall", "ToolOutput"]
    assert isinstance(items[0], AssistantMessage) and items[0].text == "Looking.\nFound a.py."
    assert len(sizes) == len(items)
    rest, _ = parser.take_items(final=True)
    assert [it.text for it in rest if isinstance(it, AssistantMessage)] == ["Done."]


def test_the_usage_observer_sees_whole_memd_calls_and_citations_and_nothing_else(tmp_path: Path) -> None:
    answer = {"project": "/p", "hits": [{"path": f"trace_summaries/t{n}.md", "entry": ""} for n in range(400)]}
    lines = [
        {"type": "session_meta", "payload": {"id": "t1", "timestamp": "2026-01-02T10:00:00Z", "cwd": "/p"}},
        {"type": "event_msg", "payload": {"type": "user_message", "message": "find the notes"}},
        {"type": "response_item", "payload": {"type": "function_call", "name": SEARCH_TOOL, "arguments": "{}", "call_id": "m1"}},
        {"type": "response_item", "payload": {"type": "function_call_output", "call_id": "m1", "output": json.dumps(answer)}},
        {"type": "response_item", "payload": {"type": "function_call", "name": "shell", "arguments": '{"command": ["ls"]}', "call_id": "s1"}},
        {"type": "response_item", "payload": {"type": "function_call_output", "call_id": "s1", "output": "a.py"}},
        {"type": "response_item", "payload": {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "ok <oai-mem-citation>x</oai-mem-citation>"}]}},
    ]  # fmt: skip
    path = tmp_path / "rollout.jsonl"
    path.write_text("".join(json.dumps({"timestamp": "2026-01-02T10:00:00Z", **line}) + "\n" for line in lines))

    class Collect:
        wants = UsageRecorder(tmp_path / "db", tmp_path).wants

        def __init__(self) -> None:
            self.items: list[Item] = []

        def __call__(self, thread: ThreadRecord, items: Sequence[Item]) -> None:
            self.items = list(items)

    seen = Collect()
    limits = InputLimits(max_line_bytes=MAX_LINE_BYTES, tool_output_cap_bytes=256)
    built = build_request(_thread(path, Agent.CODEX), limits, max_input_tokens=1000, bytes_per_token=4.0, observe=seen)
    assert [type(it).__name__ for it in seen.items] == ["ToolCall", "ToolOutput", "AssistantMessage"]
    assert isinstance(seen.items[1], ToolOutput) and json.loads(seen.items[1].output) == answer  # not capped
    everything = load_rollout(str(path), path.stat().st_size, MAX_LINE_BYTES).items
    uses = tool_uses(seen.items, thread_id="t1", default_ts=0.0)
    assert uses == tool_uses(everything, thread_id="t1", default_ts=0.0) and len(uses) == 400
    assert built.built.text.count("[...") >= 1  # the input itself caps that output


# --- memory -------------------------------------------------------------------------------------


def test_streaming_holds_a_batch_and_the_output_however_long_the_rollout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Counted, not timed or weighed: the items the builder holds and the bytes of each batch of
    # lines handed on (the peak RSS of a real run is the bench's peak_rss_large_mb).
    batch_bytes = 256 << 10
    monkeypatch.setattr(prepare, "PARSE_BATCH_BYTES", batch_bytes)
    for size in (4_000_000, 20_000_000):
        path = tmp_path / f"r{size}.jsonl"
        corpus.generate_rollout(path, target_bytes=size, variant="0.125", seed=1)
        builder = InputBuilder(max_input_tokens=20_000)
        held = seen = 0
        for items, line_bytes in stream_items(str(path), path.stat().st_size, MAX_LINE_BYTES):
            assert len(line_bytes) == len(items)
            assert sum(line_bytes) < batch_bytes + max(line_bytes, default=0)  # one batch of lines at a time
            builder.add(items, line_bytes)
            seen += len(items)
            held = max(held, builder.held_items)
        built = builder.finish()
        assert built.omitted_items > 300 and seen > 5 * held
        # What the output keeps (every user message among them, so it grows with the turns), and
        # little more: never the items of the whole file.
        assert held < len(built.items) + 100
