"""The extractor output contract (SPEC §6.3): schema, normalisation, caps, lenient JSON."""

from __future__ import annotations

import re

import pydantic
import pytest

from memd.extract.contract import (
    SUMMARY_MAX_BYTES,
    TRACE_MEMORY_MAX_BYTES,
    TRACE_OUTPUT_JSON_SCHEMA,
    TraceContext,
    TraceOutput,
    cut_middle,
    has_skeleton,
    normalise,
)
from memd.extract.redact import REDACTED
from memd.jsonish import parse_lenient_json

CTX = TraceContext(project="memd", date="2026-01-02", agent="codex", model="gpt-5")

GOOD = """# Fixed the flaky watcher test by injecting the clock.
Trace context: memd, 2026-01-02, codex, gpt-5
User preferences:
- never sleep in tests
## Task: Fix flaky watcher test
Outcome: success
Key steps: replaced time.sleep with FakeClock.advance
Things that did not work / things that can be improved: polling with sleep(0.1)
Reusable knowledge: `pytest tests/test_sources_watch.py` passes in 2 s
Pointers and references (annotate why each item matters): memd/clock.py — the injected clock"""

_MARKER = re.compile(r"\n\[\.\.\. (\d+) bytes cut \.\.\.\]\n")


def test_trace_output_validates_and_ignores_extra_keys() -> None:
    out = TraceOutput.model_validate({"trace_memory": "x", "summary": "y", "confidence": 0.3})
    assert (out.trace_memory, out.summary) == ("x", "y")
    with pytest.raises(pydantic.ValidationError):
        TraceOutput.model_validate({"trace_memory": "x"})
    with pytest.raises(pydantic.ValidationError):
        TraceOutput.model_validate({"trace_memory": 3, "summary": None})


def test_json_schema_is_strict() -> None:
    schema = TRACE_OUTPUT_JSON_SCHEMA
    assert schema["type"] == "object"
    assert schema["additionalProperties"] is False
    assert sorted(schema["required"]) == ["summary", "trace_memory"]
    assert set(schema["properties"]) == {"trace_memory", "summary"}
    assert all(p["type"] == "string" for p in schema["properties"].values())


def test_skeleton_check() -> None:
    assert has_skeleton(GOOD)
    assert not has_skeleton(GOOD.replace("# Fixed", "Fixed"))
    assert not has_skeleton(GOOD.replace("Trace context:", "Context:"))
    assert not has_skeleton(GOOD.replace("User preferences:", "Prefs:"))
    assert not has_skeleton(GOOD.replace("## Task:", "## Job:"))
    assert not has_skeleton(GOOD.replace("Outcome:", "Result:"))
    # Outcome must follow a task heading.
    moved = GOOD.replace("Outcome: success\n", "").replace(
        "User preferences:", "Outcome: success\nUser preferences:"
    )
    assert not has_skeleton(moved)


def test_both_empty_is_the_noop() -> None:
    out = normalise("  \n ", "\t", context=CTX)
    assert out.noop and out.trace_memory == "" and out.summary == "" and not out.wrapped


def test_conforming_output_is_trimmed_and_kept() -> None:
    out = normalise(f"\n\n{GOOD}\n\n", "  Injected FakeClock; tests pass.  ", context=CTX)
    assert not out.noop and not out.wrapped
    assert out.trace_memory == GOOD
    assert out.summary == "Injected FakeClock; tests pass."


def test_output_is_redacted_again() -> None:
    secret = "ghp_A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"
    out = normalise(GOOD + f"\nUse token {secret}", f"export GITHUB_TOKEN={secret}", context=CTX)
    assert secret not in out.trace_memory and secret not in out.summary
    assert REDACTED in out.trace_memory and REDACTED in out.summary
    assert out.redactions == 2


def test_output_without_skeleton_is_wrapped_not_thrown_away() -> None:
    raw = "The user fixed the build by pinning node 20.\nSteps: nvm use 20; npm ci."
    out = normalise(raw, "Pinned node 20 to fix the build.", context=CTX)
    assert out.wrapped and has_skeleton(out.trace_memory)
    assert out.trace_memory.startswith("# Pinned node 20 to fix the build.\n")
    assert "Trace context: memd, 2026-01-02, codex, gpt-5" in out.trace_memory
    assert "User preferences: none observed" in out.trace_memory
    assert "Outcome: uncertain" in out.trace_memory
    assert out.trace_memory.endswith("## Raw notes\n" + raw)


