"""Claude Code transcript parser: JSONL records in, the typed records of :mod:`memd.rollout.records`
out (SPEC §3.4). Pure: no I/O.

Source format: Claude Code session transcripts, ``<projects root>/<encoded cwd>/<sessionId>.jsonl``
(1.0.x … 2.1.x), their sub-agent transcripts (2.1.x ``<sessionId>/subagents/agent-<id>.jsonl``, 2.0.x
``agent-<id>.jsonl`` beside the session) and the inline sidechains of 1.0.x. One JSON object per line;
the ``type`` of a record is one of:

* ``user`` — a real prompt, tool results (``tool_result`` blocks), or injected text (``isMeta``
  expanded command bodies, local-command caveats and output, task notifications, interrupt markers,
  the compaction summary ``isCompactSummary``);
* ``assistant`` — one content block per line in 2.x (``text``, ``thinking``, ``tool_use``); lines
  sharing ``message.id`` are one message, and each repeats the response's ``usage``;
* ``system`` — ``compact_boundary``, ``turn_duration``, ``stop_hook_summary``, ``local_command``,
  ``api_error``, ...;
* ``summary`` / ``ai-title`` / ``custom-title`` — session titles (a ``summary`` is not a compaction);
* ``progress``, ``attachment`` (hook output, reminders, file snapshots; memd's own SessionStart context
  arrives as ``hook_additional_context``), ``queue-operation``, ``file-history-snapshot`` and many small
  metadata types.

Mapping (what :class:`ClaudeParser` yields):

* a real prompt (:func:`real_prompt`) → :class:`UserMessage` ``origin="event"`` (Claude Code records a
  prompt once, so it counts like a Codex ``user_message`` event); other user text →
  :class:`UserMessage` ``injected=True``; ``[Request interrupted by user…]`` →
  :class:`TurnEvent` ``turn_aborted``;
* assistant ``text`` blocks → one :class:`AssistantMessage` per ``message.id`` (later lines of the
  same message are merged into it, until an assistant line of another message); ``thinking`` is
  dropped; ``tool_use`` → :class:`ToolCall` (Bash ``input.command`` is a shell command; Edit / Write /
  MultiEdit / NotebookEdit become ``patch`` calls whose ``arguments`` is the change written as an
  apply_patch text, so downstream code reads one patch format); ``usage`` → :class:`TokenUsage`
  (deduplicated by :class:`UsageTally`); a new model → :class:`TurnContext`; an API error message
  (``isApiErrorMessage``) → :class:`TurnEvent` ``error``;
* ``tool_result`` → :class:`ToolOutput` with ``is_error`` and ``<system-reminder>`` blocks removed; a
  Bash result states its exit code as ``Exit code N`` when it failed; a Bash result Claude Code did not
  flag as an error, that was not interrupted, not sent to the background and carries no
  ``returnCodeInterpretation`` (``grep`` finding nothing) exited 0;
* ``system``/``compact_boundary`` → :class:`TurnEvent` ``context_compacted``; the ``isCompactSummary``
  user record that follows → :class:`Compaction`;
* ``summary`` / ``ai-title`` / ``custom-title`` → :class:`TitleCandidate`.

Every record with ``isSidechain: true`` is skipped: in a main transcript those are the inline
sub-agent conversations of 1.0.x, and a sub-agent transcript never becomes a thread. Unknown record
types, unknown ``system`` subtypes and unknown attachment kinds are skipped and counted in
``unknown_lines``; a placeholder string in a numeric field (``"[trimmed for fixture]"`` in ``usage``)
and ``data`` given as a JSON string are skipped and counted in ``bad_values``. memd's own context
blocks (``<memd-context ...>``) are removed from every kept text (feedback-loop guard, SPEC §18).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal

import orjson
import structlog

from memd.clock import parse_iso
from memd.rollout.guard import strip_memd_context
from memd.rollout.records import (
    Agent,
    AssistantMessage,
    Compaction,
    Item,
    ParsedRollout,
    SessionMeta,
    TitleCandidate,
    TokenUsage,
    ToolCall,
    ToolOutput,
    TurnContext,
    TurnEvent,
    UserMessage,
)

log = structlog.get_logger("memd.rollout.claude")

#: How many leading records may come before the first one carrying ``sessionId`` (the first lines
#: are often ``file-history-snapshot`` or ``summary`` records without one).
HEAD_LINES = 50

#: Per-parser cap on ``line_skipped`` warnings; later malformed lines are only counted.
MAX_SKIP_WARNINGS = 5

#: Lower-cased prefixes of user text that is injected, not the user speaking (SPEC §3.4).
#: ``<command-args>`` and ``<bash-stderr>`` complete the command / shell pairs the SPEC names.
INJECTED_PREFIXES: tuple[str, ...] = (
    "<command-name>",
    "<command-message>",
    "<command-args>",
    "<local-command-stdout>",
    "<local-command-stderr>",
    "<local-command-caveat>",
    "caveat: the messages below",
    "<bash-input>",
    "<bash-stdout>",
    "<bash-stderr>",
    "<task-notification>",
    "<system-reminder>",
    "<ide_opened_file>",
    "<ide_selection>",
    "[request interrupted by user",
)

#: Slash commands whose arguments are never a request to the agent (they act on the session).
NON_REQUEST_COMMANDS = frozenset({"/clear", "/exit", "/quit", "/compact", "/model", "/mcp", "/login", "/logout"})

#: Tools whose ``file_path`` (``notebook_path``) is a changed file.
PATCH_TOOLS = frozenset({"Edit", "Write", "MultiEdit", "NotebookEdit"})

#: Record types that carry nothing memd keeps (known, not counted as unknown).
_METADATA_TYPES = frozenset(
    {
        "file-history-snapshot",
        "queue-operation",
        "permission-mode",
        "mode",
        "agent-name",
        "agent-setting",
        "agent-color",
        "last-prompt",
        "worktree-state",
        "frame-link",
        "pr-link",
        "started",
        "result",
        "relocated",
        "bridge-session",
        "atis-latch",
        "tag",
    }
)

#: ``system`` subtypes that are known (only ``compact_boundary`` yields an item).
_SYSTEM_SUBTYPES = frozenset(
    {
        "compact_boundary",
        "microcompact_boundary",
        "turn_duration",
        "stop_hook_summary",
        "local_command",
        "api_error",
        "api_refusal",
        "error",
        "informational",
        "session_start",
        "model_refusal_fallback",
        "away_summary",
        "bridge_status",
    }
)

#: ``attachment.type`` values that are known (none yields an item: attachments are context the
#: harness adds, never the user speaking; ``hook_additional_context`` is where memd's own
#: SessionStart context lands).
_ATTACHMENT_TYPES = frozenset(
    {
        "hook_additional_context",
        "hook_success",
        "hook_non_blocking_error",
        "hook_blocking_error",
        "hook_cancelled",
        "hook_error_during_execution",
        "hook_stopped_continuation",
        "hook_system_message",
        "hook_permission_decision",
        "queued_command",
        "task_reminder",
        "todo_reminder",
        "task_status",
        "deferred_tools_delta",
        "mcp_instructions_delta",
        "agent_listing_delta",
        "command_permissions",
        "auto_mode",
        "plan_mode",
        "plan_mode_exit",
        "plan_mode_reentry",
        "ultra_effort_enter",
        "ultra_effort_exit",
        "total_tokens_reminder",
        "skill_listing",
        "invoked_skills",
        "dynamic_skill",
        "silent_turn_reminder",
        "batching_reminder_sent",
        "read_truncation_notice",
        "file",
        "compact_file_reference",
        "edited_text_file",
        "edited_image_file",
        "nested_memory",
        "date_change",
        "budget_usd",
        "companion_intro",
        "critical_system_reminder",
        "output_style",
        "diagnostics",
        "selected_lines_in_ide",
        "opened_file_in_ide",
        "directory",
    }
)

_THINKING_BLOCKS = frozenset({"thinking", "redacted_thinking"})
_COMMAND_NAME = re.compile(r"<command-name>(.*?)</command-name>", re.DOTALL)
_COMMAND_ARGS = re.compile(r"<command-args>(.*?)</command-args>", re.DOTALL)
_SYSTEM_REMINDER = re.compile(r"[ \t]*<system-reminder>.*?(?:</system-reminder>|\Z)[ \t]*\n?", re.DOTALL)
_EXIT_CODE = re.compile(r"\s*Exit code:? (-?\d+)\b")
_BACKGROUND = "Command running in background"
_INTERRUPTED = "[request interrupted by user"


# --- the real-prompt rule ------------------------------------------------------------------------


def real_prompt(record: Mapping[str, Any]) -> str | None:
    """The user's request in one Claude Code record, or ``None`` when the record is not a real
    prompt (SPEC §3.4). This is the one place the rule lives.

    A real prompt is a ``user`` record that is not ``isMeta``, not ``isCompactSummary``, not
    ``isSidechain``, holds text and no ``tool_result``, and whose text does not start with an
    injected marker (:data:`INJECTED_PREFIXES`). The rule is applied per text block (an IDE
    extension sends ``<ide_selection>`` and the typed prompt as two blocks; only the first is
    injected). A slash command (``<command-name>``) is a request only through its non-empty
    ``<command-args>``, and never for :data:`NON_REQUEST_COMMANDS` (``/clear``, ``/exit``, ...).
    memd's own ``<memd-context>`` blocks and ``<system-reminder>`` blocks are removed first.

    Args:
        record: one parsed transcript line (any type).

    Returns:
        The request text (blocks joined with newlines, stripped), or ``None``. Never raises.
    """
    if record.get("type") != "user":
        return None
    if record.get("isMeta") is True or record.get("isCompactSummary") is True or record.get("isSidechain") is True:
        return None
    texts = _prompt_texts(record.get("message"))
    if texts is None:
        return None
    parts = [part for part in (_prompt_part(raw) for raw in texts) if part]
    return "\n".join(parts) or None


def _prompt_texts(message: Any) -> list[str] | None:
    """The text blocks of a user message, or ``None`` when it is not a prompt (no content, or a
    ``tool_result``)."""
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        return None
    texts = []
    for block in content:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "tool_result":
            return None
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
    return texts


def _prompt_part(raw: str) -> str | None:
    """What one text block contributes to the request: a slash command's arguments, the typed
    text without reminders, or nothing for injected text."""
    text = strip_memd_context(raw).strip()
    if not text:
        return None
    head = text[:64].lower()
    if head.startswith(("<command-name>", "<command-message>", "<command-args>")):
        return _command_request(text)
    if head.startswith(INJECTED_PREFIXES):
        return None
    return _strip_reminders(text) or None


def _command_request(text: str) -> str | None:
    """The request inside a slash-command record: its non-empty ``<command-args>``."""
    name = _COMMAND_NAME.search(text)
    if name and name.group(1).strip().lower() in NON_REQUEST_COMMANDS:
        return None
    args = _COMMAND_ARGS.search(text)
    request = args.group(1).strip() if args else ""
    return request or None


def _strip_reminders(text: str) -> str:
    if "<system-reminder>" not in text:
        return text
    return _SYSTEM_REMINDER.sub("", text).rstrip()


# --- session identity ----------------------------------------------------------------------------


def session_meta(lines: Iterable[bytes], *, name_hint: str | None = None) -> SessionMeta | None:
    """Read the identity of a Claude Code transcript from its first lines (a bounded head read).

    The thread id is the ``sessionId`` of the first record that carries one; when ``name_hint``
    (the file name's stem, ``<sessionId>`` in Claude Code's layout) is itself one of the session
    ids seen, it wins (a resumed transcript may start with records copied from an earlier
    session). ``cwd``, ``version``, ``gitBranch``, ``entrypoint`` and the start time come from the
    first record of that session that has them; the folder name is never decoded. A transcript
    whose first conversation record is ``isSidechain`` with an ``agentId`` is a sub-agent
    transcript (``subagent_id`` set; ``agent-acompact-*`` is the compaction summariser).

    Args:
        lines: the first lines of the file (the caller bounds them: :data:`HEAD_LINES` lines and a
            byte cap); malformed lines are ignored.
        name_hint: the file name's stem, or ``None``.

    Returns:
        The :class:`SessionMeta` (``agent`` = Claude), or ``None`` when no line carries a
        ``sessionId``. Never raises.
    """
    builder = _MetaBuilder()
    for raw in lines:
        obj = _load(raw)
        if isinstance(obj, dict):
            builder.see(obj)
    return builder.build(name_hint)


@dataclass(slots=True)
class _MetaBuilder:
    """Collects the identity of a transcript from its records, in file order."""

    ids: list[str] = field(default_factory=list)
    fields: dict[str, dict[str, Any]] = field(default_factory=dict)  # session id -> first values

    def see(self, obj: Mapping[str, Any]) -> None:
        sid = obj.get("sessionId")
        if not isinstance(sid, str) or not sid:
            return
        if sid not in self.fields:
            self.ids.append(sid)
            self.fields[sid] = {}
        found = self.fields[sid]
        for key in ("cwd", "version", "gitBranch", "entrypoint"):
            value = obj.get(key)
            if key not in found and isinstance(value, str) and value:
                found[key] = value
        if "ts" not in found:
            ts = _ts(obj.get("timestamp"))
            if ts is not None:
                found["ts"] = ts
        if "sidechain" not in found and obj.get("type") in ("user", "assistant", "system", "attachment", "progress"):
            agent_id = obj.get("agentId")
            found["sidechain"] = obj.get("isSidechain") is True
            found["agent_id"] = agent_id if isinstance(agent_id, str) and agent_id else None

    def build(self, name_hint: str | None) -> SessionMeta | None:
        if not self.ids:
            return None
        sid = name_hint if name_hint in self.fields else self.ids[0]
        found = self.fields[sid]
        subagent_id = found.get("agent_id") if found.get("sidechain") else None
        entrypoint = found.get("entrypoint")
        if subagent_id is not None:
            kind, detail = ("internal", "compaction") if is_compaction_agent(subagent_id) else ("subagent", subagent_id)
        else:
            kind, detail = source_of_entrypoint(entrypoint)
        return SessionMeta(
            thread_id=sid,
            started_at=found.get("ts"),
            cwd=found.get("cwd"),
            originator=entrypoint,
            cli_version=found.get("version"),
            source_kind=kind,
            source_detail=detail,
            git_branch=found.get("gitBranch"),
            agent=Agent.CLAUDE,
            entrypoint=entrypoint,
            subagent_id=subagent_id,
        )


#: Record types only Claude Code writes (a Codex line has ``payload`` or is a legacy header).
_CLAUDE_TYPES = frozenset({"user", "assistant", "system", "summary", "progress", "attachment"}) | _METADATA_TYPES


def looks_like_claude(lines: Iterable[bytes]) -> bool:
    """Whether any of ``lines`` is a Claude Code record (a known Claude type without a Codex
    ``payload``), even when no ``sessionId`` is among them: such a file is a Claude transcript
    that does not (yet) name its session, not a foreign file. Never raises."""
    for raw in lines:
        obj = _load(raw)
        if isinstance(obj, dict) and "payload" not in obj and _one_of(obj.get("type"), _CLAUDE_TYPES):
            return True
    return False


def source_of_entrypoint(entrypoint: str | None) -> tuple[str, str | None]:
    """Normalise a Claude Code ``entrypoint`` to ``(source_kind, source_detail)`` (SPEC §4).

    ``None`` (older versions) and ``cli`` → ``("cli", None)``: interactive. ``sdk-cli`` (``claude
    -p``), ``sdk-ts``, ``sdk-py`` and any other ``sdk-*`` → ``("sdk", entrypoint)``: excluded by
    default. An entrypoint naming VS Code → ``("vscode", None)``; anything else (desktop, remote,
    future front ends) → ``("custom", entrypoint)``, interactive by default.
    """
    if entrypoint is None or entrypoint == "cli":
        return "cli", None
    lowered = entrypoint.lower()
    if lowered.startswith("sdk"):
        return "sdk", entrypoint
    if "vscode" in lowered:
        return "vscode", None
    return "custom", entrypoint


def is_compaction_agent(agent_id: str) -> bool:
    """Whether a sub-agent id (or ``agent-<id>.jsonl`` stem without ``agent-``) is Claude Code's
    compaction summariser (``acompact-*``), which memd skips."""
    return agent_id.startswith("acompact")


# --- the incremental parser ----------------------------------------------------------------------


class ClaudeParser:
    """Incremental parser for one Claude Code transcript (every version seen: 1.0.x … 2.1.x).

    Feed complete lines in file order, possibly over several calls; :attr:`result` is the
    :class:`ParsedRollout` so far (``meta`` from the records, see :func:`session_meta`). The
    parser keeps a little state across calls (the open assistant message, tool names by id, the
    current model), so one parser should see a file from its start when its items are used for
    input building; the indexer, which only aggregates (:class:`memd.rollout.session.ThreadStats`,
    :class:`UsageTally`), may start a fresh parser per chunk.

    Lines that fail to parse are counted in ``skipped_lines`` and logged (``line_skipped``, at most
    :data:`MAX_SKIP_WARNINGS` per parser). Never raises.

    Args:
        path: the transcript path, only used as log context.
        name_hint: the file name's stem (see :func:`session_meta`).
    """

    def __init__(self, *, path: str = "", name_hint: str | None = None) -> None:
        self._path = path
        self._name_hint = name_hint
        self._warned = 0
        self._result = ParsedRollout()
        self._meta = _MetaBuilder()
        self._meta_open = True
        self._tools: dict[str, str] = {}  # tool_use id -> tool name
        self._message_id: str | None = None  # the assistant message the last text went to
        self._message_index: int | None = None  # its index in result.items
        self._model: str | None = None
        self._line_bytes = 0
        self._line_has_item = False

    @property
    def result(self) -> ParsedRollout:
        """The :class:`ParsedRollout` accumulated so far (the live object)."""
        return self._result

    def feed(self, lines: Iterable[bytes]) -> None:
        """Parse complete lines (each with or without its trailing ``\\n``). Never raises."""
        res = self._result
        for raw in lines:
            res.lines += 1
            obj = _load(raw)
            if obj is None:
                continue  # a blank line
            if isinstance(obj, str):
                self._skip(obj)
                continue
            self._line_bytes = len(raw) if raw.endswith(b"\n") else len(raw) + 1
            self._line_has_item = False
            try:
                known = self._record(obj)
            except Exception:  # noqa: BLE001 - last resort: one odd record never stops a reader
                known = False
            if not known:
                res.unknown_lines += 1

    def take_items(self, *, final: bool = False) -> tuple[list[Item], list[int]]:
        """Remove and return the items that later lines can no longer change, with their line
        sizes (:attr:`ParsedRollout.item_line_bytes`), for a reader that consumes a transcript in
        batches and must not hold all of it; counters and meta stay in :attr:`result`.

        The open assistant message (a later line of the same message may still add text to it)
        and the items after it are held back, unless ``final`` (the whole file was fed).
        """
        res = self._result
        keep = len(res.items) if final or self._message_index is None else self._message_index
        items, sizes = res.items[:keep], res.item_line_bytes[:keep]
        del res.items[:keep], res.item_line_bytes[:keep]
        if self._message_index is not None:
            self._message_index = None if final else self._message_index - keep
        return items, sizes

    def feed_malformed(self, count: int, reason: str) -> None:
        """Count ``count`` lines the reader rejected without parsing (e.g. ``line_too_long``).

        Args:
            count: number of lines (≤ 0 is ignored).
            reason: a short snake_case reason (the reader already logged the lines).
        """
        if count > 0:
            self._result.lines += count
            self._result.skipped_lines += count

    def _skip(self, reason: str) -> None:
        self._result.skipped_lines += 1
        if self._warned < MAX_SKIP_WARNINGS:
            self._warned += 1
            log.warning(
                "line_skipped",
                path=self._path,
                line=self._result.lines,
                reason=reason,
                next="line counted in skipped_lines; parsing continues",
            )

    def _add(self, item: Item, *, carries_bytes: bool = True) -> int:
        """Append an item; the first content item of a line carries the line's bytes (usage and
        model items never do: they are not input, and the ratio of SPEC §15 counts kept items)."""
        res = self._result
        res.items.append(item)
        if carries_bytes and not self._line_has_item:
            res.item_line_bytes.append(self._line_bytes)
            self._line_has_item = True
        else:
            res.item_line_bytes.append(0)
        return len(res.items) - 1

    # --- records ---------------------------------------------------------------------------

    def _record(self, obj: dict[str, Any]) -> bool:
        """Handle one record; ``False`` when its type (or subtype, or attachment kind) is unknown."""
        if self._meta_open:
            self._see_meta(obj)
        kind = obj.get("type")
        if not isinstance(kind, str):
            return False
        if obj.get("isSidechain") is True and kind in ("user", "assistant", "system", "attachment", "progress"):
            return True  # inline sub-agent conversation (1.0.x) or a sub-agent transcript
        ts = _ts(obj.get("timestamp"))
        if kind == "user":
            self._user(obj, ts)
            return True
        if kind == "assistant":
            self._assistant(obj, ts)
            return True
        if kind == "system":
            return self._system(obj, ts)
        if kind == "attachment":
            attachment = obj.get("attachment")
            return isinstance(attachment, dict) and _one_of(attachment.get("type"), _ATTACHMENT_TYPES)
        if kind == "progress":
            if not isinstance(obj.get("data"), dict):
                self._result.bad_values += 1  # e.g. ``data`` given as a JSON string
            return True
        if kind in ("summary", "ai-title", "custom-title"):
            self._title(obj, kind, ts)
            return True
        return kind in _METADATA_TYPES

    def _see_meta(self, obj: dict[str, Any]) -> None:
        self._meta.see(obj)
        meta = self._meta.build(self._name_hint)
        if meta is not None:
            self._result.meta = meta
            found = self._meta.fields[meta.thread_id]
            if "cwd" in found and "sidechain" in found:
                self._meta_open = False  # the identity is complete

    def _user(self, obj: dict[str, Any], ts: float | None) -> None:
        message = obj.get("message")
        content = message.get("content") if isinstance(message, dict) else None
        if obj.get("isCompactSummary") is True:
            text = strip_memd_context(_plain_text(content)).strip()
            if text:
                self._add(Compaction(message=text, ts=ts))
            return
        blocks: list[Any] = content if isinstance(content, list) else []
        results = [b for b in blocks if isinstance(b, dict) and b.get("type") == "tool_result"]
        if results:
            tool_use_result = obj.get("toolUseResult") if len(results) == 1 else None
            for block in results:
                self._add(self._tool_output(block, tool_use_result, ts))
            return
        prompt = real_prompt(obj)
        images = sum(1 for b in blocks if isinstance(b, dict) and b.get("type") == "image")
        if prompt is not None:
            self._add(UserMessage(text=prompt, origin="event", images=images, ts=ts))
            return
        text = strip_memd_context(_plain_text(content)).strip()
        if not text:
            return
        if text[:40].lower().startswith(_INTERRUPTED):
            reason = "interrupted by user for tool use" if "tool use" in text[:60] else "interrupted by user"
            self._add(TurnEvent(type="turn_aborted", text=reason, ts=ts))
            return
        self._add(UserMessage(text=text, origin="event", injected=True, images=images, ts=ts))

    def _tool_output(self, block: dict[str, Any], tool_use_result: Any, ts: float | None) -> ToolOutput:
        call_id = _str(block.get("tool_use_id"))
        text = _plain_text(block.get("content"))
        if not text and isinstance(block.get("text"), str):
            text = block["text"]
        text = _strip_reminders(strip_memd_context(text))
        is_error = block.get("is_error") is True
        exit_code: int | None = None
        if self._tools.get(call_id) == "Bash":
            exit_code = _bash_exit_code(text, is_error, tool_use_result)
        elif is_error:
            match = _EXIT_CODE.match(text)
            exit_code = int(match.group(1)) if match else None
        return ToolOutput(call_id=call_id, output=text, exit_code=exit_code, ts=ts, is_error=is_error)

    def _assistant(self, obj: dict[str, Any], ts: float | None) -> None:
        message = obj.get("message")
        if not isinstance(message, dict):
            return
        message_id = _str(message.get("id"))
        if message_id and message_id != self._message_id:
            # Another message began: the open one is complete (Claude Code writes the lines of one
            # message together), so its item can be handed on (take_items).
            self._message_index = None
        model = _str(message.get("model"))
        if model and model != "<synthetic>" and model != self._model:
            self._model = model
            self._add(TurnContext(model=model, ts=ts), carries_bytes=False)
        usage = message.get("usage")
        if isinstance(usage, dict):
            self._add(self._usage(usage, message_id, _str(obj.get("requestId")), ts), carries_bytes=False)
        content = message.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            return
        error = obj.get("isApiErrorMessage") is True
        for block in content:
            if isinstance(block, dict):
                self._assistant_block(block, message_id, error=error, ts=ts)

    def _assistant_block(self, block: dict[str, Any], message_id: str, *, error: bool, ts: float | None) -> None:
        """One content block of an assistant message: text (an API error's text is a turn
        event), or a tool call; ``thinking`` / ``redacted_thinking`` are dropped, and other
        blocks (server tool results, model fallbacks) carry nothing memd keeps."""
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            text = strip_memd_context(block["text"])
            if not text.strip():
                return
            if error:
                self._add(TurnEvent(type="error", text=text.strip(), ts=ts))
            else:
                self._assistant_text(text, message_id, ts)
        elif kind == "tool_use":
            call = _tool_call(block, ts)
            if call.call_id:
                self._tools[call.call_id] = call.name
            self._add(call)

    def _assistant_text(self, text: str, message_id: str, ts: float | None) -> None:
        res = self._result
        index = self._message_index
        if message_id and message_id == self._message_id and index is not None:
            previous = res.items[index]
            if isinstance(previous, AssistantMessage):
                res.items[index] = replace(previous, text=previous.text.rstrip("\n") + "\n" + text.lstrip("\n"))
                if not self._line_has_item:
                    res.item_line_bytes[index] += self._line_bytes
                    self._line_has_item = True
                return
        self._message_index = self._add(AssistantMessage(text=text, origin="response", ts=ts))
        self._message_id = message_id or None

    def _usage(self, usage: dict[str, Any], message_id: str, request_id: str, ts: float | None) -> TokenUsage:
        counts = []
        for key in ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"):
            value = usage.get(key)
            number = _count(value)
            if number is None:
                if value is not None:
                    self._result.bad_values += 1  # a placeholder string, a float, a negative number
                number = 0
            counts.append(number)
        return TokenUsage(message_id, request_id, counts[0], counts[1], counts[2], counts[3], ts)

    def _system(self, obj: dict[str, Any], ts: float | None) -> bool:
        subtype = obj.get("subtype")
        if subtype == "compact_boundary":
            self._add(TurnEvent(type="context_compacted", ts=ts))
            return True
        return subtype is None or _one_of(subtype, _SYSTEM_SUBTYPES)

    def _title(self, obj: dict[str, Any], kind: str, ts: float | None) -> None:
        key, title_kind = {
            "summary": ("summary", "summary"),
            "ai-title": ("aiTitle", "ai"),
            "custom-title": ("customTitle", "custom"),
        }[kind]
        text = _str(obj.get(key)).strip()
        if text:
            self._add(TitleCandidate(text=text, kind=_title_kind(title_kind), ts=ts))


def parse_claude_bytes(data: bytes, *, path: str = "", name_hint: str | None = None) -> ParsedRollout:
    """Parse every complete line of ``data`` (a trailing partial line is ignored).

    Args:
        data: transcript bytes from the start of the file.
        path: log context only.
        name_hint: the file name's stem (see :func:`session_meta`).

    Returns:
        The :class:`ParsedRollout`. Never raises.
    """
    parser = ClaudeParser(path=path, name_hint=name_hint)
    lines = data.split(b"\n")
    lines.pop()  # the bytes after the last newline: a partial line, or b""
    parser.feed(lines)
    return parser.result


# --- usage -----------------------------------------------------------------------------------------

#: How many recent ``message.id`` + ``requestId`` keys a :class:`UsageTally` remembers. Lines of one
#: response are written together, so a handful suffices; the bound keeps the stored state small.
RECENT_USAGE_KEYS = 16


@dataclass(slots=True)
class UsageTally:
    """Token usage of a Claude Code session, each API response counted once; resumable.

    Claude Code repeats a response's ``usage`` on every line of the response (one line per
    content block), and streamed responses report a growing ``output_tokens``. The tally counts a
    response once per ``message.id`` + ``requestId``: the first line adds its counts, a later line
    of the same response adds only what grew. Lines without a ``message.id`` are counted as they
    come. The state is a few integers and the last :data:`RECENT_USAGE_KEYS` keys, serialisable with
    :meth:`to_obj` / :meth:`from_obj` so the indexer can fold a file chunk by chunk.

    Attributes:
        input_tokens / output_tokens / cache_read_tokens / cache_creation_tokens: totals.
        recent: ``[key, input, output, cache_read, cache_creation]`` of the latest responses.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_creation_tokens: int = 0
    recent: list[list[Any]] = field(default_factory=list)

    def add(self, usage: TokenUsage) -> None:
        """Count one line's usage (see the class docstring)."""
        counts = [usage.input_tokens, usage.output_tokens, usage.cache_read_tokens, usage.cache_creation_tokens]
        if not usage.message_id:
            self._bump(counts)
            return
        key = f"{usage.message_id}/{usage.request_id}"
        for entry in self.recent:
            if entry[0] == key:
                grown = [max(0, new - old) for new, old in zip(counts, entry[1:], strict=True)]
                entry[1:] = [max(new, old) for new, old in zip(counts, entry[1:], strict=True)]
                self._bump(grown)
                return
        self._bump(counts)
        self.recent.append([key, *counts])
        del self.recent[:-RECENT_USAGE_KEYS]

    def _bump(self, counts: list[int]) -> None:
        self.input_tokens += counts[0]
        self.output_tokens += counts[1]
        self.cache_read_tokens += counts[2]
        self.cache_creation_tokens += counts[3]

    def to_obj(self) -> dict[str, Any]:
        """A JSON-serialisable object of the tally."""
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cache_read_tokens": self.cache_read_tokens,
            "cache_creation_tokens": self.cache_creation_tokens,
            "recent": [list(entry) for entry in self.recent],
        }

    @classmethod
    def from_obj(cls, obj: Any) -> UsageTally:
        """Rebuild from :meth:`to_obj` output; anything malformed gives a fresh (or partial) tally."""
        tally = cls()
        if not isinstance(obj, dict):
            return tally
        for name in ("input_tokens", "output_tokens", "cache_read_tokens", "cache_creation_tokens"):
            value = _count(obj.get(name))
            if value is not None:
                setattr(tally, name, value)
        recent = obj.get("recent")
        if isinstance(recent, list):
            for entry in recent[-RECENT_USAGE_KEYS:]:
                if (
                    isinstance(entry, list)
                    and len(entry) == 5
                    and isinstance(entry[0], str)
                    and all(_count(v) is not None for v in entry[1:])
                ):
                    tally.recent.append(list(entry))
        return tally


