"""The indexer: rollout files on disk → ``files`` and ``threads`` rows (SPEC §3.3, §4, §5).

Two operations, both incremental:

* :meth:`Indexer.scan` / :meth:`Indexer.refresh_paths` — one ``stat``; an unchanged file (same dev,
  inode, size, mtime) costs nothing more. A new or replaced file gets a bounded read of its first line (the Codex
  ``session_meta``) — or, when that is no session header, of its first :data:`CLAUDE_HEAD_LINES`
  lines (a Claude Code transcript names its session on the first record carrying ``sessionId``) —
  and its thread row. Indexing never parses a body.
* :meth:`Indexer.catch_up` — reads a thread's rollout from its stored watermark (the byte offset just
  past the last line consumed) to the last complete line and folds the new lines into the thread's
  running statistics (real user messages, title, model, skipped lines). The cost is proportional to the appended bytes.

Claude Code (SPEC §3.4): one session is one thread, keyed by ``sessionId``. A sub-agent transcript
(``agent-*.jsonl`` beside the session, or under ``<sessionId>/subagents/``; recognised by its content:
sidechain records with an ``agentId``) is recorded as a file of its parent thread and never becomes a
thread, and the compaction summariser's ``agent-acompact-*`` is skipped. A second live file claiming
a session another file already holds is recorded as a duplicate: it never makes a second thread nor
moves the thread's watermark.

The indexer reaches the file system only through :mod:`memd.ingest` and the database only
through :class:`memd.store.store.Store`; it parses only through :mod:`memd.rollout`.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, cast

import structlog

from memd.clock import Clock
from memd.ingest import files as rollout_files
from memd.ingest import reader, scan
from memd.ingest.files import FailureReason
from memd.ingest.scan import Stamp
from memd.rollout import claude
from memd.rollout.codex import parse_session_meta
from memd.rollout.project import FORGOTTEN, NO_USER_MESSAGES, NOT_READ_YET, Ineligible, eligibility, project_key
from memd.rollout.records import Agent, SessionMeta
from memd.rollout.session import ThreadStats, new_parser
from memd.store.records import FileRecord, ThreadRecord
from memd.store.store import Store

log = structlog.get_logger(__name__)


class HeadProblem(StrEnum):
    """Why a rollout's head does not identify a session (``files.error`` of the file)."""

    EMPTY_FILE = "empty_file"
    FIRST_LINE_TOO_LONG = "first_line_too_long"
    PARTIAL_FIRST_LINE = "partial_first_line"
    NO_SESSION_META = "no_session_meta"
    #: Claude Code records, but none of the first :data:`CLAUDE_HEAD_LINES` carries ``sessionId``.
    NO_SESSION_ID = "no_session_id"
    #: Reading the head failed unexpectedly (logged as ``head_failed``); tried again on change.
    HEAD_FAILED = "head_failed"


class FileRole(StrEnum):
    """Why a Claude Code file that names a session is not that session's thread file
    (``files.error``; the file's ``thread_id`` is the session)."""

    SUBAGENT = "subagent"
    COMPACTION_AGENT = "compaction_agent"
    DUPLICATE_SESSION = "duplicate_session"


#: Lines of a Claude Code transcript read to find its session (SPEC §3.4).
CLAUDE_HEAD_LINES = claude.HEAD_LINES
#: Bytes read at most to find a Claude Code session; a longer head names no session yet.
CLAUDE_HEAD_MAX_BYTES = 8 << 20
#: Longest line kept in that head read (a pasted image can make one record megabytes long).
CLAUDE_HEAD_MAX_LINE_BYTES = 4 << 20


#: Files indexed per worker-thread round trip and per write transaction.
BATCH_FILES = 500

#: Lines parsed and folded into a thread's statistics at a time while a file is read ...
FOLD_BATCH_LINES = 2048
#: ... and at most about this many bytes of them (a huge rollout's lines are long).
FOLD_BATCH_BYTES = 1 << 20

