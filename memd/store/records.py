"""Vocabularies and frozen records that cross the store boundary (SPEC §5).

Rows never leave the store as dicts: every repository turns a :class:`sqlite3.Row` into one of
these records with the record's own ``from_row`` (the one row mapper per record), and records
that are written turn themselves into SQL parameters with ``params()``. Kinds and statuses are
:class:`~enum.StrEnum` members (their values are what the database holds).

Times are epoch seconds (float, UTC). Byte offsets consumed from a rollout are *watermarks*; the
number a claim or lease bumps on every takeover is its *fencing token*.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Any, Self

from memd.rollout.project import Ineligible
from memd.rollout.records import Agent

#: A row as the repositories read it (``sqlite3.Row`` or any mapping with the same keys).
Row = sqlite3.Row | Mapping[str, Any]


class JobKind(StrEnum):
    """What a job does; its key is a thread id (``EXTRACT``) or a project key (``CONSOLIDATE``)."""

    EXTRACT = "extract"
    CONSOLIDATE = "consolidate"


class JobStatus(StrEnum):
    """Where a job is in its life (SPEC §5 ``jobs.status``)."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    ERROR = "error"
    DEAD = "dead"


_NAMES: dict[type, tuple[str, ...]] = {}


def _names(cls: type) -> tuple[str, ...]:
    """The dataclass field names of ``cls`` (cached: looked up once per record type)."""
    names = _NAMES.get(cls)
    if names is None:
        names = _NAMES[cls] = tuple(f.name for f in fields(cls))
    return names


def _values(cls: type, row: Row) -> dict[str, Any]:
    """The row's values for every field of ``cls`` (the row must have them all)."""
    return {name: row[name] for name in _names(cls)}


def _params(record: object) -> dict[str, Any]:
    """A record's fields as SQL parameters (shallow: ``dataclasses.asdict`` deep-copies and is
    several times slower, which matters when indexing thousands of files)."""
    return {name: getattr(record, name) for name in _names(type(record))}


@dataclass(frozen=True, slots=True)
class FileRecord:
    """A rollout file as last seen by the reader (table ``files``).

    Attributes:
        path: the absolute path the file was found at.
        kind: the agent that writes it (``codex`` or ``claude``; a file that is no session is
            ``codex`` unless its records look like Claude Code's).
        dev, inode, size, mtime: its last ``stat`` (mtime in epoch seconds).
        watermark: byte offset just past the last complete line consumed.
        head_hash: sha256 hex of the first 4 KiB (detects replacement), ``""`` while shorter.
        thread_id: the thread it holds, ``None`` for a file that is not a session.
        error: why it is not indexed (``unreadable: ...``, ``no_session_meta``), else ``None``.
    """

    path: str
    kind: Agent
    dev: int
    inode: int
    size: int
    mtime: float
    watermark: int
    head_hash: str
    thread_id: str | None
    error: str | None = None

    @classmethod
    def from_row(cls, row: Row) -> Self:
        """The record of a ``files`` row (``kind`` is stored as text)."""
        values = _values(cls, row)
        values["kind"] = Agent(values["kind"])
        return cls(**values)

    def params(self) -> dict[str, Any]:
        """The record as named SQL parameters."""
        params = _params(self)
        params["kind"] = str(self.kind)
        return params


@dataclass(frozen=True, slots=True)
class ThreadRecord:
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
        reason: why not eligible, else ``None``.
        agent: the agent whose transcript the thread is (``codex`` or ``claude``).
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
    reason: Ineligible | None
    agent: Agent = Agent.CODEX

    @classmethod
    def from_row(cls, row: Row) -> Self:
        """The record of a ``threads`` row (``eligible`` is stored 0/1, ``reason`` and ``agent`` as
        text)."""
        values = _values(cls, row)
        values["eligible"] = bool(values["eligible"])
        values["reason"] = Ineligible.parse(values["reason"]) if values["reason"] else None
        values["agent"] = Agent(values["agent"])
        return cls(**values)

    def params(self, stats_json: str) -> dict[str, Any]:
        """The record as named SQL parameters, with the indexer's opaque ``stats`` JSON."""
        params = _params(self)
        params["eligible"] = int(self.eligible)
        params["reason"] = str(self.reason) if self.reason is not None else None
        params["stats"] = stats_json
        return params


