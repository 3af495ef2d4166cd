"""Database safety (SPEC §5, issue 13): backups (daily, before migrations, two kept, 0600), a
damaged database stops ``memd once`` / ``memd run`` with exit 1 naming ``memd db recover``, and
recovery restores the newest good backup and takes finished sessions from the trace files on disk:
no finished session goes to the model again, nothing is duplicated."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from memd.bench.corpus import SMALL_SIZE_MIX, generate_corpus
from memd.store import backup
from memd.store.schema import LATEST_VERSION
from tests import fake_openai as fo
from tests import faultkit as fk
from tests.fakes import RoutedFake, consolidation_answer, schema_name, trace_answer, user_content


def _memd(home: fk.MemdHome, *args: str, env: dict[str, str] | None = None, timeout_s: float = 180):  # type: ignore[no-untyped-def]
    argv = [sys.executable, "-m", "memd", *args]
    if args[0] in ("once", "run"):
        argv += ["--sessions", str(home.sessions), "--min-idle", "0", "--max-age-days", "0"]
    return subprocess.run(
        argv, env={**home.env, **(env or {})}, capture_output=True, text=True, timeout=timeout_s, cwd=home.home
    )


def test_backup_keeps_two_private_copies(tmp_path: Path) -> None:
    db = tmp_path / "memd.sqlite3"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE t (x)")
    conn.execute("INSERT INTO t VALUES (1)")
    conn.commit()
    made = [backup.backup_database(db, now_s=1_800_000_000 + i * 60) for i in range(3)]
    conn.close()
    kept = backup.backups(db)
    assert kept == [made[2], made[1]] and not made[0].exists()
    for path in kept:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert backup.check_database(path) == []
        assert sqlite3.connect(path).execute("SELECT x FROM t").fetchall() == [(1,)]
    # Daily: not due again within a day of the newest.
    os.utime(kept[0])
    assert backup.backup_if_due(db) is None


async def test_a_migration_backs_up_first(tmp_path: Path) -> None:
    from memd.clock import FakeClock
    from memd.store.db import split_statements
    from memd.store.schema import MIGRATIONS
    from memd.store.store import Store

    db = tmp_path / "memd.sqlite3"
    conn = sqlite3.connect(db)  # a database written by a memd that knew schema version 5
    for version in range(1, 6):
        for statement in split_statements(MIGRATIONS[version]):
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 5")
    conn.commit()
    conn.close()
    store = await Store.open(db, clock=FakeClock())
    await store.close()
    [saved] = backup.backups(db)
    assert sqlite3.connect(saved).execute("PRAGMA user_version").fetchone() == (5,)
    assert sqlite3.connect(db).execute("PRAGMA user_version").fetchone() == (LATEST_VERSION,)


def _corrupt(db: Path) -> None:
    """Overwrite pages in the middle of the file with garbage (a disk or a bug did it)."""
    size = db.stat().st_size
    with db.open("r+b") as handle:
        for offset in range(4096, size - 4096, 3 * 4096):
            handle.seek(offset)
            handle.write(os.urandom(2048))


@pytest.mark.timeout(600)
async def test_recovery_after_corruption_sends_no_finished_session_to_the_model_again(tmp_path: Path) -> None:
    server = RoutedFake()
    await server.start()
    try:
        await asyncio.to_thread(_recovery_scenario, tmp_path, server)
    finally:
        await server.close()


def _route(body: dict[str, Any]) -> fo.Behaviour:
    if "consolid" in schema_name(body).lower():
        return consolidation_answer(body)
    marker = user_content(body)[-40:]
    return fo.ok(trace_answer(str(abs(hash(marker)))))


def _recovery_scenario(tmp_path: Path, server: RoutedFake) -> None:
    home = fk.make_home(tmp_path)
    model = {
        "MEMD_EXTRACTOR": "openai",
        "MEMD_LLM__API_KEY": "sk-test-recovery-000000000000",
        "MEMD_LLM__BASE_URL": server.base_url,
        "MEMD_LLM__MAX_ATTEMPTS": "1",
    }
    server.route = _route
    generate_corpus(home.sessions / "a", n_files=4, size_mix=SMALL_SIZE_MIX, seed=21)
    first = _memd(home, "once", env=model)
    assert first.returncode == 0, first.stderr[-3000:]
    assert _memd(home, "db", "backup").returncode == 0

    generate_corpus(home.sessions / "b", n_files=4, size_mix=SMALL_SIZE_MIX, seed=22)
    second = _memd(home, "once", env=model)
    assert second.returncode == 0, second.stderr[-3000:]
    memories_before = fk.count(home, "SELECT COUNT(*) FROM memories")
    traces_before = sorted(p.name for p in home.memory_dir.rglob("trace_summaries/*.md"))
    assert memories_before >= 4 and len(traces_before) == memories_before
    requests_before = len(server.requests)

    _corrupt(home.db_path)
    broken = _memd(home, "once", env=model)
    assert broken.returncode == 1
    assert "memd db recover" in broken.stderr and "damaged" in broken.stderr
    run = _memd(home, "run", env=model, timeout_s=60)  # does not stay up idle
    assert run.returncode == 1 and "memd db recover" in run.stderr
    assert len(server.requests) == requests_before

    recovered = _memd(home, "db", "recover", "--sessions", str(home.sessions))
    assert recovered.returncode == 0, recovered.stderr[-3000:]
    # The search index is rebuilt from the memory folders: every trace file is searchable again.
    assert "search index rebuilt for" in recovered.stdout
    indexed = [r[0] for r in fk.query(home, "SELECT path FROM search_files WHERE path LIKE 'trace_summaries/%.md'")]
    assert sorted(Path(p).name for p in indexed) == traces_before, indexed
    assert "restored memd.sqlite3.backup-" in recovered.stdout
    damaged = list(home.db_path.parent.glob("memd.sqlite3.damaged-*Z"))
    assert len(damaged) == 1  # kept for inspection (with its -wal/-shm when there were any)

    after = _memd(home, "once", env=model)
    assert after.returncode == 0, after.stderr[-3000:]
    requests_after_recovery = len(server.requests) - requests_before
    print(f"model requests after recovery: {requests_after_recovery}")
    assert requests_after_recovery == 0, [
        (schema_name(b), user_content(b)[:300]) for b in server.bodies()[requests_before:]
    ][:3]
    assert fk.count(home, "SELECT COUNT(*) FROM memories") == memories_before
    assert sorted(p.name for p in home.memory_dir.rglob("trace_summaries/*.md")) == traces_before
    assert _memd(home, "db", "check").returncode == 0
