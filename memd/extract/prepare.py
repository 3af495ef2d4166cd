"""Preparing one thread's extraction request: read the rollout, build the input (SPEC §6.2).

:func:`build_request` is the single way a thread becomes an
:class:`~memd.extract.base.ExtractionRequest`: the extraction job, ``memd once --dry-run`` and
``memd bench`` all call it. It does blocking file I/O; async callers run it with
:func:`asyncio.to_thread`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from memd.extract.base import BuiltInput, ExtractionRequest
from memd.extract.input_builder import InputBuilder
from memd.ingest.reader import read_lines_until
from memd.llm.budget import TokenEstimator
from memd.rollout.records import Agent, Item, ParsedRollout, ToolCall, ToolOutput
from memd.rollout.session import new_parser
from memd.store.records import ThreadRecord
from memd.store.threads import ThreadRepository

#: Lines handed to the parser at a time while a rollout is streamed ...
PARSE_BATCH_LINES = 4096
#: ... and at most about this many bytes of them (lines of a large rollout are long).
PARSE_BATCH_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class InputLimits:
    """How a thread's input is built (from :class:`~memd.config.Settings`).

    Attributes:
        max_line_bytes: longest rollout line parsed; longer ones are skipped and counted.
        tool_output_cap_bytes: head+tail kept of each tool output.
    """

    max_line_bytes: int
    tool_output_cap_bytes: int


def _batches(stream: Iterable[bytes]) -> Iterator[list[bytes]]:
    """The lines of ``stream`` in batches of at most :data:`PARSE_BATCH_LINES` lines and about
    :data:`PARSE_BATCH_BYTES` bytes (the last one may be empty)."""
    batch: list[bytes] = []
    size = 0
    for line in stream:
        batch.append(line)
        size += len(line)
        if len(batch) >= PARSE_BATCH_LINES or size >= PARSE_BATCH_BYTES:
            yield batch
            batch = []
            size = 0
    yield batch


def load_rollout(path: str, watermark: int, max_line_bytes: int, agent: Agent = Agent.CODEX) -> ParsedRollout:
    """Parse a transcript (``agent``'s format: a Codex rollout or a Claude Code session) from byte 0
    up to ``watermark`` (complete lines only), holding every item.

    Raises:
        RolloutReadError: the file vanished, became unreadable or was replaced.
    """
    parser = new_parser(agent, path=path)
    stream = read_lines_until(path, watermark, max_line_bytes)
    for batch in _batches(stream):
        parser.feed(batch)
    if stream.oversized_lines:
        parser.feed_malformed(stream.oversized_lines, "line_too_long")
    return parser.result


def stream_items(
    path: str, watermark: int, max_line_bytes: int, agent: Agent = Agent.CODEX
) -> Iterator[tuple[list[Item], list[int]]]:
    """:func:`load_rollout` in batches: yields ``(items, line sizes)`` in file order
    (:attr:`ParsedRollout.item_line_bytes`), never holding more than a batch of lines and its items.

    Raises:
        RolloutReadError: the file vanished, became unreadable or was replaced (while iterating).
    """
    parser = new_parser(agent, path=path)
    stream = read_lines_until(path, watermark, max_line_bytes)
    for batch in _batches(stream):
        parser.feed(batch)
        yield parser.take_items()
    yield parser.take_items(final=True)


class RolloutObserver(Protocol):
    """Sees the rollout of every request built (the usage signal of the read path). Blocking.

    The rollout is streamed, so the observer is handed only the items it :meth:`wants` (whole,
    not capped) and the tool outputs answering the calls among them, in file order.
    """

    def wants(self, item: Item) -> bool:
        """Whether ``item`` (and, for a tool call, its outputs) is of interest."""
        ...

    def __call__(self, thread: ThreadRecord, items: Sequence[Item]) -> None:
        """Look at the wanted items of ``thread``'s rollout."""
        ...


class _Wanted:
    """Collects what a :class:`RolloutObserver` wants from the batches of one rollout."""

    def __init__(self, observer: RolloutObserver) -> None:
        self._wants = observer.wants
        self._calls: set[str] = set()
        self.items: list[Item] = []

    def see(self, items: Iterable[Item]) -> None:
        for item in items:
            if isinstance(item, ToolOutput):
                if item.call_id in self._calls:
                    self.items.append(item)
            elif self._wants(item):
                self.items.append(item)
                if isinstance(item, ToolCall) and item.call_id:
                    self._calls.add(item.call_id)


def build_request(
    thread: ThreadRecord,
    limits: InputLimits,
    *,
    max_input_tokens: int,
    bytes_per_token: float,
    observe: RolloutObserver | None = None,
) -> ExtractionRequest:
    """Read ``thread``'s rollout up to its watermark and build the extractor's request.

    The rollout is streamed through an :class:`~memd.extract.input_builder.InputBuilder`: memory is
    bounded by the input built (and a batch of lines), not by the size of the file (SPEC §15).

    Args:
        thread: the thread as indexed (path, watermark, project, ...).
        limits: line and tool-output caps.
        max_input_tokens: the token budget the input must fit.
        bytes_per_token: the calibrated estimate used to convert the budget to bytes.
        observe: handed the items it wants once the rollout is read, before the input is built.

    Returns:
        The request: the filtered, redacted, budgeted input and the thread's context.

    Raises:
        RolloutReadError: the rollout vanished, became unreadable or was replaced.
    """
    builder = InputBuilder(
        tool_output_cap_bytes=limits.tool_output_cap_bytes,
        max_input_tokens=max_input_tokens,
        bytes_per_token=bytes_per_token,
    )
    wanted = _Wanted(observe) if observe is not None else None
    for items, line_bytes in stream_items(thread.path, thread.watermark, limits.max_line_bytes, thread.agent):
        if wanted is not None:
            wanted.see(items)
        builder.add(items, line_bytes)
    if observe is not None and wanted is not None:
        observe(thread, wanted.items)
    return ExtractionRequest(
        thread_id=thread.id,
        project=thread.project,
        cwd=thread.cwd,
        rollout_path=thread.path,
        updated_at=thread.updated_at,
        started_at=thread.created_at,
        agent=thread.agent.label(thread.cli_version),
        model=thread.model,
        built=builder.finish(),
        max_input_tokens=max_input_tokens,
    )


class RequestBuilder:
    """Builds requests for the threads of one store, with the daemon's limits and calibration.

    Args:
        threads: the store's thread repository (a rebuild looks the thread up again).
        limits: line and tool-output caps.
        estimator: the calibrated bytes-per-token estimate (read at each build).
        observe: sees the wanted items of every rollout read (see :class:`RolloutObserver`).
    """

    def __init__(
        self,
        threads: ThreadRepository,
        limits: InputLimits,
        estimator: TokenEstimator,
        *,
        observe: RolloutObserver | None = None,
    ) -> None:
        self._threads = threads
        self._limits = limits
        self._estimator = estimator
        self._observe = observe

    async def build(self, thread: ThreadRecord, max_input_tokens: int) -> ExtractionRequest:
        """:func:`build_request` in a worker thread (the event loop never reads the rollout).

        Raises:
            RolloutReadError: the rollout vanished, became unreadable or was replaced.
        """
        return await asyncio.to_thread(
            build_request,
            thread,
            self._limits,
            max_input_tokens=max_input_tokens,
            bytes_per_token=self._estimator.bytes_per_token,
            observe=self._observe,
        )

    async def rebuild(self, request: ExtractionRequest, max_input_tokens: int) -> BuiltInput:
        """Build a request's input again for a smaller budget (after a context-length error).

        Returns the old input when the thread is no longer indexed.
        """
        thread = await self._threads.get(request.thread_id)
        if thread is None:
            return request.built
        return (await self.build(thread, max_input_tokens)).built
