"""The extractor output contract (SPEC §6.3): schema and normalisation (lenient JSON parsing of a
model's answer lives in :mod:`memd.jsonish`).

Every extractor returns ``{trace_memory, summary}``. Before anything is stored, the worker runs
:func:`normalise`: trim, redact again, enforce the markdown skeleton (an output without it is
wrapped, never thrown away), cap the sizes (cutting the middle, keeping head and tail, on UTF-8
character boundaries).

The skeleton::

    # <one-sentence summary of the session>
    Trace context: <project, date, agent, model>
    User preferences: <bullets, or exactly "none observed">
    ## Task: <name>
    Outcome: success|partial|fail|uncertain
    Key steps: ...
    Things that did not work / things that can be improved: ...
    Reusable knowledge: ...
    Pointers and references (annotate why each item matters): ...
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

from memd.extract.redact import redact

#: Caps from SPEC §6.3.
TRACE_MEMORY_MAX_BYTES = 300_000
SUMMARY_MAX_BYTES = 1_200
SUMMARY_MAX_WORDS = 120

OUTCOMES = ("success", "partial", "fail", "uncertain")


class TraceOutput(BaseModel):
    """What an extractor (the model) returns: ``{"trace_memory": str, "summary": str}``.

    Unknown keys are ignored; both keys are required (validated with pydantic).
    """

    model_config = ConfigDict(extra="ignore")

    trace_memory: str
    summary: str


#: Strict JSON schema for structured output (Chat Completions ``response_format`` json_schema
#: with ``strict: true``, Responses ``text.format``).
TRACE_OUTPUT_JSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "trace_memory": {
            "type": "string",
            "description": ("Markdown trace memory following the required skeleton; empty if nothing durable."),
        },
        "summary": {
            "type": "string",
            "description": (
                "At most 120 words: the most reusable outcome with concrete commands, paths and "
                "errors; empty if nothing durable."
            ),
        },
    },
    "required": ["trace_memory", "summary"],
    "additionalProperties": False,
}


@dataclass(frozen=True, slots=True)
class TraceContext:
    """The facts for the ``Trace context:`` line.

    Attributes:
        project: project key (SPEC §4).
        date: session date, ``YYYY-MM-DD``.
        agent: how the agent is named: ``codex``, or ``Claude Code <version>``
            (:meth:`memd.rollout.records.Agent.label`).
        model: the agent's model, ``""`` when unknown.
    """

    project: str
    date: str
    agent: str
    model: str

    def line(self) -> str:
        """The ``Trace context:`` line, e.g. ``Trace context: memd, 2026-01-02, codex, gpt-5``."""
        parts = [
            self.project or "unknown project",
            self.date or "unknown date",
            self.agent or "unknown agent",
            self.model or "unknown model",
        ]
        return "Trace context: " + ", ".join(parts)


@dataclass(frozen=True, slots=True)
class NormalisedOutput:
    """The output after :func:`normalise`.

    Attributes:
        trace_memory: skeleton-conformant markdown (``""`` for a no-op), ≤ 300 000 bytes.
        summary: ≤ 120 words and ≤ 1 200 bytes (``""`` for a no-op).
        noop: both were empty: nothing durable in the session (SPEC §6.3).
        wrapped: the trace memory lacked the skeleton and was wrapped with its text under
            ``## Raw notes``.
        redactions: secrets replaced during normalisation.
    """

    trace_memory: str
    summary: str
    noop: bool
    wrapped: bool
    redactions: int = 0


_OUTCOME_LINE = re.compile(r"^Outcome:", re.MULTILINE)
_TASK_LINE = re.compile(r"^## Task:", re.MULTILINE)


def has_skeleton(trace_memory: str) -> bool:
    """Whether ``trace_memory`` has the SPEC §6.3 skeleton.

    Checks: the first line starts with ``# ``; a line starts with ``Trace context:``; a line
    starts with ``User preferences:``; at least one ``## Task:`` line, followed (later) by an
    ``Outcome:`` line.
    """
    if not trace_memory.startswith("# "):
        return False
    if not re.search(r"^Trace context:", trace_memory, re.MULTILINE):
        return False
    if not re.search(r"^User preferences:", trace_memory, re.MULTILINE):
        return False
    task = _TASK_LINE.search(trace_memory)
    if task is None:
        return False
    return _OUTCOME_LINE.search(trace_memory, task.end()) is not None


def first_task_name(trace_memory: str) -> str:
    """The name of the first ``## Task:`` section of a trace memory (``""`` when it has none): the
    title a model's trace is filed under (SPEC §8: the slug comes from the main task)."""
    match = re.search(r"^## Task:[ \t]*(.+?)[ \t]*$", trace_memory, re.MULTILINE)
    return match.group(1) if match else ""