def total_usage(items: Iterable[Item]) -> UsageTally:
    """The :class:`UsageTally` of a sequence of items (non-usage items are ignored)."""
    tally = UsageTally()
    for item in items:
        if isinstance(item, TokenUsage):
            tally.add(item)
    return tally


# --- tool calls ------------------------------------------------------------------------------------


def _tool_call(block: dict[str, Any], ts: float | None) -> ToolCall:
    """A ``tool_use`` block as a :class:`ToolCall` (see the module docstring)."""
    call_id = _str(block.get("id"))
    name = _str(block.get("name")) or "tool"
    raw_input = block.get("input")
    args: dict[str, Any] = raw_input if isinstance(raw_input, dict) else {}
    if name == "Bash":
        command = args.get("command")
        return ToolCall(
            call_id=call_id,
            name=name,
            kind="shell",
            command=command if isinstance(command, str) else None,
            arguments=_json_text(raw_input),
            ts=ts,
        )
    if name in PATCH_TOOLS:
        path = _str(args.get("file_path")) or _str(args.get("notebook_path"))
        return ToolCall(
            call_id=call_id,
            name=name,
            kind="patch",
            arguments=_patch_text(name, path, args),
            patch_files=(path,) if path else (),
            ts=ts,
        )
    if name == "WebSearch":
        query = _str(args.get("query"))
        return ToolCall(call_id=call_id, name=name, kind="web_search", arguments=query, ts=ts)
    kind: Literal["mcp", "other"] = "mcp" if name.startswith("mcp__") else "other"
    return ToolCall(call_id=call_id, name=name, kind=kind, arguments=_json_text(raw_input), ts=ts)


