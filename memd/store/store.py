"""The state store: a thin facade over one repository per aggregate (SPEC §5, §17).

After procrastinate's layering: :class:`~memd.store.db.Database` is raw database access (one
aiosqlite connection, ``BEGIN IMMEDIATE`` transactions, SQLite errors as
:class:`~memd.errors.StoreError`); each repository holds one method per domain operation and
returns frozen records from :mod:`memd.store.records`; :class:`Store` opens the database and
hands out the repositories:

- ``store.threads`` — rollout files and threads (:class:`~memd.store.threads.ThreadRepository`);
- ``store.jobs`` — extract and consolidate jobs, claims, fenced commits;
- ``store.memories`` — trace memory rows;
- ``store.projects`` — per-project memory freshness (consolidation triggers);
- ``store.leases`` — named leases with fencing tokens;
- ``store.usage`` — model token usage;
- ``store.daemons`` — daemon registrations;
- ``store.meta`` — small persisted values.

Every operation is self-contained: no transaction is ever held across a caller's ``await``.
Times are epoch seconds (float, UTC) read from the injected :class:`~memd.clock.Clock`.
"""

from __future__ import annotations

import os
import secrets
import socket
import sqlite3
from pathlib import Path
from types import TracebackType
from typing import Self

import structlog

from memd.clock import Clock
from memd.store.daemons import DaemonRepository
from memd.store.db import Database, open_db, store_error, user_version
from memd.store.jobs import JobRepository
from memd.store.leases import LeaseRepository
from memd.store.memories import MemoryRepository
from memd.store.meta import MetaRepository
from memd.store.projects import ProjectRepository
from memd.store.records import StoreCounts
from memd.store.threads import ThreadRepository
from memd.store.usage import UsageRepository

log = structlog.get_logger(__name__)


def make_owner() -> str:
    """Return a fresh owner string ``host:pid:random`` (8 hex chars) for claims and leases."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class Store:
    """The SQLite state store. Create with :meth:`open`; close with :meth:`close` or ``async with``.

    One ``Store`` owns one connection; its repositories may be used from many tasks (the
    database's lock serialises them). Several ``Store`` objects — in one process or many — may
    share one file: SQLite's locks and the fencing tokens keep them consistent.

    Attributes:
        threads, jobs, memories, projects, leases, usage, daemons, meta: the repositories.
    """

    def __init__(self, db: Database, *, clock: Clock) -> None:
        """Wrap an open database. Use :meth:`open` instead."""
        self._db = db
        self.threads = ThreadRepository(db)
        self.jobs = JobRepository(db, clock)
        self.memories = MemoryRepository(db, clock)
        self.projects = ProjectRepository(db, clock)
        self.leases = LeaseRepository(db, clock)
        self.usage = UsageRepository(db, clock)
        self.daemons = DaemonRepository(db, clock)
        self.meta = MetaRepository(db)

    @classmethod
    async def open(cls, path: Path, *, clock: Clock, busy_timeout_s: float = 5.0) -> Store:
        """Open (creating and migrating if needed) the database file at ``path``.

        Creates the parent directory with mode 0700 and the file with mode 0600 when missing;
        sets WAL, ``synchronous=NORMAL``, ``foreign_keys=ON`` and the busy timeout; applies the
        migrations of :mod:`memd.store.schema` in one transaction.

        Args:
            path: the database file (e.g. ``state_dir/memd.sqlite3``).
            clock: the time source for every timestamp the store writes or compares.
            busy_timeout_s: how long an operation waits for another connection's lock, seconds.

        Raises:
            StoreError: unwritable path, not a database, written by a newer memd (schema
                version too high), or locked past the busy timeout.
        """
        path = Path(path)
        conn = await open_db(path, busy_timeout_s=busy_timeout_s)
        try:
            version = await user_version(conn)
        except sqlite3.Error as exc:
            await conn.close()
            raise store_error(exc, path=path, op="open", busy_timeout_s=busy_timeout_s) from exc
        log.debug("store_opened", path=str(path), schema_version=version)
        return cls(Database(conn, path=path, busy_timeout_s=busy_timeout_s), clock=clock)

    @property
    def path(self) -> Path:
        """The database file."""
        return self._db.path

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return self._db.closed

    async def close(self) -> None:
        """Close the connection (idempotent); an open aiosqlite connection hangs exit."""
        await self._db.close()

    async def __aenter__(self) -> Self:
        """Return the open store."""
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the store."""
        await self.close()

    async def counts(self) -> StoreCounts:
        """Return totals across the aggregates for ``memd status`` (one consistent snapshot)."""
        async with self._db.read("counts") as tx:
            row = await tx.one(
                """
                SELECT
                    (SELECT COUNT(*) FROM threads) AS threads,
                    (SELECT COUNT(*) FROM threads WHERE eligible) AS eligible,
                    (SELECT COUNT(*) FROM memories) AS memories,
                    (SELECT COUNT(*) FROM projects) AS projects,
                    (SELECT COUNT(*) FROM jobs WHERE status = 'pending') AS jobs_pending,
                    (SELECT COUNT(*) FROM jobs WHERE status = 'running') AS jobs_running,
                    (SELECT COUNT(*) FROM jobs WHERE status = 'done') AS jobs_done,
                    (SELECT COUNT(*) FROM jobs WHERE status = 'error') AS jobs_error,
                    (SELECT COUNT(*) FROM jobs WHERE status = 'dead') AS jobs_dead
                """,
            )
        assert row is not None
        return StoreCounts.from_row(row)
