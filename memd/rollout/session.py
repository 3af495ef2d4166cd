"""Aggregates over parsed transcript lines, Codex rollouts and Claude Code sessions (SPEC §3.2, §3.4, §4).
Pure: no I/O.

* :class:`RolloutParser` — the Codex parser, incremental: feed complete lines, read :class:`ParsedRollout`;
  :func:`new_parser` gives the parser of a transcript's agent (Codex, or
  :class:`memd.rollout.claude.ClaudeParser`).
* :func:`parse_rollout_bytes` — the same over a byte buffer of complete lines.
* :func:`real_user_messages`, :func:`commands`, :func:`patched_files` — views over items.
* :class:`ThreadStats` — a small, JSON-serialisable running aggregate for the indexer, which
  tails a file in chunks and must not keep every item.

Counting real user messages once. Codex records a typed user message twice: as a
``response_item`` message with role user (what the model saw) and as an ``event_msg
user_message`` (what the UI showed). Injected context (AGENTS.md, environment context, skills,
...) is only a response item, and in sanitised rollouts its text is redacted, so the prefix rule
cannot spot it (``rollout-2026-02-23T12-54-34-…``: 46 user response items, 38 user events).
Pairing by text also fails: a user can send the same text twice (same file, two identical
events). So the rule is: **if the rollout has any ``user_message`` event, the real messages are
the non-injected events; otherwise (legacy files, trimmed fixtures without events) they are
the non-injected response items.** It needs only two counters, so it works across chunks.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Protocol

import structlog

from memd.rollout.claude import ClaudeParser, UsageTally, parse_claude_bytes
from memd.rollout.codex import EMPTY_LINE as _EMPTY
from memd.rollout.codex import parse_record
from memd.rollout.records import (
    Agent,
    CommandEnd,
    Item,
    LineResult,
    ParsedRollout,
    PatchApplied,
    TitleCandidate,
    TokenUsage,
    ToolCall,
    ToolOutput,
    TurnContext,
    UserMessage,
)

log = structlog.get_logger(__name__)

#: Per-parser cap on ``line_skipped`` warnings; later malformed lines are only counted.
MAX_SKIP_WARNINGS = 5

#: Maximum length of a thread title (SPEC §5: one line, ≤ 120 chars).
TITLE_MAX_CHARS = 120

_WHITESPACE = re.compile(r"\s+")
_SESSION_RUNNING = re.compile(r"^Process running with session ID (\d+)", re.M)
_PATCH_FAILED_PREFIXES = ("apply_patch verification failed", "failed to apply patch")


class RolloutParser:
    """Incremental parser for one rollout (Codex rollout format, every variant).

    Feed complete lines in file order, possibly over several calls (the reader tails the file);
    :attr:`result` is the :class:`ParsedRollout` so far. The first ``session_meta`` / legacy
    header becomes ``meta``; later ones go to ``extra_metas``.

    Lines that fail to parse (invalid UTF-8 / JSON, not an object) are counted in
    ``skipped_lines`` and logged as ``line_skipped`` (warning, with ``path``, 1-based ``line``
    relative to the first line fed and ``reason``), at most :data:`MAX_SKIP_WARNINGS` times per
    parser; unknown lines are counted silently; :meth:`feed_malformed` only counts.

    Args:
        path: the rollout path, only used as log context.
        first_line_is_head: ``True`` (default) when the first line fed is the file's first line
            (a type-less header is then read as a legacy header); ``False`` when resuming from
            a stored offset.
    """

    def __init__(self, *, path: str = "", first_line_is_head: bool = True) -> None:
        self._path = path
        self._at_head = first_line_is_head
        self._warned = 0
        self._result = ParsedRollout()

    @property
    def result(self) -> ParsedRollout:
        """The :class:`ParsedRollout` accumulated so far (the live object, not a copy)."""
        return self._result

    def feed(self, lines: Iterable[bytes]) -> None:
        """Parse complete lines (each with or without its trailing ``\\n``). Never raises."""
        res = self._result
        add_item = res.items.append
        add_line_bytes = res.item_line_bytes.append
        for raw in lines:
            parsed = parse_record(raw, first=self._at_head and res.lines == 0)
            res.lines += 1
            if parsed is _EMPTY:  # nothing to keep or count
                continue
            if not isinstance(parsed, LineResult):  # the most frequent outcome: one item
                add_item(parsed)
                add_line_bytes(len(raw) if raw.endswith(b"\n") else len(raw) + 1)
                continue
            if parsed.malformed:
                self._skip(parsed.malformed)
            elif parsed.unknown:
                res.unknown_lines += 1
            if parsed.meta is not None:
                if res.meta is None:
                    res.meta = parsed.meta
                else:
                    res.extra_metas.append(parsed.meta)
            line_bytes = len(raw) if raw.endswith(b"\n") else len(raw) + 1
            for item in parsed.items:
                add_item(item)
                add_line_bytes(line_bytes)
                line_bytes = 0  # a line's bytes are counted once, with its first item

    def take_items(self, *, final: bool = False) -> tuple[list[Item], list[int]]:
        """Remove and return the items parsed so far with their line sizes
        (:attr:`ParsedRollout.item_line_bytes`), for a reader that consumes a transcript in
        batches and must not hold all of it; counters and metas stay in :attr:`result`.

        Args:
            final: the whole file was fed (no item is held back; Codex items never are).
        """
        res = self._result
        items, sizes = res.items, res.item_line_bytes
        res.items, res.item_line_bytes = [], []
        return items, sizes

    def feed_malformed(self, count: int, reason: str) -> None:
        """Count ``count`` lines the reader rejected without parsing (e.g. ``line_too_long``).

        Only counts (``lines`` and ``skipped_lines``): the reader that rejected the lines has
        already logged them with their size, so no second log event is written here.

        Args:
            count: number of lines (≤ 0 is ignored).
            reason: a short snake_case reason (kept for the caller's symmetry; not logged).
        """
        if count <= 0:
            return
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


class TranscriptParser(Protocol):
    """What the readers need of a transcript parser (:class:`RolloutParser` for Codex,
    :class:`~memd.rollout.claude.ClaudeParser` for Claude Code)."""

    @property
    def result(self) -> ParsedRollout:
        """The :class:`ParsedRollout` accumulated so far."""
        ...

    def feed(self, lines: Iterable[bytes]) -> None:
        """Parse complete lines in file order."""
        ...

    def feed_malformed(self, count: int, reason: str) -> None:
        """Count lines the reader rejected without parsing."""
        ...

    def take_items(self, *, final: bool = False) -> tuple[list[Item], list[int]]:
        """Remove and return the items that later lines can no longer change, with their line
        sizes (all of them when ``final``)."""
        ...


def new_parser(agent: Agent | str, *, path: str = "", from_start: bool = True) -> TranscriptParser:
    """A fresh incremental parser for a transcript written by ``agent``.

    Args:
        agent: :class:`Agent` (or its value) of the file.
        path: log context only.
        from_start: ``True`` when the first line fed is the file's first line (Codex reads a
            type-less first line as a legacy header; Claude Code files need no such hint).

    Returns:
        A :class:`RolloutParser` (Codex) or a :class:`~memd.rollout.claude.ClaudeParser`.
    """
    if agent == Agent.CLAUDE:
        return ClaudeParser(path=path, name_hint=_stem(path) if path else None)
    return RolloutParser(path=path, first_line_is_head=from_start)


def parse_transcript_bytes(data: bytes, agent: Agent | str, *, path: str = "") -> ParsedRollout:
    """:func:`parse_rollout_bytes` for either agent: every complete line of ``data`` (from the
    start of the file) through :func:`new_parser`. Never raises."""
    if agent == Agent.CLAUDE:
        return parse_claude_bytes(data, path=path, name_hint=_stem(path) if path else None)
    return parse_rollout_bytes(data, path=path)


def _stem(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    return name[: -len(".jsonl")] if name.endswith(".jsonl") else name


def parse_rollout_bytes(data: bytes, *, path: str = "") -> ParsedRollout:
    """Parse every complete line of ``data`` (a trailing partial line is ignored).

    Args:
        data: rollout bytes from the start of the file.
        path: log context only.

    Returns:
        The :class:`ParsedRollout`. Never raises.
    """
    parser = RolloutParser(path=path)
    lines = data.split(b"\n")
    lines.pop()  # the bytes after the last newline: a partial line, or b""
    parser.feed(lines)
    return parser.result


def real_user_messages(items: Iterable[Item]) -> list[UserMessage]:
    """Each real (non-injected) user message once, in file order.

    Rule (see the module docstring): when any ``event`` user message exists, the non-injected
    events; otherwise the non-injected ``response`` user messages.
    """
    events: list[UserMessage] = []
    responses: list[UserMessage] = []
    has_events = False
    for item in items:
        if isinstance(item, UserMessage):
            if item.origin == "event":
                has_events = True
                if not item.injected:
                    events.append(item)
            elif not item.injected:
                responses.append(item)
    return events if has_events else responses


def one_line_title(text: str, max_chars: int = TITLE_MAX_CHARS) -> str:
    """Collapse whitespace to single spaces and cut to ``max_chars`` (ending in ``…`` if cut)."""
    line = _WHITESPACE.sub(" ", text).strip()
    return line if len(line) <= max_chars else line[: max_chars - 1].rstrip() + "…"


@dataclass(slots=True)
class ThreadStats:
    """Running per-thread figures for the indexer, fed chunk by chunk, persisted as JSON.

    Works for both agents: Claude Code prompts are ``event`` user messages (recorded once), so
    the same counting rule applies; Claude's own titles and token usage fill the fields that
    Codex leaves empty.

    Attributes:
        lines / skipped_lines / unknown_lines: line counters summed over chunks.
        event_seen: a ``user_message`` event was seen (selects the counting rule).
        event_user_messages / response_user_messages: non-injected user messages per origin.
        event_title / response_title: the first non-injected message of each origin, as a title.
        last_ts: latest timestamp seen (epoch seconds), ``None`` if none.
        model: model of the latest ``turn_context``, ``None`` until one is seen.
        custom_title / ai_title / summary_title: the latest Claude Code ``custom-title``,
            ``ai-title`` and ``summary`` record, as titles (``""`` when none).
        usage: Claude Code token usage, each API response once (:class:`UsageTally`).
    """

    lines: int = 0
    skipped_lines: int = 0
    unknown_lines: int = 0
    event_seen: bool = False
    event_user_messages: int = 0
    response_user_messages: int = 0
    event_title: str = ""
    response_title: str = ""
    last_ts: float | None = None
    model: str | None = None
    custom_title: str = ""
    ai_title: str = ""
    summary_title: str = ""
    usage: UsageTally = field(default_factory=UsageTally)

    @property
    def user_messages(self) -> int:
        """Real user messages, each counted once (same rule as :func:`real_user_messages`)."""
        return self.event_user_messages if self.event_seen else self.response_user_messages

    @property
    def title(self) -> str:
        """The thread's title, one line of ≤ 120 chars, ``""`` until one is known.

        A title the user gave (Claude Code ``custom-title``), else Claude Code's own (``ai-title``),
        else the first real user message, else a ``summary`` record (in Claude Code these often
        describe an earlier session of the project, so they come last).
        """
        first = self.event_title if self.event_seen else self.response_title
        return self.custom_title or self.ai_title or first or self.summary_title

    def feed(self, chunk: ParsedRollout | Iterable[Item]) -> None:
        """Add a chunk: a :class:`ParsedRollout` of newly read lines (counters and items), or
        bare items (items only). Chunks must come in file order and not overlap."""
        if isinstance(chunk, ParsedRollout):
            self.lines += chunk.lines
            self.skipped_lines += chunk.skipped_lines
            self.unknown_lines += chunk.unknown_lines
            for meta in ([chunk.meta] if chunk.meta else []) + chunk.extra_metas:
                self._see_ts(meta.started_at)
            items: Iterable[Item] = chunk.items
        else:
            items = chunk
        for item in items:
            self._see_ts(item.ts)
            if isinstance(item, UserMessage):
                if item.origin == "event":
                    self.event_seen = True
                if item.injected:
                    continue
                if item.origin == "event":
                    self.event_user_messages += 1
                    self.event_title = self.event_title or one_line_title(item.text)
                else:
                    self.response_user_messages += 1
                    self.response_title = self.response_title or one_line_title(item.text)
            elif isinstance(item, TurnContext) and item.model:
                self.model = item.model
            elif isinstance(item, TokenUsage):
                self.usage.add(item)
            elif isinstance(item, TitleCandidate):
                title = one_line_title(item.text)
                if item.kind == "custom":
                    self.custom_title = title
                elif item.kind == "ai":
                    self.ai_title = title
                else:
                    self.summary_title = title

    def _see_ts(self, ts: float | None) -> None:
        if ts is not None and (self.last_ts is None or ts > self.last_ts):
            self.last_ts = ts

    def to_json(self) -> str:
        """Serialise to a compact JSON object string."""
        # Not ``asdict``: it deep-copies, and the indexer serialises one per file.
        data = {name: getattr(self, name) for name in _STATS_FIELDS}
        data["usage"] = self.usage.to_obj()
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str | None) -> ThreadStats:
        """Rebuild from :meth:`to_json` output; ``None``/empty/invalid text gives fresh stats
        (unknown keys are ignored, so older stored states still load)."""
        if not text:
            return cls()
        try:
            data = json.loads(text)
        except ValueError:
            return cls()
        if not isinstance(data, dict):
            return cls()
        stats = cls()
        for f in fields(cls):
            value = data.get(f.name)
            if f.name == "usage":
                stats.usage = UsageTally.from_obj(value)
                continue
            if f.name in ("event_title", "response_title", "custom_title", "ai_title", "summary_title"):
                ok = isinstance(value, str)
            elif f.name == "event_seen":
                ok = isinstance(value, bool)
            elif f.name == "model":
                ok = value is None or isinstance(value, str)
            elif f.name == "last_ts":
                ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
            else:
                ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
            if f.name in data and ok:
                setattr(stats, f.name, value)
        return stats


_STATS_FIELDS = tuple(f.name for f in fields(ThreadStats))


@dataclass(frozen=True, slots=True)
class CommandRun:
    """A shell command the agent ran, with its result.

    Attributes:
        command: the command line (``bash -lc`` unwrapped); the raw arguments when they could
            not be parsed (sanitised rollouts), ``""`` when nothing is known.
        exit_code: the exit code, ``None`` when not recorded (still running, interrupted).
        output: the output text the model saw (falls back to the event's aggregated output).
        call_id: the tool call id (``""`` when the rollout had none).
        error: the tool reported a failure (Claude Code ``is_error``), with or without an exit
            code: a failed command even when ``exit_code`` is ``None``.
    """

    command: str
    exit_code: int | None
    output: str
    call_id: str
    error: bool = False

    @property
    def failed(self) -> bool:
        """A non-zero exit code, or an error flag without one."""
        return self.error or self.exit_code not in (None, 0)


def commands(items: Iterable[Item]) -> list[CommandRun]:
    """Shell commands in call order, each once.

    Pairs shell-kind :class:`ToolCall` items with their :class:`ToolOutput` and
    ``exec_command_end`` :class:`CommandEnd` by ``call_id``. The exit code of ``CommandEnd``
    wins over one parsed from output text. Unified exec (``exec_command`` answered "Process
    running with session ID N") takes its later exit code and output from the ``write_stdin``
    calls on that session. A ``CommandEnd`` with no matching call (user-run ``!cmd``) is a
    command of its own.
    """
    runs: dict[str, _Run] = {}  # call id (or "#<index>") -> run; insertion order = call order
    sessions: dict[str, _Run] = {}  # unified-exec session id -> run
    stdin_calls: dict[str, _Run] = {}  # write_stdin call id -> run of its session
    for n, item in enumerate(items):
        if isinstance(item, ToolCall):
            if item.kind == "shell":
                command = item.command if item.command is not None else item.arguments
                runs[item.call_id or f"#{n}"] = _Run(command=command, call_id=item.call_id)
            elif item.name == "write_stdin" and item.call_id:
                session = sessions.get(_stdin_session(item.arguments) or "")
                if session is not None:
                    stdin_calls[item.call_id] = session
        elif isinstance(item, ToolOutput) and item.call_id:
            if item.call_id in runs:
                run = runs[item.call_id]
                run.output = item.output
                match = _SESSION_RUNNING.search(item.output[:2000])
                if match:
                    sessions[match.group(1)] = run
            elif item.call_id in stdin_calls:
                run = stdin_calls[item.call_id]
                run.output += item.output
            else:
                continue
            if item.exit_code is not None and not run.ended:
                run.exit_code = item.exit_code
            run.error = run.error or item.is_error
        elif isinstance(item, CommandEnd):
            target = runs.get(item.call_id) if item.call_id else None
            if target is None:  # no matching call: a command of its own (user-run ``!cmd``)
                target = runs[item.call_id or f"#{n}"] = _Run(item.command, item.call_id)
            target.ended = True
            target.exit_code = item.exit_code
            target.command = target.command or item.command
            target.output = target.output or item.output
    return [CommandRun(r.command, r.exit_code, r.output, r.call_id, r.error) for r in runs.values()]


@dataclass(slots=True)
class _Run:
    command: str
    call_id: str
    exit_code: int | None = None
    output: str = ""
    ended: bool = False
    error: bool = False


def _stdin_session(arguments: str) -> str | None:
    try:
        args = json.loads(arguments)
    except (ValueError, RecursionError):
        return None
    if isinstance(args, dict) and isinstance(args.get("session_id"), (int, str)):
        return str(args["session_id"])
    return None


def patched_files(items: Iterable[Item]) -> list[str]:
    """Files changed by apply_patch, de-duplicated, in order of first appearance.

    A patch counts unless it is known to have failed: ``patch_apply_end`` with
    ``success=false``, a non-zero exit code, an error flag (a Claude Code edit rejected or
    refused), or an output starting with "apply_patch
    verification failed" / "Failed to apply patch". Files come from the call's
    ``*** ... File:`` headers (as the agent wrote them, often relative); a ``patch_apply_end``
    without a matching call contributes its (absolute) ``changes`` keys.
    """
    patches: dict[str, _Patch] = {}  # call id (or "#<index>") -> patch, in call order
    for n, item in enumerate(items):
        if isinstance(item, ToolCall) and item.kind == "patch":
            patches[item.call_id or f"#{n}"] = _Patch(files=item.patch_files)
        elif isinstance(item, ToolOutput) and item.call_id in patches:
            text = item.output.lstrip().lower()
            failed = item.is_error or item.exit_code not in (None, 0) or text.startswith(_PATCH_FAILED_PREFIXES)
            patches[item.call_id].failed = failed
        elif isinstance(item, PatchApplied):
            patch = patches.get(item.call_id) if item.call_id else None
            if patch is None:
                patches[item.call_id or f"#{n}"] = _Patch(files=item.files, failed=not item.success)
            else:
                patch.failed = not item.success
                patch.files = patch.files or item.files
    seen: dict[str, None] = {}
    for patch in patches.values():
        if not patch.failed:
            for path in patch.files:
                seen.setdefault(path, None)
    return list(seen)


@dataclass(slots=True)
class _Patch:
    files: tuple[str, ...]
    failed: bool = False