#: The statistics of a thread whose body is not read yet (shared, never mutated).
_FRESH_STATS = ThreadStats()
_FRESH_STATS_JSON = _FRESH_STATS.to_json()
#: ThreadStats fields that hold user text (title candidates).
_TITLE_FIELDS = ("event_title", "response_title", "custom_title", "ai_title", "summary_title")


@dataclass(slots=True)
class _Head:
    """What the file-system pass learned about one new or changed rollout.

    Attributes:
        st: the ``fstat`` taken with the head (the scan's stat when the read failed).
        prev: the stored record of the file (or of the file it was moved from), if any.
        failure: the read failed (already logged by :mod:`memd.ingest.files`).
        head_hash: sha256 of the first 4 KiB (``""`` while shorter).
        meta: the session the head names (Codex ``session_meta`` / legacy header, or Claude Code
            records), ``None`` when it names none.
        reason: why ``meta`` is ``None`` (``empty_file``, ``no_session_meta``, ...).
        project: the thread's project key (SPEC §4), ``""`` without ``meta``.
        claude: the head is Claude Code's (with or without a session id).
    """

    st: rollout_files.FileStat
    prev: FileRecord | None
    failure: rollout_files.ReadFailure | None = None
    head_hash: str = ""
    meta: SessionMeta | None = None
    reason: HeadProblem | None = None
    project: str = ""
    claude: bool = False


@dataclass(slots=True)
class _Batch:
    """Rows waiting for one write transaction."""

    files: list[FileRecord] = field(default_factory=list)
    threads: list[tuple[ThreadRecord, str, FileRecord]] = field(default_factory=list)
    thread_ids: set[str] = field(default_factory=set)

    async def flush(self, store: Store) -> None:
        if self.files or self.threads:
            await store.threads.record_many(self.threads, files=self.files)
        self.files, self.threads, self.thread_ids = [], [], set()


@dataclass(slots=True)
class IndexSummary:
    """Counters of one scan (or batch of refreshes).

    Attributes:
        files_seen: rollout files stat'ed.
        unchanged: files that cost only their stat.
        indexed: files whose head was (re)read.
        removed: files that disappeared since the last scan.
        failed: files whose head could not be read for an unexpected reason (``head_failed``;
            recorded as not indexed, tried again when they change).
        problems: file-system problems reported by the scan (missing roots, loops, ...).
    """

    files_seen: int = 0
    unchanged: int = 0
    indexed: int = 0
    removed: int = 0
    failed: int = 0
    problems: list[str] = field(default_factory=list)


class ReadOutcome(StrEnum):
    """What :meth:`Indexer.catch_up` could do with a thread's rollout."""

    #: Read up to its last complete line (possibly nothing new).
    READ = "read"
    #: No file at the thread's path: nothing to read until it reappears (a change the indexer records).
    VANISHED = "vanished"
    #: Unreadable this time (permission denied, I/O error, replaced mid-read): try again later.
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class CatchUp:
    """The result of :meth:`Indexer.catch_up`.

    Attributes:
        thread: the thread as stored after the read (unchanged unless ``outcome`` is ``read``).
        outcome: whether the rollout was read (see :class:`ReadOutcome`).
    """

    thread: ThreadRecord
    outcome: ReadOutcome

    @property
    def read_ok(self) -> bool:
        """The rollout was read to its last complete line."""
        return self.outcome is ReadOutcome.READ


