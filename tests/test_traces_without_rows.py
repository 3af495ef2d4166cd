"""Trace files no database row names are kept (SPEC §5 recovery, §8): after a reinstall that removed
the state but kept the memories, and after a ``memd db recover`` that could not take a trace back
(its rollout is gone), the next start-ups must not delete the only copy of those memories."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.builders import run_memd, simple_turns, thread_id, write_rollout

OLD_DAYS = 60


def _once(home: Path, sessions: Path, *, max_age_days: int = 0) -> subprocess.CompletedProcess[str]:
    args = ("--sessions", str(sessions), "--min-idle", "0", "--max-age-days", str(max_age_days))
    done = run_memd(home, "once", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _traces(home: Path) -> dict[str, Path]:
    """``{thread id: trace file}`` over every memory root."""
    return {p.name[:36]: p for p in (home / "data" / "memd" / "projects").glob("*/memory/trace_summaries/*.md")}


@pytest.mark.timeout(300)
def test_a_reinstall_keeps_the_traces_of_sessions_not_extracted_again(tmp_path: Path) -> None:
    home, sessions, project = tmp_path / "home", tmp_path / "sessions", tmp_path / "proj"
    project.mkdir()
    old_id, new_id = thread_id(1), thread_id(2)
    old = write_rollout(sessions, old_id, project, simple_turns("old session"))
    _once(home, sessions)
    old_trace = _traces(home)[old_id]
    old_text = old_trace.read_text()

    # README "Upgrade and uninstall": the state goes, the memories stay. The old session is now
    # older than max_age_days: it is not extracted again.
    shutil.rmtree(home / "state" / "memd")
    past = time.time() - OLD_DAYS * 86_400
    os.utime(old, (past, past))
    write_rollout(sessions, new_id, project, simple_turns("new session"))
    _once(home, sessions, max_age_days=30)  # the project's row is made again
    _once(home, sessions, max_age_days=30)  # the next start-up repairs the memory roots

    traces = _traces(home)
    assert sorted(traces) == sorted([old_id, new_id])
    assert traces[old_id].read_text() == old_text


@pytest.mark.timeout(300)
def test_a_trace_db_recover_could_not_take_back_survives_the_next_start(tmp_path: Path) -> None:
    home, sessions, project = tmp_path / "home", tmp_path / "sessions", tmp_path / "proj"
    project.mkdir()
    gone_id, kept_id = thread_id(3), thread_id(4)
    gone = write_rollout(sessions, gone_id, project, simple_turns("rollout deleted later"))
    write_rollout(sessions, kept_id, project, simple_turns("rollout kept"))
    _once(home, sessions)
    assert sorted(_traces(home)) == sorted([gone_id, kept_id])
    gone_text = _traces(home)[gone_id].read_text()

    gone.unlink()
    recovered = run_memd(home, "db", "recover", "--sessions", str(sessions))
    assert recovered.returncode == 0, recovered.stderr[-3000:]
    assert "2 trace files on disk, 1 memories taken" in recovered.stdout

    _once(home, sessions)
    traces = _traces(home)
    assert sorted(traces) == sorted([gone_id, kept_id])
    assert traces[gone_id].read_text() == gone_text
