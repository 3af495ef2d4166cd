"""Typed records parsed from session transcripts: Codex rollout lines (SPEC §3.2) and Claude Code
transcript records (SPEC §3.4).

These are the only shapes that leave :mod:`memd.rollout`. Every record is frozen. Timestamps are
epoch seconds (float, UTC) or ``None`` where the line carried none (legacy format, trimmed
fixtures).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

#: How the source of a session was normalised. ``source_kind`` of :class:`SessionMeta`.
#: ``sdk`` is a Claude Code session started non-interactively (``claude -p`` = entrypoint
#: ``sdk-cli``, the SDKs = ``sdk-ts`` / ``sdk-py``).
SourceKind = Literal["cli", "vscode", "exec", "mcp", "unknown", "subagent", "internal", "custom", "sdk"]


class Agent(StrEnum):
    """The coding agent that wrote a transcript."""

    CODEX = "codex"
    CLAUDE = "claude"

    @property
    def display_name(self) -> str:
        """The product name (``Codex CLI``, ``Claude Code``)."""
        return "Claude Code" if self is Agent.CLAUDE else "Codex CLI"

    def label(self, version: str = "") -> str:
        """How trace context lines and model prompts name the agent: ``Claude Code 2.1.39`` for
        Claude Code (the version when known), ``codex`` for Codex (as before Claude support)."""
        if self is Agent.CLAUDE:
            return f"Claude Code {version}".strip()
        return self.value


@dataclass(frozen=True, slots=True)
class SessionMeta:
    """The identity of a rollout, from its first ``session_meta`` line or legacy header.

    Attributes:
        thread_id: ``payload.id`` (envelope) or ``id`` (legacy header).
        started_at: ``payload.timestamp`` as epoch seconds, ``None`` if missing or unparseable.
        cwd: working directory of the session as recorded (not normalised), or ``None``.
        originator: ``codex_cli_rs``, ``codex_exec``, ``codex-tui``, ``Codex Desktop``, ...
        cli_version: e.g. ``0.77.0``.
        source_kind: normalised source: a string source as is (``cli``, ``vscode``, ``exec``,
            ``mcp``, ``unknown``), or the key of an object source (``subagent``, ``internal``,
            ``custom``). A missing source is ``unknown``.
        source_detail: the value inside an object source (``review``, ``thread_spawn``,
            ``memory_consolidation``, a custom name), else ``None``.
        thread_source: ``payload.thread_source`` when present (0.146+), else ``None``.
        memory_mode: ``payload.memory_mode`` when present (``disabled`` = user opted out).
        model_provider: ``payload.model_provider`` when present.
        git_branch / git_commit / git_repository_url: from ``payload.git`` when present
            (Claude Code: ``gitBranch``).
        legacy: ``True`` for the pre-0.36 bare header format.
        agent: the agent that wrote the transcript (Codex unless a Claude parser made it).
        entrypoint: Claude Code ``entrypoint`` (``cli``, ``sdk-cli``, ``sdk-ts``, ...), ``None``
            when absent (older versions) and for Codex.
        subagent_id: Claude Code ``agentId`` when the file is a sub-agent transcript (it belongs to
            the session ``thread_id`` and never becomes a thread of its own), else ``None``.
    """

    thread_id: str
    started_at: float | None = None
    cwd: str | None = None
    originator: str | None = None
    cli_version: str | None = None
    source_kind: str = "unknown"
    source_detail: str | None = None
    thread_source: str | None = None
    memory_mode: str | None = None
    model_provider: str | None = None
    git_branch: str | None = None
    git_commit: str | None = None
    git_repository_url: str | None = None
    legacy: bool = False
    agent: Agent = Agent.CODEX
    entrypoint: str | None = None
    subagent_id: str | None = None

    @property
    def source_label(self) -> str:
        """A one-word label for logs and ``memd status``: ``cli``, ``subagent:review``, ..."""
        return f"{self.source_kind}:{self.source_detail}" if self.source_detail else self.source_kind


@dataclass(frozen=True, slots=True)
class UserMessage:
    """A user-role message.

    Attributes:
        text: the message text (input_text parts joined with newlines; images as ``[image]``).
        origin: ``event`` for ``event_msg user_message``, ``response`` for a ``response_item``
            message with role user (also the legacy bare item). A real message usually appears
            once as each: count it once (see :func:`memd.rollout.session.real_user_messages`).
        injected: ``True`` when the text is injected context, not the user speaking
            (``# AGENTS.md instructions``, ``<environment_context>``, ``<user_instructions>``,
            ``<skill>``, ``<subagent_notification>``, memd's own memory marker).
        images: number of images attached.
        ts: epoch seconds or ``None``.
    """

    text: str
    origin: Literal["event", "response"]
    injected: bool = False
    images: int = 0
    ts: float | None = None


@dataclass(frozen=True, slots=True)
class AssistantMessage:
    """An assistant-role message (``response_item`` message, or ``event_msg agent_message``).

    Attributes:
        text: output_text parts joined.
        phase: ``commentary`` / ``final_answer`` when the line says so (0.104+), else ``None``.
        origin: ``response`` or ``event`` (the same answer is often present as both).
        ts: epoch seconds or ``None``.
    """

    text: str
    phase: str | None = None
    origin: Literal["event", "response"] = "response"
    ts: float | None = None


@dataclass(frozen=True, slots=True)
class Reasoning:
    """A reasoning item. Only the plain-text summary is kept; encrypted content is dropped."""

    summary: str
    ts: float | None = None


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A tool invocation (``function_call``, ``custom_tool_call``, ``local_shell_call``,
    ``web_search_call``, ``tool_search_call``).

    Attributes:
        call_id: links the call to its :class:`ToolOutput` (``""`` when absent).
        name: tool name (``shell``, ``shell_command``, ``exec_command``, ``write_stdin``,
            ``apply_patch``, ``update_plan``, ``mcp__<server>__<tool>``, ``web_search``, ...).
        kind: ``shell`` (a command ran), ``patch`` (apply_patch), ``mcp``, ``web_search`` or
            ``other``.
        command: for shell kinds the command line as one string (argv joined with shell quoting,
            ``bash -lc`` wrappers unwrapped), else ``None``.
        arguments: the raw arguments / patch input text (may be long; the input builder caps it).
        patch_files: for ``apply_patch``, the files named in ``*** Add/Update/Delete File:``
            headers, in order.
        ts: epoch seconds or ``None``.
    """

    call_id: str
    name: str
    kind: Literal["shell", "patch", "mcp", "web_search", "other"]
    command: str | None = None
    arguments: str = ""
    patch_files: tuple[str, ...] = ()
    ts: float | None = None


@dataclass(frozen=True, slots=True)
class ToolOutput:
    """The result of a tool call (``function_call_output``, ``custom_tool_call_output``,
    ``tool_search_output``).

    Attributes:
        call_id: the :class:`ToolCall` it answers.
        output: the output text (the ``output`` field of a JSON-string output, else the text).
        exit_code: from JSON ``metadata.exit_code``, ``Exit code: N`` or
            ``Process exited with code N``; ``None`` when not stated (still running, non-shell).
        is_error: the tool reported a failure without (necessarily) an exit code: Claude Code's
            ``tool_result.is_error`` (a rejected edit, a tool error, a failed Bash command).
            Always ``False`` for Codex, whose failures are exit codes.
        ts: epoch seconds or ``None``.
    """

    call_id: str
    output: str
    exit_code: int | None = None
    ts: float | None = None
    is_error: bool = False


@dataclass(frozen=True, slots=True)
class CommandEnd:
    """``event_msg exec_command_end``: a finished command with its exit code (0.104+)."""

    call_id: str
    command: str
    exit_code: int | None
    output: str = ""
    ts: float | None = None


@dataclass(frozen=True, slots=True)
class PatchApplied:
    """``event_msg patch_apply_end``: whether an apply_patch succeeded and which files changed."""

    call_id: str
    success: bool
    files: tuple[str, ...] = ()
    ts: float | None = None


@dataclass(frozen=True, slots=True)
class Compaction:
    """A ``compacted`` line: ``message`` is the summary that replaced earlier history.

    ``replaced_user_messages`` counts user messages inside ``replacement_history`` (they were
    already seen earlier in the file and are not counted again).
    """

    message: str
    replaced_user_messages: int = 0
    ts: float | None = None


@dataclass(frozen=True, slots=True)
class TurnContext:
    """A ``turn_context`` line: the model and cwd in force for the next turn."""

    model: str | None = None
    cwd: str | None = None
    ts: float | None = None


@dataclass(frozen=True, slots=True)
class TurnEvent:
    """A turn lifecycle event: ``task_started``, ``task_complete``, ``turn_aborted``,
    ``thread_rolled_back``, ``context_compacted``, ``error``.

    ``text`` carries ``last_agent_message`` for task_complete, the message for error, the
    reason for turn_aborted; ``num_turns`` is set for thread_rolled_back.
    """

    type: str
    text: str | None = None
    num_turns: int | None = None
    ts: float | None = None


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """Token usage reported on one Claude Code ``assistant`` line (``message.usage``).

    Claude Code writes one line per content block and repeats the usage of the whole API
    response on each of them (later lines of a streamed response carry the larger
    ``output_tokens``), so usage must be counted once per ``message_id`` + ``request_id``: see
    :class:`memd.rollout.claude.UsageTally`.

    Attributes:
        message_id: ``message.id`` (``""`` when absent).
        request_id: ``requestId`` (``""`` when absent, e.g. Bedrock sessions).
        input_tokens / output_tokens / cache_read_tokens / cache_creation_tokens: token counts
            (a missing or non-numeric field is 0).
        ts: epoch seconds or ``None``.
    """

    message_id: str
    request_id: str
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_creation_tokens: int = 0
    ts: float | None = None


@dataclass(frozen=True, slots=True)
class TitleCandidate:
    """A session title offered by the transcript itself (Claude Code ``summary``, ``ai-title``,
    ``custom-title`` records). ``summary`` records are titles, never compactions.

    Attributes:
        text: the title text.
        kind: ``custom`` (the user named the session), ``ai`` (Claude Code's generated title) or
            ``summary`` (a leaf summary; in resumed sessions it may describe an earlier session).
        ts: epoch seconds or ``None``.
    """

    text: str
    kind: Literal["custom", "ai", "summary"]
    ts: float | None = None


#: Any item a rollout body yields.
Item = (
    UserMessage
    | AssistantMessage
    | Reasoning
    | ToolCall
    | ToolOutput
    | CommandEnd
    | PatchApplied
    | Compaction
    | TurnContext
    | TurnEvent
    | TokenUsage
    | TitleCandidate
)


@dataclass(frozen=True, slots=True)
class LineResult:
    """What one line parsed into.

    Attributes:
        meta: a :class:`SessionMeta` when the line was a ``session_meta`` (or legacy header).
        items: zero or more items (a line yields at most a few).
        unknown: ``True`` when the line was valid JSON of a type we do not model (counted, skipped
            silently, SPEC §3.2).
        malformed: a short reason (``invalid_json``, ``invalid_utf8``, ``not_an_object``) when the
            line could not be parsed at all; ``None`` otherwise.
    """

    meta: SessionMeta | None = None
    items: tuple[Item, ...] = ()
    unknown: bool = False
    malformed: str | None = None


@dataclass(slots=True)
class ParsedRollout:
    """A whole (or partially read) rollout: the first meta, the items, and line counters.

    Attributes:
        meta: the FIRST session_meta / legacy header seen (it identifies the thread), or ``None``
            when the file has none (the thread is then not indexable).
        extra_metas: later session_meta lines (composite files, resumed sessions).
        items: all items in file order.
        lines: complete lines consumed.
        skipped_lines: malformed lines (invalid JSON / UTF-8 / over ``max_line_bytes``).
        unknown_lines: valid JSON lines of types we do not model.
        item_line_bytes: parallel to ``items``: the byte length of the source line (with its
            newline) for the first item a line produced, 0 for further items of the same line.
            Used to measure rendered size against raw JSON size. (Claude Code: a line merged
            into an earlier item of the same message adds its bytes to that item.)
        bad_values: values of the wrong type inside otherwise modelled lines that were skipped
            (a placeholder string in a numeric field, ``data`` given as a JSON string); Codex
            lines leave it 0.
    """

    meta: SessionMeta | None = None
    extra_metas: list[SessionMeta] = field(default_factory=list)
    items: list[Item] = field(default_factory=list)
    lines: int = 0
    skipped_lines: int = 0
    unknown_lines: int = 0
    item_line_bytes: list[int] = field(default_factory=list)
    bad_values: int = 0
