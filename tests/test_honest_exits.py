"""Honest exits and output of ``memd once`` (issue 13): failures exit 1 and say why; "0 extracted"
says why; a missing ``--sessions`` directory is a usage error (2); an unwritable state directory is a
configuration error (78, so systemd does not restart memd in a loop)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from memd.bench.corpus import SMALL_SIZE_MIX, generate_corpus
from tests import faultkit as fk


def _once(home: fk.MemdHome, *args: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    argv = [sys.executable, "-m", "memd", "once", *args]
    return subprocess.run(
        argv, env={**home.env, **(env or {})}, capture_output=True, text=True, timeout=120, cwd=home.home
    )


def test_missing_sessions_directory_is_a_usage_error(tmp_path: Path) -> None:
    home = fk.make_home(tmp_path)
    done = _once(home, "--sessions", str(tmp_path / "nope"))
    assert done.returncode == 2
    assert f"--sessions {tmp_path / 'nope'}: no such directory" in done.stderr
    assert not home.db_path.exists()  # nothing was started


def test_unwritable_state_directory_is_a_configuration_error(tmp_path: Path) -> None:
    home = fk.make_home(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory\n")
    done = _once(home, "--sessions", str(home.sessions), env={"MEMD_STATE_DIR": str(blocker / "state")})
    assert done.returncode == 78, done.stderr[-1000:]
    assert "state_dir" in done.stderr and "cannot be created" in done.stderr


def test_failed_extractions_exit_1_and_say_how_many_and_why(tmp_path: Path) -> None:
    home = fk.make_home(tmp_path)
    generate_corpus(home.sessions, n_files=3, size_mix=SMALL_SIZE_MIX, seed=5)
    model = {  # a model endpoint that refuses connections: every extraction fails
        "MEMD_EXTRACTOR": "openai",
        "MEMD_LLM__API_KEY": "sk-test-0000000000000000",
        "MEMD_LLM__BASE_URL": "http://127.0.0.1:9/v1",
        "MEMD_LLM__MAX_ATTEMPTS": "1",
        "MEMD_LLM__TIMEOUT_S": "5",
    }
    done = _once(home, "--sessions", str(home.sessions), "--min-idle", "0", "--max-age-days", "0", env=model)
    assert done.returncode == 1, done.stderr[-2000:]
    lines = done.stderr.splitlines()
    header = next(line for line in lines if "extraction(s) failed:" in line)
    failed = int(header.split("memd once: ")[1].split()[0])
    assert failed >= 1 and f"{failed} failed" in done.stdout
    reasons = lines[lines.index(header) + 1 :]
    assert reasons and all(": " in r for r in reasons[: min(failed, 5)])
    assert any("Connect" in r or "connect" in r or "unreachable" in r.lower() for r in reasons), reasons


def test_zero_extracted_says_why(tmp_path: Path) -> None:
    home = fk.make_home(tmp_path)
    empty = _once(home, "--sessions", str(home.sessions))
    assert empty.returncode == 0
    assert f"0 extracted: nothing eligible: no sessions found under {home.sessions}" in empty.stdout

    generate_corpus(home.sessions, n_files=4, size_mix=SMALL_SIZE_MIX, seed=6)
    now = time.time()
    for path in home.sessions.rglob("*.jsonl"):
        os.utime(path, (now, now))  # just written: inside the idle gate
    gated = _once(home, "--sessions", str(home.sessions), "--max-age-days", "0")
    assert gated.returncode == 0, gated.stderr[-1000:]
    assert "0 extracted: " in gated.stdout and "waiting on the idle gate (min_idle_s = 3600" in gated.stdout

    old = now - 90 * 86400
    for path in home.sessions.rglob("*.jsonl"):
        os.utime(path, (old, old))
    aged = _once(home, "--sessions", str(home.sessions))
    assert aged.returncode == 0, aged.stderr[-1000:]
    assert "older than max_age_days = 30" in aged.stdout

    done = _once(home, "--sessions", str(home.sessions), "--max-age-days", "0")
    assert done.returncode == 0, done.stderr[-1000:]
    again = _once(home, "--sessions", str(home.sessions), "--max-age-days", "0")  # nothing changed since
    assert "0 extracted: 4 known sessions unchanged since they were last planned" in again.stdout, again.stdout
