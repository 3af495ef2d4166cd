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
a command renders once, with its output and exit code, where it was started (with its first
end event; a second end event for the same call renders on its own).

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

Streaming (SPEC §15: memory bounded by the output, not by the file): :class:`InputBuilder` takes
the items in batches as the transcript is read. Each item is capped as it arrives, so its raw text
is not kept, and a unit that can no longer fit the budget, whatever the rest of the file holds,
is dropped at once (its items only counted); the result is the same as :func:`build_input`'s
over the whole item list (see :class:`InputBuilder` for why).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

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

#: ``(user origin, assistant origin)``: which copy of each message a rollout keeps depends on
#: whether the WHOLE rollout has a user event / an assistant response item, which an
#: incremental builder knows only at the end; so assistant finality is tracked under each pair
#: (bit ``h`` of ``_Unit.final_in`` for ``_HYPOTHESES[h]``).
_HYPOTHESES: tuple[tuple[str, str], ...] = (
    ("event", "response"),
    ("event", "event"),
    ("response", "response"),
    ("response", "event"),
)
#: Bytes reserved per kept unit (and once more) for the ``[... N items omitted ...]`` markers.
_MARKER_ROOM_BYTES = 40


@dataclass(slots=True, eq=False)
class _Unit:
    """One rendered block: an item, or a tool call with the outputs folded into it.

    ``seq`` numbers units in creation order; ``origin`` is the message origin a user or
    assistant unit exists under; ``final_in`` (assistant) has bit ``h`` set when the unit is a
    final answer under ``_HYPOTHESES[h]``; ``text`` is the rendering, ``""`` until rendered or
    after the unit changed; a ``pruned`` unit cannot fit the budget any more and keeps only
    its ``indices`` (counted in ``[... N items omitted ...]``).
    """

    kind: str
    indices: list[int]
    seq: int = 0
    origin: str | None = None
    final: bool = False
    final_in: int = 0
    session: str | None = None  # unified-exec session id of a command
    ended: bool = False  # a command whose end event came
    text: str = ""
    pruned: bool = False


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
        parsed: the parsed rollout (Codex rollout format, any variant; or a Claude Code
            transcript parsed into the same items).
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
    builder = InputBuilder(
        tool_output_cap_bytes=tool_output_cap_bytes,
        user_message_cap_bytes=user_message_cap_bytes,
        max_input_tokens=max_input_tokens,
        bytes_per_token=bytes_per_token,
        bounded=False,
    )
    builder.add(parsed.items, parsed.item_line_bytes)
    return builder.finish()


