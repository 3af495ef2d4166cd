"""The SQLite connection of the state store: file creation, pragmas, migrations (SPEC §5).

One database file given by the caller. The connection is an :mod:`aiosqlite` connection with
``isolation_level=None`` (no implicit transactions: every read-modify-write opens
``BEGIN IMMEDIATE`` itself), WAL journal, ``synchronous=NORMAL``, ``foreign_keys=ON`` and a busy
timeout. Every :class:`sqlite3.Error` leaves this package as :class:`memd.errors.StoreError`.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite
import structlog

from memd.clock import Clock
from memd.errors import StoreError
from memd.store.schema import LATEST_VERSION, MIGRATIONS

log = structlog.get_logger(__name__)

_BUSY_CODES = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}


def is_locked(exc: BaseException) -> bool:
    """Return whether ``exc`` is SQLite's "database is locked/busy" (busy timeout exceeded)."""
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and code & 0xFF in _BUSY_CODES:
        return True
    return "locked" in str(exc) or "busy" in str(exc)


def store_error(exc: BaseException, *, path: Path, op: str, busy_timeout_s: float) -> StoreError:
    """Turn a :class:`sqlite3.Error` into a :class:`StoreError` and log one event.

    Args:
        exc: the SQLite error.
        path: the database file.
        op: the store operation that failed (e.g. ``claim_job``).
        busy_timeout_s: the busy timeout in force, quoted in the message.

    Returns:
        ``StoreError("database is locked ...")`` when another connection held the write lock
        past the busy timeout (event ``store_locked``), else ``StoreError("database error ...")``
        (event ``store_failed``). The caller raises it ``from exc``.
    """
    if is_locked(exc):
        log.warning("store_locked", path=str(path), op=op, busy_timeout_s=busy_timeout_s)
        return StoreError(
            f"database is locked: {path} stayed locked by another connection for longer than "
            f"the busy timeout ({busy_timeout_s:g} s) during {op}; nothing was written, "
            "retry later"
        )
    log.error("store_failed", path=str(path), op=op, error=str(exc))
    return StoreError(f"database error during {op} on {path}: {exc}")


def prepare_path(path: Path) -> None:
    """Create the database's parent directory (mode 0700) and the file (mode 0600) if missing.

    Existing directories and files keep their modes.

    Raises:
        StoreError: the directory or file cannot be created.
    """
    try:
        if not path.parent.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(path.parent, 0o700)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    except OSError as exc:
        raise StoreError(f"cannot create the database file {path}: {exc}") from exc
    os.close(fd)
    os.chmod(path, 0o600)


def split_statements(script: str) -> list[str]:
    """Split an SQL script into complete statements (uses :func:`sqlite3.complete_statement`).

    ``executescript`` cannot be used inside our own transaction: it commits first.
    """
    statements: list[str] = []
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    leftover = [ln for ln in buffer.splitlines() if ln.strip() and not ln.strip().startswith("--")]
    if leftover:
        raise ValueError(f"incomplete SQL statement at the end of a migration: {buffer!r}")
    return statements


async def connect(path: Path, *, busy_timeout_s: float) -> aiosqlite.Connection:
    """Open ``path`` and set the pragmas (WAL, ``synchronous=NORMAL``, busy timeout, FKs).

    Args:
        path: the database file (created by :func:`prepare_path` first).
        busy_timeout_s: how long a statement waits for another connection's lock, in seconds.

    Returns:
        An open connection with ``row_factory = sqlite3.Row``; the caller closes it.

    Raises:
        StoreError: the file is not a database, or stayed locked past the busy timeout.
    """
    conn = await aiosqlite.connect(str(path), timeout=busy_timeout_s, isolation_level=None)
    try:
        conn.row_factory = sqlite3.Row
        await conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        rows = list(await conn.execute_fetchall("PRAGMA journal_mode = WAL"))
        mode = rows[0][0] if rows else None
        if mode != "wal":
            log.warning("store_wal_unavailable", path=str(path), journal_mode=mode)
        await conn.execute("PRAGMA synchronous = NORMAL")
        await conn.execute("PRAGMA foreign_keys = ON")
    except sqlite3.Error as exc:
        await conn.close()
        raise store_error(exc, path=path, op="open", busy_timeout_s=busy_timeout_s) from exc
    except BaseException:
        await conn.close()
        raise
    return conn


