"""Acceptance tests of the main job, as a user runs it: ``memd once`` and ``memd run`` as
subprocesses on a copy of the real rollouts, with temporary XDG directories (issue 3)."""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from memd.memory.files import file_id
from tests.builders import memd_env, run_memd


def db(home: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(home / "state" / "memd" / "memd.sqlite3")
    conn.row_factory = sqlite3.Row
    return conn


def snapshot(tree: Path) -> dict[str, tuple[int, int]]:
    """path -> (inode, mtime_ns) of every file under ``tree`` except git internals."""
    out = {}
    for path in tree.rglob("*"):
        if path.is_file() and ".git" not in path.parts:
            st = path.stat()
            out[str(path.relative_to(tree))] = (st.st_ino, st.st_mtime_ns)
    return out


@pytest.mark.timeout(300)
def test_memd_once_end_to_end(codex_rollouts: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    sessions = tmp_path / "sessions"
    shutil.copytree(codex_rollouts, sessions)
    args = ("once", "--sessions", str(sessions), "--min-idle", "0", "--max-age-days", "0")

    first = run_memd(home, *args)
    assert first.returncode == 0, first.stderr[-3000:]
    conn = db(home)
    eligible = [r["id"] for r in conn.execute("SELECT id FROM threads WHERE eligible = 1")]
    assert len(eligible) >= 6
    memory_dir = home / "data" / "memd" / "projects"
    for thread_id in eligible:
        rows = conn.execute("SELECT * FROM memories WHERE thread_id = ?", (thread_id,)).fetchall()
        assert len(rows) == 1, thread_id
        files = list(memory_dir.glob(f"*/memory/trace_summaries/{file_id(thread_id)}_*.md"))
        if rows[0]["path"] is None:
            assert files == [] and rows[0]["trace_memory"] == ""
        else:
            assert len(files) == 1, thread_id
            assert files[0].read_text().split("\n\n", 1)[1].strip() == rows[0]["trace_memory"].strip()
            assert oct(files[0].stat().st_mode & 0o777) == "0o600"
    not_eligible = conn.execute("SELECT COUNT(*) FROM memories m JOIN threads t ON t.id = m.thread_id WHERE t.eligible = 0").fetchone()[0]
    assert not_eligible == 0
    projects_with_traces = {r["project"] for r in conn.execute("SELECT DISTINCT project FROM memories WHERE path IS NOT NULL")}
    assert projects_with_traces
    for project in projects_with_traces:
        root = Path(conn.execute("SELECT memory_root FROM projects WHERE project = ?", (project,)).fetchone()[0])
        assert (root / "MEMORY.md").is_file() and (root / "memory_summary.md").is_file()
        assert (root / "PROJECT").read_text().strip() == project
        assert oct(root.stat().st_mode & 0o777) == "0o700"
    generated = {r["thread_id"]: r["generated_at"] for r in conn.execute("SELECT thread_id, generated_at FROM memories")}
    consolidated = {r["project"]: r["last_consolidated_at"] for r in conn.execute("SELECT project, last_consolidated_at FROM projects")}
    conn.close()

    # A second run extracts nothing and rewrites nothing.
    before = snapshot(memory_dir)
    second = run_memd(home, *args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "0 extracted" in second.stdout
    assert snapshot(memory_dir) == before
    conn = db(home)
    assert {r["thread_id"]: r["generated_at"] for r in conn.execute("SELECT thread_id, generated_at FROM memories")} == generated
    conn.close()

    # Appending a user turn re-extracts only that thread and reconsolidates only its project.
    target = sessions / "aisessions-codex-pomodor-timer.jsonl"
    thread_id = "019a085e-04c1-7f81-a09e-9555f6a1fb40"
    with target.open("a") as handle:
        handle.write(json.dumps({"timestamp": "2025-10-21T21:00:00.000Z", "type": "event_msg",
                                 "payload": {"type": "user_message", "message": "Always run the tests with npm test before committing.", "kind": "plain"}}) + "\n")
    third = run_memd(home, *args)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "1 extracted" in third.stdout
    conn = db(home)
    after = {r["thread_id"]: r["generated_at"] for r in conn.execute("SELECT thread_id, generated_at FROM memories")}
    changed = {t for t in after if after[t] != generated.get(t)}
    assert changed == {thread_id}
    project = conn.execute("SELECT project FROM threads WHERE id = ?", (thread_id,)).fetchone()[0]
    reconsolidated = {r["project"] for r in conn.execute("SELECT project, last_consolidated_at FROM projects")
                      if r["last_consolidated_at"] != consolidated.get(r["project"])}
    assert reconsolidated == {project}
    trace = conn.execute("SELECT trace_memory FROM memories WHERE thread_id = ?", (thread_id,)).fetchone()[0]
    assert "npm test" in trace
    conn.close()


def _wait_for(predicate, timeout_s: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


@pytest.mark.timeout(120)
def test_memd_run_picks_up_new_rollout_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    home = tmp_path / "home"
    sessions = tmp_path / "sessions"
    sessions.mkdir(parents=True)
    home.mkdir(parents=True)
    env = memd_env(home)
    env.update(MEMD_CONSOLIDATION__DELAY_S="0", MEMD_CONSOLIDATION__MIN_INTERVAL_S="0")
    log_path = tmp_path / "memd.log"
    log_file = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "memd", "run", "--sessions", str(sessions), "--min-idle", "0", "--max-age-days", "0"],
        env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=home,
    )
    try:
        db_path = home / "state" / "memd" / "memd.sqlite3"
        assert _wait_for(db_path.exists, 30)
        time.sleep(1.0)  # let the watcher start
        thread_id = "019c0000-aaaa-7bbb-8ccc-ddddeeeeffff"
        day = sessions / "2026" / "11" / "21"
        day.mkdir(parents=True)
        lines = [
            {"timestamp": "2026-11-21T08:00:00Z", "type": "session_meta", "payload": {"id": thread_id, "timestamp": "2026-11-21T08:00:00Z", "cwd": str(tmp_path / "proj"), "originator": "codex_cli_rs", "cli_version": "0.77.0", "source": "cli"}},
            {"timestamp": "2026-11-21T08:00:01Z", "type": "event_msg", "payload": {"type": "user_message", "message": "Add a --verbose flag to the CLI and run the tests"}},
            {"timestamp": "2026-11-21T08:00:02Z", "type": "response_item", "payload": {"type": "function_call", "name": "shell", "call_id": "c1", "arguments": json.dumps({"command": ["bash", "-lc", "pytest -q"]})}},
            {"timestamp": "2026-11-21T08:00:03Z", "type": "response_item", "payload": {"type": "function_call_output", "call_id": "c1", "output": json.dumps({"output": "5 passed", "metadata": {"exit_code": 0, "duration_seconds": 1.0}})}},
            {"timestamp": "2026-11-21T08:00:04Z", "type": "event_msg", "payload": {"type": "agent_message", "message": "Added --verbose; tests pass."}},
        ]
        (day / f"rollout-2026-11-21T08-00-00-{thread_id}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))

        def memory_written() -> bool:
            try:
                conn = sqlite3.connect(db_path)
                try:
                    return conn.execute("SELECT COUNT(*) FROM memories WHERE thread_id = ?", (thread_id,)).fetchone()[0] == 1
                finally:
                    conn.close()
            except sqlite3.Error:
                return False

        assert _wait_for(memory_written, 60), "the new rollout's memory did not appear"
        traces = list((home / "data" / "memd" / "projects").glob(f"*/memory/trace_summaries/{file_id(thread_id)}_*.md"))
        assert len(traces) == 1
        assert _wait_for(lambda: any((home / "data" / "memd" / "projects").glob("*/memory/MEMORY.md")), 30)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=10)
        assert code == 0
        assert time.monotonic() - started < 10
        conn = sqlite3.connect(db_path)
        held = conn.execute("SELECT COUNT(*) FROM leases WHERE owner IS NOT NULL AND expires_at > ?", (time.time(),)).fetchone()[0]
        running = conn.execute("SELECT COUNT(*) FROM jobs WHERE status = 'running'").fetchone()[0]
        conn.close()
        assert held == 0 and running == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log_file.close()
    output = log_path.read_text()
    assert '"event": "daemon_stopped"' in output, output[-3000:]
    assert '"level": "error"' not in output, output[-3000:]