class Indexer:
    """Keeps ``files`` and ``threads`` in step with the rollout roots.

    Args:
        store: the state store.
        clock: time source (for ``now`` in age checks).
        roots: rollout roots (``sessions`` setting).
        max_line_bytes: lines longer than this are skipped and counted.
        include_sources: source kinds that may become memories (SPEC §4).
        project_rule: ``git`` or ``cwd`` (SPEC §4).
        clean_text: applied to session text before it is stored (the title): the redactor
            (SPEC §14); default none.
        forgotten: returns the thread ids ``memd forget`` removed; they are recorded with
            reason ``forgotten`` and never extracted again.
    """

    def __init__(
        self,
        store: Store,
        clock: Clock,
        *,
        roots: Sequence[Path],
        max_line_bytes: int,
        include_sources: Iterable[str],
        project_rule: str = "git",
        clean_text: Callable[[str], str] | None = None,
        forgotten: Callable[[], frozenset[str]] | None = None,
    ) -> None:
        self._store = store
        # Thread ids ``memd forget`` removed (tombstones on disk): indexed as never eligible.
        self._forgotten = forgotten or frozenset
        # Applied to the text stored from a session (the title: the first user message), so a
        # secret pasted there never reaches the database (SPEC §14); wired to the redactor.
        self._clean = clean_text or (lambda text: text)
        self._clock = clock
        self.roots = [Path(r) for r in roots]
        self._max_line_bytes = max_line_bytes
        self._include = tuple(include_sources)
        self._project_rule = project_rule
        self._lock = asyncio.Lock()
        #: Body bytes read by the most recent :meth:`catch_up` (observability and tests).
        self.last_catch_up_bytes = 0

    def _stats_json(self, stats: ThreadStats) -> str:
        """The parser's resumable statistics as stored: its title candidates (user text) cleaned
        like the title itself (SPEC §14: titles and statistics in the database are redacted)."""
        cleaned: dict[str, str] = {}
        changes: dict[str, str] = {}
        for name in _TITLE_FIELDS:
            value = getattr(stats, name)
            if value:
                if value not in cleaned:
                    cleaned[value] = self._clean(value)
                if cleaned[value] != value:
                    changes[name] = cleaned[value]
        return (replace(stats, **cast(dict[str, Any], changes)) if changes else stats).to_json()

    async def scan(self) -> IndexSummary:
        """Reconcile every root: stat each rollout, index new/changed heads, forget vanished files.

        Cost: one ``stat`` per unchanged file, one bounded head read per new or changed file,
        one query for the known files, and one transaction per :data:`BATCH_FILES` indexed
        files. Each new thread is logged at debug level; the ``scan_done`` event sums up.

        Returns:
            The counters of this scan. Never raises for a single bad file or root.
        """
        stamps = await self._store.threads.file_stamps()
        result = await asyncio.to_thread(scan.scan_roots, self.roots, stamps)
        summary = IndexSummary(problems=[f"{p.kind}:{p.path}" for p in result.problems])
        async with self._lock:
            seen = {*result.unchanged, *(st.path for st in result.files)}
            summary.files_seen = len(seen)
            changed = await self._previous_records(result.files, stamps, seen)
            summary.unchanged = len(result.unchanged) + len(result.files) - len(changed)
            new_threads = await self._index(changed, summary, log_each=log.debug)
            # Files under a root or directory the walk could not read were not seen, not gone:
            # forgetting them would make memd read every one again from 0 when the root returns.
            roots = _prefixes(self.roots)
            blind = _prefixes(p.path for p in result.problems if p.kind in _BLIND_SPOTS)
            unseen = [p for p in stamps if p not in seen and p.startswith(roots) and not p.startswith(blind)]
            gone = await asyncio.to_thread(_absent, unseen) if unseen else []
            if gone:
                summary.removed += await self._store.threads.forget_files(gone)
        log.info(
            "scan_done",
            files=summary.files_seen,
            unchanged=summary.unchanged,
            indexed=summary.indexed,
            new_threads=new_threads,
            removed=summary.removed,
            failed=summary.failed,
            problems=len(summary.problems),
        )
        return summary

    async def _previous_records(
        self, differ: Sequence[rollout_files.FileStat], stamps: dict[str, Stamp], seen: set[str]
    ) -> list[tuple[rollout_files.FileStat, FileRecord | None]]:
        """Pair each file the walk found different from its stamp with its stored record (the
        one at its path, or, for a new path, the record of the same inode at a path that is gone:
        archived, moved), read now under the lock; a file whose record meanwhile describes it
        (a watcher batch indexed it) is left out."""
        if not differ:
            return []
        moved_from: dict[str, str] = {}
        if any(st.path not in stamps for st in differ):
            by_inode = {(stamp[0], stamp[1]): path for path, stamp in stamps.items()}
            for st in differ:
                old = by_inode.get((st.dev, st.inode)) if st.path not in stamps else None
                if old is not None and old not in seen and not os.path.exists(old):
                    moved_from[st.path] = old
        known = await self._store.threads.get_files([st.path for st in differ] + list(moved_from.values()))
        pairs = [(st, known.get(moved_from.get(st.path, st.path))) for st in differ]
        return [(st, prev) for st, prev in pairs if not _unchanged(prev, st)]

    async def refresh_paths(self, paths: Iterable[str]) -> IndexSummary:
        """Re-stat the paths of a watch batch (files, or directories to scan) and index changes.

        Each new thread is logged (``thread_indexed``, info).
        """
        result = await asyncio.to_thread(scan.restat_paths, list(paths))
        summary = IndexSummary(problems=[f"{p.kind}:{p.path}" for p in result.problems])
        async with self._lock:
            # A move (Codex archiving a session) is a vanished path and a new one in one batch:
            # the new path takes over the old record (same dev and inode), as in scan().
            moved_from: dict[tuple[int, int], FileRecord] = {}
            if result.vanished:
                vanished = await self._store.threads.get_files(result.vanished)
                moved_from = {(f.dev, f.inode): f for f in vanished.values()}
                summary.removed += await self._store.threads.forget_files(result.vanished)
            known = await self._store.threads.get_files(st.path for st in result.files)
            changed: list[tuple[rollout_files.FileStat, FileRecord | None]] = []
            for st in result.files:
                prev = known.get(st.path) or moved_from.get((st.dev, st.inode))
                summary.files_seen += 1
                if _unchanged(prev, st):
                    summary.unchanged += 1
                else:
                    changed.append((st, prev))
            await self._index(changed, summary, log_each=log.info)
        return summary

    async def _index(
        self,
        changed: Sequence[tuple[rollout_files.FileStat, FileRecord | None]],
        summary: IndexSummary,
        *,
        log_each: Callable[..., object],
    ) -> int:
        """Index new or changed files in batches; return how many new (or moved) threads.

        Per batch: the heads are read and parsed in one worker thread, the known threads are
        fetched in one query, and every row is written in one transaction. Rows are decided in
        file order exactly as one file at a time would: a thread id seen twice in a batch
        flushes the rows before it (the second file must see the first one's thread).
        """
        new_threads = 0
        for start in range(0, len(changed), BATCH_FILES):
            heads = await asyncio.to_thread(self._read_heads, changed[start : start + BATCH_FILES])
            # Sessions before sub-agent transcripts, so a sub-agent finds its parent in the batch.
            heads.sort(key=lambda h: h.meta is not None and h.meta.subagent_id is not None)
            ids = {h.meta.thread_id for h in heads if h.meta is not None}
            known = await self._store.threads.get_many(ids)
            thread_paths = {t.id: t.path for t in known.values()}
            cwds = {t.id: t.cwd for t in known.values()}
            batch = _Batch()
            for head in heads:
                meta = head.meta
                if meta is not None and meta.subagent_id is not None:
                    await self._attach(head, cwds, batch, summary)
                    continue
                if meta is not None and meta.thread_id in batch.thread_ids:
                    await batch.flush(self._store)
                new_threads += await self._decide(head, thread_paths, batch, summary, log_each)
                if meta is not None and meta.thread_id in batch.thread_ids:
                    cwds.setdefault(meta.thread_id, meta.cwd or "")
            await batch.flush(self._store)
        return new_threads

    def _read_heads(self, changed: Sequence[tuple[rollout_files.FileStat, FileRecord | None]]) -> list[_Head]:
        """The file-system part of indexing (runs in a worker thread): read and parse each head,
        and resolve its project key (which may look for ``.git`` on disk).

        An unexpected error on one file (a bug met by a strange head) never fails the batch: it is
        logged (``head_failed``, error, with the traceback) and the file is recorded as not indexed
        (:attr:`HeadProblem.HEAD_FAILED`; tried again when it changes).
        """
        heads: list[_Head] = []
        projects: dict[str | None, str] = {}  # cwd -> project key, within this batch
        for st, prev in changed:
            try:
                heads.append(self._read_head(st, prev, projects))
            except Exception as exc:  # one file never fails the batch (SPEC §13)
                log.error(
                    "head_failed",
                    path=st.path,
                    error=f"{type(exc).__name__}: {exc}",
                    action="recorded as not indexed; tried again when the file changes",
                    exc_info=exc,
                )
                heads.append(_Head(st=st, prev=prev, reason=HeadProblem.HEAD_FAILED))
        return heads

    def _read_head(self, st: rollout_files.FileStat, prev: FileRecord | None, projects: dict[str | None, str]) -> _Head:
        """Read and parse one file's head (see :meth:`_read_heads`); ``projects`` caches project keys."""
        head = reader.read_head(st.path, max_line_bytes=self._max_line_bytes)
        if isinstance(head, rollout_files.ReadFailure):  # logged by memd.ingest.files
            return _Head(st=st, prev=prev, failure=head)
        meta = None
        if head.complete and head.first_line:
            meta = parse_session_meta(head.first_line)
        is_claude = False
        if meta is None and (head.complete or head.oversized):
            meta, is_claude = self._claude_head(head.stat.path)
        reason = None
        if meta is None:
            reason = _head_problem(head, is_claude=is_claude)
        project = ""
        if meta is not None:
            project = projects.get(meta.cwd) or projects.setdefault(
                meta.cwd, project_key(meta.cwd, rule=self._project_rule)
            )
        return _Head(
            st=head.stat,
            prev=prev,
            head_hash=head.head_hash,
            meta=meta,
            reason=reason,
            project=project,
            claude=is_claude or (meta is not None and meta.agent is Agent.CLAUDE),
        )

    def _claude_head(self, path: str) -> tuple[SessionMeta | None, bool]:
        """Read a transcript's first lines as Claude Code's: ``(meta, looks like Claude)``.

        Bounded by :data:`CLAUDE_HEAD_LINES` lines and :data:`CLAUDE_HEAD_MAX_BYTES` bytes. A read
        failure is logged by :mod:`memd.ingest.files` and gives ``(None, False)``.
        """
        lines = reader.read_head_lines(
            path,
            max_lines=CLAUDE_HEAD_LINES,
            max_line_bytes=min(self._max_line_bytes, CLAUDE_HEAD_MAX_LINE_BYTES),
            max_bytes=CLAUDE_HEAD_MAX_BYTES,
        )
        if isinstance(lines, rollout_files.ReadFailure):
            return None, False
        meta = claude.session_meta(lines, name_hint=_stem(path))
        return meta, meta is not None or claude.looks_like_claude(lines)

    async def _decide(
        self,
        head: _Head,
        thread_paths: dict[str, str],
        batch: _Batch,
        summary: IndexSummary,
        log_each: Callable[..., object],
    ) -> int:
        """Add one file's rows to ``batch``; return 1 for a new (or moved) thread, else 0.

        ``thread_paths`` maps known thread ids to their current path and is kept up to date.
        """
        st, prev = head.st, head.prev
        if head.failure is not None:
            if head.failure.reason is FailureReason.UNREADABLE and prev is None:
                error = FailureReason.UNREADABLE.record_error(head.failure.detail)
                batch.files.append(_file(st, "", None, 0, error=error))
            return 0
        summary.indexed += 1
        meta = head.meta
        kind = Agent.CLAUDE if head.claude else Agent.CODEX
        if meta is None:
            summary.failed += head.reason is HeadProblem.HEAD_FAILED
            batch.files.append(_file(st, head.head_hash, None, 0, error=head.reason, kind=kind))
            log.info("file_not_indexed", path=st.path, reason=head.reason, agent=str(kind))
            return 0
        existing_path = thread_paths.get(meta.thread_id)
        moved = existing_path is not None and existing_path != st.path
        if moved and meta.agent is Agent.CLAUDE and existing_path is not None and os.path.exists(existing_path):
            # Two live files claim one session (a copy, a second projects root): the first one
            # keeps the thread and its watermark; this one is recorded, never read.
            error = FileRole.DUPLICATE_SESSION
            batch.files.append(_file(st, head.head_hash, meta.thread_id, 0, error=error, kind=kind))
            log.warning("duplicate_session", thread_id=meta.thread_id, path=st.path, thread_path=existing_path)
            return 0
        if existing_path is not None and st.path == existing_path + ".zst":
            if os.path.exists(existing_path):
                return 0  # x.jsonl and x.jsonl.zst both exist: the plain file wins
        change = reader.classify_change(prev, st, head.head_hash)
        keep = False
        if prev is not None and prev.thread_id == meta.thread_id and not prev.error:
            keep = change == reader.Change.GROWN
            if prev.path != st.path and st.size >= prev.watermark:
                keep = True  # moved (archived): same inode, keep the watermark and statistics
        if keep:
            assert prev is not None
            watermark = prev.watermark
            stats = ThreadStats.from_json(await self._store.threads.stats(meta.thread_id))
        else:
            watermark, stats = 0, _FRESH_STATS
            if existing_path is not None and not moved and prev is not None:
                log.info("rollout_replaced", thread_id=meta.thread_id, path=st.path, change=str(change))
        file = _file(st, head.head_hash, meta.thread_id, watermark, kind=kind)
        verdict = eligibility(meta, 1, self._include)  # conditions that depend on the head only
        reason = self._reason(meta, stats, verdict.reason, read=keep and watermark > 0)
        record = self._thread_record(meta, head.project, file, stats, reason)
        stats_json = _FRESH_STATS_JSON if stats is _FRESH_STATS else self._stats_json(stats)
        batch.threads.append((record, stats_json, file))
        batch.thread_ids.add(meta.thread_id)
        thread_paths[meta.thread_id] = st.path
        if existing_path is None or moved:
            log_each(
                "thread_indexed",
                thread_id=meta.thread_id,
                path=st.path,
                agent=str(meta.agent),
                source=meta.source_label,
                moved=moved,
            )
            return 1
        return 0

    async def _attach(self, head: _Head, cwds: dict[str, str], batch: _Batch, summary: IndexSummary) -> None:
        """Record a Claude Code sub-agent transcript as a file of its parent session (never a thread).

        One event per file: ``subagent_without_parent`` when its session is unknown (the parent may
        appear later; nothing is lost), ``subagent_cwd_differs`` when it records another cwd than
        its session (the session's cwd stands), else ``subagent_attached`` (debug). The compaction
        summariser (``agent-acompact-*``) is recorded and skipped (``file_not_indexed``).
        """
        meta = head.meta
        assert meta is not None and meta.subagent_id is not None
        summary.indexed += 1
        st = head.st
        role = FileRole.COMPACTION_AGENT if claude.is_compaction_agent(meta.subagent_id) else FileRole.SUBAGENT
        batch.files.append(_file(st, head.head_hash, meta.thread_id, 0, error=role, kind=Agent.CLAUDE))
        if role is FileRole.COMPACTION_AGENT:
            log.info("file_not_indexed", path=st.path, reason=str(role), thread_id=meta.thread_id, agent="claude")
            return
        parent_cwd = cwds.get(meta.thread_id)
        if parent_cwd is None:
            log.info(
                "subagent_without_parent",
                path=st.path,
                thread_id=meta.thread_id,
                action="recorded as a file of the session; it never becomes a thread",
            )
        elif meta.cwd and parent_cwd and meta.cwd != parent_cwd:
            log.info(
                "subagent_cwd_differs",
                path=st.path,
                thread_id=meta.thread_id,
                cwd=meta.cwd,
                session_cwd=parent_cwd,
                action="the session's cwd stands",
            )
        else:
            log.debug("subagent_attached", path=st.path, thread_id=meta.thread_id, agent_id=meta.subagent_id)

    def _reason(
        self, meta: SessionMeta, stats: ThreadStats, head_reason: Ineligible | None, *, read: bool
    ) -> Ineligible | None:
        """Why an indexed thread is not a candidate (``None``: it is): forgotten, the head's reason,
        else — when ``stats`` cover the bytes read so far (``read``: a grown or moved file keeps
        them) — the verdict they give, as :meth:`catch_up` would; a thread not read yet waits."""
        if meta.thread_id in self._forgotten():
            return FORGOTTEN
        if head_reason is not None:
            return head_reason
        if not read:
            return NOT_READ_YET
        return NO_USER_MESSAGES if stats.user_messages == 0 else None

    def _thread_record(
        self,
        meta: SessionMeta,
        project: str,
        file: FileRecord,
        stats: ThreadStats,
        reason: Ineligible | None,
    ) -> ThreadRecord:
        return ThreadRecord(
            id=meta.thread_id,
            path=file.path,
            project=project,
            cwd=meta.cwd or "",
            source=meta.source_label,
            originator=meta.originator or "",
            cli_version=meta.cli_version or "",
            model=stats.model or "",
            title=self._clean(stats.title) if stats.title else "",
            created_at=meta.started_at if meta.started_at is not None else file.mtime,
            updated_at=file.mtime,
            watermark=file.watermark,
            user_messages=stats.user_messages,
            skipped_lines=stats.skipped_lines,
            eligible=reason is None,
            reason=reason,
            agent=meta.agent,
        )

    async def catch_up(self, thread_id: str) -> CatchUp | None:
        """Read a thread's rollout forward from its watermark and update its statistics.

        Returns:
            ``None`` when the thread is unknown, else a :class:`CatchUp`: the thread as stored
            after the read, and whether the read happened (``read``), found no file
            (``vanished``: nothing to read until it reappears, which the indexer records as a
            change) or failed this time (``failed``: permission denied, an I/O error, the file
            replaced mid-read; the thread is as before and the caller tries again later). A file
            replaced or truncated since it was indexed is read again from 0.
        """
        async with self._lock:
            self.last_catch_up_bytes = 0
            thread = await self._store.threads.get(thread_id)
            if thread is None:
                return None
            file = await self._store.threads.get_file(thread.path)
            st = await asyncio.to_thread(rollout_files.stat_rollout, thread.path)
            if isinstance(st, rollout_files.ReadFailure) or file is None:
                # No record: the file was forgotten (gone) and, if it is back, not indexed yet.
                outcome = ReadOutcome.VANISHED if _vanished(st) else ReadOutcome.FAILED
                log.info("catch_up_failed", thread_id=thread_id, path=thread.path, outcome=str(outcome))
                return CatchUp(thread, outcome)
            if st.size == file.watermark and st.inode == file.inode and thread.reason != NOT_READ_YET:
                return CatchUp(thread, ReadOutcome.READ)
            stats = ThreadStats.from_json(await self._store.threads.stats(thread_id))
            watermark = file.watermark
            if st.inode != file.inode or st.size < file.watermark:
                watermark, stats = 0, ThreadStats()
            read = await asyncio.to_thread(self._read_forward, file.path, watermark, st.inode, stats, thread.agent)
            if isinstance(read, ReadOutcome):
                return CatchUp(thread, read)
            watermark, bytes_read, last_stat = read
            record = await self._record_read(thread, file, last_stat or st, watermark, stats)
            self.last_catch_up_bytes = bytes_read
            log.debug("thread_caught_up", thread_id=thread_id, bytes_read=bytes_read, watermark=watermark)
            return CatchUp(record, ReadOutcome.READ)

    async def _record_read(
        self, thread: ThreadRecord, file: FileRecord, st: rollout_files.FileStat, watermark: int, stats: ThreadStats
    ) -> ThreadRecord:
        """Store what :meth:`catch_up` read: the thread's new watermark, statistics and verdict."""
        new_file = _file(st, file.head_hash, thread.id, watermark, kind=thread.agent)
        reason = thread.reason if thread.reason is not None and not thread.reason.provisional else None
        if reason is None and stats.user_messages == 0:
            reason = NO_USER_MESSAGES
        record = replace(
            thread,
            model=stats.model or thread.model,
            title=self._clean(stats.title) if stats.title else thread.title,
            updated_at=new_file.mtime,
            watermark=watermark,
            user_messages=stats.user_messages,
            skipped_lines=stats.skipped_lines,
            eligible=reason is None,
            reason=reason,
        )
        # What the scheduler reads is not a change to plan again (only the indexer's are).
        await self._store.threads.record(record, self._stats_json(stats), new_file, changed=False)
        return record

    def _read_forward(
        self, path: str, watermark: int, inode: int, stats: ThreadStats, agent: Agent
    ) -> tuple[int, int, rollout_files.FileStat | None] | ReadOutcome:
        """Fold the complete lines after ``watermark`` into ``stats`` (parsed as ``agent``'s).

        Returns:
            ``(new watermark, bytes read, fstat of the file)``, or :attr:`ReadOutcome.VANISHED` when
            the file is gone, :attr:`ReadOutcome.FAILED` when it is unreadable or was replaced
            while reading (the next scan re-indexes it).
        """
        stream = reader.read_lines_until(
            path, None, self._max_line_bytes, start_watermark=watermark, expect_inode=inode
        )
        parser = new_parser(agent, path=path, from_start=watermark == 0)
        try:
            batch: list[bytes] = []
            size = 0
            for line in stream:
                batch.append(line)
                size += len(line)
                if len(batch) >= FOLD_BATCH_LINES or size >= FOLD_BATCH_BYTES:
                    parser.feed(batch)
                    batch.clear()
                    size = 0
                    stats.feed(parser.result)  # fold and drop the items: memory stays bounded
                    parser = new_parser(agent, path=path, from_start=False)
            parser.feed(batch)
        except rollout_files.RolloutReadError as exc:
            outcome = ReadOutcome.VANISHED if exc.reason is FailureReason.VANISHED else ReadOutcome.FAILED
            log.info("catch_up_failed", path=path, outcome=str(outcome), reason=str(exc))
            return outcome
        if stream.oversized_lines:
            parser.feed_malformed(stream.oversized_lines, "line_too_long")
        stats.feed(parser.result)
        return stream.watermark, stream.bytes_read, stream.stat