async def user_version(conn: aiosqlite.Connection) -> int:
    """Return ``PRAGMA user_version`` (the schema version; 0 for a new file)."""
    rows = list(await conn.execute_fetchall("PRAGMA user_version"))
    return int(rows[0][0])


async def migrate(conn: aiosqlite.Connection, *, path: Path, busy_timeout_s: float) -> int:
    """Bring the schema to :data:`LATEST_VERSION` inside one ``BEGIN IMMEDIATE`` transaction.

    A database already at the latest version is left untouched (no write lock taken). Two
    processes opening a new file at once are safe: the version is re-read under the lock.

    Args:
        conn: an open connection (from :func:`connect`).
        path: the database file, for messages.
        busy_timeout_s: the busy timeout in force, for messages.

    Returns:
        The schema version after migration.

    Raises:
        StoreError: the file was written by a newer memd (its ``user_version`` is higher than
            this code knows), a migration failed (rolled back, nothing applied), or the
            database stayed locked.
    """
    try:
        current = await user_version(conn)
        _refuse_newer(current, path)
        if current == LATEST_VERSION:
            return current
        if current > 0:  # an existing database: keep a copy from before the migration (SPEC §5)
            from memd.store.backup import backup_database

            saved = await asyncio.to_thread(backup_database, path)
            log.info("store_backed_up", path=str(saved), reason="migration", from_version=current)
        await conn.execute("BEGIN IMMEDIATE")
        try:
            current = await user_version(conn)
            _refuse_newer(current, path)
            start = current
            for version in sorted(v for v in MIGRATIONS if v > current):
                for statement in split_statements(MIGRATIONS[version]):
                    await conn.execute(statement)
                current = version
            await conn.execute(f"PRAGMA user_version = {int(current)}")
            await conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                await conn.execute("ROLLBACK")
            raise
    except sqlite3.Error as exc:
        raise store_error(exc, path=path, op="migrate", busy_timeout_s=busy_timeout_s) from exc
    if current != start:
        log.info("store_migrated", path=str(path), from_version=start, to_version=current)
    return current


def _refuse_newer(version: int, path: Path) -> None:
    if version > LATEST_VERSION:
        raise StoreError(
            f"the database {path} has schema version {version}, newer than this memd knows "
            f"({LATEST_VERSION}); it was written by a newer memd — upgrade memd or point it "
            "at another state directory"
        )


async def open_db(path: Path, *, busy_timeout_s: float) -> aiosqlite.Connection:
    """Create if needed, connect, and migrate the database at ``path``.

    Returns:
        An open, migrated connection; the caller closes it.

    Raises:
        StoreError: see :func:`prepare_path`, :func:`connect` and :func:`migrate`.
    """
    prepare_path(path)
    conn = await connect(path, busy_timeout_s=busy_timeout_s)
    try:
        await migrate(conn, path=path, busy_timeout_s=busy_timeout_s)
    except BaseException:
        await conn.close()
        raise
    return conn


#: SQL parameters: a mapping for ``:name`` placeholders or a sequence for ``?`` placeholders.
Params = Mapping[str, Any] | Iterable[Any]


