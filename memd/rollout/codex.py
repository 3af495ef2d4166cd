"""Codex rollout line parser: one JSONL line in, typed records out (SPEC §3.2). No I/O.

Source format: the Codex CLI / Codex Desktop rollout files
(``$CODEX_HOME/sessions/YYYY/MM/DD/rollout-*.jsonl``), in all the variants seen in the wild:

* **envelope** (Codex ≥ 0.36): ``{"timestamp", "type", "payload"}`` with optional extra keys
  (``ordinal``, ``metadata``) that are ignored;
* **legacy** (before ~0.36): a bare header ``{"id", "timestamp", "instructions"?, "git"?,
  "cwd"?}``, ``{"record_type": "state"}`` marker lines (unknown, skipped) and bare response
  items (``{"type": "message", ...}``) without envelope or timestamp.

:func:`parse_line` never raises: bytes that are not UTF-8, not JSON or not a JSON object come
back as ``malformed``; valid JSON of a shape we do not model comes back as ``unknown``; modelled
lines that carry nothing memd keeps (``token_count``, developer messages, ghost snapshots, ...)
come back as an empty :class:`~memd.rollout.records.LineResult`.

Injected context (SPEC §3.2). A user-role message is *injected* (not the user speaking) when its
text, after leading whitespace, starts (case-insensitively, as Codex itself compares) with one of
:data:`INJECTED_PREFIXES`:

* ``# AGENTS.md instructions``, ``<environment_context>`` — seen in the real rollouts
  (0.47 … 0.129) as user-role response items that have no ``user_message`` event twin;
* ``<user_instructions>`` (the pre-0.5x form of AGENTS.md), ``<skill>``,
  ``<subagent_notification>``, ``<turn_aborted>`` — named by SPEC §3.2 / the brief;
* ``<user_shell_command>`` and ``<plugins>`` — listed as "contextual user fragments" by
  codex-rs itself (``model_visible_context.rs``), which excludes them from real user intent;
* :data:`MEMD_MEMORY_MARKER` — memory that memd itself produced.

Feedback-loop guard (SPEC §18): every ``<memd-context ...>...</memd-context>`` block is removed from
user, developer and assistant text, tool outputs and compaction summaries
(:func:`memd.rollout.guard.strip_memd_context`); a user message that held only such blocks is injected.
MCP tools recorded as ``{"namespace": "mcp__memd", "name": "memory_search"}`` (Codex 0.17x) are named
``mcp__memd__memory_search``, as older releases wrote them.

Not injected, on purpose: ``# Context from my IDE setup:`` (the VS Code extension prefixes the
user's own typed request with it — the real request follows under ``## My request for Codex:``).
``<permissions instructions>``, ``<collaboration_mode>``, ``<skills_instructions>`` and
``<plugins_instructions>`` occur in the real files only as *developer* messages, which are
dropped anyway. Older ``user_message`` events carry ``kind`` = ``user_instructions`` /
``environment_context`` for injected text; those are injected too.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from datetime import datetime
from typing import Any, Literal

import orjson

from memd.clock import parse_iso
from memd.rollout.guard import strip_memd_context
from memd.rollout.records import (
    AssistantMessage,
    CommandEnd,
    Compaction,
    Item,
    LineResult,
    PatchApplied,
    Reasoning,
    SessionMeta,
    ToolCall,
    ToolOutput,
    TurnContext,
    TurnEvent,
    UserMessage,
)

#: The opening marker memd puts around memory it injects into a session; a user message that
#: starts with it is memd's own output and never counts as the user speaking.
MEMD_MEMORY_MARKER = "<memd_memory>"

#: Lower-cased prefixes of injected-context user messages (see the module docstring).
INJECTED_PREFIXES: tuple[str, ...] = (
    "# agents.md instructions",
    "<environment_context>",
    "<user_instructions>",
    "<skill>",
    "<subagent_notification>",
    "<turn_aborted>",
    "<user_shell_command>",
    "<plugins>",
    MEMD_MEMORY_MARKER,
)

#: ``user_message`` event kinds (Codex ~0.3x–0.4x ``InputMessageKind``) that mark injected text.
_INJECTED_EVENT_KINDS = frozenset({"user_instructions", "environment_context"})

#: Response item types that are modelled but carry nothing memd keeps.
_DROPPED_RESPONSE_TYPES = frozenset({"ghost_snapshot", "compaction", "compaction_summary", "image_generation_call"})

#: Event types that are known Codex protocol noise for memd (token usage, streaming deltas,
#: begin/end twins of response items, UI state): empty result, not counted as unknown.
_NOISE_EVENT_TYPES = frozenset(
    {
        "token_count",
        "agent_reasoning",
        "agent_reasoning_delta",
        "agent_reasoning_raw_content",
        "agent_reasoning_raw_content_delta",
        "agent_reasoning_section_break",
        "agent_message_delta",
        "session_configured",
        "exec_command_begin",
        "exec_command_output_delta",
        "terminal_interaction",
        "exec_approval_request",
        "apply_patch_approval_request",
        "patch_apply_begin",
        "mcp_tool_call_begin",
        "mcp_tool_call_end",
        "mcp_list_tools_response",
        "web_search_begin",
        "web_search_end",
        "view_image_tool_call",
        "image_generation_begin",
        "image_generation_end",
        "background_event",
        "stream_error",
        "warning",
        "deprecation_notice",
        "turn_diff",
        "plan_update",
        "entered_review_mode",
        "exited_review_mode",
        "item_started",
        "item_completed",
        "raw_response_item",
        "undo_started",
        "undo_completed",
        "thread_name_updated",
        "thread_goal_updated",
        "thread_settings_applied",
        "guardian_assessment",
        "sub_agent_activity",
        "dynamic_tool_call_request",
        "dynamic_tool_call_response",
        "collab_agent_spawn_begin",
        "collab_agent_spawn_end",
        "collab_agent_interaction_begin",
        "collab_agent_interaction_end",
        "collab_waiting_begin",
        "collab_waiting_end",
        "collab_close_begin",
        "collab_close_end",
        "shutdown_complete",
    }
)

#: Turn lifecycle events that become :class:`TurnEvent`.
_TURN_EVENT_TYPES = frozenset(
    {
        "task_started",
        "task_complete",
        "turn_aborted",
        "thread_rolled_back",
        "context_compacted",
        "error",
    }
)

#: Function tools whose call runs a shell command.
_SHELL_TOOLS = frozenset({"shell", "shell_command", "exec_command", "local_shell", "container.exec"})
_SHELLS = frozenset({"bash", "sh", "zsh", "dash", "ksh", "fish"})
# Not anchored with "^": a leading literal lets ``re`` scan fast; line starts are checked in code.
_PATCH_HEADER = re.compile(r"\*\*\* (?:Add File|Update File|Delete File|Move to): (.+?)\s*$", re.M)
_EXIT_CODE_TEXT = re.compile(r"\s*Exit code: (-?\d+)\b")
_PROCESS_EXITED = re.compile(r"^Process exited with code (-?\d+)\b", re.M)

_EMPTY = LineResult()
#: The result of a line that carries nothing memd keeps (``parse_line`` returns this very
#: object, so callers may test it with ``is``).
EMPTY_LINE = _EMPTY
_UNKNOWN = LineResult(unknown=True)


def parse_line(raw: bytes, *, first: bool = False) -> LineResult:
    """Parse one complete rollout line into records (Codex rollout format, all variants).

    Args:
        raw: the line's bytes, with or without its trailing ``\\n`` (``\\r\\n`` is accepted).
        first: ``True`` for the first line of a file. A type-less object with a string ``id``
            is a legacy header when ``first`` is set or when it also has a ``timestamp`` key.

    Returns:
        A :class:`LineResult`: ``meta`` for a ``session_meta`` / legacy header; ``items`` for
        modelled content; ``unknown=True`` for a blank line or valid JSON of an unmodelled
        shape; ``malformed`` = ``invalid_utf8`` / ``invalid_json`` / ``not_an_object``.
        Never raises.
    """
    result = parse_record(raw, first=first)
    return result if isinstance(result, LineResult) else LineResult(items=(result,))


def parse_record(raw: bytes, *, first: bool = False) -> LineResult | Item:
    """:func:`parse_line` for the hot loop of :class:`~memd.rollout.session.RolloutParser`: a
    line that yields exactly one item returns that item itself instead of a
    :class:`LineResult` around it (most lines do; the wrapper is measurable). Never raises.
    """
    try:
        obj = orjson.loads(raw)  # validates UTF-8 and JSON in one pass
    except orjson.JSONDecodeError:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return LineResult(malformed="invalid_utf8")
        text = text.strip().lstrip("\ufeff")  # a BOM, or integers beyond 64 bits: the careful way
        if not text:
            return _UNKNOWN
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError):
            return LineResult(malformed="invalid_json")
    if not isinstance(obj, dict):
        return LineResult(malformed="not_an_object")
    try:
        return _parse_object(obj, first)
    except Exception:  # noqa: BLE001 - last resort: a line of valid JSON must never crash a reader
        return _UNKNOWN


def _ts(value: Any) -> float | None:
    """Epoch seconds of a rollout timestamp (``2026-01-02T17:00:00.000Z``); see
    :func:`memd.clock.parse_iso`, which this only short-cuts for the common form."""
    if isinstance(value, str) and value[-1:] == "Z":
        try:
            return datetime.fromisoformat(value).timestamp()  # Python ≥ 3.11 reads "Z" as UTC
        except ValueError:
            pass
    return parse_iso(value)


def parse_session_meta(first_line: bytes) -> SessionMeta | None:
    """Read the thread identity from a rollout's first line (a bounded head read).

    Args:
        first_line: the first line's bytes (``session_meta`` envelope or legacy header).

    Returns:
        The :class:`SessionMeta`, or ``None`` when the line is not a session header (or is
        truncated / malformed). Never raises.
    """
    return parse_line(first_line, first=True).meta


def is_injected_text(text: str) -> bool:
    """Whether a user-role message text is injected context (see the module docstring)."""
    head = text.lstrip()[:64].lower()
    return head.startswith(INJECTED_PREFIXES)


# --- dispatch -----------------------------------------------------------------------------


def _parse_object(obj: dict[str, Any], first: bool) -> LineResult | Item:
    kind = obj.get("type")
    if "payload" in obj and isinstance(kind, str):
        payload = obj["payload"]
        if not isinstance(payload, dict):
            return _UNKNOWN
        ts = _ts(obj.get("timestamp"))
        if kind == "session_meta":
            meta = _session_meta(payload, ts)
            return LineResult(meta=meta) if meta else _UNKNOWN
        if kind == "response_item":
            return _response_item(payload, ts)
        if kind == "event_msg":
            return _event(payload, ts)
        if kind == "turn_context":
            return _one(TurnContext(model=_str(payload.get("model")), cwd=_str(payload.get("cwd")), ts=ts))
        if kind == "compacted":
            return _one(_compaction(payload, ts))
        return _UNKNOWN
    if kind is None and "payload" not in obj:
        if "record_type" in obj:
            return _UNKNOWN
        if _str(obj.get("id")) and (first or "timestamp" in obj):
            return LineResult(meta=_legacy_header(obj))
        return _UNKNOWN
    if isinstance(kind, str):
        # Legacy bare response item (no envelope, usually no timestamp).
        return _response_item(obj, _ts(obj.get("timestamp")))
    return _UNKNOWN


def _one(item: Item | None) -> LineResult | Item:
    return item if item is not None else _EMPTY


# --- session meta -------------------------------------------------------------------------


def _session_meta(p: dict[str, Any], envelope_ts: float | None) -> SessionMeta | None:
    thread_id = _str(p.get("id")) or _str(p.get("session_id"))
    if not thread_id:
        return None
    source_kind, source_detail = _source(p.get("source"))
    git = _dict(p.get("git"))
    started = parse_iso(p.get("timestamp"))
    return SessionMeta(
        thread_id=thread_id,
        started_at=started if started is not None else envelope_ts,
        cwd=_str(p.get("cwd")),
        originator=_str(p.get("originator")),
        cli_version=_str(p.get("cli_version")),
        source_kind=source_kind,
        source_detail=source_detail,
        thread_source=_str(p.get("thread_source")),
        memory_mode=_str(p.get("memory_mode")),
        model_provider=_str(p.get("model_provider")),
        git_branch=_str(git.get("branch")),
        git_commit=_str(git.get("commit_hash")),
        git_repository_url=_str(git.get("repository_url")),
    )


def _legacy_header(obj: dict[str, Any]) -> SessionMeta:
    git = _dict(obj.get("git"))
    source_kind, source_detail = _source(obj.get("source"))
    return SessionMeta(
        thread_id=str(obj["id"]),
        started_at=parse_iso(obj.get("timestamp")),
        cwd=_str(obj.get("cwd")),
        originator=_str(obj.get("originator")),
        cli_version=_str(obj.get("cli_version")),
        source_kind=source_kind,
        source_detail=source_detail,
        git_branch=_str(git.get("branch")),
        git_commit=_str(git.get("commit_hash")),
        git_repository_url=_str(git.get("repository_url")),
        legacy=True,
    )


_STRING_SOURCES = frozenset({"cli", "vscode", "exec", "mcp", "unknown"})
_OBJECT_SOURCES = frozenset({"subagent", "internal", "custom"})


def _source(value: Any) -> tuple[str, str | None]:
    """Normalise ``session_meta.source`` to ``(source_kind, source_detail)``.

    ``"cli"`` → ``("cli", None)``; ``{"subagent": "review"}`` → ``("subagent", "review")``;
    ``{"subagent": {"thread_spawn": {...}}}`` → ``("subagent", "thread_spawn")``;
    ``{"internal": "memory_consolidation"}``, ``{"custom": "x"}`` likewise. Missing → unknown;
    an unrecognised string or key → ``("unknown", <it>)`` so it stays visible.
    """
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in _STRING_SOURCES:
            return lowered, None
        return "unknown", value or None
    if isinstance(value, dict) and value:
        key, inner = next(iter(value.items()))
        key = str(key)
        if isinstance(inner, str):
            detail: str | None = inner
        elif isinstance(inner, dict) and inner:
            detail = str(next(iter(inner)))
        else:
            detail = None
        if key.lower() in _OBJECT_SOURCES:
            return key.lower(), detail
        return "unknown", key
    return "unknown", None


# --- response items -----------------------------------------------------------------------


def _response_item(p: dict[str, Any], ts: float | None) -> LineResult | Item:
    kind = _str(p.get("type"))
    if kind == "message":
        return _message(p, ts)
    if kind == "reasoning":
        summary = _reasoning_summary(p.get("summary"))
        return _one(Reasoning(summary=summary, ts=ts)) if summary else _EMPTY
    if kind in ("function_call", "custom_tool_call"):
        return _named_call(p, kind, ts)
    if kind == "local_shell_call":
        action = _dict(p.get("action"))
        command = _command_text(action.get("command"))
        return _one(
            ToolCall(
                call_id=_call_id(p),
                name="local_shell",
                kind="shell",
                command=command,
                arguments=_arguments_text(action.get("command")),
                ts=ts,
            )
        )
    if kind == "web_search_call":
        return _one(_web_search(p, ts))
    if kind == "tool_search_call":
        return _one(
            ToolCall(
                call_id=_call_id(p),
                name="tool_search",
                kind="other",
                arguments=_arguments_text(p.get("arguments")),
                ts=ts,
            )
        )
    if kind in ("function_call_output", "custom_tool_call_output", "tool_search_output"):
        output, exit_code = _tool_output(p.get("output"))
        return _one(ToolOutput(call_id=_call_id(p), output=strip_memd_context(output), exit_code=exit_code, ts=ts))
    if kind in _DROPPED_RESPONSE_TYPES:
        return _EMPTY
    return _UNKNOWN


def _named_call(p: dict[str, Any], kind: str, ts: float | None) -> LineResult | Item:
    """A ``function_call`` (``arguments``) or ``custom_tool_call`` (``input``, e.g. apply_patch)."""
    name = _str(p.get("name"))
    if not name:
        return _UNKNOWN
    if kind == "custom_tool_call":
        return _one(_tool_call(name, _call_id(p), _arguments_text(p.get("input")), ts))
    namespace = _str(p.get("namespace"))
    if namespace and not name.startswith(namespace + "__"):  # Codex 0.17x: MCP tools as a namespace tool
        name = f"{namespace}__{name}"
    return _one(_tool_call(name, _call_id(p), _arguments_text(p.get("arguments")), ts))


def _web_search(p: dict[str, Any], ts: float | None) -> ToolCall:
    """A ``web_search_call``: its query (or URL, or the queries joined)."""
    action = _dict(p.get("action"))
    query = _str(action.get("query")) or _str(action.get("url")) or ""
    if not query and isinstance(action.get("queries"), list):
        query = "\n".join(q for q in action["queries"] if isinstance(q, str))
    return ToolCall(call_id=_call_id(p), name="web_search", kind="web_search", arguments=query, ts=ts)


def _message(p: dict[str, Any], ts: float | None) -> LineResult | Item:
    role = p.get("role")
    raw, images = _content_text(p.get("content"))
    text = strip_memd_context(raw)
    if role == "user":
        if text != raw and not text:  # only memd's own injected memory: not the user speaking
            return _one(UserMessage(text="", origin="response", injected=True, images=images, ts=ts))
        return _one(UserMessage(text=text, origin="response", injected=is_injected_text(text), images=images, ts=ts))
    if role == "assistant":
        return _one(AssistantMessage(text=text, phase=_str(p.get("phase")), origin="response", ts=ts))
    if role in ("developer", "system"):
        return _EMPTY
    return _UNKNOWN


def _content_text(content: Any) -> tuple[str, int]:
    """Join a message ``content`` into text; images become ``[image]``. Returns (text, images)."""
    if isinstance(content, str):
        return content, 0
    if not isinstance(content, list):
        return "", 0
    parts: list[str] = []
    images = 0
    for part in content:
        if isinstance(part, str):
            parts.append(part)
        elif isinstance(part, dict):
            ptype = part.get("type")
            if ptype in ("input_image", "image", "output_image"):
                images += 1
                parts.append("[image]")
            elif isinstance(part.get("text"), str):
                parts.append(part["text"])
    return "\n".join(parts), images


def _reasoning_summary(summary: Any) -> str:
    if isinstance(summary, str):
        return summary.strip()
    if not isinstance(summary, list):
        return ""
    texts = [s["text"] for s in summary if isinstance(s, dict) and isinstance(s.get("text"), str)]
    texts += [s for s in summary if isinstance(s, str)]
    return "\n".join(t for t in texts if t.strip()).strip()


def _tool_call(name: str, call_id: str, arguments: str, ts: float | None) -> ToolCall:
    """Classify a function / custom tool call by name (see :class:`ToolCall`)."""
    if name == "apply_patch":
        patch = arguments
        args = _json_object(arguments)
        if args is not None and isinstance(args.get("input"), str):
            patch = args["input"]  # apply_patch as a JSON function tool: {"input": "*** Begin Patch..."}
        return ToolCall(
            call_id=call_id,
            name=name,
            kind="patch",
            arguments=arguments,
            patch_files=_patch_files(patch),
            ts=ts,
        )
    if name in _SHELL_TOOLS:
        args = _json_object(arguments)
        command = None
        if args is not None:
            keys = ("cmd", "command") if name == "exec_command" else ("command", "cmd")
            command = _command_text(args.get(keys[0])) or _command_text(args.get(keys[1]))
        if command is not None and command.lstrip().startswith("apply_patch"):
            # Older Codex ran apply_patch through the shell tool (argv or heredoc form).
            files = _patch_files(command)
            return ToolCall(
                call_id=call_id,
                name=name,
                kind="patch",
                command=command,
                arguments=arguments,
                patch_files=files,
                ts=ts,
            )
        return ToolCall(call_id=call_id, name=name, kind="shell", command=command, arguments=arguments, ts=ts)
    kind: Literal["mcp", "other"] = "mcp" if name.startswith("mcp__") else "other"
    return ToolCall(call_id=call_id, name=name, kind=kind, arguments=arguments, ts=ts)


def _command_text(value: Any) -> str | None:
    """A shell command as one string: argv joined with shell quoting, ``bash -lc`` unwrapped."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list) or not value:
        return None
    argv = [v if isinstance(v, str) else json.dumps(v) for v in value]
    if len(argv) == 3 and os.path.basename(argv[0]) in _SHELLS and argv[1] in ("-lc", "-c", "-ic", "-l -c"):
        return argv[2]
    return shlex.join(argv)


