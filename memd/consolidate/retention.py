"""Usage-based retention of MEMORY.md entries (SPEC §18, ``[consolidation] max_unused_days``).

Consolidation keeps what later sessions use and lets the rest age out. An entry (a bullet of
MEMORY.md) falls out when all of these hold:

* its section is not *Start here* or *User preferences* (those leave only when superseded, which is
  the merge's decision, never by age alone);
* its last sign of life — the newest date it cites (provenance ``[019a085e 2025-10-21]``, a dated task
  line, or the session date of a trace it links) or its last use by a later session (memd MCP calls,
  Codex citations: :class:`memd.store.search.Usage`) — is older than ``max_unused_days`` counted back
  from the project's newest session (the project's own timeline, never the wall clock, so a project
  left alone for a year keeps its memory);
* newer knowledge covers the project: at least one entry of the same section stays (a section is
  never emptied by age).

Entries with no date at all are kept. The filter works on the writer's rendered MEMORY.md, so it
applies to the offline merge and to a model's handbook alike (:func:`retaining` wraps a writer).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from memd.consolidate.builtin import Consolidated, ConsolidationInput, MemoryWriter
from memd.memory.files import TraceHeader
from memd.store.search import MEMORY_FILE, Chunk, Usage, chunk_memory_md

#: Sections whose entries never fall out by age (matched case-insensitively, by prefix).
PROTECTED_SECTIONS = ("start here", "user preferences")
DAY_S = 86_400.0


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """What :func:`prune_unused` needs besides the text.

    Attributes:
        usage: uses of the project's memory pieces, ``{(path, entry): Usage}``.
        max_unused_days: ``[consolidation] max_unused_days``.
    """

    usage: Mapping[tuple[str, str], Usage]
    max_unused_days: float


def _last_sign_of_life(
    chunk: Chunk, session_dates: Mapping[str, float], usage: Mapping[tuple[str, str], Usage]
) -> float:
    dates = [chunk.date_s]
    for sid in chunk.session_ids:
        dates += [d for tid, d in session_dates.items() if tid == sid or tid.startswith(sid)]
    use = usage.get((MEMORY_FILE, chunk.entry))
    if use is not None:
        dates.append(use.last_used_at)
    return max(dates)


def prune_unused(
    memory_md: str,
    *,
    policy: RetentionPolicy,
    session_dates: Mapping[str, float],
    newest_session_s: float,
) -> tuple[str, int]:
    """Drop the MEMORY.md entries that aged out (rules in the module docstring).

    Args:
        memory_md: the rendered handbook.
        policy: usage and ``max_unused_days``.
        session_dates: ``{thread id: session date (epoch s)}`` of the traces merged.
        newest_session_s: the project's newest session (epoch s); 0 disables pruning.

    Returns:
        ``(text, dropped)``: the handbook without the dropped entries, and how many were dropped.
    """
    if newest_session_s <= 0:
        return memory_md, 0
    cutoff = newest_session_s - policy.max_unused_days * DAY_S
    by_section: dict[str, list[tuple[Chunk, float]]] = {}
    for chunk in chunk_memory_md(memory_md):
        if not chunk.heading or chunk.heading.lower().startswith(PROTECTED_SECTIONS):
            continue
        if not chunk.body.lstrip().startswith(("- ", "* ")):
            continue
        by_section.setdefault(chunk.heading, []).append((chunk, _last_sign_of_life(chunk, session_dates, policy.usage)))
    drop: set[int] = set()
    for entries in by_section.values():
        stale = [(c, t) for c, t in entries if 0 < t < cutoff]
        if len(stale) == len(entries):  # never empty a section: the freshest entry stays
            stale = sorted(stale, key=lambda ct: ct[1])[:-1]
        for chunk, _ in stale:
            drop.update(range(chunk.line_start, chunk.line_end + 1))
    if not drop:
        return memory_md, 0
    lines = memory_md.splitlines(keepends=True)
    kept = [line for number, line in enumerate(lines, start=1) if number not in drop]
    dropped = sum(1 for entries in by_section.values() for c, _ in entries if c.line_start in drop)
    return "".join(kept), dropped


def _session_s(header: TraceHeader) -> float:
    """When a trace's session happened: its start (``session_date``), else its last activity
    (trace files written before the header carried the session date)."""
    return header.started_at or header.updated_at


def retaining(writer: MemoryWriter, policy: RetentionPolicy) -> MemoryWriter:
    """Wrap a consolidation writer so that its MEMORY.md goes through :func:`prune_unused`."""

    def write(data: ConsolidationInput) -> Consolidated:
        result = writer(data)
        dates = {t.header.thread_id: _session_s(t.header) for t in data.traces if t.header.thread_id}
        newest = max((_session_s(t.header) for t in data.traces), default=0.0)
        text, _ = prune_unused(result.memory_md, policy=policy, session_dates=dates, newest_session_s=newest)
        return Consolidated(memory_md=text, skills=result.skills)

    return write
