"""The full-text search index over memory files, and the memory-use ledger (SPEC §18).

A repository on the state database (``state_dir/memd.sqlite3``, tables from the schema migration that
holds :data:`SCHEMA_SQL`) driven through the
stdlib :mod:`sqlite3` module, so that the short-lived readers — ``memd mcp`` and ``memd context`` — need
neither the daemon nor aiosqlite. The daemon calls :meth:`SearchIndex.refresh` (in a thread) after an
extraction commits and after a consolidation; the MCP server calls it before each search, which costs
one ``stat`` per memory file when nothing changed. :meth:`SearchIndex.rebuild` re-reads every project
folder under ``memory_dir`` (what ``memd db recover`` calls after a restore).

What is indexed (SQLite FTS5, ``porter unicode61``), one row per *chunk*:

* ``MEMORY.md`` (kind ``memory``): one chunk per bullet (with its continuation lines) or paragraph,
  under its ``##`` section heading; ``entry`` is a stable key of the bullet text (see :func:`entry_key`);
* ``skills/<name>/SKILL.md`` (kind ``skill``): one chunk per file; heading = name and description;
* ``trace_summaries/<file>.md`` (kind ``trace``): the preamble (title, trace context, preferences)
  and one chunk per ``## Task:`` section; session id and date from the trace header (SPEC §8).

Ranking: ``bm25`` with the heading weighted :data:`HEADING_WEIGHT` times the body, then recency
(newest first) as the tie-break. Queries are reduced to their words, each quoted, so FTS5 syntax in
a query (``"``, ``*``, ``NEAR``, ``-``, ``AND``/``OR``/``NOT``, parentheses, ``:``) is plain text.

The *memory-use ledger* (``memory_use``) records one row per use of a memory piece found in a later
transcript (an ``mcp__memd__*`` tool call, a Codex ``<oai-mem-citation>``); ``usage_count`` and
``last_used_at`` are aggregates over it, so re-reading a transcript never counts a use twice.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

#: bm25 weight of the heading column against the body (1.0).
HEADING_WEIGHT = 4.0
#: Largest memory file read into the index; the rest of a larger file is not indexed.
MAX_FILE_BYTES = 2 * 1024 * 1024
#: Body of one chunk kept in the index (characters).
MAX_CHUNK_CHARS = 8_000

try:  # the builtin module: hashlib would load OpenSSL, a cost every `memd context` start pays (SPEC §15)
    from _sha2 import sha256  # type: ignore[import-not-found,unused-ignore]  # CPython >= 3.12
except ImportError:
    try:
        from _sha256 import sha256  # type: ignore[import-not-found,no-redef,unused-ignore]  # CPython 3.11
    except ImportError:
        from hashlib import sha256  # type: ignore[assignment,unused-ignore]


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of ``data`` (the builtin implementation when available; see above)."""
    return str(sha256(data).hexdigest())


#: ``search_files`` row holding the ``trace_summaries/`` folder's mtime (see :meth:`SearchIndex.refresh`).
_FOLDER_KEY = "trace_summaries/"
_FOLDER_END = "trace_summaries0"  # "0" follows "/": every trace path sorts between the two
MEMORY_FILE = "MEMORY.md"
SUMMARY_FILE = "memory_summary.md"
TRACE_DIR = "trace_summaries"
SKILLS_DIR = "skills"
SKILL_FILE = "SKILL.md"

