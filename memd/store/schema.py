"""Schema migrations of the state store (SPEC §5).

``MIGRATIONS[v]`` is the SQL script that takes a database from ``user_version`` ``v - 1`` to
``v``. Scripts are applied in order inside one ``BEGIN IMMEDIATE`` transaction at open
(:func:`memd.store.db.migrate`). Never edit a released script: append a new version.

Times are epoch seconds (REAL, UTC). Booleans are INTEGER 0/1.
"""

from __future__ import annotations

MIGRATIONS: dict[int, str] = {
    1: """
-- A rollout file as last seen by the reader; offset is the watermark in bytes.
CREATE TABLE files (
    path        TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    dev         INTEGER NOT NULL,
    inode       INTEGER NOT NULL,
    size        INTEGER NOT NULL,
    mtime       REAL NOT NULL,
    offset      INTEGER NOT NULL,
    head_hash   TEXT NOT NULL,
    thread_id   TEXT,
    error       TEXT
);
CREATE INDEX files_thread ON files(thread_id);

-- A session. stats is an opaque JSON string owned by the indexer.
CREATE TABLE threads (
    id            TEXT PRIMARY KEY,
    path          TEXT NOT NULL,
    project       TEXT NOT NULL,
    cwd           TEXT NOT NULL,
    source        TEXT NOT NULL,
    originator    TEXT NOT NULL,
    cli_version   TEXT NOT NULL,
    model         TEXT NOT NULL,
    title         TEXT NOT NULL DEFAULT '',
    created_at    REAL NOT NULL,
    updated_at    REAL NOT NULL,
    watermark     INTEGER NOT NULL,
    user_messages INTEGER NOT NULL,
    skipped_lines INTEGER NOT NULL,
    eligible      INTEGER NOT NULL,
    reason        TEXT,
    stats         TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX threads_project ON threads(project);
CREATE INDEX threads_updated ON threads(updated_at);

-- Units of work: extract/<thread id>, consolidate/<project key>.
CREATE TABLE jobs (
    kind              TEXT NOT NULL,
    key               TEXT NOT NULL,
    status            TEXT NOT NULL DEFAULT 'pending'
                      CHECK (status IN ('pending', 'running', 'done', 'error', 'dead')),
    owner             TEXT,
    token             INTEGER NOT NULL DEFAULT 0,
    lease_until       REAL,
    attempts          INTEGER NOT NULL DEFAULT 0,
    retry_at          REAL,
    last_error        TEXT,
    input_watermark   INTEGER NOT NULL DEFAULT 0,
    success_watermark INTEGER NOT NULL DEFAULT 0,
    priority          REAL NOT NULL DEFAULT 0,
    created_at        REAL NOT NULL,
    updated_at        REAL NOT NULL,
    started_at        REAL,
    PRIMARY KEY (kind, key)
);
CREATE INDEX jobs_claim ON jobs(kind, status, priority DESC);

-- One trace memory per thread; path is relative to the project's memory root.
CREATE TABLE memories (
    thread_id        TEXT PRIMARY KEY REFERENCES threads(id) ON DELETE CASCADE,
    project          TEXT NOT NULL,
    path             TEXT,
    trace_memory     TEXT NOT NULL,
    summary          TEXT NOT NULL,
    source_watermark INTEGER NOT NULL,
    generated_at     REAL NOT NULL,
    extractor        TEXT NOT NULL,
    tokens_in        INTEGER NOT NULL DEFAULT 0,
    tokens_out       INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX memories_project ON memories(project);

-- Named leases; token is monotonic and never reset; owner NULL = released.
CREATE TABLE leases (
    name         TEXT PRIMARY KEY,
    owner        TEXT,
    token        INTEGER NOT NULL,
    expires_at   REAL NOT NULL,
    heartbeat_at REAL
);

-- One row per model request.
CREATE TABLE usage (
    id            INTEGER PRIMARY KEY,
    at            REAL NOT NULL,
    phase         TEXT NOT NULL,
    model         TEXT NOT NULL,
    input_tokens  INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL
);
CREATE INDEX usage_at ON usage(at);

-- Per-project memory freshness that drives consolidation (SPEC §7).
CREATE TABLE projects (
    project              TEXT PRIMARY KEY,
    memory_root          TEXT,
    memory_seq           INTEGER NOT NULL DEFAULT 0,
    last_memory_at       REAL,
    consolidated_seq     INTEGER NOT NULL DEFAULT 0,
    last_consolidated_at REAL,
    last_attempt_at      REAL,
    failures             INTEGER NOT NULL DEFAULT 0,
    last_error           TEXT
);

-- Daemon processes, for `memd status`.
CREATE TABLE daemons (
    owner        TEXT PRIMARY KEY,
    pid          INTEGER NOT NULL,
    host         TEXT NOT NULL,
    started_at   REAL NOT NULL,
    heartbeat_at REAL NOT NULL,
    stopped_at   REAL
);

-- Small settings the daemon persists (extractor choice, model-work pause reason, ...).
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
""",
    2: """
-- One name per concept (SPEC §17): the consumed byte offset is the watermark, and the number a
-- claim or lease bumps is its fencing token.
ALTER TABLE files RENAME COLUMN offset TO watermark;
ALTER TABLE jobs RENAME COLUMN token TO fencing_token;
ALTER TABLE leases RENAME COLUMN token TO fencing_token;
""",
    3: """
-- The read path (SPEC §18): the full-text index over memory files (memd.store.search) ...
CREATE TABLE search_files (
    project   TEXT NOT NULL,
    path      TEXT NOT NULL,
    mtime_ns  INTEGER NOT NULL,
    size      INTEGER NOT NULL,
    PRIMARY KEY (project, path)
);
CREATE VIRTUAL TABLE search_chunks USING fts5(
    heading, body,
    project UNINDEXED, path UNINDEXED, kind UNINDEXED, line_start UNINDEXED, line_end UNINDEXED,
    entry UNINDEXED, session_ids UNINDEXED, date_s UNINDEXED,
    tokenize = 'porter unicode61'
);
-- ... and the memory-use ledger: one row per use of a memory piece seen in a later transcript.
CREATE TABLE memory_use (
    project   TEXT NOT NULL,
    path      TEXT NOT NULL,
    entry     TEXT NOT NULL DEFAULT '',
    thread_id TEXT NOT NULL,
    event_id  TEXT NOT NULL,
    used_at   REAL NOT NULL,
    PRIMARY KEY (thread_id, event_id, project, path, entry)
);
CREATE INDEX memory_use_project ON memory_use(project, path, entry);
""",
    4: """
-- Claude Code transcripts are a second source (SPEC §3.4): every thread names the agent that wrote
-- it. Files an older memd could not identify (a Claude Code transcript has no session_meta line)
-- are forgotten, so the next scan reads their heads again.
ALTER TABLE threads ADD COLUMN agent TEXT NOT NULL DEFAULT 'codex' CHECK (agent IN ('codex', 'claude'));
DELETE FROM files WHERE thread_id IS NULL AND error = 'no_session_meta';
""",
    5: """
-- Whether a memory file's version (mtime, size) holds nothing to redact: `memd context` skips loading
-- the redactor for files the daemon already checked (SPEC §14, §15).
ALTER TABLE search_files ADD COLUMN clean INTEGER;
""",
    6: """
-- A daemon's process identity (boot id and start time), so that a pid reused by another process
-- after a kill -9 is not taken for the daemon (issue 13: stale claims are taken back at once).
ALTER TABLE daemons ADD COLUMN proc_start TEXT;
""",
    7: """
-- Claims are indexed queries over waiting jobs only (SPEC §15): a partial index in claim order
-- for each waiting status, and one by status (running jobs, counts, retries), so a claim never
-- reads a finished job however long the history.
CREATE INDEX IF NOT EXISTS jobs_pending ON jobs(kind, priority DESC, created_at, key) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS jobs_error ON jobs(kind, priority DESC, created_at, key) WHERE status = 'error';
DROP INDEX IF EXISTS jobs_claim;
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, kind);
-- Projects waiting for consolidation, without reading the consolidated ones.
CREATE INDEX IF NOT EXISTS projects_due ON projects(last_memory_at) WHERE memory_seq > consolidated_seq;
-- memd status pages through threads by (updated_at, id) and finds recent projects in an index.
DROP INDEX IF EXISTS threads_updated;
CREATE INDEX IF NOT EXISTS threads_updated ON threads(updated_at, id);
DROP INDEX IF EXISTS threads_project;
CREATE INDEX IF NOT EXISTS threads_project ON threads(project, updated_at);
""",
    8: """
-- Event-driven planning (SPEC §15): a pass looks only at threads whose rollout changed since they
-- were last planned. plan_pending counts the changes the indexer recorded (a new, grown, replaced
-- or moved file); the scheduler sets it back to 0 only if it is still the count it read before
-- deciding (compare-and-clear: a change during the pass is planned by the next). The partial
-- index gives the changed threads by last activity: ready (past the idle gate), waiting, or too old.
-- Every thread of an older database is looked at once.
ALTER TABLE threads ADD COLUMN plan_pending INTEGER NOT NULL DEFAULT 1;
CREATE INDEX IF NOT EXISTS threads_plan ON threads(updated_at) WHERE plan_pending > 0;
""",
}

#: The schema version this code writes and understands.
LATEST_VERSION: int = max(MIGRATIONS)