class InputBuilder:
    """Builds one session's input from its items, fed in file order in batches (SPEC §6.2, §15).

    :meth:`add` the items of a transcript (with their source line sizes) batch by batch, then
    :meth:`finish` once: the result is :func:`build_input`'s over the whole item list. Each item
    is capped as it arrives (its raw text is not kept). With ``bounded`` (the default) memory is
    bounded by the output, not by the file: after each batch, the units that cannot fit the
    budget whatever the rest of the file holds are dropped, keeping only their item counts.

    Why a dropped unit could never have been kept: the budget is filled newest-first after the
    required units (every user message, the last final answer), stopping at the first unit that
    does not fit, so a unit is kept only if the required units plus every non-required unit from
    it to the end fit. Each unit has a lower bound on its final size whatever comes later (its
    size for a unit nothing can change or that only grows, the ``$ command`` line of a command
    whose output may still be replaced by its end event, 0 for an assistant message); a unit is
    dropped once those bounds alone exceed the budget, and an assistant message only once a later
    final answer exists under every origin the rest of the file could still settle on.

    Args:
        tool_output_cap_bytes: per tool output, head + tail kept (bytes).
        user_message_cap_bytes: per user message, final answer and shell command (bytes).
        max_input_tokens: token budget of the text (tokens = ``bytes / bytes_per_token``).
        bytes_per_token: the calibration of the estimate.
        bounded: drop what cannot fit as the items come (``False``: keep every capped item until
            :meth:`finish`, as :func:`build_input` does).
    """

    def __init__(
        self,
        *,
        tool_output_cap_bytes: int = 4096,
        user_message_cap_bytes: int = 32768,
        max_input_tokens: int = 120_000,
        bytes_per_token: float = 4.0,
        bounded: bool = True,
    ) -> None:
        self._output_cap = tool_output_cap_bytes
        self._message_cap = user_message_cap_bytes
        self._max_input_tokens = max_input_tokens
        self._bytes_per_token = bytes_per_token
        self._budget_bytes = int(max_input_tokens * bytes_per_token)
        self._bounded = bounded
        self._finished = False
        self._n = 0  # items seen
        self._seq = 0  # units opened
        self._units: list[_Unit] = []  # every unit in file order, pruned ones included
        self._shown: dict[int, Item] = {}  # capped items of the live units, by item index
        self._line_bytes: dict[int, int] = {}  # their source line sizes (when not 0)
        self._commentary: dict[int, AssistantMessage] = {}  # assistant text at the commentary cap
        self._patches: dict[int, _PatchStats] = {}  # per-file counts of a patch call's full input
        self._by_call: dict[str, _Unit] = {}
        self._sessions: dict[str, _Unit] = {}
        self._user_events = False  # a user_message event was seen: response copies are dropped
        self._assistant_responses = False  # an assistant response item was seen: event copies are dropped
        self._last_assistant: list[_Unit | None] = [None] * len(_HYPOTHESES)
        self._latest_final = [-1] * len(_HYPOTHESES)  # seq of the newest final answer per hypothesis
        # Bounded mode: units before the frontier are pruned, user messages, or assistant
        # messages held until a later final answer exists (``_held``).
        self._frontier = 0
        self._held: list[_Unit] = []
        self._pruned_low = 0  # lower bounds of the pruned units' sizes
        self._user_bytes = 0  # sizes of the user units that surely stay (event origin)
        self._user_count = 0
        self._pruned_any = False
        self._unpruned_bytes = 0  # source line bytes added since the last pass

    @property
    def held_items(self) -> int:
        """How many (capped) items the builder holds now: what its memory is proportional to."""
        return len(self._shown)

    # --- intake ------------------------------------------------------------------------------

    def add(self, items: Sequence[Item], line_bytes: Sequence[int] = ()) -> None:
        """Take the next items of the transcript, in file order.

        Args:
            items: parsed items (:attr:`ParsedRollout.items` or a slice of them).
            line_bytes: ``line_bytes[k]`` is the source line size of ``items[k]``
                (:attr:`ParsedRollout.item_line_bytes`); missing entries count 0.

        Raises:
            RuntimeError: called after :meth:`finish`.
        """
        if self._finished:
            raise RuntimeError("InputBuilder.add after finish")
        base = self._n
        known = len(line_bytes)
        for k, item in enumerate(items):
            self._take(base + k, item, line_bytes[k] if k < known else 0)
        self._n = base + len(items)
        if self._bounded:
            # A pass costs a look at every unit not yet pruned: run one per budget's worth of
            # source lines, which keeps the items held between passes bounded by the budget too.
            self._unpruned_bytes += sum(line_bytes)
            if self._unpruned_bytes >= self._budget_bytes:
                self._unpruned_bytes = 0
                self._prune()

    def _take(self, i: int, it: Item, size: int) -> None:
        if isinstance(it, ToolOutput):
            self._output(i, it, size)
        elif isinstance(it, ToolCall):
            self._call(i, it, size)
        elif isinstance(it, UserMessage):
            self._user(i, it, size)
        elif isinstance(it, AssistantMessage):
            self._assistant(i, it, size)
        elif isinstance(it, CommandEnd):
            self._command_end(i, it, size)
        elif isinstance(it, PatchApplied):
            unit = self._by_call.get(it.call_id) if it.call_id else None
            if unit is None or unit.kind != "patch":
                self._open("patch_applied", i, it, size)
            else:
                self._join(unit, i, it, size)
        elif isinstance(it, Reasoning):
            if it.summary.strip():
                summary = _head(it.summary, REASONING_CAP_BYTES)
                self._open("reasoning", i, it if summary is it.summary else replace(it, summary=summary), size)
        elif isinstance(it, Compaction):
            if it.message.strip():
                message = _cap(it.message, self._message_cap)
                self._open("compaction", i, it if message is it.message else replace(it, message=message), size)
        elif isinstance(it, TurnEvent):
            self._event(i, it, size)

    def _open(self, kind: str, i: int, shown: Item, size: int) -> _Unit:
        unit = _Unit(kind, [i], seq=self._seq)
        self._seq += 1
        self._units.append(unit)
        self._shown[i] = shown
        if size:
            self._line_bytes[i] = size
        return unit

    def _join(self, unit: _Unit, i: int, shown: Item, size: int) -> None:
        unit.indices.append(i)
        if unit.pruned:
            return  # counted among the omitted items; nothing to keep
        unit.text = ""
        self._shown[i] = shown
        if size:
            self._line_bytes[i] = size

    def _user(self, i: int, it: UserMessage, size: int) -> None:
        if it.injected:
            return
        if it.origin == "event":
            if not self._user_events:
                self._user_events = True
                self._vanish("user", "response")
        elif self._user_events:
            return  # the response copy of a message its event already gave
        self._boundary(it.origin)
        text = _strip_memd_blocks(it.text) if MEMD_MEMORY_MARKER in it.text else it.text
        capped = _cap(text, self._message_cap)
        unit = self._open("user", i, it if capped is it.text else replace(it, text=capped), size)
        unit.origin = it.origin
        if self._bounded and it.origin == "event":
            unit.text = _render(unit, self._shown, self._patches)
            self._user_bytes += _utf8_len(unit.text) + 2
            self._user_count += 1

    def _assistant(self, i: int, it: AssistantMessage, size: int) -> None:
        if it.origin == "response":
            if not self._assistant_responses:
                self._assistant_responses = True
                self._vanish("assistant", "event")
        elif self._assistant_responses:
            return  # the event copy of an answer its response item already gave
        if not it.text.strip():
            return
        text = _cap(it.text, self._message_cap)
        unit = self._open("assistant", i, it if text is it.text else replace(it, text=text), size)
        unit.origin = it.origin
        commentary = _cap(it.text, COMMENTARY_CAP_BYTES)
        if commentary is not text:
            self._commentary[i] = replace(it, text=commentary)
        mine = [h for h, (_, origin) in enumerate(_HYPOTHESES) if origin == it.origin]
        for h in mine:
            if it.phase == "final_answer":
                unit.final_in |= 1 << h
                self._latest_final[h] = unit.seq
            if it.phase != "commentary":
                self._last_assistant[h] = unit

    def _boundary(self, user_origin: str | None) -> None:
        """A turn ended (a kept user message of ``user_origin``; ``None``: a task_complete event or
        the end of the file): the last non-commentary answer of the turn is its final answer."""
        for h, (origin, _) in enumerate(_HYPOTHESES):
            if user_origin is not None and origin != user_origin:
                continue
            unit = self._last_assistant[h]
            if unit is not None:
                unit.final_in |= 1 << h
                self._latest_final[h] = max(self._latest_final[h], unit.seq)
                self._last_assistant[h] = None

    def _vanish(self, kind: str, origin: str) -> None:
        """Drop the ``origin`` copies of ``kind`` messages: the other copy turned out to be kept."""

        def gone(unit: _Unit) -> bool:
            return unit.kind == kind and unit.origin == origin

        if not any(gone(u) for u in self._units):
            return
        self._frontier -= sum(1 for u in self._units[: self._frontier] if gone(u))
        for unit in self._units:
            if gone(unit):
                for i in unit.indices:
                    self._forget(i)
        self._units = [u for u in self._units if not gone(u)]
        self._held = [u for u in self._held if not gone(u)]

    def _call(self, i: int, it: ToolCall, size: int) -> None:
        shown = _capped_call(it, self._message_cap)
        kind = _tool_kind(it, self._sessions)
        if kind is None:  # a poll of a running command: folded into it
            target = self._sessions.get(_stdin_session(it.arguments) or "")
            if target is not None:
                self._join(target, i, shown, size)
                if it.call_id:
                    self._by_call[it.call_id] = target
                return
            kind = "tool"
        unit = self._open(kind, i, shown, size)
        if kind == "patch":
            self._patches[i] = _patch_stats(_patch_text(it))
        if it.call_id:
            self._by_call[it.call_id] = unit

    def _output(self, i: int, it: ToolOutput, size: int) -> None:
        output = _cap(it.output, self._output_cap)
        shown = it if output is it.output else replace(it, output=output)
        unit = self._by_call.get(it.call_id) if it.call_id else None
        if unit is None:
            self._open("output", i, shown, size)
            return
        self._join(unit, i, shown, size)
        if unit.kind == "command" and unit.session is None:
            match = _SESSION_RUNNING.search(it.output[:2000])
            if match:
                unit.session = match.group(1)
                self._sessions[unit.session] = unit

    def _command_end(self, i: int, it: CommandEnd, size: int) -> None:
        command = _cap(it.command, self._message_cap)
        output = _cap(it.output, self._output_cap)
        same = command is it.command and output is it.output
        shown = it if same else replace(it, command=command, output=output)
        unit = self._by_call.get(it.call_id) if it.call_id else None
        if unit is None or unit.kind != "command" or unit.ended:
            unit = self._open("command", i, shown, size)
        else:
            self._join(unit, i, shown, size)
        unit.ended = True

    def _event(self, i: int, it: TurnEvent, size: int) -> None:
        if it.type == "task_complete":
            self._boundary(None)
        elif it.type in ("error", "turn_aborted", "thread_rolled_back"):
            text = _cap(it.text, EVENT_TEXT_CAP_BYTES) if it.text else it.text
            self._open("event", i, it if text is it.text else replace(it, text=text), size)

    def _forget(self, i: int) -> None:
        self._shown.pop(i, None)
        self._line_bytes.pop(i, None)
        self._commentary.pop(i, None)
        self._patches.pop(i, None)

    # --- bounded memory ----------------------------------------------------------------------

    def _prune(self) -> None:
        """Drop the units that cannot fit the budget whatever comes later (see the class doc)."""
        tail = self._units[self._frontier :]
        lows = [self._low(u) for u in tail]
        if self._pruned_low + self._user_bytes + sum(lows) <= self._budget_bytes:
            return  # everything may still fit (the budget check of _fit keeps all then)
        self._held = [u for u in self._held if not self._drop(u, 0)]
        room = self._budget_bytes - self._user_bytes - _MARKER_ROOM_BYTES * (self._user_count + 1)
        newer = 0
        for n in range(len(tail) - 1, -1, -1):
            newer += lows[n]
            if newer > room:
                break
        else:
            return
        for unit, low in zip(tail[: n + 1], lows[: n + 1], strict=True):
            if unit.kind != "user" and not self._drop(unit, low):
                self._held.append(unit)
        self._frontier += n + 1

    def _low(self, unit: _Unit) -> int:
        """A lower bound of the unit's final size in the budget (bytes), whatever comes later."""
        kind = unit.kind
        if kind == "user" or kind == "assistant":
            return 0  # user sizes are counted apart; an assistant answer's cap is not known yet
        if kind == "command" and not unit.ended:  # its end event may still replace its output
            first = self._shown[unit.indices[0]]
            if isinstance(first, ToolCall):
                command = first.command if first.command is not None else first.arguments
                return _utf8_len(f"$ {command.strip()}") + 2 if command else 4
        if not unit.text:
            unit.text = _render(unit, self._shown, self._patches)
        low = _utf8_len(unit.text) + 2
        if kind == "command":  # ended: only a later exit code may still replace the last line
            low -= _utf8_len(unit.text) - _utf8_len(unit.text.rsplit("\n", 1)[0])
        return low

    def _drop(self, unit: _Unit, low: int) -> bool:
        """Prune ``unit`` (known not to fit) unless it may still be required; ``True`` if pruned."""
        if unit.kind == "assistant" and (unit.origin != "response" or self._may_be_last_final(unit)):
            return False
        unit.pruned = True
        unit.text = ""
        self._pruned_any = True
        self._pruned_low += low
        for i in unit.indices:
            self._forget(i)
        return True

    def _may_be_last_final(self, unit: _Unit) -> bool:
        first = self._shown[unit.indices[0]]
        if isinstance(first, AssistantMessage) and first.phase == "commentary":
            return False  # never a final answer
        users = ("event",) if self._user_events else ("event", "response")
        return any(
            self._latest_final[h] <= unit.seq
            for h, (user, assistant) in enumerate(_HYPOTHESES)
            if user in users and assistant == "response"
        )

    # --- result ------------------------------------------------------------------------------

    def finish(self) -> BuiltInput:
        """The built input (see :func:`build_input` for its shape). Never raises on any items.

        Raises:
            RuntimeError: called twice.
        """
        if self._finished:
            raise RuntimeError("InputBuilder.finish called twice")
        self._finished = True
        self._boundary(None)
        chosen = (
            "event" if self._user_events else "response",
            "response" if self._assistant_responses else "event",
        )
        h = _HYPOTHESES.index(chosen)
        shown = self._shown
        for unit in self._units:
            if unit.kind == "assistant":
                unit.final = bool(unit.final_in >> h & 1)
                if not unit.final and not unit.pruned and unit.indices[0] in self._commentary:
                    shown[unit.indices[0]] = self._commentary[unit.indices[0]]
            if not unit.pruned and (not unit.text or unit.kind == "assistant"):
                unit.text = _render(unit, shown, self._patches)
        units = [u for u in self._units if u.text or u.pruned]
        kept, omitted = _fit(units, self._budget_bytes, pruned=self._pruned_any)
        kept, omitted, redactions = self._redact_kept(units, kept, omitted)
        return self._result(units, kept, omitted, redactions)

    def _redact_kept(self, units: list[_Unit], kept: list[bool], omitted: int) -> tuple[list[bool], int, int]:
        """Redact what is kept (only that leaves the machine) and render again where a secret was
        found; a replacement can make a unit longer, so the budget is checked once more."""
        shown = self._shown
        kept_units = [u for u, keep in zip(units, kept, strict=True) if keep]
        changed, redactions = _redact(shown, {i: _text_fields(shown[i]) for u in kept_units for i in u.indices})
        if not changed:
            return kept, omitted, redactions
        for unit in kept_units:
            if not changed.isdisjoint(unit.indices):
                unit.text = _render(unit, shown, self._patches)
        again, dropped = _fit(kept_units, self._budget_bytes)
        if dropped:
            drop = {id(u) for u, keep in zip(kept_units, again, strict=True) if not keep}
            kept = [keep and id(u) not in drop for u, keep in zip(units, kept, strict=True)]
            omitted += dropped
        return kept, omitted, redactions

    def _result(self, units: list[_Unit], kept: list[bool], omitted: int, redactions: int) -> BuiltInput:
        text = _join_text(units, kept)
        kept_indices = sorted(i for unit, keep in zip(units, kept, strict=True) if keep for i in unit.indices)
        raw_json_bytes = sum(self._line_bytes.get(i, 0) for i in kept_indices)
        text_bytes = _utf8_len(text)
        bytes_per_token = self._bytes_per_token
        est_tokens = int(text_bytes / bytes_per_token) if bytes_per_token > 0 else text_bytes
        if est_tokens > self._max_input_tokens:
            log.warning(
                "input_over_budget",
                est_tokens=est_tokens,
                max_input_tokens=self._max_input_tokens,
                reason="user messages and the last final answer alone exceed the budget",
            )
        return BuiltInput(
            items=tuple(self._shown[i] for i in kept_indices),
            text=text,
            raw_json_bytes=raw_json_bytes,
            text_bytes=text_bytes,
            est_tokens=est_tokens,
            omitted_items=omitted,
            redactions=redactions,
        )


