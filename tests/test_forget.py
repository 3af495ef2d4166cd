"""``memd forget`` (issue 13): the session leaves the memory files, the search index and the git
history (re-rooted: the earlier commits are deleted), and a tombstone beside the memories keeps it
out even after the database is rebuilt."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from memd.bench.corpus import SMALL_SIZE_MIX, generate_corpus
from memd.memory.files import TOMBSTONE_FILE, read_tombstones
from tests import faultkit as fk


def _memd(home: fk.MemdHome, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "memd", *args]
    if args[0] == "once":
        argv += ["--sessions", str(home.sessions), "--min-idle", "0", "--max-age-days", "0"]
    return subprocess.run(argv, env=home.env, capture_output=True, text=True, timeout=180, cwd=home.home)


def _mentions(root: Path, thread_id: str) -> list[str]:
    return [
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and ".git" not in p.parts and thread_id[:8] in p.read_text("utf-8", "replace")
    ]


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
@pytest.mark.timeout(300)
def test_forget_removes_the_session_everywhere_and_for_good(tmp_path: Path) -> None:
    home = fk.make_home(tmp_path)
    generate_corpus(home.sessions, n_files=6, size_mix=SMALL_SIZE_MIX, seed=31)
    assert _memd(home, "once").returncode == 0
    rows = fk.query(home, "SELECT thread_id, project, path FROM memories WHERE path IS NOT NULL ORDER BY thread_id")
    thread_id, project = rows[0]["thread_id"], rows[0]["project"]
    [root] = [p.parent for p in home.memory_dir.glob("*/memory/PROJECT") if p.read_text().strip() == project]
    assert (root / rows[0]["path"]).exists()
    assert _memd(home, "once").returncode == 0  # a second consolidation: history has several commits
    assert (
        thread_id[:8]
        in subprocess.run(
            ["git", "-C", str(root), "log", "--all", "-p"], capture_output=True, text=True, check=True
        ).stdout
    )

    forget = _memd(home, "forget", thread_id)
    assert forget.returncode == 0, forget.stderr[-2000:]
    assert "git history re-rooted" in forget.stdout
    assert _memd(home, "once").returncode == 0  # the project is consolidated without it

    assert _mentions(root, thread_id) == []
    history = subprocess.run(["git", "-C", str(root), "log", "--all", "-p"], capture_output=True, text=True, check=True)
    assert thread_id[:8] not in history.stdout
    conn = sqlite3.connect(home.db_path)
    try:
        hits = conn.execute(
            "SELECT COUNT(*) FROM search_chunks WHERE path LIKE ? OR session_ids LIKE ?",
            (f"%{thread_id[:8]}%", f"%{thread_id[:8]}%"),
        ).fetchone()[0]
    finally:
        conn.close()
    assert hits == 0
    assert thread_id in read_tombstones(home.memory_dir)
    assert (home.memory_dir / TOMBSTONE_FILE).stat().st_mode & 0o777 == 0o600

    # The database is rebuilt from scratch: the session stays forgotten.
    for path in home.db_path.parent.glob("memd.sqlite3*"):
        path.unlink()
    again = _memd(home, "once")
    assert again.returncode == 0, again.stderr[-2000:]
    assert fk.count(home, "SELECT COUNT(*) FROM memories WHERE thread_id = ?", (thread_id,)) == 0
    assert fk.query(home, "SELECT reason FROM threads WHERE id = ?", (thread_id,))[0]["reason"] == "forgotten"
    assert _mentions(root, thread_id) == []
