"""Input building: what an extractor sees of one session (SPEC §6.2).

:func:`build_input` turns a :class:`~memd.rollout.records.ParsedRollout` into a
:class:`~memd.extract.base.BuiltInput`: the kept items (redacted copies) and a compact text
rendering, fitted to a token budget.

Kept: real user messages (each once, capped per message); assistant messages (final answers in
full up to the user-message cap, commentary trimmed to :data:`COMMENTARY_CAP_BYTES`); short
reasoning summaries (:data:`REASONING_CAP_BYTES`); tool calls with their arguments (shell
commands in full up to the user-message cap, apply_patch as per-file headers with ``+a -b``
counts and hunks up to :data:`PATCH_HUNKS_CAP_BYTES`); tool outputs head + tail capped at
``tool_output_cap_bytes`` with the exit code; compaction summaries; error / abort / rollback
events.

Dropped: developer / system messages and ghost snapshots (the parser yields no items for
them), injected-context user messages (the parser's ``injected`` flag, which includes messages
that start with memd's ``<memd_memory>`` marker), ``<memd_memory>`` blocks inside a kept user
message (replaced by ``[memd memory omitted]``: memory memd wrote is not evidence), token
counts, turn contexts, task start/complete events, and the second copy of every message: Codex
records each user message as a response item and as a ``user_message`` event, and each
assistant message as a response item and as an ``agent_message`` event. The user copy kept is
the one :func:`memd.rollout.session.real_user_messages` counts (events when the rollout has
any); the assistant copy kept is the response item (it carries ``phase``) when the rollout has
any. Unified-exec polls (``write_stdin`` with no input) are folded into the command they poll:
a command renders once, with its output and exit code, where it was started.

Rendering, one block per turn (a blank line before each user message)::

    user: add a Pause/Resume feature
    thinking: **Adding explicit pause/resume button**
    $ cat script.js
      const WORK_DURATION = 25 * 60;
      ...
    exit 0
    patch: script.js (+12 -3)
      @@
      -const startBtn = ...
    assistant: Added a dedicated pause control ...

Every text is capped first (head + tail, cut at whitespace); the units are rendered and fitted
to the budget; then the texts of the kept units are redacted (SPEC §14) in one batch and the
units where a secret was found are rendered again (and the budget checked again), so the
returned items and text never contain a detected secret, and text that is dropped anyway is
not scanned.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field, replace

import structlog

from memd.extract.base import BuiltInput
from memd.extract.contract import cut_middle
from memd.extract.redact import redact, redact_many
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
    TurnEvent,
    UserMessage,
)

log = structlog.get_logger(__name__)

#: Cap of an assistant commentary message (progress notes between tool calls).
COMMENTARY_CAP_BYTES = 600
#: Cap of a reasoning summary (one line).
REASONING_CAP_BYTES = 240
#: Cap of the hunk text rendered per apply_patch call (file headers and counts always kept).
PATCH_HUNKS_CAP_BYTES = 1536
#: Cap of the arguments of non-shell tools (MCP, web search, plans, ...).
TOOL_ARGS_CAP_BYTES = 512
#: Cap of an error / abort event text.
EVENT_TEXT_CAP_BYTES = 1024
#: Cap of the raw arguments kept on a shell call item (the command itself is kept in full).
SHELL_ARGS_CAP_BYTES = 512

_UNIFIED_EXEC_HEADER = re.compile(
    r"(?:(?:Chunk ID|Wall time|Original token count|Exit code|Process exited with code"
    r"|Process running with session ID)\b[^\n]*\n)+Output:\n?"
)
_SESSION_RUNNING = re.compile(r"Process running with session ID (\d+)")
_PATCH_HEADER = re.compile(r"\*\*\* (Add File|Update File|Delete File|Move to): (.+?)\s*$")
_PATCH_FAILED_PREFIXES = ("apply_patch verification failed", "failed to apply patch")
_MEMD_BLOCK = re.compile(
    re.escape(MEMD_MEMORY_MARKER) + r".*?(?:" + re.escape(MEMD_MEMORY_MARKER.replace("<", "</")) + r"|\Z)",
    re.DOTALL,
)
_PLAN_MARK = {"completed": "[x]", "in_progress": "[>]", "pending": "[ ]"}


@dataclass(slots=True)
class _Unit:
    """One rendered block: an item, or a tool call with the outputs folded into it."""

    kind: str
    indices: list[int]
    final: bool = False
    session: str | None = None  # unified-exec session id of a command
    text: str = ""


def build_input(
    parsed: ParsedRollout,
    *,
    tool_output_cap_bytes: int = 4096,
    user_message_cap_bytes: int = 32768,
    max_input_tokens: int = 120_000,
    bytes_per_token: float = 4.0,
) -> BuiltInput:
    """Filter, cap, redact and render one session for an extractor (SPEC §6.2).

    Args:
        parsed: the parsed rollout (Codex rollout format, any variant).
        tool_output_cap_bytes: per tool output, head + tail kept (bytes).
        user_message_cap_bytes: per user message, final answer and shell command (bytes).
        max_input_tokens: token budget of ``text``; tokens are estimated as
            ``bytes / bytes_per_token``.
        bytes_per_token: the calibration of the estimate (SPEC §6.2: 4 by default).

    Returns:
        A :class:`BuiltInput`. When the rendering is over budget, every user message and the
        last final answer are kept, the remaining room is filled newest-first, and each run of
        dropped items shows as ``[... N items omitted ...]``; ``omitted_items`` counts the
        dropped items. Never raises on any parsed input.
    """
    items = parsed.items
    units = _group(items)
    capped = _cap_items(items, units, tool_output_cap_bytes, user_message_cap_bytes)
    shown = _apply(items, capped)
    patches = {i: _patch_stats(_patch_text(items[i])) for u in units if u.kind == "patch" for i in u.indices[:1]}
    for unit in units:
        unit.text = _render(unit, shown, patches)
    units = [u for u in units if u.text]

    budget_bytes = int(max_input_tokens * bytes_per_token)
    kept, omitted = _fit(units, budget_bytes)
    # Redact what is kept (only that leaves the machine) and render again where a secret was
    # found; a replacement can make a unit longer, so the budget is checked once more.
    kept_units = [u for u, keep in zip(units, kept, strict=True) if keep]
    changed, redactions = _redact(shown, {i: capped[i] for u in kept_units for i in u.indices})
    if changed:
        for unit in kept_units:
            if not changed.isdisjoint(unit.indices):
                unit.text = _render(unit, shown, patches)
        again, dropped = _fit(kept_units, budget_bytes)
        if dropped:
            drop = {id(u) for u, keep in zip(kept_units, again, strict=True) if not keep}
            kept = [keep and id(u) not in drop for u, keep in zip(units, kept, strict=True)]
            omitted += dropped
    parts: list[str] = []
    gap = 0
    for unit, keep in zip(units, kept, strict=True):
        if not keep:
            gap += len(unit.indices)
            continue
        if gap:
            parts.append(f"[... {gap} items omitted ...]")
            gap = 0
        if unit.kind == "user" and parts:
            parts.append("")
        parts.append(unit.text)
    if gap:
        parts.append(f"[... {gap} items omitted ...]")
    text = "\n".join(parts)

    kept_indices = sorted(i for unit, keep in zip(units, kept, strict=True) if keep for i in unit.indices)
    line_bytes = parsed.item_line_bytes
    raw_json_bytes = sum(line_bytes[i] for i in kept_indices if i < len(line_bytes))
    text_bytes = _utf8_len(text)
    est_tokens = int(text_bytes / bytes_per_token) if bytes_per_token > 0 else text_bytes
    if est_tokens > max_input_tokens:
        log.warning(
            "input_over_budget",
            est_tokens=est_tokens,
            max_input_tokens=max_input_tokens,
            reason="user messages and the last final answer alone exceed the budget",
        )
    return BuiltInput(
        items=tuple(shown[i] for i in kept_indices),
        text=text,
        raw_json_bytes=raw_json_bytes,
        text_bytes=text_bytes,
        est_tokens=est_tokens,
        omitted_items=omitted,
        redactions=redactions,
    )


# --- grouping -------------------------------------------------------------------------------


def _group(items: list[Item]) -> list[_Unit]:
    """Select the items to keep and group tool calls with their outputs, in file order."""
    user_events = any(isinstance(it, UserMessage) and it.origin == "event" for it in items)
    assistant_responses = any(isinstance(it, AssistantMessage) and it.origin == "response" for it in items)
    user_origin = "event" if user_events else "response"
    assistant_origin = "response" if assistant_responses else "event"

    units: list[_Unit] = []
    by_call: dict[str, _Unit] = {}
    sessions: dict[str, _Unit] = {}
    last_assistant: _Unit | None = None

    def turn_boundary() -> None:
        nonlocal last_assistant
        if last_assistant is not None:
            last_assistant.final = True
        last_assistant = None

    for i, it in enumerate(items):
        if isinstance(it, UserMessage):
            if it.origin != user_origin or it.injected:
                continue
            turn_boundary()
            units.append(_Unit("user", [i]))
        elif isinstance(it, AssistantMessage):
            if it.origin != assistant_origin or not it.text.strip():
                continue
            unit = _Unit("assistant", [i], final=it.phase == "final_answer")
            units.append(unit)
            if it.phase != "commentary":
                last_assistant = unit
        elif isinstance(it, Reasoning):
            if it.summary.strip():
                units.append(_Unit("reasoning", [i]))
        elif isinstance(it, ToolCall):
            unit = _tool_unit(it, i, sessions)
            if unit is None:  # a poll of a running command: folded into it
                target = sessions.get(_stdin_session(it.arguments) or "")
                if target is not None:
                    target.indices.append(i)
                    if it.call_id:
                        by_call[it.call_id] = target
                    continue
                unit = _Unit("tool", [i])
            units.append(unit)
            if it.call_id:
                by_call[it.call_id] = unit
        elif isinstance(it, ToolOutput):
            unit = by_call.get(it.call_id) if it.call_id else None
            if unit is None:
                units.append(_Unit("output", [i]))
                continue
            unit.indices.append(i)
            if unit.kind == "command" and unit.session is None:
                match = _SESSION_RUNNING.search(it.output[:2000])
                if match:
                    unit.session = match.group(1)
                    sessions[unit.session] = unit
        elif isinstance(it, CommandEnd):
            unit = by_call.get(it.call_id) if it.call_id else None
            if unit is None or unit.kind != "command":
                units.append(_Unit("command", [i]))
            else:
                unit.indices.append(i)
        elif isinstance(it, PatchApplied):
            unit = by_call.get(it.call_id) if it.call_id else None
            if unit is None or unit.kind != "patch":
                units.append(_Unit("patch_applied", [i]))
            else:
                unit.indices.append(i)
        elif isinstance(it, Compaction):
            if it.message.strip():
                units.append(_Unit("compaction", [i]))
        elif isinstance(it, TurnEvent):
            if it.type == "task_complete":
                turn_boundary()
            elif it.type in ("error", "turn_aborted", "thread_rolled_back"):
                units.append(_Unit("event", [i]))
    turn_boundary()
    return units


def _tool_unit(call: ToolCall, index: int, sessions: dict[str, _Unit]) -> _Unit | None:
    """The unit a tool call opens, or ``None`` for a ``write_stdin`` poll (no input)."""
    if call.kind == "shell":
        return _Unit("command", [index])
    if call.kind == "patch":
        return _Unit("patch", [index])
    if call.kind == "web_search":
        return _Unit("web_search", [index])
    if call.name == "write_stdin":
        args = _json_object(call.arguments)
        chars = args.get("chars") if args else None
        if not chars and _stdin_session(call.arguments) in sessions:
            return None
        return _Unit("stdin", [index])
    if call.name == "update_plan":
        return _Unit("plan", [index])
    return _Unit("tool", [index])


# --- capping and redaction ------------------------------------------------------------------


def _cap_items(items: list[Item], units: list[_Unit], output_cap: int, message_cap: int) -> dict[int, dict[str, str]]:
    """The capped text fields of every kept item: ``{index: {field: text}}``."""
    capped: dict[int, dict[str, str]] = {}
    for unit in units:
        for i in unit.indices:
            it = items[i]
            if isinstance(it, UserMessage):
                text = _strip_memd_blocks(it.text) if MEMD_MEMORY_MARKER in it.text else it.text
                capped[i] = {"text": _cap(text, message_cap)}
            elif isinstance(it, AssistantMessage):
                cap = message_cap if unit.final else COMMENTARY_CAP_BYTES
                capped[i] = {"text": _cap(it.text, cap)}
            elif isinstance(it, Reasoning):
                capped[i] = {"summary": _head(it.summary, REASONING_CAP_BYTES)}
            elif isinstance(it, ToolCall):
                fields: dict[str, str] = {}
                if it.command is not None:
                    fields["command"] = _cap(it.command, message_cap)
                if it.kind == "patch":
                    fields["arguments"] = _cap(it.arguments, PATCH_HUNKS_CAP_BYTES + 512)
                elif it.kind == "shell":
                    fields["arguments"] = _cap(it.arguments, SHELL_ARGS_CAP_BYTES)
                else:
                    fields["arguments"] = _cap(it.arguments, TOOL_ARGS_CAP_BYTES)
                capped[i] = fields
            elif isinstance(it, ToolOutput):
                capped[i] = {"output": _cap(it.output, output_cap)}
            elif isinstance(it, CommandEnd):
                capped[i] = {
                    "command": _cap(it.command, message_cap),
                    "output": _cap(it.output, output_cap),
                }
            elif isinstance(it, Compaction):
                capped[i] = {"message": _cap(it.message, message_cap)}
            elif isinstance(it, TurnEvent) and it.text:
                capped[i] = {"text": _cap(it.text, EVENT_TEXT_CAP_BYTES)}
            else:
                capped[i] = {}
    return capped


def _cap(text: str, max_bytes: int) -> str:
    """:func:`cut_middle`, with a fast path for ASCII text that fits (no encoding needed)."""
    if len(text) <= max_bytes and text.isascii():
        return text
    return cut_middle(text, max_bytes)


def _apply(items: list[Item], capped: dict[int, dict[str, str]]) -> dict[int, Item]:
    """The kept items with their capped fields: ``{index: item}`` (the item itself when no
    field was cut)."""
    shown: dict[int, Item] = {}
    for i, fields in capped.items():
        it = items[i]
        if any(getattr(it, name) is not text for name, text in fields.items()):
            it = replace(it, **fields)  # type: ignore[arg-type]
        shown[i] = it
    return shown


def _redact(shown: dict[int, Item], capped: dict[int, dict[str, str]]) -> tuple[set[int], int]:
    """Redact the capped fields of the items ``capped`` names, in one batch.

    Items where a secret was found are replaced in ``shown`` by redacted copies.

    Returns:
        ``(indices of the items that changed, secrets replaced)``.
    """
    keys: list[tuple[int, str]] = []
    texts: list[str] = []
    for i, fields in capped.items():
        for name, text in fields.items():
            keys.append((i, name))
            texts.append(text)
    # The same text often appears twice (a command in its call and in its end event, ...):
    # scan each distinct text once, and count its secrets once per occurrence.
    distinct = list(dict.fromkeys(texts))
    redacted, count = redact_many(distinct)
    if not count:
        return set(), 0
    clean = dict(zip(distinct, redacted, strict=True))
    if len(distinct) < len(texts):
        for text, times in Counter(texts).items():
            if times > 1 and clean[text] != text:
                count += (times - 1) * redact(text)[1]
    updates: dict[int, dict[str, str]] = {}
    for (i, name), before in zip(keys, texts, strict=True):
        after = clean[before]
        if after != before:
            updates.setdefault(i, {})[name] = after
    for i, fields in updates.items():
        shown[i] = replace(shown[i], **fields)  # type: ignore[arg-type]
    return set(updates), count


# --- rendering ------------------------------------------------------------------------------


def _render(unit: _Unit, items: dict[int, Item], patches: dict[int, _PatchStats]) -> str:
    first = items.get(unit.indices[0])
    kind = unit.kind
    if kind == "user" and isinstance(first, UserMessage):
        return f"user: {first.text.strip()}"
    if kind == "assistant" and isinstance(first, AssistantMessage):
        label = "assistant" if unit.final or first.phase != "commentary" else "assistant (commentary)"
        return f"{label}: {first.text.strip()}"
    if kind == "reasoning" and isinstance(first, Reasoning):
        return "thinking: " + " ".join(first.summary.split())
    if kind == "command":
        return _render_command(unit, items)
    if kind == "patch" and isinstance(first, ToolCall):
        return _render_patch(unit, items, patches[unit.indices[0]])
    if kind == "web_search" and isinstance(first, ToolCall):
        return f"web_search: {_one_line(first.arguments)}"
    if kind == "plan" and isinstance(first, ToolCall):
        return _render_plan(first) + _render_outputs(unit, items, skip_first=True, plan=True)
    if kind in ("tool", "stdin") and isinstance(first, ToolCall):
        if kind == "stdin":
            args = _json_object(first.arguments) or {}
            chars = json.dumps(args.get("chars", ""))
            head = f"stdin (session {args.get('session_id', '?')}): {chars}"
        else:
            head = f"tool {first.name}: {_one_line(first.arguments)}"
        return head + _render_outputs(unit, items, skip_first=True)
    if kind == "output" and isinstance(first, ToolOutput):
        return "output:" + _indented_output(first.output, first.exit_code, error=first.is_error)
    if kind == "patch_applied" and isinstance(first, PatchApplied):
        status = "applied" if first.success else "FAILED"
        return f"patch {status}: {', '.join(first.files) or '(no files)'}"
    if kind == "compaction" and isinstance(first, Compaction):
        return f"compaction summary: {first.message.strip()}"
    if kind == "event" and isinstance(first, TurnEvent):
        if first.type == "error":
            return f"error: {(first.text or '').strip()}"
        if first.type == "turn_aborted":
            return f"[turn aborted: {first.text or 'no reason given'}]"
        return f"[rolled back {first.num_turns if first.num_turns is not None else '?'} turns]"
    return ""


def _render_command(unit: _Unit, items: dict[int, Item]) -> str:
    command = ""
    bodies: list[str] = []
    exit_code: int | None = None
    error = False
    end: CommandEnd | None = None
    for i in unit.indices:
        it = items[i]
        if isinstance(it, ToolCall):
            if it.kind == "shell" and not command:
                command = it.command if it.command is not None else it.arguments
        elif isinstance(it, ToolOutput):
            body = _strip_exec_header(it.output)
            if body.strip():
                bodies.append(body)
            if it.exit_code is not None:
                exit_code = it.exit_code
            error = error or it.is_error
        elif isinstance(it, CommandEnd):
            end = it
    if end is not None:
        command = command or end.command
        if end.exit_code is not None:
            exit_code = end.exit_code
        if end.output.strip():
            bodies = [end.output]  # the aggregated output supersedes the polled chunks
    lines = [f"$ {command.strip()}"]
    body = "\n".join(b.rstrip("\n") for b in bodies)
    if body.strip():
        lines.append(_indent(body))
    if exit_code is not None:
        lines.append(f"exit {exit_code}")
    elif error:
        lines.append("error")  # the tool reported a failure without an exit code (Claude Code)
    return "\n".join(lines)


@dataclass(slots=True)
class _PatchStats:
    """Per-file ``(action, added, removed)`` of one apply_patch input, in order."""

    files: list[tuple[str, str, int, int]] = field(default_factory=list)


def _patch_text(call: Item) -> str:
    if not isinstance(call, ToolCall):
        return ""
    text = call.command if call.command is not None else call.arguments
    if text.lstrip().startswith("{"):
        args = _json_object(text)
        if args and isinstance(args.get("input"), str):
            return args["input"]
    return text


def _patch_stats(patch: str) -> _PatchStats:
    stats = _PatchStats()
    current: list | None = None
    for line in patch.splitlines():
        if line.startswith("***"):
            m = _PATCH_HEADER.match(line)
            if m:
                action = {
                    "Add File": "add",
                    "Update File": "update",
                    "Delete File": "delete",
                    "Move to": "move",
                }[m.group(1)]
                current = [m.group(2), action, 0, 0]
                stats.files.append(current)  # type: ignore[arg-type]
            continue
        if current is None:
            continue
        if line.startswith("+"):
            current[2] += 1
        elif line.startswith("-"):
            current[3] += 1
    stats.files = [tuple(f) for f in stats.files]  # type: ignore[misc]
    return stats


def _render_patch(unit: _Unit, items: dict[int, Item], stats: _PatchStats) -> str:
    call = items[unit.indices[0]]
    assert isinstance(call, ToolCall)
    lines: list[str] = []
    if stats.files:
        for path, action, added, removed in stats.files:
            verb = "" if action == "update" else f"{action}, "
            lines.append(f"patch: {path} ({verb}+{added} -{removed})")
    else:
        lines.append(f"patch: {', '.join(call.patch_files) or '(no file headers)'}")
    hunks = _hunks(_patch_text(call))
    if hunks:
        lines.append(_indent(cut_middle(hunks, PATCH_HUNKS_CAP_BYTES)))
    for i in unit.indices[1:]:
        it = items[i]
        failure = None
        if isinstance(it, ToolOutput):
            text = it.output.strip()
            if it.is_error or it.exit_code not in (None, 0) or text.lower().startswith(_PATCH_FAILED_PREFIXES):
                failure = text
        elif isinstance(it, PatchApplied) and not it.success:
            failure = "patch_apply_end success=false"
        if failure is not None:
            lines.append("patch failed:" + _indented_output(failure, None))
    return "\n".join(lines)


def _hunks(patch: str) -> str:
    """The patch body without the ``*** Begin/End Patch`` and file header lines."""
    return "\n".join(line for line in patch.splitlines() if not line.startswith("***") and line.strip())


def _render_plan(call: ToolCall) -> str:
    args = _json_object(call.arguments)
    plan = args.get("plan") if args else None
    if not isinstance(plan, list):
        return f"tool update_plan: {_one_line(call.arguments)}"
    steps = []
    for step in plan:
        if isinstance(step, dict):
            mark = _PLAN_MARK.get(str(step.get("status")), "[?]")
            steps.append(f"{mark} {step.get('step', '')}")
    explanation = args.get("explanation") if args else None
    head = f"plan: {'; '.join(steps)}"
    if isinstance(explanation, str) and explanation.strip():
        head += f" ({_one_line(explanation)})"
    return head


def _render_outputs(unit: _Unit, items: dict[int, Item], *, skip_first: bool, plan: bool = False) -> str:
    parts = []
    for i in unit.indices[1 if skip_first else 0 :]:
        it = items[i]
        if isinstance(it, ToolOutput):
            if plan and it.output.strip() == "Plan updated":
                continue
            parts.append(_indented_output(it.output, it.exit_code, error=it.is_error))
    return "".join(parts)


def _indented_output(output: str, exit_code: int | None, *, error: bool = False) -> str:
    body = _strip_exec_header(output).rstrip("\n")
    text = ("\n" + _indent(body)) if body.strip() else ""
    if exit_code is not None:
        text += f"\nexit {exit_code}"
    elif error:
        text += "\nerror"
    return text


def _strip_exec_header(output: str) -> str:
    """Drop the unified-exec / shell_command header (``Chunk ID``, ``Wall time``, ...)."""
    if output.startswith(("Chunk ID", "Wall time", "Exit code", "Process ")):
        m = _UNIFIED_EXEC_HEADER.match(output)
        if m:
            return output[m.end() :]
    return output


def _strip_memd_blocks(text: str) -> str:
    """Remove ``<memd_memory>...</memd_memory>`` blocks: memory memd wrote is not evidence."""
    return _MEMD_BLOCK.sub("[memd memory omitted]", text)


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def _indent(text: str) -> str:
    return "  " + text.replace("\n", "\n  ")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _head(text: str, max_bytes: int) -> str:
    """The first ``max_bytes`` bytes of ``text`` (on a character boundary), ``…`` if cut."""
    text = text.strip()
    if len(text) * 4 <= max_bytes:
        return text
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return text
    return data[: max_bytes - 3].decode("utf-8", "ignore").rstrip() + "…"


def _stdin_session(arguments: str) -> str | None:
    args = _json_object(arguments)
    if args is not None and isinstance(args.get("session_id"), (int, str)):
        return str(args["session_id"])
    return None


def _json_object(text: str) -> dict | None:
    if not text or not text.lstrip().startswith("{"):
        return None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


# --- budget ---------------------------------------------------------------------------------


def _fit(units: list[_Unit], budget_bytes: int) -> tuple[list[bool], int]:
    """Which units to keep under ``budget_bytes``, and how many items were dropped.

    Everything fits → all kept. Else every user message and the last final answer are kept,
    then the newest other units while they fit (a contiguous recent window).
    """
    sizes = [_utf8_len(u.text) + 2 for u in units]
    if sum(sizes) <= budget_bytes:
        return [True] * len(units), 0
    keep = [u.kind == "user" for u in units]
    finals = [n for n, u in enumerate(units) if u.kind == "assistant" and u.final]
    if finals:
        keep[finals[-1]] = True
    marker_room = 40
    used = sum(s for s, k in zip(sizes, keep, strict=True) if k) + marker_room * (keep.count(True) + 1)
    for n in range(len(units) - 1, -1, -1):
        if keep[n]:
            continue
        if used + sizes[n] > budget_bytes:
            break
        keep[n] = True
        used += sizes[n]
    omitted = sum(len(u.indices) for u, k in zip(units, keep, strict=True) if not k)
    return keep, omitted