class Database:
    """Raw access to the state database: one aiosqlite connection, serialised by a lock.

    The repositories of :mod:`memd.store` run their statements through :meth:`write` (one
    ``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back on any error) and :meth:`read` (autocommit: each
    statement sees a consistent snapshot). No transaction is ever held across a caller's ``await``.

    Errors: every :class:`sqlite3.Error` is raised as :class:`~memd.errors.StoreError` (a database
    locked past the busy timeout gives ``"database is locked ..."``), with one log event. If the
    awaiting task is cancelled, the operation may or may not have committed; the cancellation
    completes once the statement in flight ends (at most the busy timeout) and the connection is
    always left clean.

    Args:
        conn: an open, migrated connection (from :func:`open_db`).
        path: the database file, for messages.
        busy_timeout_s: the busy timeout in force, seconds, for messages.
    """

    def __init__(self, conn: aiosqlite.Connection, *, path: Path, busy_timeout_s: float) -> None:
        self._conn: aiosqlite.Connection | None = conn
        self.path = path
        self.busy_timeout_s = busy_timeout_s
        self._lock = asyncio.Lock()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return self._conn is None

    async def close(self) -> None:
        """Close the connection (idempotent); an open aiosqlite connection hangs interpreter exit."""
        conn, self._conn = self._conn, None
        if conn is not None:
            async with self._lock:
                await conn.close()

    def _connection(self) -> aiosqlite.Connection:
        if self._conn is None:
            raise StoreError(f"the store {self.path} is closed")
        return self._conn

    async def _rollback_quietly(self, conn: aiosqlite.Connection) -> None:
        # Queued after whatever is still in flight on the connection's thread (FIFO), so it also
        # undoes a BEGIN whose await was cancelled. "no transaction is active" is fine.
        try:
            await conn.execute("ROLLBACK")
        except (sqlite3.Error, ValueError):
            pass

    def error(self, exc: BaseException, op: str) -> StoreError:
        """The :class:`StoreError` for an SQLite error during ``op`` (see :func:`store_error`)."""
        return store_error(exc, path=self.path, op=op, busy_timeout_s=self.busy_timeout_s)

    @asynccontextmanager
    async def write(self, op: str) -> AsyncIterator[Transaction]:
        """Run the body inside ``BEGIN IMMEDIATE`` ... ``COMMIT`` (rolled back on any error).

        Args:
            op: the domain operation, named in errors and log events (e.g. ``claim_job``).

        Raises:
            StoreError: an SQLite error, or the database stayed locked past the busy timeout.
        """
        async with self._lock:
            conn = self._connection()
            try:
                try:
                    await conn.execute("BEGIN IMMEDIATE")
                    yield Transaction(conn)
                    await conn.execute("COMMIT")
                except BaseException:
                    await self._rollback_quietly(conn)
                    raise
            except sqlite3.Error as exc:
                raise self.error(exc, op) from exc

    @asynccontextmanager
    async def read(self, op: str) -> AsyncIterator[Transaction]:
        """Run autocommit reads (each statement sees a consistent snapshot).

        Raises:
            StoreError: an SQLite error.
        """
        async with self._lock:
            conn = self._connection()
            try:
                yield Transaction(conn)
            except sqlite3.Error as exc:
                raise self.error(exc, op) from exc


class Transaction:
    """The statements a repository runs inside :meth:`Database.write` or :meth:`Database.read`.

    Rows come back as :class:`sqlite3.Row`; repositories turn them into frozen records with the
    row mappers of :mod:`memd.store.records` and never hand rows to their callers.
    """

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    async def execute(self, sql: str, params: Params = ()) -> None:
        """Run one statement, discarding any rows."""
        await self._conn.execute(sql, params)

    async def executemany(self, sql: str, rows: Iterable[Params]) -> None:
        """Run one statement once per parameter set."""
        await self._conn.executemany(sql, rows)

    async def rows(self, sql: str, params: Params = ()) -> list[sqlite3.Row]:
        """Run one statement and return all its rows."""
        return list(await self._conn.execute_fetchall(sql, params))

    async def one(self, sql: str, params: Params = ()) -> sqlite3.Row | None:
        """Run one statement and return its first row, or ``None``."""
        rows = await self.rows(sql, params)
        return rows[0] if rows else None

    async def scalar(self, sql: str, params: Params = ()) -> int:
        """Run a one-value query (``COUNT(*)``, ``SUM(...)``) and return it as an int (0 when NULL)."""
        row = await self.one(sql, params)
        return int(row[0] or 0) if row is not None else 0


class Repository:
    """Base of the repositories: one per aggregate, over the shared :class:`Database`.

    Built by :class:`~memd.store.store.Store`; every method raises what :class:`Database` raises
    (:class:`~memd.errors.StoreError` and its subclasses).

    Args:
        db: the database.
        clock: the time source for every timestamp written or compared.
    """

    def __init__(self, db: Database, clock: Clock) -> None:
        self._db = db
        self._clock = clock