def _join_text(units: list[_Unit], kept: list[bool]) -> str:
    """The kept units' texts in file order, a blank line before each user message, each run of
    dropped items as ``[... N items omitted ...]``."""
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
    return "\n".join(parts)


# --- grouping and capping -------------------------------------------------------------------


def _tool_kind(call: ToolCall, sessions: dict[str, _Unit]) -> str | None:
    """The kind of unit a tool call opens, or ``None`` for a ``write_stdin`` poll (no input) of
    a running command."""
    if call.kind == "shell":
        return "command"
    if call.kind == "patch":
        return "patch"
    if call.kind == "web_search":
        return "web_search"
    if call.name == "write_stdin":
        args = _json_object(call.arguments)
        chars = args.get("chars") if args else None
        if not chars and _stdin_session(call.arguments) in sessions:
            return None
        return "stdin"
    if call.name == "update_plan":
        return "plan"
    return "tool"


def _capped_call(call: ToolCall, message_cap: int) -> ToolCall:
    """The call with its command capped at ``message_cap`` and its arguments by kind."""
    command = _cap(call.command, message_cap) if call.command is not None else None
    if call.kind == "patch":
        arguments = _cap(call.arguments, PATCH_HUNKS_CAP_BYTES + 512)
    elif call.kind == "shell":
        arguments = _cap(call.arguments, SHELL_ARGS_CAP_BYTES)
    else:
        arguments = _cap(call.arguments, TOOL_ARGS_CAP_BYTES)
    if command is call.command and arguments is call.arguments:
        return call
    return replace(call, command=command, arguments=arguments)


