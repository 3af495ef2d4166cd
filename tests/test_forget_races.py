"""``memd forget`` against work in flight (SPEC §10, §7): a queued or running extraction of the
forgotten session never brings it back, ``memory_summary.md`` (what ``memd context`` injects) loses
it at once, and a consolidation holding the project's lease makes forget wait, then give up, having
changed nothing."""

from __future__ import annotations

import re
import sqlite3
import subprocess
from pathlib import Path

import pytest

from tests.builders import append_turn, run_memd, simple_turns, thread_id, write_rollout

KEPT, FORGOTTEN = "kept-kiwi-marker", "forgotten-fig-marker"


def _once(home: Path, sessions: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    done = run_memd(home, "once", "--sessions", str(sessions), "--min-idle", "0", "--max-age-days", "0", *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _memory_files(home: Path) -> dict[str, str]:
    """Every memory file's text (``.git`` excluded), by path relative to ``memory_dir``."""
    memory_dir = home / "data" / "memd" / "projects"
    return {
        str(p.relative_to(memory_dir)): p.read_text("utf-8", "replace")
        for p in memory_dir.rglob("*")
        if p.is_file() and ".git" not in p.parts
    }


def _two_sessions(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """home, sessions, project, and the rollout of the session to forget; both extracted and consolidated."""
    home, sessions, project = tmp_path / "home", tmp_path / "sessions", tmp_path / "proj"
    project.mkdir()
    write_rollout(sessions, thread_id(1), project, simple_turns(KEPT))
    forgotten = write_rollout(sessions, thread_id(2), project, simple_turns(FORGOTTEN))
    _once(home, sessions)
    assert any(FORGOTTEN in text for text in _memory_files(home).values())
    return home, sessions, project, forgotten


@pytest.mark.timeout(300)
def test_a_queued_extraction_of_a_forgotten_session_never_runs(tmp_path: Path) -> None:
    home, sessions, project, rollout = _two_sessions(tmp_path)
    append_turn(rollout, f"one more request ({FORGOTTEN})")
    queued = _once(home, sessions, "--dry-run")  # plans: the grown session's job is queued
    assert re.search(r"\b1 threads? would be extracted", queued.stdout), queued.stdout

    forget = run_memd(home, "forget", thread_id(2))
    assert forget.returncode == 0, forget.stderr[-2000:]
    # memd context injects memory_summary.md and MEMORY.md: neither holds the session any more.
    context = run_memd(home, "context", "--cwd", str(project))
    assert context.returncode == 0, context.stderr[-2000:]
    assert FORGOTTEN not in context.stdout and KEPT in context.stdout

    after = _once(home, sessions)
    assert "0 extracted" in after.stdout, after.stdout
    assert [name for name, text in _memory_files(home).items() if FORGOTTEN in text] == []
    conn = sqlite3.connect(home / "state" / "memd" / "memd.sqlite3")
    try:
        assert conn.execute("SELECT status FROM jobs WHERE key = ?", (thread_id(2),)).fetchall() == [("dead",)]
        assert conn.execute("SELECT COUNT(*) FROM memories WHERE thread_id = ?", (thread_id(2),)).fetchone() == (0,)
    finally:
        conn.close()


async def _hold_lease(
    db_path: Path, project: str, owner: str, *, release_token: int | None = None, dead_pid: int | None = None
) -> int | None:
    """Take (or, with ``release_token``, release) ``consolidate:<project>`` as ``owner`` (another daemon;
    with ``dead_pid``, one of this host registered under that pid, which is no longer running)."""
    import socket

    from memd.clock import SystemClock
    from memd.store.store import Store

    store = await Store.open(db_path, clock=SystemClock())
    try:
        if dead_pid is not None:
            await store.daemons.register(owner, dead_pid, socket.gethostname())
        if release_token is not None:
            await store.leases.release(f"consolidate:{project}", owner, release_token)
            return None
        return await store.leases.acquire(f"consolidate:{project}", owner, 600)
    finally:
        await store.close()


@pytest.mark.timeout(300)
def test_forget_waits_for_a_consolidation_holding_the_lease_and_changes_nothing_without_it(tmp_path: Path) -> None:
    import asyncio

    home, sessions, project, _ = _two_sessions(tmp_path)
    db_path = home / "state" / "memd" / "memd.sqlite3"
    conn = sqlite3.connect(db_path)
    try:
        [(key,)] = conn.execute("SELECT DISTINCT project FROM memories").fetchall()
    finally:
        conn.close()
    before = _memory_files(home)
    token = asyncio.run(_hold_lease(db_path, key, "elsewhere:1:abc"))
    assert token is not None

    refused = run_memd(home, "forget", thread_id(2), "--wait", "0")
    assert refused.returncode == 1
    assert "holds its lease" in refused.stderr and "nothing was changed" in refused.stderr
    assert _memory_files(home) == before  # no tombstone, trace, MEMORY.md or summary touched
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("SELECT COUNT(*) FROM memories WHERE thread_id = ?", (thread_id(2),)).fetchone() == (1,)
    finally:
        conn.close()

    asyncio.run(_hold_lease(db_path, key, "elsewhere:1:abc", release_token=token))
    done = run_memd(home, "forget", thread_id(2), "--wait", "0")
    assert done.returncode == 0, done.stderr[-2000:]
    assert [name for name, text in _memory_files(home).items() if FORGOTTEN in text] == []


@pytest.mark.timeout(300)
def test_forget_takes_back_the_lease_of_a_daemon_killed_mid_consolidation(tmp_path: Path) -> None:
    import asyncio

    home, sessions, project, _ = _two_sessions(tmp_path)
    db_path = home / "state" / "memd" / "memd.sqlite3"
    conn = sqlite3.connect(db_path)
    try:
        [(key,)] = conn.execute("SELECT DISTINCT project FROM memories").fetchall()
    finally:
        conn.close()
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert asyncio.run(_hold_lease(db_path, key, "host:1:killed", dead_pid=gone.pid)) is not None

    done = run_memd(home, "forget", thread_id(2), "--wait", "0")
    assert done.returncode == 0, done.stderr[-2000:]
    assert [name for name, text in _memory_files(home).items() if FORGOTTEN in text] == []


@pytest.mark.timeout(300)
def test_forgetting_a_session_before_its_first_extraction_keeps_it_out(tmp_path: Path) -> None:
    home, sessions, project = tmp_path / "home", tmp_path / "sessions", tmp_path / "proj"
    project.mkdir()
    write_rollout(sessions, thread_id(5), project, simple_turns(FORGOTTEN))
    queued = _once(home, sessions, "--dry-run")
    assert re.search(r"\b1 threads? would be extracted", queued.stdout), queued.stdout

    forget = run_memd(home, "forget", thread_id(5))
    assert forget.returncode == 0, forget.stderr[-2000:]
    assert "had no memory yet" in forget.stdout
    assert "0 extracted" in _once(home, sessions).stdout
    assert [name for name, text in _memory_files(home).items() if FORGOTTEN in text] == []
    again = run_memd(home, "forget", thread_id(5))
    assert again.returncode == 1 and "no memory for thread" in again.stderr