@dataclass(frozen=True, slots=True)
class JobRecord:
    """A unit of work (table ``jobs``), keyed by (kind, key).

    Attributes:
        kind: ``extract`` (key = thread id) or ``consolidate`` (key = project key).
        key: the thread id or project key.
        status: see :class:`JobStatus`.
        owner: the claimant (``host:pid:random``) while ``running``.
        fencing_token: bumped by every claim; the claim is ``(owner, fencing_token)``.
        lease_until: when the claim may be taken over (epoch s).
        attempts: attempts counted for the current input.
        retry_at: when a failed job may be claimed again (epoch s).
        last_error: the last failure, one line.
        input_watermark: the watermark the job must cover.
        success_watermark: the watermark the last success covered.
        created_at, updated_at, started_at: epoch s.
        priority: claim order, highest first (for ``extract``: the thread's ``updated_at``, so
            the newest thread is claimed first).
    """

    kind: JobKind
    key: str
    status: JobStatus
    owner: str | None
    fencing_token: int
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

    @classmethod
    def from_row(cls, row: Row) -> Self:
        """The record of a ``jobs`` row."""
        values = _values(cls, row)
        values["kind"] = JobKind(values["kind"])
        values["status"] = JobStatus(values["status"])
        return cls(**values)


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """A named lease (table ``leases``), e.g. ``consolidate:<project>``.

    Attributes:
        name: the lease name.
        owner: the holder, ``None`` once released.
        fencing_token: monotonic, never reset; bumped by every acquisition.
        expires_at: when it may be taken over (epoch s).
        heartbeat_at: the last renewal (epoch s).
    """

    name: str
    owner: str | None
    fencing_token: int
    expires_at: float
    heartbeat_at: float | None

    @classmethod
    def from_row(cls, row: Row) -> Self:
        """The record of a ``leases`` row."""
        return cls(**_values(cls, row))