def _patch_text(name: str, path: str, args: dict[str, Any]) -> str:
    """An Edit / Write / MultiEdit / NotebookEdit input written as an apply_patch text (the one
    patch format downstream code reads: ``*** Update File:`` headers, ``-`` / ``+`` lines)."""
    lines = ["*** Begin Patch"]
    if name == "Write":
        lines.append(f"*** Add File: {path}")
        lines.extend("+" + line for line in _str(args.get("content")).splitlines())
    elif name == "NotebookEdit":
        lines.append(f"*** Update File: {path}")
        lines.append("@@")
        sign = "-" if args.get("edit_mode") == "delete" else "+"
        lines.extend(sign + line for line in _str(args.get("new_source")).splitlines())
    else:
        edits = args.get("edits") if name == "MultiEdit" else [args]
        lines.append(f"*** Update File: {path}")
        for edit in edits if isinstance(edits, list) else []:
            if not isinstance(edit, dict):
                continue
            lines.append("@@")
            lines.extend("-" + line for line in _str(edit.get("old_string")).splitlines())
            lines.extend("+" + line for line in _str(edit.get("new_string")).splitlines())
    lines.append("*** End Patch")
    return "\n".join(lines)


def _bash_exit_code(text: str, is_error: bool, tool_use_result: Any) -> int | None:
    """The exit code of a Bash result (see the module docstring), ``None`` when not known."""
    if is_error:
        match = _EXIT_CODE.match(text)
        return int(match.group(1)) if match else None
    if text.startswith(_BACKGROUND):
        return None
    if isinstance(tool_use_result, dict) and (
        tool_use_result.get("interrupted") is True
        or tool_use_result.get("backgroundTaskId")
        or tool_use_result.get("returnCodeInterpretation")
    ):
        return None
    return 0


