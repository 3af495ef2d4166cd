"""The daemons repository: which daemon processes use the state (table ``daemons``), for
``memd status`` and for telling a live peer from a dead one."""

from __future__ import annotations

import os
import socket

from memd.clock import Clock
from memd.store.db import Database
from memd.store.records import DaemonRecord

#: A daemon whose heartbeat is older than this is shown as not running (seconds). The daemon
#: beats every 30 s.
DAEMON_STALE_S = 120.0


def pid_alive(pid: int) -> bool:
    """Return whether a process ``pid`` exists on this host (signal 0; a zombie counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def daemon_alive(record: DaemonRecord, now_s: float, *, host: str | None = None) -> bool:
    """Return whether a registered daemon is running.

    Running: not unregistered, a heartbeat within :data:`DAEMON_STALE_S` of ``now_s``, and — when
    it ran on this host (``host``, default :func:`socket.gethostname`) — its process still exists.
    A daemon killed with ``kill -9`` never unregisters; the process check tells at once.
    """
    if record.stopped_at is not None or now_s - (record.heartbeat_at or 0) > DAEMON_STALE_S:
        return False
    if record.host == (host if host is not None else socket.gethostname()):
        return pid_alive(record.pid)
    return True


#: Rows of daemons whose last heartbeat is older than this are pruned at the next start, seconds.
DAEMON_KEEP_S = 7 * 24 * 3600.0


class DaemonRepository:
    """Daemon registrations. Built by :class:`~memd.store.store.Store`; see :class:`Database` for errors.

    Args:
        db: the database.
        clock: the time source for every timestamp written.
    """

    def __init__(self, db: Database, clock: Clock) -> None:
        self._db = db
        self._clock = clock

    async def register(self, owner: str, pid: int, host: str) -> None:
        """Record a daemon start (``started_at`` = ``heartbeat_at`` = now).

        Rows whose last heartbeat is older than :data:`DAEMON_KEEP_S` are pruned.
        """
        now = self._clock.now()
        async with self._db.write("register_daemon") as tx:
            await tx.execute("DELETE FROM daemons WHERE heartbeat_at < ?", (now - DAEMON_KEEP_S,))
            await tx.execute(
                """
                INSERT INTO daemons (owner, pid, host, started_at, heartbeat_at, stopped_at)
                VALUES (?, ?, ?, ?, ?, NULL)
                ON CONFLICT(owner) DO UPDATE SET pid = excluded.pid, host = excluded.host,
                    started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at,
                    stopped_at = NULL
                """,
                (owner, pid, host, now, now),
            )

    async def heartbeat(self, owner: str) -> bool:
        """Set the daemon's ``heartbeat_at`` to now. Returns whether it is registered."""
        now = self._clock.now()
        async with self._db.write("heartbeat_daemon") as tx:
            rows = await tx.rows("UPDATE daemons SET heartbeat_at = ? WHERE owner = ? RETURNING 1", (now, owner))
        return bool(rows)

    async def unregister(self, owner: str) -> bool:
        """Mark the daemon stopped (``stopped_at`` = now). Returns whether it was registered."""
        now = self._clock.now()
        async with self._db.write("unregister_daemon") as tx:
            rows = await tx.rows("UPDATE daemons SET stopped_at = ? WHERE owner = ? RETURNING 1", (now, owner))
        return bool(rows)

    async def list_all(self) -> list[DaemonRecord]:
        """Return the registered daemons, most recently started first."""
        async with self._db.read("list_daemons") as tx:
            rows = await tx.rows("SELECT * FROM daemons ORDER BY started_at DESC, owner")
        return [DaemonRecord.from_row(row) for row in rows]