def _patch_files(patch: str) -> tuple[str, ...]:
    """Files named by ``*** Add/Update/Delete File:`` and ``*** Move to:`` headers, in order."""
    seen: dict[str, None] = {}
    for match in _PATCH_HEADER.finditer(patch):
        start = match.start()
        if start == 0 or patch[start - 1] == "\n":
            seen.setdefault(match.group(1), None)
    return tuple(seen)


def _tool_output(value: Any) -> tuple[str, int | None]:
    """Output text and exit code of a ``*_output`` item.

    Formats: a JSON string ``{"output", "metadata": {"exit_code"}}`` (0.47–0.77); text starting
    ``Exit code: N`` (``shell_command``); unified-exec text whose header (before ``Output:``)
    has ``Process exited with code N``; content-item lists / objects (0.146+).
    """
    if isinstance(value, str):
        parsed = _json_object(value) if value.lstrip().startswith("{") else None
        if parsed is not None and "output" in parsed:
            metadata = parsed.get("metadata")
            exit_code = _int(metadata.get("exit_code")) if isinstance(metadata, dict) else None
            out = parsed["output"]
            return (out if isinstance(out, str) else _arguments_text(out)), exit_code
        return value, _text_exit_code(value)
    if isinstance(value, list):
        text, _ = _content_text(value)
        return text, _text_exit_code(text)
    if isinstance(value, dict):
        if isinstance(value.get("text"), str):
            return value["text"], _text_exit_code(value["text"])
        if "content" in value:
            return _tool_output(value["content"])
        return _arguments_text(value), None
    if value is None:
        return "", None
    return str(value), None