def _text_fields(item: Item) -> dict[str, str]:
    """The (capped) text fields of a kept item that redaction scans: ``{field: text}``."""
    if isinstance(item, UserMessage | AssistantMessage):
        return {"text": item.text}
    if isinstance(item, Reasoning):
        return {"summary": item.summary}
    if isinstance(item, ToolCall):
        if item.command is None:
            return {"arguments": item.arguments}
        return {"command": item.command, "arguments": item.arguments}
    if isinstance(item, ToolOutput):
        return {"output": item.output}
    if isinstance(item, CommandEnd):
        return {"command": item.command, "output": item.output}
    if isinstance(item, Compaction):
        return {"message": item.message}
    if isinstance(item, TurnEvent) and item.text:
        return {"text": item.text}
    return {}


def _cap(text: str, max_bytes: int) -> str:
    """:func:`cut_middle`, with a fast path for ASCII text that fits (no encoding needed)."""
    if len(text) <= max_bytes and text.isascii():
        return text
    return cut_middle(text, max_bytes)


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
    """The text block of ``unit`` (see the module doc), from the (capped) ``items`` it names;
    ``""`` when its first item is not of the unit's kind."""
    first = items.get(unit.indices[0])
    if unit.kind in _CALL_KINDS:
        return _render_call(unit, first, items, patches)
    if unit.kind == "command":
        return _render_command(unit, items)
    return _render_single(unit, first)