#: SQL of the tables (applied by migrations 3 and 5, which adds ``clean``, and by :func:`ensure_schema` on a scratch
#: database).
SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS search_files (
    project   TEXT NOT NULL,
    path      TEXT NOT NULL,
    mtime_ns  INTEGER NOT NULL,
    size      INTEGER NOT NULL,
    clean     INTEGER,
    PRIMARY KEY (project, path)
);
CREATE VIRTUAL TABLE IF NOT EXISTS search_chunks USING fts5(
    heading, body,
    project UNINDEXED, path UNINDEXED, kind UNINDEXED, line_start UNINDEXED, line_end UNINDEXED,
    entry UNINDEXED, session_ids UNINDEXED, date_s UNINDEXED,
    tokenize = 'porter unicode61'
);
CREATE TABLE IF NOT EXISTS memory_use (
    project   TEXT NOT NULL,
    path      TEXT NOT NULL,
    entry     TEXT NOT NULL DEFAULT '',
    thread_id TEXT NOT NULL,
    event_id  TEXT NOT NULL,
    used_at   REAL NOT NULL,
    PRIMARY KEY (thread_id, event_id, project, path, entry)
);
CREATE INDEX IF NOT EXISTS memory_use_project ON memory_use(project, path, entry);
"""


class ChunkKind(StrEnum):
    """What a search chunk comes from."""

    MEMORY = "memory"
    SKILL = "skill"
    TRACE = "trace"


@dataclass(frozen=True, slots=True)
class Chunk:
    """One indexed piece of a memory file.

    Attributes:
        path: file path relative to the project's memory root (``MEMORY.md``, ``trace_summaries/x.md``).
        kind: the file's kind.
        heading: section heading (bm25-weighted), e.g. ``Pitfalls and pivots`` or ``Task: add a test``.
        body: the chunk text.
        line_start: first line (1-based) of the chunk in the file.
        line_end: last line (1-based, inclusive).
        entry: stable key of a MEMORY.md bullet (:func:`entry_key`), ``""`` for other kinds.
        session_ids: thread ids (or their 8-character prefixes) the chunk cites, in order.
        date_s: the chunk's date, epoch seconds (trace: session date; MEMORY.md: newest cited date,
            else the file's mtime); 0.0 when unknown.
    """

    path: str
    kind: ChunkKind
    heading: str
    body: str
    line_start: int
    line_end: int
    entry: str = ""
    session_ids: tuple[str, ...] = ()
    date_s: float = 0.0


@dataclass(frozen=True, slots=True)
class SearchHit:
    """One search result (a :class:`Chunk` with its rank).

    Attributes:
        chunk: the chunk matched.
        snippet: the part of its body to show (the whole body when short).
        score: bm25 score (lower is better, as SQLite reports it).
    """

    chunk: Chunk
    snippet: str
    score: float


@dataclass(frozen=True, slots=True)
class RefreshReport:
    """What :meth:`SearchIndex.refresh` changed for one project (counts of files)."""

    indexed: int
    removed: int
    unchanged: int


@dataclass(frozen=True, slots=True)
class UseEvent:
    """One use of a memory piece seen in a transcript.

    Attributes:
        project: project key whose memory was used.
        path: file relative to the memory root.
        entry: MEMORY.md bullet key, ``""`` for a whole file.
        thread_id: the session in which the use happened.
        event_id: what identifies the use inside that session (tool call id, citation number), so the
            same use seen twice is counted once.
        used_at: epoch seconds of the use (the transcript's timestamp, else the session's).
    """

    project: str
    path: str
    entry: str
    thread_id: str
    event_id: str
    used_at: float


@dataclass(frozen=True, slots=True)
class Usage:
    """Aggregated use of one memory piece: ``usage_count`` uses, the last at ``last_used_at`` (epoch s)."""

    usage_count: int
    last_used_at: float


# --------------------------------------------------------------------------- chunking (pure)

_SPACES = re.compile(r"\s+")
_PROVENANCE = re.compile(r"\[([0-9a-fA-F][0-9a-fA-F-]{5,63})\s+(\d{4}-\d{2}-\d{2})\]")
_TRACE_REF = re.compile(r"trace_summaries/([A-Za-z0-9-]{1,64})_[^)\s]*\.md")
_DATE = re.compile(r"\b(\d{4})-(\d{2})-(\d{2})(?!\d)")
_ENTRY_NOISE = re.compile(r"\[[^\]]*\]|\(trace:[^)]*\)|\(seen in \d+ sessions?\)")
_EMPHASIS = re.compile(r"[*_`]")
_BULLET = re.compile(r"^\s{0,3}(?:[-*+]|\d+[.)])\s+")
_WORD = re.compile(r"\w+", re.UNICODE)
_NOT_CONTENT = re.compile(r"\s*(?:<!--.*-->\s*$|(?:none yet|none observed)\b)", re.IGNORECASE)


def entry_key(text: str) -> str:
    """Stable key of a MEMORY.md entry, kept across consolidations that reword nothing.

    The bullet marker, provenance (``[019a085e 2025-10-21]``, ``(trace: ...)``, ``(seen in N sessions)``),
    markdown emphasis, case and spacing are ignored; the first 300 characters count.

    Returns:
        16 hex characters (sha256 prefix), or ``""`` for text with nothing left.
    """
    core = _BULLET.sub("", text, count=1)
    core = _EMPHASIS.sub("", _ENTRY_NOISE.sub(" ", core))
    core = _SPACES.sub(" ", core).strip().lower().rstrip(".;: ")
    if not core:
        return ""
    return sha256_hex(core[:300].encode("utf-8", "replace"))[:16]


def _epoch(date: str) -> float:
    """``YYYY-MM-DD`` or an ISO-8601 time (``Z`` or offset) to epoch seconds; 0.0 when unparseable."""
    from datetime import UTC, datetime

    text = date.strip()
    try:
        parsed = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    except ValueError:
        return 0.0
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


def _citations(text: str) -> tuple[tuple[str, ...], float]:
    ids: list[str] = []
    newest = 0.0
    for match in _PROVENANCE.finditer(text):
        ids.append(match.group(1))
        newest = max(newest, _epoch(match.group(2)))
    for match in _TRACE_REF.finditer(text):
        ids.append(match.group(1))
    if not newest:
        for match in _DATE.finditer(text):
            newest = max(newest, _epoch(match.group(0)))
    return tuple(dict.fromkeys(ids)), newest


def chunk_memory_md(text: str, *, path: str = MEMORY_FILE, mtime_s: float = 0.0) -> list[Chunk]:
    """Split a ``MEMORY.md`` into one chunk per bullet or paragraph, under its ``##`` heading.

    One-line HTML comments (the consolidator's merge markers) and ``none yet`` / ``none observed``
    placeholders are not content.

    Args:
        text: the file's text.
        path: its path relative to the memory root.
        mtime_s: the file's mtime, the date of chunks that cite no date.

    Returns:
        Chunks in file order; the ``# `` title line and blank lines are not chunks.
    """
    chunks: list[Chunk] = []
    heading = ""
    current: list[str] = []
    start = 0

    def flush(end: int) -> None:
        body = "\n".join(current).strip()
        if body:
            ids, date_s = _citations(body)
            chunks.append(
                Chunk(
                    path,
                    ChunkKind.MEMORY,
                    heading,
                    body[:MAX_CHUNK_CHARS],
                    start,
                    end,
                    entry_key(body),
                    ids,
                    date_s or mtime_s,
                )
            )
        current.clear()

    for number, line in enumerate(text.splitlines(), start=1):
        if _NOT_CONTENT.match(line):  # memd's merge markers (<!-- ... -->) and "none yet" placeholders
            flush(number - 1)
            continue
        if line.startswith("#"):
            flush(number - 1)
            if line.startswith("## ") or line.startswith("### "):
                heading = line.lstrip("#").strip()
            continue
        if not line.strip():
            flush(number - 1)
            continue
        if _BULLET.match(line) and not line.startswith("    "):
            flush(number - 1)
        if not current:
            start = number
        current.append(line)
    flush(len(text.splitlines()))
    return chunks


def _front_matter(text: str) -> tuple[dict[str, str], int]:
    """YAML-ish front matter (``key: value`` lines between ``---``): (values, lines used)."""
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return {}, 0
    values: dict[str, str] = {}
    for index, line in enumerate(lines[1:], start=1):
        if line.strip() == "---":
            return values, index + 1
        key, sep, value = line.partition(":")
        if sep:
            values[key.strip()] = value.strip().strip("\"'")
    return {}, 0


def chunk_skill(text: str, *, path: str, mtime_s: float = 0.0) -> list[Chunk]:
    """One chunk for a ``SKILL.md``: heading = its front matter ``name`` and ``description``."""
    meta, used = _front_matter(text)
    lines = text.splitlines()
    name = meta.get("name") or Path(path).parent.name
    heading = f"{name}: {meta['description']}" if meta.get("description") else name
    body = "\n".join(lines[used:]).strip()
    if not body and not heading:
        return []
    return [
        Chunk(
            path, ChunkKind.SKILL, heading, body[:MAX_CHUNK_CHARS], used + 1, max(len(lines), used + 1), "", (), mtime_s
        )
    ]


_TRACE_HEADER_KEYS = frozenset(
    {
        "thread_id",
        "agent",
        "project",
        "cwd",
        "rollout_path",
        "session_date",
        "updated_at",
        "source_watermark",
        "started_at",
    }
)


def _trace_header(lines: list[str]) -> tuple[dict[str, str], int]:
    values: dict[str, str] = {}
    for index, line in enumerate(lines):
        if not line.strip():
            return values, index + 1
        key, sep, value = line.partition(":")
        if not sep or key.strip() not in _TRACE_HEADER_KEYS:
            return values, index
        values[key.strip()] = value.strip()
    return values, len(lines)


def _header_date(values: dict[str, str], mtime_s: float) -> float:
    for key in ("session_date", "started_at", "updated_at"):
        match = _DATE.search(values.get(key, ""))
        if match:
            return _epoch(values[key]) or _epoch(match.group(0))
    return mtime_s


def chunk_trace(text: str, *, path: str, mtime_s: float = 0.0) -> list[Chunk]:
    """Split a trace file (SPEC §8 header + SPEC §6.3 skeleton) into preamble and ``## Task:`` chunks."""
    lines = text.splitlines()
    values, first = _trace_header(lines)
    thread_id = values.get("thread_id", "") or Path(path).stem.split("_", 1)[0]
    ids = (thread_id,) if thread_id else ()
    date_s = _header_date(values, mtime_s)
    title = ""
    chunks: list[Chunk] = []
    heading = ""
    current: list[str] = []
    start = first + 1

    def flush(end: int) -> None:
        body = "\n".join(current).strip()
        if body or heading:
            chunks.append(
                Chunk(
                    path,
                    ChunkKind.TRACE,
                    heading or title,
                    body[:MAX_CHUNK_CHARS],
                    start,
                    max(end, start),
                    "",
                    ids,
                    date_s,
                )
            )
        current.clear()

    for number, line in enumerate(lines[first:], start=first + 1):
        if line.startswith("# ") and not title:
            title = line[2:].strip()
            current.append(line)
            continue
        if line.startswith("## "):
            flush(number - 1)
            heading = line[3:].strip()
            start = number
            continue
        if not current and not heading:
            start = number
        current.append(line)
    flush(len(lines))
    return [c for c in chunks if c.body or c.heading]


def chunk_file(relpath: str, text: str, *, mtime_s: float = 0.0) -> list[Chunk]:
    """Chunk one memory file by its place in the memory root (see the module docstring).

    Returns:
        The chunks, or ``[]`` for a file that is not indexed (``memory_summary.md``, ``PROJECT``, ...).
    """
    if relpath == MEMORY_FILE:
        return chunk_memory_md(text, path=relpath, mtime_s=mtime_s)
    if relpath.startswith(SKILLS_DIR + "/") and relpath.endswith("/" + SKILL_FILE):
        return chunk_skill(text, path=relpath, mtime_s=mtime_s)
    if relpath.startswith(TRACE_DIR + "/") and relpath.endswith(".md"):
        return chunk_trace(text, path=relpath, mtime_s=mtime_s)
    return []


def memory_files(root: Path, *, traces: bool = True) -> dict[str, os.stat_result]:
    """The indexable files of a memory root and their stats (``{relpath: stat}``); missing root: ``{}``.

    Temporary and staging files (names starting with ``.`` or holding ``.tmp-memd-``) are skipped.
    ``traces=False`` leaves ``trace_summaries/`` out (one ``scandir`` + ``stat`` per file saved).
    """
    found: dict[str, os.stat_result] = {}

    def add(relpath: str, path: str) -> None:
        try:
            st = os.stat(path)
        except OSError:
            return
        if stat.S_ISREG(st.st_mode):
            found[relpath] = st

    base = os.fspath(root)
    add(MEMORY_FILE, os.path.join(base, MEMORY_FILE))
    add(SUMMARY_FILE, os.path.join(base, SUMMARY_FILE))
    for directory, pattern in ((TRACE_DIR, None), (SKILLS_DIR, SKILL_FILE)):
        if directory == TRACE_DIR and not traces:
            continue
        try:
            with os.scandir(os.path.join(base, directory)) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith(".") or ".tmp-memd-" in entry.name:
                continue
            if pattern is None and entry.name.endswith(".md"):
                add(f"{directory}/{entry.name}", entry.path)
            elif pattern is not None and entry.is_dir(follow_symlinks=False):
                add(f"{directory}/{entry.name}/{pattern}", os.path.join(entry.path, pattern))
    return found


def fts_query(query: str) -> str:
    """Turn free text into a safe FTS5 query: every word quoted, words joined with ``OR``.

    ``"``, ``*``, ``-``, ``:``, parentheses and the operators ``AND``/``OR``/``NOT``/``NEAR`` become
    plain words or separators. bm25 ranks chunks that match more of the words first.

    Returns:
        The FTS5 query, or ``""`` when the text holds no word.
    """
    words = list(dict.fromkeys(w.lower() for w in _WORD.findall(query)))[:32]
    return " OR ".join(f'"{w}"' for w in words)


# --------------------------------------------------------------------------- the repository


def has_search_tables(conn: sqlite3.Connection) -> bool:
    """Whether the database holds the search and usage tables (schema migration applied)."""
    rows = conn.execute(
        "SELECT count(*) FROM sqlite_master WHERE name IN ('search_chunks', 'search_files', 'memory_use')"
    ).fetchone()
    return int(rows[0]) == 3


def ensure_schema(conn: sqlite3.Connection) -> None:
    """Create the search and usage tables on a scratch connection (a real database gets migrations 3 and 5)."""
    conn.executescript(SCHEMA_SQL)


class SearchIndex:
    """The search index and usage ledger of one database, over a stdlib :class:`sqlite3.Connection`.

    Args:
        conn: an open connection with ``isolation_level=None`` (autocommit; this class opens
            ``BEGIN IMMEDIATE`` for every write) on a database holding :data:`SCHEMA_SQL`.

        is_clean: ``is_clean(text) -> bool``, whether a file's text holds nothing the redactor would
            replace; recorded per file version (``search_files.clean``) so that ``memd context`` can skip
            loading the redactor for files already known clean (:meth:`known_clean`). ``None`` records
            nothing.

    Use :meth:`open` for the state database and :meth:`scratch` for an in-memory one.
    """

    def __init__(self, conn: sqlite3.Connection, *, is_clean: Callable[[str], bool] | None = None) -> None:
        self._conn = conn
        self._is_clean = is_clean

    @classmethod
    def open(
        cls, db_path: Path, *, busy_timeout_s: float = 5.0, is_clean: Callable[[str], bool] | None = None
    ) -> SearchIndex | None:
        """Open the state database's index, or return ``None`` when it cannot serve.

        ``None`` when the file is missing or its schema predates the search tables (the daemon
        migrates it; readers never do). Never creates the database.

        Raises:
            sqlite3.Error: the file exists but is not a readable SQLite database.
        """
        if not db_path.is_file():
            return None
        conn = sqlite3.connect(
            f"file:{db_path}?mode=rw", uri=True, isolation_level=None, timeout=busy_timeout_s, check_same_thread=False
        )
        try:
            if not has_search_tables(conn):
                conn.close()
                return None
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        except sqlite3.Error:
            conn.close()
            raise
        return cls(conn, is_clean=is_clean)

    @classmethod
    def scratch(cls, *, is_clean: Callable[[str], bool] | None = None) -> SearchIndex:
        """An index in memory (for a reader whose state database is missing or older)."""
        conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        ensure_schema(conn)
        return cls(conn, is_clean=is_clean)

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    # -- index maintenance

    def refresh(self, project: str, root: Path, *, full: bool = False) -> RefreshReport:
        """Bring one project's chunks in line with its memory files (stat, then read what changed).

        memd writes trace files by rename, which changes the ``trace_summaries/`` folder's mtime; so
        unless ``full``, an unchanged folder mtime skips the per-file stats of the traces (a search over
        1,000 traces then costs a few stats, not a thousand). The daemon refreshes with ``full=True``.

        Args:
            project: the project key.
            root: its memory root; a missing root removes every chunk of the project.
            full: stat every trace file even when their folder did not change.

        Returns:
            Counts of files indexed, removed and unchanged.

        Raises:
            sqlite3.Error: the database failed (locked past the busy timeout, ...); nothing changed.
        """
        try:
            folder: tuple[int, int] | None = (os.stat(root / TRACE_DIR).st_mtime_ns, 0)
        except OSError:
            folder = None
        row = self._conn.execute(
            "SELECT mtime_ns, size FROM search_files WHERE project = ? AND path = ?", (project, _FOLDER_KEY)
        ).fetchone()
        skip_traces = not full and folder is not None and row is not None and tuple(row) == folder
        # Trace rows are the key range ["trace_summaries/", "trace_summaries0"): skipped without being read.
        where = "WHERE project = ? AND path != ?" + (" AND NOT (path >= ? AND path < ?)" if skip_traces else "")
        params: tuple[str, ...] = (project, _FOLDER_KEY) + ((_FOLDER_KEY, _FOLDER_END) if skip_traces else ())
        known = {
            path: (mtime_ns, size)
            for path, mtime_ns, size in self._conn.execute(
                f"SELECT path, mtime_ns, size FROM search_files {where}", params
            )
        }
        skipped = 0
        if skip_traces:
            skipped = int(
                self._conn.execute(
                    "SELECT count(*) FROM search_files WHERE project = ? AND path > ? AND path < ?",
                    (project, _FOLDER_KEY, _FOLDER_END),
                ).fetchone()[0]
            )
        on_disk = memory_files(root, traces=not skip_traces)
        changed = {p: st for p, st in on_disk.items() if known.get(p) != (st.st_mtime_ns, st.st_size)}
        gone = [p for p in known if p not in on_disk]
        folder_moved = (tuple(row) if row is not None else None) != folder
        if not changed and not gone and not folder_moved:
            return RefreshReport(0, 0, len(on_disk) + skipped)
        texts = {p: self._read(root / p) for p in changed}
        with self._write() as conn:
            conn.execute("DELETE FROM search_files WHERE project = ? AND path = ?", (project, _FOLDER_KEY))
            if folder is not None:
                conn.execute(
                    "INSERT INTO search_files (project, path, mtime_ns, size) VALUES (?, ?, ?, ?)",
                    (project, _FOLDER_KEY, *folder),
                )
            # ``known`` was read before this transaction: another refresher (the daemon, `memd mcp`) may
            # have indexed or removed some of these paths since. Which have rows is read again here;
            # a path without rows has none to delete (a DELETE on the FTS table scans it).
            indexed_now = {
                path
                for (path,) in conn.execute(
                    "SELECT path FROM search_files WHERE project = ? AND path IN (SELECT value FROM json_each(?))",
                    (project, json.dumps([*gone, *changed])),
                )
            }
            for path in [*gone, *changed]:
                if path in indexed_now:
                    conn.execute("DELETE FROM search_chunks WHERE project = ? AND path = ?", (project, path))
                    conn.execute("DELETE FROM search_files WHERE project = ? AND path = ?", (project, path))
            for path, st in changed.items():
                text = texts[path]
                if text is None:
                    continue
                rows = [
                    (
                        c.heading,
                        c.body,
                        project,
                        c.path,
                        c.kind.value,
                        c.line_start,
                        c.line_end,
                        c.entry,
                        " ".join(c.session_ids),
                        c.date_s,
                    )
                    for c in chunk_file(path, text, mtime_s=st.st_mtime)
                ]
                conn.executemany(
                    "INSERT INTO search_chunks (heading, body, project, path, kind, line_start, line_end, entry,"
                    " session_ids, date_s) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
                clean = None if self._is_clean is None else int(self._is_clean(text))
                conn.execute(
                    "INSERT INTO search_files (project, path, mtime_ns, size, clean) VALUES (?, ?, ?, ?, ?)",
                    (project, path, st.st_mtime_ns, st.st_size, clean),
                )
        indexed = sum(1 for p in changed if texts[p] is not None)
        return RefreshReport(indexed, len(gone), len(on_disk) - len(changed) + skipped)

    @staticmethod
    def _read(path: Path) -> str | None:
        try:
            with open(path, "rb") as handle:
                return handle.read(MAX_FILE_BYTES).decode("utf-8", "replace")
        except OSError:
            return None

    def rebuild(self, memory_dir: Path) -> int:
        """Drop the whole index and re-index every project folder under ``memory_dir``.

        A project folder is ``<memory_dir>/<hash>/memory`` holding a ``PROJECT`` file (SPEC §8); the
        project key is read from it. Returns the number of projects indexed.
        """
        with self._write() as conn:
            conn.execute("DELETE FROM search_chunks")
            conn.execute("DELETE FROM search_files")
        count = 0
        try:
            folders = sorted(os.scandir(memory_dir), key=lambda e: e.name)
        except OSError:
            return 0
        for folder in folders:
            root = Path(folder.path) / "memory"
            project = self._read(root / "PROJECT")
            if project and project.strip():
                self.refresh(project.strip(), root)
                count += 1
        return count

    # -- queries

    def search(
        self,
        project: str,
        query: str,
        *,
        kinds: Iterable[ChunkKind] | None = None,
        limit: int = 5,
        offset: int = 0,
        snippet_chars: int = 600,
    ) -> list[SearchHit]:
        """Search one project's chunks: bm25 (heading weighted), then newest first.

        Args:
            project: the project key (never another project's chunks).
            query: free text (see :func:`fts_query`).
            kinds: restrict to these kinds (default: all).
            limit: at most this many hits.
            offset: skip this many (pagination).
            snippet_chars: longest snippet; a longer body is cut around its first matched word.

        Returns:
            The hits, best first; ``[]`` for a query without words.
        """
        match = fts_query(query)
        if not match:
            return []
        kind_values = [ChunkKind(k).value for k in kinds] if kinds else [k.value for k in ChunkKind]
        marks = ",".join("?" for _ in kind_values)
        sql = (
            "SELECT heading, body, path, kind, line_start, line_end, entry, session_ids, date_s,"
            f" bm25(search_chunks, {HEADING_WEIGHT}, 1.0) AS score"
            " FROM search_chunks WHERE search_chunks MATCH ? AND project = ?"
            f" AND kind IN ({marks}) ORDER BY round(score, 4), date_s DESC LIMIT ? OFFSET ?"
        )
        rows = self._conn.execute(sql, (match, project, *kind_values, limit, offset)).fetchall()
        words = [w.strip('"') for w in match.split(" OR ")]
        hits = []
        for heading, body, path, kind, start, end, entry, ids, date_s, score in rows:
            chunk = Chunk(
                path,
                ChunkKind(kind),
                heading,
                body,
                int(start),
                int(end),
                entry,
                tuple(ids.split()) if ids else (),
                float(date_s),
            )
            hits.append(SearchHit(chunk, _snippet(body, words, snippet_chars), float(score)))
        return hits

    def known_clean(self, project: str, relpath: str, st: os.stat_result) -> bool:
        """Whether this version (mtime, size) of a memory file was checked and holds nothing to redact."""
        row = self._conn.execute(
            "SELECT mtime_ns, size, clean FROM search_files WHERE project = ? AND path = ?", (project, relpath)
        ).fetchone()
        return row is not None and (row[0], row[1]) == (st.st_mtime_ns, st.st_size) and row[2] == 1

    def chunk_count(self, project: str) -> int:
        """Number of indexed chunks of a project."""
        row = self._conn.execute("SELECT count(*) FROM search_chunks WHERE project = ?", (project,)).fetchone()
        return int(row[0])

    # -- usage ledger

    def record_uses(self, events: Sequence[UseEvent]) -> int:
        """Record uses (idempotent: a use already recorded is ignored). Returns how many were new."""
        if not events:
            return 0
        with self._write() as conn:
            before = conn.total_changes
            conn.executemany(
                "INSERT OR IGNORE INTO memory_use (project, path, entry, thread_id, event_id, used_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [(e.project, e.path, e.entry, e.thread_id, e.event_id, e.used_at) for e in events],
            )
            return conn.total_changes - before

    def usage(self, project: str) -> dict[tuple[str, str], Usage]:
        """Usage of a project's memory pieces: ``{(path, entry): Usage}`` (entry ``""`` = whole file)."""
        rows = self._conn.execute(
            "SELECT path, entry, count(*), max(used_at) FROM memory_use WHERE project = ? GROUP BY path, entry",
            (project,),
        )
        return {(path, entry): Usage(int(n), float(last)) for path, entry, n, last in rows}

    def usage_counts(self) -> dict[str, int]:
        """Uses per project (``{project: usage_count}``), for ``memd status``."""
        rows = self._conn.execute("SELECT project, count(*) FROM memory_use GROUP BY project")
        return {project: int(n) for project, n in rows}


def _snippet(body: str, words: Sequence[str], limit: int) -> str:
    if len(body) <= limit:
        return body
    lowered = body.lower()
    positions = [lowered.find(w) for w in words if w]
    found = [p for p in positions if p >= 0]
    centre = min(found) if found else 0
    start = max(0, min(centre - limit // 3, len(body) - limit))
    text = body[start : start + limit]
    return ("…" if start else "") + text + ("…" if start + limit < len(body) else "")
