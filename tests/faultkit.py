"""Helpers of the fault-injection suites: run ``memd`` as a subprocess on a temporary home, read
its JSON log lines and its database, and check the invariants every fault must preserve.

``memd`` runs through :mod:`tests.slow_memd`: the real command line, with a slow extractor when
``MEMD_TEST_EXTRACT_DELAY_S`` is set.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memd.consolidate.builtin import MEMORY_FILE
from memd.memory.files import STAGING_PREFIX, TEMP_MARKER, TRACE_DIR, parse_trace_file

REPO = Path(__file__).resolve().parents[1]


@dataclass
class MemdHome:
    """A temporary user for memd: XDG directories, a sessions root and log files.

    Attributes:
        base: the test's temporary directory.
        env: the environment memd runs with (``MEMD_*`` settings included).
    """

    base: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def home(self) -> Path:
        return self.base / "home"

    @property
    def sessions(self) -> Path:
        return self.base / "sessions"

    @property
    def db_path(self) -> Path:
        return self.home / "state" / "memd" / "memd.sqlite3"

    @property
    def memory_dir(self) -> Path:
        return self.home / "data" / "memd" / "projects"

    def log_path(self, name: str) -> Path:
        return self.base / f"{name}.log"


def make_home(base: Path, **settings: object) -> MemdHome:
    """Create a home under ``base``; ``settings`` become ``MEMD_<NAME>`` variables
    (``consolidation__delay_s=0`` → ``MEMD_CONSOLIDATION__DELAY_S=0``)."""
    home = MemdHome(base)
    home.home.mkdir(parents=True, exist_ok=True)
    home.sessions.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEMD_", "OPENAI_", "PYTEST_"))}
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "JOURNAL_STREAM"):
        env.pop(name, None)
    env.update(
        HOME=str(home.home),
        CODEX_HOME=str(home.home / ".codex"),
        XDG_STATE_HOME=str(home.home / "state"),
        XDG_DATA_HOME=str(home.home / "data"),
        XDG_CONFIG_HOME=str(home.home / "config"),
        PYTHONPATH=str(REPO),
        MEMD_EXTRACTOR="offline",
    )
    env.update({f"MEMD_{key.upper()}": str(value) for key, value in settings.items()})
    home.env = env
    return home


def memd_argv(home: MemdHome, command: str, *args: str) -> list[str]:
    """``python -m tests.slow_memd <command> --sessions ... --min-idle 0 --max-age-days 0 ...``."""
    argv = [sys.executable, "-m", "tests.slow_memd", command]
    if command in ("run", "once", "scan"):
        argv += ["--sessions", str(home.sessions), "--min-idle", "0", "--max-age-days", "0"]
    return argv + list(args)


def start(home: MemdHome, log_name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``memd run`` with stdout and stderr appended to ``<log_name>.log``."""
    with home.log_path(log_name).open("ab") as log_file:
        return subprocess.Popen(
            memd_argv(home, "run", *args),
            env={**home.env, **(env or {})},
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=home.home,
        )


def run(home: MemdHome, command: str, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    """Run one short ``memd`` command to its end."""
    return subprocess.run(
        memd_argv(home, command, *args), env=home.env, capture_output=True, text=True, timeout=timeout_s, cwd=home.home
    )


def status_json(home: MemdHome) -> dict[str, Any]:
    """``memd status --json`` as a dict."""
    done = run(home, "status", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 30) -> int:
    """SIGTERM ``proc`` and return its exit code."""
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=timeout_s)


def kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL ``proc`` if it still runs, and reap it."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def wait_for(
    predicate: Callable[[], bool],
    timeout_s: float,
    *,
    procs: Iterable[subprocess.Popen[bytes]] = (),
    poll_s: float = 0.2,
) -> bool:
    """Poll ``predicate`` until true or ``timeout_s``; fail at once if one of ``procs`` exited."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        for proc in procs:
            assert proc.poll() is None, f"memd exited early with code {proc.returncode}"
        time.sleep(poll_s)
    return predicate()


def query(home: MemdHome, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
    """Run one read-only query on memd's database (empty when the file does not exist yet)."""
    if not home.db_path.exists():
        return []
    conn = sqlite3.connect(f"file:{home.db_path}?mode=ro", uri=True, timeout=30)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql, params).fetchall()
    except sqlite3.OperationalError:
        return []  # the schema does not exist yet
    finally:
        conn.close()


def count(home: MemdHome, sql: str, params: tuple[Any, ...] = ()) -> int:
    """The first column of the first row of ``sql`` (0 when there is none)."""
    rows = query(home, sql, params)
    return int(rows[0][0]) if rows and rows[0][0] is not None else 0