@dataclass(frozen=True, slots=True)
class MemoryRecord:
    """A thread's trace memory (table ``memories``).

    ``path`` is the trace file relative to the project's memory root (``None`` for a no-op);
    ``source_watermark`` is the thread watermark it was built from; ``extractor`` is ``offline``
    or the model name; tokens are 0 for offline.
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

    @classmethod
    def from_row(cls, row: Row) -> Self:
        """The record of a ``memories`` row."""
        return cls(**_values(cls, row))

    def params(self) -> dict[str, Any]:
        """The record as named SQL parameters."""
        return _params(self)


@dataclass(frozen=True, slots=True)
class ProjectRecord:
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

    @classmethod
    def from_row(cls, row: Row) -> Self:
        """The record of a ``projects`` row."""
        return cls(**_values(cls, row))


@dataclass(frozen=True, slots=True)
class DaemonRecord:
    """A daemon process that used the state (table ``daemons``), shown by ``memd status``.

    ``owner`` is the ``host:pid:random`` owner string the daemon also uses for claims and leases;
    ``stopped_at`` is ``None`` while it runs (or if it died without unregistering — compare
    ``heartbeat_at`` with the time to tell). ``proc_start`` is the process identity
    (:func:`memd.store.daemons.process_start_id`) recorded at registration, ``None`` when unknown.
    """

    owner: str
    pid: int
    host: str
    started_at: float
    heartbeat_at: float
    stopped_at: float | None
    proc_start: str | None = None

    @classmethod
    def from_row(cls, row: Row) -> Self:
        """The record of a ``daemons`` row."""
        return cls(**_values(cls, row))


@dataclass(frozen=True, slots=True)
class StoreCounts:
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

    @classmethod
    def from_row(cls, row: Row) -> Self:
        """The record of the one-row totals query."""
        return cls(**_values(cls, row))


class ThreadState(StrEnum):
    """Where a thread is on its way to a memory, as ``memd status`` shows it (SPEC §10)."""

    PENDING = "pending"
    RUNNING = "running"
    ERROR = "error"
    DEAD = "dead"
    DONE = "done"
    #: Its memory predates new bytes.
    STALE = "stale"
    #: Eligible, with no memory or job yet (e.g. inside the idle gate).
    WAITING = "waiting"
    #: Not eligible (see the thread's ``reason``).
    SKIPPED = "skipped"


@dataclass(frozen=True, slots=True)
class ThreadStatus:
    """A thread with its extract job and memory, one row of ``memd status``.

    Attributes:
        thread: the thread.
        job_status: its extract job's status, ``None`` without a job.
        attempts: attempts of that job for its current input (0 without a job).
        last_error: that job's last failure, one line.
        memory_watermark: the watermark its memory was built from, ``None`` without a memory.
    """

    thread: ThreadRecord
    job_status: JobStatus | None
    attempts: int
    last_error: str | None
    memory_watermark: int | None

    @classmethod
    def from_row(cls, row: Row) -> Self:
        """The record of a ``threads`` row joined with ``job_status``, ``job_attempts``,
        ``job_last_error`` and ``memory_watermark``."""
        return cls(
            thread=ThreadRecord.from_row(row),
            job_status=JobStatus(row["job_status"]) if row["job_status"] else None,
            attempts=int(row["job_attempts"] or 0),
            last_error=row["job_last_error"],
            memory_watermark=row["memory_watermark"],
        )

    @property
    def state(self) -> ThreadState:
        """The thread's state: its job's unless done, else judged by its memory and eligibility."""
        if self.job_status is not None and self.job_status is not JobStatus.DONE:
            return ThreadState(self.job_status.value)
        if self.memory_watermark is not None:
            return ThreadState.DONE if self.memory_watermark >= self.thread.watermark else ThreadState.STALE
        return ThreadState.WAITING if self.thread.eligible else ThreadState.SKIPPED


@dataclass(frozen=True, slots=True)
class ProjectActivity:
    """A project seen through its threads: how many, and the last activity of any (epoch s)."""

    project: str
    threads: int
    last_active_at: float

    @classmethod
    def from_row(cls, row: Row) -> Self:
        """The record of a ``(project, threads, last_active_at)`` aggregate row."""
        return cls(project=row["project"], threads=int(row["threads"]), last_active_at=float(row["last_active_at"]))


@dataclass(frozen=True, slots=True)
class ProjectStatus:
    """A project's memory freshness with the number of its trace files (memories with a file)."""

    project: ProjectRecord
    traces: int

    @classmethod
    def from_row(cls, row: Row) -> Self:
        """The record of a ``projects`` row joined with ``traces``."""
        return cls(project=ProjectRecord.from_row(row), traces=int(row["traces"] or 0))


@dataclass(frozen=True, slots=True)
class PlanCandidate:
    """A thread whose rollout changed since it was last planned, past its idle gate.

    Attributes:
        thread: the thread as stored.
        plan_pending: the changes recorded since it was last planned, as read; the scheduler
            clears the mark only if it is still this value (see
            :meth:`~memd.store.threads.ThreadRepository.mark_planned`).
    """

    thread: ThreadRecord
    plan_pending: int

    @classmethod
    def from_row(cls, row: Row) -> Self:
        """The record of a ``threads`` row (with its ``plan_pending`` column)."""
        return cls(thread=ThreadRecord.from_row(row), plan_pending=int(row["plan_pending"]))


@dataclass(frozen=True, slots=True)
class PlanBacklog:
    """Changed threads a planning pass leaves for later, counted through the ``threads_plan`` index.

    Attributes:
        waiting: changed threads inside the idle gate (active after the pass's cut-off).
        next_ready_at: the earliest last activity among them (epoch s; it leaves the gate
            ``min_idle_s`` later), ``None`` when none waits.
        too_old: changed threads whose last activity is older than the age limit (a backfill
            reaches them).
    """

    waiting: int
    next_ready_at: float | None
    too_old: int