def test_summary_only_is_wrapped_and_empty_summary_comes_from_the_title() -> None:
    out = normalise("", "Only a summary.", context=CTX)
    assert out.wrapped and has_skeleton(out.trace_memory) and "Only a summary." in out.trace_memory
    out = normalise(GOOD, "", context=CTX)
    assert out.summary == "Fixed the flaky watcher test by injecting the clock."


def test_summary_is_cut_to_120_words() -> None:
    summary = " ".join(f"w{i}" for i in range(130))
    out = normalise(GOOD, summary, context=CTX)
    words = out.summary.split()
    assert words[:120] == [f"w{i}" for i in range(120)]
    assert out.summary.endswith("…") and len(words) == 121


def test_summary_is_capped_at_1200_bytes_with_marker() -> None:
    summary = " ".join(["é" * 40] * 60)  # 60 words of 80 bytes each
    out = normalise(GOOD, summary, context=CTX)
    data = out.summary.encode()
    assert len(data) <= SUMMARY_MAX_BYTES
    assert _MARKER.search(out.summary)
    assert out.summary.startswith("é" * 40) and out.summary.endswith("é" * 10)


def test_trace_memory_is_capped_keeping_head_and_tail() -> None:
    body = "\n".join(f"line {i} " + "ü" * 50 for i in range(5000))
    trace = GOOD + "\n" + body + "\nTHE END"
    out = normalise(trace, "s", context=CTX)
    data = out.trace_memory.encode()
    assert len(data) <= TRACE_MEMORY_MAX_BYTES
    assert out.trace_memory.startswith(GOOD)
    assert out.trace_memory.endswith("THE END")
    assert has_skeleton(out.trace_memory)
    m = _MARKER.search(out.trace_memory)
    assert m is not None
    head, tail = out.trace_memory.split(m.group(0))
    assert int(m.group(1)) == len(trace.encode()) - len(head.encode()) - len(tail.encode())


@pytest.mark.parametrize("cap", [64, 65, 66, 67, 100, 257, 1000])
def test_cut_middle_respects_utf8_boundaries_and_the_cap(cap: int) -> None:
    text = "a€😀b" * 200  # 1, 3, 4, 1 bytes
    out = cut_middle(text, cap)
    assert len(out.encode("utf-8")) <= cap
    m = _MARKER.search(out)
    assert m is not None
    head, tail = out.split(m.group(0))
    assert text.startswith(head) and text.endswith(tail)
    assert int(m.group(1)) == len(text.encode()) - len(head.encode()) - len(tail.encode())


def test_cut_middle_prefers_whitespace_so_tokens_are_not_split() -> None:
    text = " ".join(f"token{i:04d}" for i in range(2000))
    out = cut_middle(text, 500)
    head, tail = _MARKER.split(out)[0], _MARKER.split(out)[2]
    assert re.fullmatch(r"(token\d{4} )+", head)
    assert re.fullmatch(r"( token\d{4})+", tail)


def test_cut_middle_returns_short_text_unchanged() -> None:
    assert cut_middle("short", 10) == "short"
    assert cut_middle("€" * 10, 30) == "€" * 10


def test_lenient_json_plain_fenced_and_embedded() -> None:
    assert parse_lenient_json('{"trace_memory": "a", "summary": "b"}') == {
        "trace_memory": "a",
        "summary": "b",
    }
    fenced = 'Here you go:\n```json\n{"trace_memory": "# T", "summary": "s"}\n```\nDone.'
    assert parse_lenient_json(fenced) == {"trace_memory": "# T", "summary": "s"}
    bare_fence = '```\n{"a": 1}\n```'
    assert parse_lenient_json(bare_fence) == {"a": 1}
    prose = 'Sure! {not json} The answer is {"summary": "uses {braces} and \\"quotes\\"", "trace_memory": "x"} hope it helps'
    assert parse_lenient_json(prose) == {
        "summary": 'uses {braces} and "quotes"',
        "trace_memory": "x",
    }
    nested = 'result: {"a": {"b": [1, {"c": "}"}]}} trailing }'
    assert parse_lenient_json(nested) == {"a": {"b": [1, {"c": "}"}]}}


def test_lenient_json_rejects_non_objects_and_garbage() -> None:
    assert parse_lenient_json("") is None
    assert parse_lenient_json("[1, 2]") is None
    assert parse_lenient_json('"just a string"') is None
    assert parse_lenient_json("no json at all") is None
    assert parse_lenient_json('{"unterminated": "x"') is None
