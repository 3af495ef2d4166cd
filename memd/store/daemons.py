"""The daemons repository: which daemon processes use the state (table ``daemons``), for
``memd status`` and for telling a live peer from a dead one.

A pid alone is not an identity: after ``kill -9`` the kernel may give the pid to another process.
A daemon registers its process identity, the boot id (``/proc/sys/kernel/random/boot_id``) and its
start time in clock ticks since boot (field 22 of ``/proc/<pid>/stat``, proc(5)); together they
never repeat (:func:`process_start_id`, :func:`same_process`)."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from pathlib import Path

from memd.store.db import Repository
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


_PROC = Path("/proc")


def _boot_id(proc: Path) -> str:
    try:
        return (proc / "sys" / "kernel" / "random" / "boot_id").read_text().strip()
    except OSError:
        return ""


def process_start_id(pid: int, *, proc: Path = _PROC) -> str | None:
    """The identity ``<boot id>:<start ticks>`` of process ``pid`` on this host.

    Args:
        pid: the process id.
        proc: the procfs mount (tests pass a fake tree).

    Returns:
        The identity, or ``None`` when the process does not exist or ``/proc`` cannot tell
        (another OS, a hidden pid).
    """
    if pid <= 0:
        return None
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses; fields after the last ")".
    fields = stat[stat.rfind(")") + 2 :].split()
    if len(fields) < 20 or not fields[19].isdigit():
        return None
    return f"{_boot_id(proc)}:{fields[19]}"


def same_process(pid: int, start_id: str | None, *, proc: Path = _PROC) -> bool:
    """Whether ``pid`` still runs the process that was registered with ``start_id``.

    Args:
        pid: the registered pid.
        start_id: the :func:`process_start_id` recorded at registration; ``None`` (a row written
            before start ids were kept, or a host without ``/proc``) checks the pid only.

    Returns:
        ``False`` when the pid is gone or now belongs to a different process.
    """
    if not pid_alive(pid):
        return False
    if not start_id:
        return True
    now = process_start_id(pid, proc=proc)
    return now is None or now == start_id


def daemon_alive(record: DaemonRecord, now_s: float, *, host: str | None = None) -> bool:
    """Return whether a registered daemon is running.

    Running: not unregistered, a heartbeat within :data:`DAEMON_STALE_S` of ``now_s``, and — when
    it ran on this host (``host``, default :func:`socket.gethostname`) — its process still exists.
    A daemon killed with ``kill -9`` never unregisters; the process check tells at once.
    """
    if record.stopped_at is not None or now_s - (record.heartbeat_at or 0) > DAEMON_STALE_S:
        return False
    if record.host == (host if host is not None else socket.gethostname()):
        return same_process(record.pid, record.proc_start)
    return True


#: Rows of daemons whose last heartbeat is older than this are pruned at the next start, seconds.
DAEMON_KEEP_S = 7 * 24 * 3600.0


class DaemonRepository(Repository):
    """Daemon registrations. See :class:`~memd.store.db.Repository`."""

    async def register(self, owner: str, pid: int, host: str, proc_start: str | None = None) -> None:
        """Record a daemon start (``started_at`` = ``heartbeat_at`` = now).

        Args:
            owner: the daemon's ``host:pid:random`` owner string.
            pid: its process id.
            host: its host name.
            proc_start: its process identity (boot id and start time), to tell it from a later
                process that reuses the pid.

        Rows whose last heartbeat is older than :data:`DAEMON_KEEP_S` are pruned.
        """
        now = self._clock.now()
        async with self._db.write("register_daemon") as tx:
            await tx.execute("DELETE FROM daemons WHERE heartbeat_at < ?", (now - DAEMON_KEEP_S,))
            await tx.execute(
                """
                INSERT INTO daemons (owner, pid, host, started_at, heartbeat_at, stopped_at, proc_start)
                VALUES (?, ?, ?, ?, ?, NULL, ?)
                ON CONFLICT(owner) DO UPDATE SET pid = excluded.pid, host = excluded.host,
                    started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at,
                    stopped_at = NULL, proc_start = excluded.proc_start
                """,
                (owner, pid, host, now, now, proc_start),
            )

    async def take_back(self, owners: Sequence[str]) -> tuple[int, int]:
        """Take back what dead daemons held: their running jobs' claims and their leases expire
        now (so the next claim or acquire takes them, fenced as after any expiry), and the
        daemons are marked stopped.

        Args:
            owners: owner strings of daemons known to be dead (the caller checked their process).

        Returns:
            ``(jobs, leases)``: how many claims and held leases were expired.
        """
        if not owners:
            return 0, 0
        now = self._clock.now()
        marks = ", ".join("?" for _ in owners)
        async with self._db.write("take_back_dead_daemons") as tx:
            jobs = await tx.rows(
                f"UPDATE jobs SET lease_until = ? WHERE status = 'running' AND owner IN ({marks})"
                " AND COALESCE(lease_until, 0) > ? RETURNING 1",
                (now, *owners, now),
            )
            leases = await tx.rows(
                f"UPDATE leases SET expires_at = ? WHERE owner IN ({marks}) AND expires_at > ? RETURNING 1",
                (now, *owners, now),
            )
            await tx.execute(
                f"UPDATE daemons SET stopped_at = ? WHERE owner IN ({marks}) AND stopped_at IS NULL",
                (now, *owners),
            )
        return len(jobs), len(leases)

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