#: Units opened by a non-shell tool call (the outputs folded into them).
_CALL_KINDS = frozenset({"patch", "web_search", "plan", "tool", "stdin"})


def _render_single(unit: _Unit, first: Item | None) -> str:
    """A unit of one item: a message, a reasoning summary, an unanswered output, an event."""
    kind = unit.kind
    if kind == "user" and isinstance(first, UserMessage):
        return f"user: {first.text.strip()}"
    if kind == "assistant" and isinstance(first, AssistantMessage):
        commentary = not unit.final and first.phase == "commentary"
        return f"{'assistant (commentary)' if commentary else 'assistant'}: {first.text.strip()}"
    if kind == "reasoning" and isinstance(first, Reasoning):
        return "thinking: " + " ".join(first.summary.split())
    if kind == "output" and isinstance(first, ToolOutput):
        return "output:" + _indented_output(first.output, first.exit_code, error=first.is_error)
    if kind == "patch_applied" and isinstance(first, PatchApplied):
        return f"patch {'applied' if first.success else 'FAILED'}: {', '.join(first.files) or '(no files)'}"
    if kind == "compaction" and isinstance(first, Compaction):
        return f"compaction summary: {first.message.strip()}"
    if kind == "event" and isinstance(first, TurnEvent):
        return _render_event(first)
    return ""