def cut_middle(text: str, max_bytes: int) -> str:
    """Cap ``text`` at ``max_bytes`` UTF-8 bytes by cutting the middle.

    Keeps the head (about two thirds of the room) and the tail and puts
    ``[... N bytes cut ...]`` (on its own line) between them, N being the bytes removed. Cuts
    fall on UTF-8 character boundaries, preferably at whitespace within 256 bytes of the ideal
    cut point (so a token is not split in two: a half secret would escape redaction). The
    result, marker included, is never longer than ``max_bytes`` bytes.

    Args:
        text: any text.
        max_bytes: the cap in bytes (≥ 64 for a meaningful head and tail).

    Returns:
        ``text`` itself when it fits, else the shortened text.
    """
    if len(text) * 4 <= max_bytes:  # fast path: even all-4-byte characters fit
        return text
    data = text.encode("utf-8")
    total = len(data)
    if total <= max_bytes:
        return text
    marker_len = len(f"\n[... {total} bytes cut ...]\n".encode())
    keep = max(0, max_bytes - marker_len)
    head_end = _char_boundary_back(data, (keep * 2) // 3)
    space = _last_space(data, head_end - 256, head_end)
    if space > 0:
        head_end = space
    tail_start = _char_boundary_forward(data, total - (keep - head_end))
    space = _first_space(data, tail_start, tail_start + 256)
    if space != -1:
        tail_start = space
    cut = tail_start - head_end
    head = data[:head_end].decode("utf-8")
    tail = data[tail_start:].decode("utf-8")
    return f"{head}\n[... {cut} bytes cut ...]\n{tail}"


def _last_space(data: bytes, start: int, end: int) -> int:
    """Index just past the last ASCII whitespace in ``data[start:end]``, or -1."""
    start = max(start, 0)
    best = -1
    for ws in (b" ", b"\n", b"\t"):
        i = data.rfind(ws, start, end)
        if i != -1 and i + 1 > best:
            best = i + 1
    return best


def _first_space(data: bytes, start: int, end: int) -> int:
    """Index of the first ASCII whitespace in ``data[start:end]``, or -1."""
    best = -1
    for ws in (b" ", b"\n", b"\t"):
        i = data.find(ws, start, end)
        if i != -1 and (best == -1 or i < best):
            best = i
    return best


def _char_boundary_back(data: bytes, pos: int) -> int:
    """The largest character boundary ≤ ``pos``."""
    pos = min(max(pos, 0), len(data))
    while 0 < pos < len(data) and (data[pos] & 0xC0) == 0x80:
        pos -= 1
    return pos


def _char_boundary_forward(data: bytes, pos: int) -> int:
    """The smallest character boundary ≥ ``pos``."""
    pos = min(max(pos, 0), len(data))
    while pos < len(data) and (data[pos] & 0xC0) == 0x80:
        pos += 1
    return pos


def cap_words(text: str, max_words: int) -> str:
    """Keep the first ``max_words`` words of ``text``, ending with ``…`` when cut."""
    words = text.split()
    if len(words) <= max_words:
        return text
    return " ".join(words[:max_words]) + " …"


def normalise(trace_memory: str, summary: str, *, context: TraceContext) -> NormalisedOutput:
    """Normalise an extractor's answer (SPEC §6.3).

    Steps: trim; redact both texts again (SPEC §14); both empty → no-op; a trace memory without
    the skeleton (see :func:`has_skeleton`) is wrapped in one, its text kept under
    ``## Raw notes``; an empty summary is taken from the trace memory's title line; the summary
    is cut to 120 words (ending ``…``) and 1 200 bytes; the trace memory is capped at 300 000
    bytes. Byte caps cut the middle with a visible marker on UTF-8 boundaries
    (:func:`cut_middle`).

    Args:
        trace_memory: markdown from the extractor.
        summary: the one-paragraph summary from the extractor.
        context: facts for the ``Trace context:`` line of a wrapped output.

    Returns:
        The :class:`NormalisedOutput`. Never raises on any string input.
    """
    trace_memory, n1 = redact(trace_memory.strip())
    summary, n2 = redact(summary.strip())
    redactions = n1 + n2
    if not trace_memory and not summary:
        return NormalisedOutput("", "", noop=True, wrapped=False, redactions=redactions)

    wrapped = False
    if not has_skeleton(trace_memory):
        trace_memory = _wrap(trace_memory, summary, context)
        wrapped = True
    if not summary:
        summary = trace_memory.split("\n", 1)[0].removeprefix("# ").strip()
    summary = cut_middle(cap_words(summary, SUMMARY_MAX_WORDS), SUMMARY_MAX_BYTES)
    trace_memory = cut_middle(trace_memory, TRACE_MEMORY_MAX_BYTES)
    return NormalisedOutput(trace_memory, summary, noop=False, wrapped=wrapped, redactions=redactions)


def _wrap(raw: str, summary: str, context: TraceContext) -> str:
    """Put ``raw`` into the skeleton under ``## Raw notes`` (nothing is thrown away)."""
    title = _first_sentence(summary) or _first_sentence(raw) or "Session notes"
    lines = [
        f"# {title}",
        context.line(),
        "User preferences: none observed",
        "## Task: Session notes",
        "Outcome: uncertain",
        "Key steps: see the raw notes below.",
        "Things that did not work / things that can be improved: not recorded.",
        "Reusable knowledge: see the raw notes below.",
        "Pointers and references (annotate why each item matters): none recorded.",
        "",
        "## Raw notes",
        raw if raw else summary,
    ]
    return "\n".join(lines)


def _first_sentence(text: str, max_chars: int = 160) -> str:
    """The first non-empty line's first sentence, without markdown heading marks, ≤ max_chars."""
    for line in text.splitlines():
        line = line.strip().lstrip("#").strip()
        if line:
            m = re.match(r"(.+?[.!?])(\s|$)", line)
            sentence = m.group(1) if m else line
            if len(sentence) > max_chars:
                sentence = sentence[: max_chars - 1].rstrip() + "…"
            return sentence
    return ""