#: Scan problems that leave a directory's files unseen without telling whether they exist.
_BLIND_SPOTS = frozenset({"root_missing", "root_not_dir", "dir_unreadable"})


def _prefixes(dirs: Iterable[str | Path]) -> tuple[str, ...]:
    """Path prefixes matching everything under ``dirs`` (for ``str.startswith``)."""
    return tuple(str(d).rstrip("/") + "/" for d in dirs)


def _absent(paths: Sequence[str]) -> list[str]:
    """The paths with nothing at them (runs in a worker thread: one ``stat`` each)."""
    return [path for path in paths if not os.path.exists(path)]


def _vanished(st: rollout_files.FileStat | rollout_files.ReadFailure) -> bool:
    return isinstance(st, rollout_files.ReadFailure) and st.reason is FailureReason.VANISHED


def _unchanged(prev: FileRecord | None, st: rollout_files.FileStat) -> bool:
    """Whether the stored record still describes the file (then only its stat was paid)."""
    return (
        prev is not None
        and prev.path == st.path
        and (prev.dev, prev.inode, prev.size, prev.mtime) == (st.dev, st.inode, st.size, st.mtime)
        and not FailureReason.UNREADABLE.recorded_in(prev.error)  # retried on every scan
    )


def _head_problem(head: reader.HeadRead, *, is_claude: bool) -> HeadProblem:
    """Why a head that names no session does not (``files.error`` of the file)."""
    if head.stat.size == 0:
        return HeadProblem.EMPTY_FILE
    if is_claude:
        return HeadProblem.NO_SESSION_ID
    if head.oversized:
        return HeadProblem.FIRST_LINE_TOO_LONG
    if not head.complete:
        return HeadProblem.PARTIAL_FIRST_LINE
    return HeadProblem.NO_SESSION_META


def _stem(path: str) -> str:
    name = os.path.basename(path)
    return name[: -len(".jsonl")] if name.endswith(".jsonl") else name


def _file(
    st: rollout_files.FileStat,
    head_hash: str,
    thread_id: str | None,
    watermark: int,
    *,
    error: str | None = None,
    kind: Agent = Agent.CODEX,
) -> FileRecord:
    return FileRecord(
        path=st.path,
        kind=kind,
        dev=st.dev,
        inode=st.inode,
        size=st.size,
        mtime=st.mtime,
        watermark=watermark,
        head_hash=head_hash,
        thread_id=thread_id,
        error=error,
    )
