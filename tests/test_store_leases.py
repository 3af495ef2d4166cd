"""Leases and fencing tokens in the state store (SPEC §5): races across connections, processes."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import re
import socket
from pathlib import Path

from structlog.testing import capture_logs

from memd.clock import FakeClock, SystemClock
from memd.store.store import Store, make_owner

LEASE = "consolidate:/p"




def test_make_owner_is_host_pid_random() -> None:
    a, b = make_owner(), make_owner()
    assert a != b
    host, pid, rand = a.rsplit(":", 2)
    assert (host, pid) == (socket.gethostname(), str(os.getpid()))
    assert re.fullmatch(r"[0-9a-f]{8}", rand)


async def test_acquire_free_lease_and_refuse_a_held_one(store: Store, clock: FakeClock) -> None:
    assert await store.leases.acquire(LEASE, "A", 60) == 1
    assert await store.leases.acquire(LEASE, "B", 60) is None
    assert await store.leases.acquire(LEASE, "A", 60) is None  # re-acquire is not renewal
    lease = await store.leases.get(LEASE)
    assert lease is not None
    assert (lease.owner, lease.fencing_token, lease.expires_at, lease.heartbeat_at) == (
        "A", 1, clock.now() + 60, clock.now())
    assert await store.leases.acquire("consolidate:/other", "B", 60) == 1
    assert [le.name for le in await store.leases.list_all()] == ["consolidate:/other", LEASE]


async def test_renew_extends_and_stale_token_fails(store: Store, clock: FakeClock) -> None:
    token = await store.leases.acquire(LEASE, "A", 60)
    assert token == 1
    clock.advance(50)
    assert await store.leases.renew(LEASE, "A", token, 60) is True
    assert (await store.leases.get(LEASE)).expires_at == clock.now() + 60  # type: ignore[union-attr]
    assert await store.leases.renew(LEASE, "A", token - 1, 60) is False
    assert await store.leases.renew(LEASE, "B", token, 60) is False
    clock.advance(50)
    assert await store.leases.acquire(LEASE, "B", 60) is None  # renewal kept it


async def test_expired_lease_is_taken_over_and_old_owner_is_fenced(
    store: Store, store2: Store, clock: FakeClock
) -> None:
    await store.projects.ensure("/p", "/mem/p")
    old = await store.leases.acquire(LEASE, "A", 60)
    assert old == 1
    clock.advance(60)
    new = await store2.leases.acquire(LEASE, "B", 60)
    assert new == 2

    assert await store.leases.check(LEASE, "A", old) is False
    assert await store.leases.renew(LEASE, "A", old, 60) is False
    assert await store.leases.release(LEASE, "A", old) is False
    with capture_logs() as logs:
        assert await store.projects.mark_consolidated("/p", 0, LEASE, "A", old) is False
    assert [e["event"] for e in logs] == ["lease_fence_refused"]
    assert (await store.projects.get("/p")).last_consolidated_at is None  # type: ignore[union-attr]

    assert await store2.leases.check(LEASE, "B", new) is True
    assert await store2.projects.mark_consolidated("/p", 0, LEASE, "B", new) is True
    project = await store.projects.get("/p")
    assert project is not None and project.last_consolidated_at == clock.now()
    lease = await store.leases.get(LEASE)
    assert lease is not None and (lease.owner, lease.fencing_token) == ("B", 2)


async def test_expired_but_untaken_lease_can_still_be_renewed(
    store: Store, clock: FakeClock
) -> None:
    token = await store.leases.acquire(LEASE, "A", 60)
    assert token is not None
    clock.advance(120)
    assert await store.leases.check(LEASE, "A", token) is True
    assert await store.leases.renew(LEASE, "A", token, 60) is True
    assert await store.leases.acquire(LEASE, "B", 60) is None


async def test_release_keeps_the_row_and_tokens_stay_monotonic(
    store: Store, store2: Store, clock: FakeClock
) -> None:
    tokens = []
    for owner, s in [("A", store), ("B", store2), ("A", store), ("B", store2)]:
        token = await s.leases.acquire(LEASE, owner, 600)
        assert token is not None
        tokens.append(token)
        clock.advance(1)
        assert await s.leases.release(LEASE, owner, token) is True
        lease = await s.leases.get(LEASE)
        assert lease is not None
        assert (lease.owner, lease.fencing_token, lease.expires_at) == (None, token, clock.now())
        assert await s.leases.check(LEASE, owner, token) is False  # released: fenced off
        assert await s.leases.release(LEASE, owner, token) is False
        assert await s.leases.renew(LEASE, owner, token, 600) is False
    assert tokens == [1, 2, 3, 4]


async def test_two_connections_racing_exactly_one_wins(store: Store, store2: Store) -> None:
    for i in range(25):
        name = f"race:{i}"
        a, b = await asyncio.gather(
            store.leases.acquire(name, "A", 60), store2.leases.acquire(name, "B", 60)
        )
        assert sorted([a, b], key=lambda t: t is None) == [1, None], (i, a, b)
        winner = "A" if a else "B"
        lease = await store.leases.get(name)
        assert lease is not None and lease.owner == winner


# ---------------------------------------------------------------------- two processes

_ROUNDS = 40


def _race_worker(db_path: str, barrier, results) -> None:  # runs in a spawned process
    async def main() -> list[tuple[int, int]]:
        owner = make_owner()
        won = []
        async with await Store.open(Path(db_path), clock=SystemClock()) as s:
            for i in range(_ROUNDS):
                barrier.wait()
                token = await s.leases.acquire("race", owner, 300)
                barrier.wait()  # every process has tried before the winner releases
                if token is not None:
                    won.append((i, token))
                    assert await s.leases.release("race", owner, token)
        return won

    try:
        results.put((os.getpid(), asyncio.run(main())))
    except BaseException as exc:  # report instead of hanging the barrier
        barrier.abort()
        results.put((os.getpid(), repr(exc)))


async def test_two_processes_racing_for_one_lease(db_path: Path) -> None:
    async with await Store.open(db_path, clock=SystemClock()):
        pass  # create and migrate once, so the workers race on the lease only
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2, timeout=60)
    results = ctx.Queue()
    procs = [ctx.Process(target=_race_worker, args=(str(db_path), barrier, results))
             for _ in range(2)]
    for p in procs:
        p.start()
    try:
        outcomes = await asyncio.gather(*(asyncio.to_thread(results.get, timeout=100)
                                          for _ in procs))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    wins: list[tuple[int, int]] = []
    for _pid, won in outcomes:
        assert isinstance(won, list), won
        wins.extend(won)
    rounds = sorted(i for i, _ in wins)
    assert rounds == list(range(_ROUNDS))  # exactly one winner in every round
    assert sorted(t for _, t in wins) == list(range(1, _ROUNDS + 1))  # monotonic, never reused
    assert all(p.exitcode == 0 for p in procs)
