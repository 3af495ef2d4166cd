"""Dead peers: take back what a daemon killed on this host still holds (SPEC §5, §13).

Every daemon registers itself (owner, host, pid and the process's start identity) and refreshes
the registration on each heartbeat. A daemon that died without stopping (``kill -9``, a crash, an
OOM kill) leaves its in-flight extract jobs ``running`` and its project leases held until they
expire. :class:`PeerReaper` looks for such daemons on this host — their pid is gone, or now belongs
to a different process (its start identity differs) — and takes their claims back at once, so a
restart after ``kill -9`` resumes the in-flight sessions immediately. Daemons on other hosts are
never judged by their pid; their claims expire with their leases.
"""

from __future__ import annotations

import asyncio
import math
import socket

import structlog

from memd.clock import Clock
from memd.store.daemons import daemon_alive, same_process
from memd.store.records import DaemonRecord
from memd.store.store import Store

log = structlog.get_logger(__name__)

#: Dead peers are looked for at most this often after the first look (a held lease asks on each
#: poll), seconds.
TAKE_BACK_MIN_INTERVAL_S = 5.0


class PeerReaper:
    """Takes back the jobs and leases of dead daemons on this host.

    Args:
        store: the state store (its ``daemons`` repository registers every daemon).
        clock: the injected clock.
        owner: this daemon's owner string; its own registration is never judged.
        min_interval_s: the shortest time between two looks, seconds (the first look always runs).
    """

    def __init__(
        self, store: Store, clock: Clock, *, owner: str, min_interval_s: float = TAKE_BACK_MIN_INTERVAL_S
    ) -> None:
        self._store = store
        self._clock = clock
        self._owner = owner
        self._min_interval_s = min_interval_s
        self._last_look = -math.inf

    async def take_back(self) -> int:
        """Take back the claims and leases of this host's daemons that died without stopping.

        Called at start-up, on every heartbeat and when a held lease blocks consolidation; looks
        at most once per ``min_interval_s``. Logs ``daemon_taken_back`` (warning) per dead daemon.

        Returns:
            The number of dead daemons whose claims were taken back (0 when it did not look).

        Raises:
            StoreError: the database failed.
        """
        now = self._clock.now()
        if now - self._last_look < self._min_interval_s:
            return 0
        self._last_look = now
        registered = await self._store.daemons.list_all()
        dead = await asyncio.to_thread(self._dead_on_this_host, registered)  # reads /proc
        if not dead:
            return 0
        jobs, leases = await self._store.daemons.take_back([d.owner for d in dead])
        for d in dead:
            log.warning("daemon_taken_back", dead_owner=d.owner, pid=d.pid, jobs=jobs, leases=leases)
        return len(dead)

    def _dead_on_this_host(self, registered: list[DaemonRecord]) -> list[DaemonRecord]:
        host = socket.gethostname()
        return [
            d
            for d in registered
            if d.owner != self._owner
            and d.stopped_at is None
            and d.host == host
            and not same_process(d.pid, d.proc_start)
        ]

    async def other_alive(self) -> bool:
        """Whether another registered daemon is running on this state (it may be writing).

        Raises:
            StoreError: the database failed.
        """
        now = self._clock.now()
        registered = await self._store.daemons.list_all()
        return await asyncio.to_thread(
            lambda: any(d.owner != self._owner and daemon_alive(d, now) for d in registered)  # reads /proc
        )