# --- small helpers ---------------------------------------------------------------------------------


def _ts(value: Any) -> float | None:
    """Epoch seconds of a record's ``timestamp`` (``2026-01-02T17:00:00.000Z``), ``None`` when
    missing or not a time (``"[trimmed for fixture]"``)."""
    if isinstance(value, str) and value[-1:] == "Z":
        try:
            return datetime.fromisoformat(value).timestamp()  # Python >= 3.11 reads "Z" as UTC
        except ValueError:
            pass
    return parse_iso(value)


def _load(raw: bytes) -> dict[str, Any] | str | None:
    """A line as a JSON object, a malformed reason (``invalid_utf8`` / ``invalid_json`` /
    ``not_an_object``), or ``None`` for a blank line."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return "invalid_utf8"
        text = text.strip().lstrip("\ufeff")
        if not text:
            return None
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError):
            return "invalid_json"
    return obj if isinstance(obj, dict) else "not_an_object"


def _plain_text(content: Any) -> str:
    """The text of a message / tool-result ``content``: a string, or the ``text`` of its blocks
    (images as ``[image]``), joined with newlines."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    parts: list[str] = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict):
            if block.get("type") == "image":
                parts.append("[image]")
            elif isinstance(block.get("text"), str):
                parts.append(block["text"])
    return "\n".join(parts)


def _title_kind(kind: str) -> Literal["custom", "ai", "summary"]:
    if kind == "custom":
        return "custom"
    return "ai" if kind == "ai" else "summary"


def _one_of(value: Any, names: frozenset[str]) -> bool:
    """Whether a record's field is one of ``names``: a string in the set (a list, an object or a
    number given where a type name belongs is none of them; a set lookup of those would raise)."""
    return isinstance(value, str) and value in names


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _count(value: Any) -> int | None:
    """A token count: a non-negative integer (an integral float is accepted), else ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    return None


def _json_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    try:
        return orjson.dumps(value).decode("utf-8")
    except TypeError:
        return json.dumps(value, ensure_ascii=False, default=str)