def _render_event(event: TurnEvent) -> str:
    if event.type == "error":
        return f"error: {(event.text or '').strip()}"
    if event.type == "turn_aborted":
        return f"[turn aborted: {event.text or 'no reason given'}]"
    return f"[rolled back {event.num_turns if event.num_turns is not None else '?'} turns]"


def _render_call(unit: _Unit, call: Item | None, items: dict[int, Item], patches: dict[int, _PatchStats]) -> str:
    """A non-shell tool call with its outputs: a patch, a web search, a plan, a stdin write, another tool."""
    if not isinstance(call, ToolCall):
        return ""
    kind = unit.kind
    if kind == "patch":
        return _render_patch(unit, items, patches[unit.indices[0]])
    if kind == "web_search":
        return f"web_search: {_one_line(call.arguments)}"
    if kind == "plan":
        return _render_plan(call) + _render_outputs(unit, items, skip_first=True, plan=True)
    if kind == "stdin":
        args = _json_object(call.arguments) or {}
        head = f"stdin (session {args.get('session_id', '?')}): {json.dumps(args.get('chars', ''))}"
    else:
        head = f"tool {call.name}: {_one_line(call.arguments)}"
    return head + _render_outputs(unit, items, skip_first=True)


def _render_command(unit: _Unit, items: dict[int, Item]) -> str:
    """A shell command: ``$ command``, its output (the end event's aggregated output supersedes
    the polled chunks) and its exit code."""
    command, bodies, exit_code, error, end = _command_parts(unit, items)
    if end is not None:
        command = command or end.command
        if end.exit_code is not None:
            exit_code = end.exit_code
        if end.output.strip():
            bodies = [end.output]
    lines = [f"$ {command.strip()}"]
    body = "\n".join(b.rstrip("\n") for b in bodies)
    if body.strip():
        lines.append(_indent(body))
    if exit_code is not None:
        lines.append(f"exit {exit_code}")
    elif error:
        lines.append("error")  # the tool reported a failure without an exit code (Claude Code)
    return "\n".join(lines)


