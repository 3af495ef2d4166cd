"""Frozen records that cross the store boundary (SPEC §5). Rows never leave the store as dicts.

Times are epoch seconds (float, UTC). Each record has ``from_row(row)`` for an
:class:`sqlite3.Row` (or any mapping with the same keys).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Self


class _FromRow:
    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Self:
        """Build the record from a row whose keys include every field name."""
        keys = row.keys() if hasattr(row, "keys") else row
        return cls(**{f.name: row[f.name] for f in fields(cls) if f.name in keys})  # type: ignore[arg-type, misc]


@dataclass(frozen=True, slots=True)
class FileRecord(_FromRow):
    """A rollout file as last seen by the reader (table ``files``).

    ``offset`` is the byte offset just past the last complete line consumed (the watermark);
    ``head_hash`` is the sha256 hex of the first 4 KiB (detects replacement).
    """

    path: str
    kind: str
    dev: int
    inode: int
    size: int
    mtime: float
    offset: int
    head_hash: str
    thread_id: str | None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class ThreadRecord(_FromRow):
    """A session (table ``threads``).

    Attributes:
        id: the thread (session) id.
        path: the rollout file currently holding it (changes when it is archived).
        project: the project key (SPEC §4).
        cwd, source, originator, cli_version, model: as recorded by the rollout.
        title: first real user message, one line, ≤ 120 chars (``""`` until known).
        created_at / updated_at: session start / last activity (epoch s).
        watermark: bytes of the rollout consumed.
        user_messages: real user messages (injected context excluded, counted once).
        skipped_lines: malformed lines skipped so far.
        eligible: computed eligibility (SPEC §4, conditions 1, 2 and memory_mode).
        reason: why not eligible (``source:exec``, ``no_user_messages``, ...) else ``None``.
    """

    id: str
    path: str
    project: str
    cwd: str
    source: str
    originator: str
    cli_version: str
    model: str
    title: str
    created_at: float
    updated_at: float
    watermark: int
    user_messages: int
    skipped_lines: int
    eligible: bool
    reason: str | None


@dataclass(frozen=True, slots=True)
class JobRecord(_FromRow):
    """A unit of work (table ``jobs``), keyed by (kind, key).

    ``kind`` is ``extract`` (key = thread id) or ``consolidate`` (key = project key);
    ``status`` ∈ pending|running|done|error|dead; ``token`` is the fencing token of the claim;
    ``input_watermark`` is what the job must cover, ``success_watermark`` what the last success
    covered; ``priority`` orders claims, highest first (for ``extract``: the thread's
    ``updated_at``, so the newest thread is claimed first).
    """

    kind: str
    key: str
    status: str
    owner: str | None
    token: int
    lease_until: float | None
    attempts: int
    retry_at: float | None
    last_error: str | None
    input_watermark: int
    success_watermark: int
    created_at: float
    updated_at: float
    started_at: float | None = None
    priority: float = 0.0


@dataclass(frozen=True, slots=True)
class LeaseRecord(_FromRow):
    """A named lease (table ``leases``). ``token`` is monotonic and never reset."""

    name: str
    owner: str | None
    token: int
    expires_at: float
    heartbeat_at: float | None


@dataclass(frozen=True, slots=True)
class MemoryRecord(_FromRow):
    """A thread's trace memory (table ``memories``).

    ``path`` is the trace file relative to the project's memory root (``None`` for a no-op);
    ``extractor`` is ``offline`` or the model name; tokens are 0 for offline.
    """

    thread_id: str
    project: str
    path: str | None
    trace_memory: str
    summary: str
    source_watermark: int
    generated_at: float
    extractor: str
    tokens_in: int
    tokens_out: int


@dataclass(frozen=True, slots=True)
class ProjectRecord(_FromRow):
    """A project's memory freshness (table ``projects``), keyed by the project key (SPEC §4).

    Attributes:
        project: the project key.
        memory_root: the project's memory directory (``None`` until a caller sets it).
        memory_seq: bumped on every memory write or delete for the project.
        last_memory_at: time of the last memory write or delete (epoch s), ``None`` if never.
        consolidated_seq: the ``memory_seq`` the last successful consolidation covered.
        last_consolidated_at: time of the last successful consolidation, ``None`` if never.
        last_attempt_at: time of the last consolidation attempt that ended (success or failure).
        failures: consecutive failed consolidations (0 after a success).
        last_error: the last consolidation error, ``None`` after a success.
    """

    project: str
    memory_root: str | None
    memory_seq: int
    last_memory_at: float | None
    consolidated_seq: int
    last_consolidated_at: float | None
    last_attempt_at: float | None
    failures: int
    last_error: str | None


@dataclass(frozen=True, slots=True)
class DaemonRecord(_FromRow):
    """A daemon process that used the state (table ``daemons``), shown by ``memd status``.

    ``owner`` is the ``host:pid:random`` owner string the daemon also uses for leases;
    ``stopped_at`` is ``None`` while it runs (or if it died without unregistering — compare
    ``heartbeat_at`` with the time to tell).
    """

    owner: str
    pid: int
    host: str
    started_at: float
    heartbeat_at: float
    stopped_at: float | None


@dataclass(frozen=True, slots=True)
class StoreCounts(_FromRow):
    """Totals for ``memd status``: threads, eligible threads, memories, projects, and jobs of every
    kind by status."""

    threads: int
    eligible: int
    memories: int
    projects: int
    jobs_pending: int
    jobs_running: int
    jobs_done: int
    jobs_error: int
    jobs_dead: int