def events(log_path: Path) -> list[dict[str, Any]]:
    """The JSON log events of a memd log file (other lines are skipped)."""
    out = []
    if not log_path.exists():
        return out
    for line in log_path.read_text("utf-8", "replace").splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def named(evts: Iterable[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """The events called ``name``."""
    return [e for e in evts if e.get("event") == name]


def all_done(home: MemdHome) -> bool:
    """Every eligible thread has a memory and every project is consolidated, no lease held."""
    eligible = count(home, "SELECT COUNT(*) FROM threads WHERE eligible = 1")
    if not eligible:
        return False
    memories = count(
        home,
        "SELECT COUNT(*) FROM memories m JOIN threads t ON t.id = m.thread_id AND m.source_watermark >= t.watermark",
    )
    stale = count(home, "SELECT COUNT(*) FROM projects WHERE consolidated_seq < memory_seq")
    held = count(home, "SELECT COUNT(*) FROM leases WHERE owner IS NOT NULL AND expires_at > ?", (time.time(),))
    return memories == eligible and stale == 0 and held == 0


@dataclass(frozen=True)
class Figures:
    """What :func:`check_invariants` counted."""

    eligible: int
    memories: int
    trace_files: int
    lost: int
    duplicated: int
    projects: int


def check_invariants(home: MemdHome) -> Figures:
    """Assert what no fault may break, and count it.

    - ``PRAGMA integrity_check`` is ``ok``;
    - every eligible thread has exactly one ``memories`` row, built from its whole rollout;
    - every row with a path has exactly one trace file (that one, holding the row's trace
      memory), a no-op row has none, and no trace file lacks a row;
    - no temp file (``*.tmp-memd-*``) or staging directory (``.staging-*``) is left;
    - no job is running, failed or dead, and no lease is held;
    - every project with traces has a well-formed ``MEMORY.md`` merged from all its trace files
      (this needs ``max_traces_per_project`` ≥ the traces per project) and a
      ``memory_summary.md`` naming each of them.
    """
    conn = sqlite3.connect(home.db_path, timeout=30)
    conn.row_factory = sqlite3.Row
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        threads = {r["id"]: r for r in conn.execute("SELECT * FROM threads WHERE eligible = 1")}
        rows = {r["thread_id"]: r for r in conn.execute("SELECT * FROM memories")}
        projects = {r["project"]: r for r in conn.execute("SELECT * FROM projects")}
        jobs = conn.execute("SELECT kind, key, status, last_error FROM jobs WHERE status != 'done'").fetchall()
        held = conn.execute(
            "SELECT name, owner FROM leases WHERE owner IS NOT NULL AND expires_at > ?", (time.time(),)
        ).fetchall()
    finally:
        conn.close()
    lost = sorted(set(threads) - set(rows))
    assert not lost, f"{len(lost)} eligible threads have no memory: {lost[:5]}"
    assert set(rows) <= set(threads), "a memory exists for a thread that is not eligible"
    for thread_id, row in rows.items():
        assert row["source_watermark"] == threads[thread_id]["watermark"], thread_id
    assert [dict(j) for j in jobs] == [], "jobs left unfinished"
    assert [dict(h) for h in held] == [], "leases still held"

    files: dict[str, list[Path]] = {}
    for path in home.memory_dir.glob(f"*/memory/{TRACE_DIR}/*.md"):
        header, _ = parse_trace_file(path.read_text("utf-8"))
        files.setdefault(header.thread_id, []).append(path)
    duplicated = sorted(t for t, paths in files.items() if len(paths) > 1)
    assert not duplicated, f"threads with several trace files: {duplicated[:5]}"
    assert set(files) <= set(rows), "a trace file has no memories row"
    for thread_id, row in rows.items():
        if row["path"] is None:
            assert thread_id not in files and row["trace_memory"] == "", thread_id
            continue
        (path,) = files[thread_id]
        root = Path(projects[row["project"]]["memory_root"])
        assert path == root / row["path"], (path, row["path"])
        assert parse_trace_file(path.read_text("utf-8"))[1] == row["trace_memory"].rstrip("\n"), thread_id
        assert oct(path.stat().st_mode & 0o777) == "0o600"

    leftovers = [p for p in home.memory_dir.rglob("*") if TEMP_MARKER in p.name or p.name.startswith(STAGING_PREFIX)]
    assert leftovers == [], f"temporary files left: {leftovers[:5]}"

    with_traces = {r["project"] for r in rows.values() if r["path"]}
    for project in with_traces:
        p = projects[project]
        assert p["consolidated_seq"] == p["memory_seq"], f"{project} not consolidated after its last memory"
        root = Path(p["memory_root"])
        traces = sorted(r["path"] for r in rows.values() if r["project"] == project and r["path"])
        memory_md = (root / MEMORY_FILE).read_text("utf-8")
        assert memory_md.startswith(f"# Project memory: {project}\n") and memory_md.endswith("\n"), project
        for section in ("Start here", "User preferences", "Pitfalls and pivots", "Verification", "Open follow-ups",
                        "Recent tasks"):  # fmt: skip
            assert f"\n## {section}\n" in memory_md, (project, section)
        ids = sorted(r["thread_id"] for r in rows.values() if r["project"] == project and r["path"])
        merged = _merged_ids(memory_md)
        assert merged == ids, (project, "every trace on disk is merged into MEMORY.md, once", merged, ids)
        summary = (root / "memory_summary.md").read_text("utf-8")
        assert all(f"[{i[:8]} " in summary for i in ids), project
        assert len(traces) == len(ids), project
    return Figures(
        eligible=len(threads),
        memories=len(rows),
        trace_files=sum(len(p) for p in files.values()),
        lost=len(lost),
        duplicated=len(duplicated),
        projects=len(with_traces),
    )


def _merged_ids(markdown: str) -> list[str]:
    """Session ids in MEMORY.md's merged-traces comment (``<!-- memd merged: id:hash ... -->``)."""
    match = re.search(r"<!-- memd merged: ([^>]*) -->", markdown)
    return sorted(item.split(":")[0] for item in match.group(1).split()) if match else []