def _command_parts(unit: _Unit, items: dict[int, Item]) -> tuple[str, list[str], int | None, bool, CommandEnd | None]:
    """``(command, output bodies, exit code, error, end event)`` gathered from a command unit's
    call, polled outputs and (last) end event."""
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
    return command, bodies, exit_code, error, end


@dataclass(slots=True)
class _PatchStats:
    """Per-file ``(path, action, added, removed)`` of one apply_patch input, in order."""

    files: list[tuple[str, str, int, int]] = field(default_factory=list)


def _patch_text(call: Item) -> str:
    if not isinstance(call, ToolCall):
        return ""
    text = call.command if call.command is not None else call.arguments
    if text.lstrip().startswith("{"):
        args = _json_object(text)
        patch = args.get("input") if args else None
        if isinstance(patch, str):
            return patch
    return text


def _patch_stats(patch: str) -> _PatchStats:
    names: list[tuple[str, str]] = []
    added: list[int] = []
    removed: list[int] = []
    for line in patch.splitlines():
        if line.startswith("***"):
            m = _PATCH_HEADER.match(line)
            if m:
                names.append((m.group(2), _PATCH_ACTIONS[m.group(1)]))
                added.append(0)
                removed.append(0)
            continue
        if not names:
            continue
        if line.startswith("+"):
            added[-1] += 1
        elif line.startswith("-"):
            removed[-1] += 1
    return _PatchStats([(path, action, a, r) for (path, action), a, r in zip(names, added, removed, strict=True)])


_PATCH_ACTIONS = {"Add File": "add", "Update File": "update", "Delete File": "delete", "Move to": "move"}


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


def _json_object(text: str) -> dict[str, Any] | None:
    if not text or not text.lstrip().startswith("{"):
        return None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


# --- budget ---------------------------------------------------------------------------------


def _fit(units: list[_Unit], budget_bytes: int, *, pruned: bool = False) -> tuple[list[bool], int]:
    """Which units to keep under ``budget_bytes``, and how many items were dropped.

    Everything fits → all kept. Else every user message and the last final answer are kept,
    then the newest other units while they fit (a contiguous recent window). ``pruned``: some
    units were pruned while streaming (so not everything fits, and the window ends before the
    newest pruned unit at the latest).
    """
    sizes = [_utf8_len(u.text) + 2 for u in units]
    if not pruned and sum(sizes) <= budget_bytes:
        return [True] * len(units), 0
    keep = [u.kind == "user" for u in units]
    finals = [n for n, u in enumerate(units) if u.kind == "assistant" and u.final]
    if finals:
        keep[finals[-1]] = True
    used = sum(s for s, k in zip(sizes, keep, strict=True) if k) + _MARKER_ROOM_BYTES * (keep.count(True) + 1)
    for n in range(len(units) - 1, -1, -1):
        if keep[n]:
            continue
        if units[n].pruned or used + sizes[n] > budget_bytes:
            break
        keep[n] = True
        used += sizes[n]
    omitted = sum(len(u.indices) for u, k in zip(units, keep, strict=True) if not k)
    return keep, omitted