def _text_exit_code(text: str) -> int | None:
    match = _EXIT_CODE_TEXT.match(text)
    if match:
        return int(match.group(1))
    end = text.find("\nOutput:")
    header = text[:end] if end >= 0 else text[:2000]
    match = _PROCESS_EXITED.search(header)
    return int(match.group(1)) if match else None


# --- events -------------------------------------------------------------------------------


def _event(p: dict[str, Any], ts: float | None) -> LineResult | Item:
    kind = _str(p.get("type"))
    if kind == "user_message":
        raw = _str(p.get("message")) or ""
        text = strip_memd_context(raw)
        images = _len(p.get("images")) + _len(p.get("local_images"))
        injected = (text != raw and not text) or is_injected_text(text) or _str(p.get("kind")) in _INJECTED_EVENT_KINDS
        return _one(UserMessage(text=text, origin="event", injected=injected, images=images, ts=ts))
    if kind == "agent_message":
        return _one(
            AssistantMessage(
                text=strip_memd_context(_str(p.get("message")) or ""), phase=_str(p.get("phase")), origin="event", ts=ts
            )
        )
    if kind == "exec_command_end":
        output = next(
            (p[k] for k in ("aggregated_output", "formatted_output", "stdout") if _str(p.get(k))),
            "",
        )
        return _one(
            CommandEnd(
                call_id=_call_id(p),
                command=_command_text(p.get("command")) or "",
                exit_code=_int(p.get("exit_code")),
                output=strip_memd_context(output),
                ts=ts,
            )
        )
    if kind == "patch_apply_end":
        changes = p.get("changes")
        files = tuple(str(k) for k in changes) if isinstance(changes, dict) else ()
        return _one(PatchApplied(call_id=_call_id(p), success=p.get("success") is True, files=files, ts=ts))
    if kind in _TURN_EVENT_TYPES:
        field = {
            "task_complete": "last_agent_message",
            "turn_aborted": "reason",
            "error": "message",
        }
        detail = _str(p.get(field[kind])) if kind in field else None
        num_turns = _int(p.get("num_turns")) if kind == "thread_rolled_back" else None
        return _one(TurnEvent(type=kind, text=detail, num_turns=num_turns, ts=ts))
    if kind in _NOISE_EVENT_TYPES:
        return _EMPTY
    return _UNKNOWN


def _compaction(p: dict[str, Any], ts: float | None) -> Compaction:
    """A ``compacted`` line; counts the real (non-injected) user messages it replaced."""
    history = p.get("replacement_history")
    replaced = 0
    if isinstance(history, list):
        for entry in history:
            if isinstance(entry, dict) and entry.get("type") == "message" and entry.get("role") == "user":
                text = strip_memd_context(_content_text(entry.get("content"))[0])
                replaced += bool(text.strip()) and not is_injected_text(text)
    return Compaction(message=strip_memd_context(_str(p.get("message")) or ""), replaced_user_messages=replaced, ts=ts)


# --- small coercions (rollouts carry wrong types: never trust a field) ----------------------


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _len(value: Any) -> int:
    return len(value) if isinstance(value, list) else 0


def _call_id(p: dict[str, Any]) -> str:
    return _str(p.get("call_id")) or _str(p.get("id")) or ""


def _arguments_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(value)


def _json_object(text: str) -> dict[str, Any] | None:
    if text.lstrip()[:1] != "{":
        return None  # not an object: no need to parse (patches, plain text)
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        try:
            value = json.loads(text)  # integers beyond 64 bits
        except (ValueError, RecursionError):
            return None
    return value if isinstance(value, dict) else None
