"""Stale claims after a crash (issue 13): a daemon killed with ``kill -9`` on this host leaves running
jobs and held leases; the next daemon takes them back at once (pid gone, or the pid now belongs to
another process: its start time differs), and a held lease is logged once per holder."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from memd.bench.corpus import SMALL_SIZE_MIX, generate_corpus
from memd.store.daemons import process_start_id, same_process
from tests import faultkit as fk


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_process_identity_tells_a_reused_pid() -> None:
    me = process_start_id(os.getpid())
    assert me is not None and ":" in me
    assert same_process(os.getpid(), me)
    assert same_process(os.getpid(), None)  # unknown identity: the pid decides
    assert not same_process(os.getpid(), "another-boot:1")  # the pid now runs something else
    assert not same_process(_dead_pid(), None)
    assert process_start_id(_dead_pid()) is None


def test_process_identity_reads_the_start_time_after_an_odd_command_name(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    (proc / "42").mkdir(parents=True)
    (proc / "sys" / "kernel" / "random").mkdir(parents=True)
    (proc / "sys" / "kernel" / "random" / "boot_id").write_text("b00t\n")
    fields = ["S"] + ["0"] * 18 + ["123456"] + ["0"] * 30  # field 22 (starttime) is the 20th after ")"
    (proc / "42" / "stat").write_text("42 (memd (x) y) " + " ".join(fields) + "\n")
    assert process_start_id(42, proc=proc) == "b00t:123456"
    (proc / "42" / "stat").write_text("42 (short)")
    assert process_start_id(42, proc=proc) is None


def _plant_dead_daemon(home: fk.MemdHome, owner: str, pid: int, proc_start: str | None) -> None:
    """A daemon row as a killed daemon leaves it, with a running claim and a held lease."""
    now = time.time()
    conn = sqlite3.connect(home.db_path)
    with conn:
        conn.execute(
            "INSERT INTO daemons (owner, pid, host, started_at, heartbeat_at, stopped_at, proc_start)"
            " VALUES (?, ?, ?, ?, ?, NULL, ?)",
            (owner, pid, os.uname().nodename, now - 60, now - 5, proc_start),
        )
        conn.execute(
            "UPDATE jobs SET status = 'running', owner = ?, lease_until = ?, attempts = 1, started_at = ?"
            " WHERE kind = 'extract'",
            (owner, now + 900, now - 30),
        )
        conn.execute(
            "INSERT INTO leases (name, owner, fencing_token, expires_at, heartbeat_at)"
            " VALUES ('consolidate:/nowhere', ?, 7, ?, ?)",
            (owner, now + 600, now - 5),
        )
    conn.close()


@pytest.mark.parametrize("how", ["pid_gone", "pid_reused"])
def test_start_up_takes_back_what_a_dead_daemon_held(tmp_path: Path, how: str) -> None:
    home = fk.make_home(tmp_path)
    generate_corpus(home.sessions, n_files=3, size_mix=SMALL_SIZE_MIX, seed=3)
    assert fk.run(home, "scan").returncode == 0
    assert fk.run(home, "once", "--dry-run").returncode == 0  # queues the extract jobs, sends nothing
    owner = "deadhost:1:dead"
    if how == "pid_gone":
        _plant_dead_daemon(home, owner, _dead_pid(), None)
    else:  # our own pid, but registered with another start time: the pid was reused
        _plant_dead_daemon(home, owner, os.getpid(), "another-boot:1")
    running = fk.count(home, "SELECT COUNT(*) FROM jobs WHERE status = 'running' AND owner = ?", (owner,))
    assert running >= 1

    done = fk.run(home, "once")
    assert done.returncode == 0, done.stderr[-2000:]
    events = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    [taken] = [e for e in events if e["event"] == "daemon_taken_back"]
    assert (taken["dead_owner"], taken["jobs"], taken["leases"]) == (owner, running, 1)
    assert fk.count(home, "SELECT COUNT(*) FROM jobs WHERE owner = ? AND status = 'running'", (owner,)) == 0
    assert fk.count(home, "SELECT COUNT(*) FROM leases WHERE owner = ? AND expires_at > ?", (owner, time.time())) == 0
    assert fk.count(home, "SELECT COUNT(*) FROM daemons WHERE owner = ? AND stopped_at IS NOT NULL", (owner,)) == 1
    # The taken-back sessions were extracted by this run, not 15 minutes later.
    assert fk.count(home, "SELECT COUNT(*) FROM memories") >= running


def test_a_live_daemon_is_left_alone(tmp_path: Path) -> None:
    home = fk.make_home(tmp_path)
    generate_corpus(home.sessions, n_files=2, size_mix=SMALL_SIZE_MIX, seed=4)
    assert fk.run(home, "once", "--dry-run").returncode == 0
    owner = "livehost:me:alive"
    _plant_dead_daemon(home, owner, os.getpid(), process_start_id(os.getpid()))
    done = fk.run(home, "once")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "daemon_taken_back" not in done.stderr
    assert fk.count(home, "SELECT COUNT(*) FROM leases WHERE owner = ? AND expires_at > ?", (owner, time.time())) == 1


@pytest.mark.timeout(240)
def test_restart_after_kill9_resumes_in_flight_sessions_at_once(tmp_path: Path) -> None:
    # Production lease lengths (extract_lease_s 900 s, consolidation 600 s): without the take-back
    # the killed daemon's sessions would wait 15 minutes.
    home = fk.make_home(tmp_path, extract_concurrency=4, consolidation__delay_s=0)
    generate_corpus(home.sessions, n_files=12, size_mix=SMALL_SIZE_MIX, seed=11)
    slow = {"MEMD_TEST_EXTRACT_DELAY_S": "30"}
    first = fk.start(home, "first", env=slow)
    try:
        in_flight_sql = "SELECT COUNT(*) FROM jobs WHERE status = 'running' AND kind = 'extract'"
        assert fk.wait_for(lambda: home.db_path.exists() and fk.count(home, in_flight_sql) >= 4, 90, procs=[first])
    finally:
        fk.kill(first)  # SIGKILL: nothing is released
    in_flight = [r["key"] for r in fk.query(home, "SELECT key FROM jobs WHERE status = 'running' AND kind = 'extract'")]
    restarted_at = time.monotonic()
    second = fk.start(home, "second", env={"MEMD_TEST_EXTRACT_DELAY_S": "0"})
    try:
        marks = ", ".join("?" for _ in in_flight)
        done_sql = f"SELECT COUNT(*) FROM memories WHERE thread_id IN ({marks})"
        assert fk.wait_for(lambda: fk.count(home, done_sql, tuple(in_flight)) == len(in_flight), 120, procs=[second])
        resumed_s = time.monotonic() - restarted_at
        assert fk.stop(second) == 0
    finally:
        fk.kill(second)
    events = fk.events(home.log_path("second"))
    assert fk.named(events, "daemon_taken_back")
    reclaimed = {e["key"] for e in fk.named(events, "job_reclaimed")}
    assert set(in_flight) <= reclaimed
    print(f"kill -9 + restart: {len(in_flight)} in-flight sessions resumed and extracted in {resumed_s:.1f} s")


async def test_the_reaper_judges_only_this_hosts_dead_daemons_and_looks_at_most_every_interval(
    manual_store, manual_clock
) -> None:  # type: ignore[no-untyped-def]
    import socket

    from memd.schedule.peers import PeerReaper

    host = socket.gethostname()
    await manual_store.daemons.register("me", os.getpid(), host, process_start_id(os.getpid()))
    await manual_store.daemons.register("alive", os.getpid(), host, process_start_id(os.getpid()))
    await manual_store.daemons.register("dead", _dead_pid(), host, None)
    await manual_store.daemons.register("elsewhere", _dead_pid(), "another-host", None)
    reaper = PeerReaper(manual_store, manual_clock, owner="me", min_interval_s=5.0)
    assert await reaper.other_alive()  # "alive" runs (this very process)

    assert await reaper.take_back() == 1
    stopped = {d.owner for d in await manual_store.daemons.list_all() if d.stopped_at is not None}
    assert stopped == {"dead"}  # a pid on another host is never judged here

    await manual_store.daemons.register("dead-too", _dead_pid(), host, None)
    assert await reaper.take_back() == 0  # within the interval: it does not look
    manual_clock.advance(5.0)
    assert await reaper.take_back() == 1
