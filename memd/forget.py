"""``memd forget THREAD``: remove one session from the memory for good (SPEC §14).

Under the project's consolidation lease (so that a running consolidation cannot swap back a
``MEMORY.md`` that still holds the session), :func:`forget` writes the tombstone
(``<memory_dir>/FORGOTTEN``, which survives a rebuilt or recovered database), makes the thread
ineligible and ends its extract job (a running claim is fenced out), deletes the memory row and the
trace file, takes the session's entries out of ``MEMORY.md`` and its line out of
``memory_summary.md``, refreshes the search index and re-roots the memory folder's git history.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from memd.clock import SystemClock
from memd.config import Settings
from memd.store.records import MemoryRecord
from memd.store.store import Store, make_owner

#: How long ``memd forget`` waits by default for a consolidation holding the project's lease, seconds.
FORGET_WAIT_S = 30.0
_POLL_S = 0.5


class ForgetStatus(StrEnum):
    """How a ``memd forget`` ended."""

    FORGOTTEN = "forgotten"  # the memory was removed everywhere
    NOT_EXTRACTED = "not_extracted"  # no memory yet: tombstoned, its extraction ended
    UNKNOWN = "unknown"  # no such session, or already forgotten
    LEASE_HELD = "lease_held"  # a consolidation of the project kept its lease: nothing changed


@dataclass(frozen=True, slots=True)
class ForgetOutcome:
    """What :func:`forget` did.

    Attributes:
        status: how it ended.
        project: the session's project key (``""`` when it had no memory).
        rerooted: whether the memory folder's git history was re-rooted.
        holder: the owner of the lease that blocked it (``LEASE_HELD``), ``""`` when unknown.
    """

    status: ForgetStatus
    project: str = ""
    rerooted: bool = False
    holder: str = ""


async def forget(settings: Settings, thread_id: str, *, wait_s: float = FORGET_WAIT_S) -> ForgetOutcome:
    """Remove the session ``thread_id`` from the memory for good.

    Args:
        settings: where the state database and the memory folders are.
        thread_id: the session.
        wait_s: how long to wait for a consolidation holding the project's lease, seconds.

    Raises:
        StoreError: the database failed.
        MemoryWriteError: a memory file cannot be written (the tombstone is written first).
    """
    store = await Store.open(settings.db_path, clock=SystemClock())
    try:
        memory = await store.memories.get(thread_id)
        if memory is None:
            return await _forget_unextracted(store, settings, thread_id)
        lease_name, owner = f"consolidate:{memory.project}", make_owner()
        token = await _take_lease(store, lease_name, owner, settings.consolidation.lease_s, wait_s)
        if token is None:
            holder = await store.leases.get(lease_name)
            return ForgetOutcome(ForgetStatus.LEASE_HELD, memory.project, holder=(holder.owner or "") if holder else "")
        try:
            from memd.memory import files as memory_files

            root = memory_files.project_root(settings.memory_dir, memory.project)
            rerooted = await _forget_session(store, settings, memory, root)
        finally:
            await store.leases.release(lease_name, owner, token)
    finally:
        await store.close()
    return ForgetOutcome(ForgetStatus.FORGOTTEN, memory.project, rerooted=rerooted)


async def _forget_unextracted(store: Store, settings: Settings, thread_id: str) -> ForgetOutcome:
    """A session with no memory yet (its first extraction may be queued or running): the
    tombstone and the thread made ineligible, its extract job ended; no file to edit."""
    from memd.memory import files as memory_files

    thread = await store.threads.get(thread_id)
    if thread is None or thread_id in memory_files.read_tombstones(settings.memory_dir):
        return ForgetOutcome(ForgetStatus.UNKNOWN)
    memory_files.add_tombstone(settings.memory_dir, thread_id)
    await store.threads.mark_forgotten(thread_id)
    return ForgetOutcome(ForgetStatus.NOT_EXTRACTED, thread.project)


async def _take_lease(store: Store, name: str, owner: str, ttl_s: float, wait_s: float) -> int | None:
    """Take the lease ``name``, trying every half second for up to ``wait_s`` seconds; a holder that
    is a daemon of this host killed without stopping is taken back at once (as the daemon does).

    Returns:
        The fencing token, or ``None`` when another holder kept it.
    """
    from memd.schedule.peers import PeerReaper

    reaper = PeerReaper(store, SystemClock(), owner=owner)
    deadline = time.monotonic() + max(0.0, wait_s)
    while True:
        token = await store.leases.acquire(name, owner, ttl_s)
        if token is None and await reaper.take_back():
            token = await store.leases.acquire(name, owner, ttl_s)
        if token is not None or time.monotonic() >= deadline:
            return token
        await asyncio.sleep(_POLL_S)


async def _forget_session(store: Store, settings: Settings, memory: MemoryRecord, root: Path) -> bool:
    """Remove a session's memory (its project's consolidation lease held): the tombstone, the thread
    made ineligible and its extract job ended, the row, the trace file, its entries in ``MEMORY.md``,
    its line in ``memory_summary.md``, its search chunks and the git history.

    Returns:
        Whether the memory root's git history was re-rooted.
    """
    from memd.consolidate.builtin import forget_thread
    from memd.consolidate.gitlog import drop_history
    from memd.consolidate.runner import render_memory_summary
    from memd.memory import files as memory_files
    from memd.store.search import SearchIndex

    # The tombstone first: whatever fails later, the session is never extracted again, even by a
    # rebuilt or recovered database (it lives with the memories, not in the database).
    memory_files.add_tombstone(settings.memory_dir, memory.thread_id)
    await store.threads.mark_forgotten(memory.thread_id)  # its extract job ends (fenced out if running)
    await store.memories.delete(memory.thread_id)
    memory_files.remove_trace(root, memory.thread_id)
    forget_thread(root, memory.thread_id)  # MEMORY.md is incremental: the session leaves it too
    if root.is_dir():  # the routing map `memd context` injects, from the rows left
        rows = [m for m in await store.memories.list_for_project(memory.project) if m.path]
        kept = rows[: settings.consolidation.max_traces_per_project]
        memory_files.write_file_atomic(root, "memory_summary.md", render_memory_summary(memory.project, kept))
    index = SearchIndex.open(settings.db_path)
    if index is not None:
        try:
            index.refresh(memory.project, root, full=True)  # its chunks leave the search index
        finally:
            index.close()
    return drop_history(root)
