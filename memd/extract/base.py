"""The extractor contract shared by the offline and the model extractors (SPEC §6.3, §6.4)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from memd.rollout.records import Item


@dataclass(frozen=True, slots=True)
class BuiltInput:
    """What an extractor sees of one session, already filtered and redacted (SPEC §6.2).

    Attributes:
        items: the kept items, in order, with every text field redacted (SPEC §14).
        text: the rendered session (``user:`` / ``assistant:`` / ``$ command`` / ``exit N``),
            redacted and fitted to the token budget.
        raw_json_bytes: bytes of the source JSON lines of the kept items.
        text_bytes: ``len(text.encode())``.
        est_tokens: estimated tokens of ``text`` (bytes / bytes_per_token).
        omitted_items: items dropped to fit the budget (0 when everything fit).
        redactions: number of secrets replaced with ``[REDACTED_SECRET]``.
    """

    items: tuple[Item, ...]
    text: str
    raw_json_bytes: int
    text_bytes: int
    est_tokens: int
    omitted_items: int = 0
    redactions: int = 0


@dataclass(frozen=True, slots=True)
class ExtractionRequest:
    """One phase-1 job's input.

    Attributes:
        thread_id: the session id.
        project: project key (SPEC §4).
        cwd: session cwd as recorded.
        rollout_path: absolute path of the rollout file.
        updated_at: last activity, epoch seconds.
        started_at: when the session started (its ``session_meta`` timestamp), epoch seconds;
            the date a trace memory is filed under. ``None`` when unknown.
        agent: how the agent is named: ``codex``, or ``Claude Code <version>``
            (:meth:`memd.rollout.records.Agent.label`).
        model: the agent's model from ``turn_context`` (``""`` when unknown).
        built: the filtered, redacted input.
        max_input_tokens: the budget the input was built for.
    """

    thread_id: str
    project: str
    cwd: str
    rollout_path: str
    updated_at: float
    agent: str
    model: str
    built: BuiltInput
    max_input_tokens: int = 120_000
    started_at: float | None = None


@dataclass(frozen=True, slots=True)
class ExtractionResult:
    """An extractor's answer, before normalisation.

    ``trace_memory`` and ``summary`` both empty means "nothing durable" (the no-op).
    ``extractor`` is ``offline`` or the model name. Token counts are 0 for offline. ``title`` is
    the name of the session's main task, what the trace file's slug is made from (``""``: the
    caller falls back to the thread's title).
    """

    trace_memory: str
    summary: str
    extractor: str
    tokens_in: int = 0
    tokens_out: int = 0
    tokens_cached: int = 0
    notes: dict[str, str] = field(default_factory=dict)
    title: str = ""


class Extractor(Protocol):
    """Turns one session into a trace memory.

    Raises:
        ExtractorError: a retryable failure for this thread.
        ModelAuthError: credentials rejected; the pool pauses all model work.
        BudgetExhausted: the daily token budget is spent.
    """

    name: str

    async def extract(self, request: ExtractionRequest) -> ExtractionResult:
        """Return the trace memory and summary for ``request``."""
        ...

    async def aclose(self) -> None:
        """Release network clients. Idempotent."""
        ...
