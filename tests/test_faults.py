"""Fault injection (SPEC §13, issue 5): memd survives each fault without losing or duplicating a
memory, and says what it is doing.

In-process tests drive a :class:`memd.daemon.Daemon` with a :class:`~memd.clock.FakeClock`
(backoff and retry without sleeping) and inject write errors with ``monkeypatch``. Subprocess
tests run the real ``memd run`` (through :mod:`tests.slow_memd`, which can slow the extractor
down) on a synthetic corpus and read its JSON log and its database.

Covered elsewhere (not repeated here): bad rollout input — ``tests/test_sources.py``,
``tests/test_indexer.py``; the LLM server's faults — ``tests/test_llm.py``,
``tests/test_openai_extractor.py``; the consolidation command missing, exiting non-zero, hanging
or leaving a background process, at the runner level — ``tests/test_consolidate_runner.py``;
the built-in consolidator's staging or swap failing with the previous ``MEMORY.md`` left intact
— ``tests/test_consolidate_builtin.py::test_staging_failure_leaves_previous_outputs`` and
``::test_swap_failure_restores_skills``; ``kill -9`` — ``tests/test_faults_kill9.py``.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import sqlite3
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from memd.bench.corpus import SMALL_SIZE_MIX, CorpusManifest, append_turn, generate_corpus
from memd.clock import FakeClock
from memd.config import ConsolidationSettings, Settings
from memd.consolidate.trigger import TriggerSummary
from memd.daemon import Daemon
from memd.memory import files as memory_files
from memd.status import collect_status
from memd.store.daemons import pid_alive
from tests import faultkit as fk

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- in-process set-up


def _settings(tmp_path: Path, **kw: object) -> Settings:
    consolidation = ConsolidationSettings(**kw.pop("consolidation", {}))  # type: ignore[arg-type]
    return Settings(
        sessions=[tmp_path / "sessions"],
        state_dir=tmp_path / "state",
        memory_dir=tmp_path / "memory",
        min_idle_s=0,
        max_age_days=0,
        extractor="offline",
        consolidation=consolidation,
        **kw,  # type: ignore[arg-type]
    )


def _eligible(manifest: CorpusManifest) -> list[str]:
    """Threads eligible by construction (SPEC §4): interactive source, memory not disabled."""
    return sorted(
        f.thread_id
        for f in manifest.files
        if f.source_kind in ("cli", "vscode", "unknown") and f.user_messages and f.memory_mode != "disabled"
    )


@contextmanager
def _failing_writes(monkeypatch: pytest.MonkeyPatch, where: str, err: int = errno.ENOSPC) -> Iterator[None]:
    """Make ``os.write`` fail with ``err`` for memory temp files whose path contains ``where``."""
    real_write = os.write

    def write(fd: int, data: bytes) -> int:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if memory_files.TEMP_MARKER in target and where in target:
            raise OSError(err, os.strerror(err))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    try:
        yield
    finally:
        monkeypatch.setattr(os, "write", real_write)


def _leftovers(memory_dir: Path) -> list[Path]:
    return [p for p in memory_dir.rglob("*") if memory_files.TEMP_MARKER in p.name or p.name.startswith(".staging-")]


@pytest.fixture
def corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CorpusManifest:
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the consolidation subprocess runs `python -m memd`
    return generate_corpus(tmp_path / "sessions", n_files=12, size_mix=SMALL_SIZE_MIX, seed=11)


# --------------------------------------------------------------------------- disk full


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd to aim the injected error")
async def test_disk_full_writing_trace_files_fails_cleanly_then_retries(
    tmp_path: Path, corpus: CorpusManifest, monkeypatch: pytest.MonkeyPatch, jumping_clock
) -> None:
    clock = jumping_clock(time.time() + 3600)
    daemon = await Daemon.open(_settings(tmp_path, retry_base_s=60), clock=clock)
    assert daemon.components.store is not None
    eligible = _eligible(corpus)
    try:
        with _failing_writes(monkeypatch, f"/{memory_files.TRACE_DIR}/"), capture_logs() as logs:
            summary = await daemon.once()
        assert (summary.extracted, summary.failed) == (0, len(eligible))
        failed = [e for e in logs if e["event"] == "extract_failed"]
        assert sorted(e["thread_id"] for e in failed) == eligible  # one event per thread
        for event in failed:
            assert "disk full (ENOSPC)" in event["error"] and event["dead"] is False and event["retry_at"]
        jobs = await daemon.components.store.jobs.list_all("extract")
        assert {j.status for j in jobs} == {"error"}
        assert {j.retry_at for j in jobs} == {clock.now() + 60}
        assert await daemon.components.store.memories.watermarks() == {}
        assert list((tmp_path / "memory").rglob("*.md")) == [] and _leftovers(tmp_path / "memory") == []
        report = await collect_status(daemon.components.store, clock, extractor="offline", extractor_reason="", daily_token_budget=0)
        states = {t["id"]: (t["state"], t["last_error"]) for t in report["threads"] if t["eligible"]}
        assert all(state == "error" and "disk full" in error for state, error in states.values())
        assert report["totals"]["error"] == len(eligible)

        # The disk has room again, but the backoff has not passed: nothing runs (no spin).
        summary = await daemon.once()
        assert (summary.extracted, summary.failed) == (0, 0)
        clock.advance(61)
        summary = await daemon.once()
        assert (summary.extracted, summary.failed) == (len(eligible), 0)
        assert summary.consolidated >= 1
        memories = await daemon.components.store.memories.watermarks()
        assert sorted(memories) == eligible
        traces = list((tmp_path / "memory").glob(f"*/memory/{memory_files.TRACE_DIR}/*.md"))
        assert len(traces) == len(eligible) and _leftovers(tmp_path / "memory") == []
        assert {j.status for j in await daemon.components.store.jobs.list_all("extract")} == {"done"}
    finally:
        await daemon.close()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd to aim the injected error")
async def test_disk_full_before_consolidation_keeps_previous_memory_and_retries_later(
    tmp_path: Path, corpus: CorpusManifest, monkeypatch: pytest.MonkeyPatch, jumping_clock
) -> None:
    clock = jumping_clock(time.time() + 3600)
    daemon = await Daemon.open(_settings(tmp_path, consolidation={"min_interval_s": 600}), clock=clock)
    assert daemon.components.store is not None
    try:
        first = await daemon.once()
        assert first.consolidated >= 1 and first.consolidation_failed == 0
        target = next(f for f in corpus.files if f.thread_id in _eligible(corpus))
        project = (await daemon.components.store.threads.get(target.thread_id)).project  # type: ignore[union-attr]
        root = memory_files.project_root(tmp_path / "memory", project)
        before = {name: (root / name).read_bytes() for name in ("MEMORY.md", "memory_summary.md")}

        append_turn(target.path, seed=5)  # the thread grows: a new memory, the project is due
        clock.advance(700)
        await daemon.components.indexer.scan()
        await daemon.components.scheduler.plan()
        await daemon.components.pool.run(asyncio.Event(), burst=True)
        with _failing_writes(monkeypatch, "memory_summary.md"), capture_logs() as logs:
            summary = await daemon.consolidate_due(delay_s=0, min_interval_s=600)
            ok, failed = summary.consolidated, summary.failed
        assert (ok, failed) == (0, 1)
        [event] = [e for e in logs if e["event"] == "consolidate_failed"]
        assert event["project"] == project and "disk full (ENOSPC)" in event["error"]
        assert {name: (root / name).read_bytes() for name in before} == before
        assert _leftovers(tmp_path / "memory") == []
        record = await daemon.components.store.projects.get(project)
        assert record is not None and record.consolidated_seq < record.memory_seq
        assert "disk full" in (record.last_error or "")
        lease = await daemon.components.store.leases.get(f"consolidate:{project}")
        assert lease is not None and lease.owner is None  # released on the failure path
        report = await collect_status(daemon.components.store, clock, extractor="offline", extractor_reason="", daily_token_budget=0)
        [row] = [p for p in report["projects"] if p["project"] == project]
        assert "disk full" in row["last_error"] and row["fresh"] is False

        # Retried only after min_interval_s (bounded, no spin), then it succeeds.
        assert await daemon.consolidate_due(delay_s=0, min_interval_s=600) == TriggerSummary(0, 0)
        clock.advance(601)
        assert await daemon.consolidate_due(delay_s=0, min_interval_s=600) == TriggerSummary(1, 0)
        record = await daemon.components.store.projects.get(project)
        assert record is not None and record.consolidated_seq == record.memory_seq and record.last_error is None
        assert (root / "memory_summary.md").read_bytes() != before["memory_summary.md"]
    finally:
        await daemon.close()


# --------------------------------------------------------------------------- a crash between commit and rename


async def test_trace_file_missing_after_its_row_committed_is_written_again(
    tmp_path: Path, corpus: CorpusManifest, monkeypatch: pytest.MonkeyPatch, jumping_clock
) -> None:
    """Two ways a committed row can lack its file: the rename failed (the daemon goes on; the
    repair before the project's next consolidation writes it), or memd died between the commit
    and the rename (the temp file is left; start-up recovery writes it). The row is the truth."""
    clock = jumping_clock(time.time() + 3600)
    settings = _settings(tmp_path)
    eligible = _eligible(corpus)
    failing, crashed = eligible[0], eligible[1]
    real_commit = memory_files.StagedFile.commit

    def rename_fails(self: memory_files.StagedFile) -> list[str]:
        if self.thread_id == failing:
            self.abort()
            raise memory_files.MemoryWriteError(f"cannot write memory file {self.final}: disk full (ENOSPC)")
        return real_commit(self)

    def killed_before_rename(self: memory_files.StagedFile) -> list[str]:
        if self.thread_id == crashed:
            return []  # the row committed, the rename never happens: the temp file stays
        return real_commit(self)

    daemon = await Daemon.open(settings, clock=clock)
    assert daemon.components.store is not None
    try:
        await daemon.components.indexer.scan()
        await daemon.components.scheduler.plan()
        with capture_logs() as logs:
            monkeypatch.setattr(memory_files.StagedFile, "commit", rename_fails)
            await daemon.components.pool.run(asyncio.Event(), burst=True)
            monkeypatch.setattr(memory_files.StagedFile, "commit", real_commit)
        [event] = [e for e in logs if e["event"] == "trace_file_commit_failed"]
        assert event["thread_id"] == failing and "disk full" in event["error"]
        assert sorted(await daemon.components.store.memories.watermarks()) == eligible  # every row committed
        row = await daemon.components.store.memories.get(failing)
        assert row is not None and row.path is not None
        root = memory_files.project_root(tmp_path / "memory", row.project)
        assert not (root / row.path).exists()
        with capture_logs() as logs:
            await daemon.consolidate_due(delay_s=0, min_interval_s=0)
        assert memory_files.trace_exists(root, row.path, row.trace_memory)
        assert [e["count"] for e in logs if e["event"] == "trace_files_rewritten"] == [1]
        assert _leftovers(tmp_path / "memory") == []

        # `crashed` grows and is extracted again; memd "dies" between the commit and the rename:
        # the row holds the new memory, the disk the old file and a temp file.
        target = next(f for f in corpus.files if f.thread_id == crashed)
        append_turn(target.path, seed=8)
        clock.advance(60)
        await daemon.components.indexer.scan()
        await daemon.components.scheduler.plan()
        monkeypatch.setattr(memory_files.StagedFile, "commit", killed_before_rename)
        await daemon.components.pool.run(asyncio.Event(), burst=True)
        monkeypatch.setattr(memory_files.StagedFile, "commit", real_commit)
        row = await daemon.components.store.memories.get(crashed)
        assert row is not None and row.path is not None
        root = memory_files.project_root(tmp_path / "memory", row.project)
        assert not memory_files.trace_exists(root, row.path, row.trace_memory)
        assert len(_leftovers(tmp_path / "memory")) == 1
    finally:
        await daemon.close()

    with capture_logs() as logs:
        restarted = await Daemon.open(settings, clock=clock)
    try:
        assert memory_files.trace_exists(root, row.path, row.trace_memory)
        assert _leftovers(tmp_path / "memory") == []
        [event] = [e for e in logs if e["event"] == "memory_recovered" and "rewritten" in e]
        assert (event["project"], event["rewritten"]) == (row.project, 1)
        files = list((tmp_path / "memory").glob(f"*/memory/{memory_files.TRACE_DIR}/*.md"))
        assert len(files) == len(eligible)
    finally:
        await restarted.close()


async def test_a_loop_that_crashes_stops_the_daemon_with_exit_1(
    tmp_path: Path, corpus: CorpusManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug that ends one of the service's loops is not silent: one event, a clean stop and
    exit status 1, so that ``Restart=on-failure`` starts memd again."""
    daemon = await Daemon.open(_settings(tmp_path), clock=FakeClock(time.time() + 3600))

    async def broken(stop: asyncio.Event, *, burst: bool = False) -> None:
        raise RuntimeError("a bug in the pool")

    monkeypatch.setattr(daemon.components.pool, "run", broken)
    try:
        with capture_logs() as logs:
            code = await asyncio.wait_for(daemon.serve(), 60)
    finally:
        await daemon.close()
    assert code == 1
    [event] = [e for e in logs if e["event"] == "daemon_loop_crashed"]
    assert event["loop"] == "pool" and "a bug in the pool" in event["error"]
    assert [e["event"] for e in logs][-1] == "daemon_stopped"


# --------------------------------------------------------------------------- subprocess faults

SLOW = {"MEMD_TEST_EXTRACT_DELAY_S": "0.3"}


#: How long the other process holds the write lock: more than twice the 5 s busy timeout, so that
#: several operations in a row fail (memd's store calls are serialised, each waits 5 s).
LOCK_S = 13.0
#: Events that say what memd does next about a store operation that failed.
LOCK_FOLLOW_UPS = {
    "claim_failed", "extract_commit_retry", "extract_failed", "job_update_failed", "job_renew_failed",
    "plan_failed", "consolidate_lease_error", "consolidate_failed", "consolidate_record_failed",
    "consolidate_release_failed", "rescan_failed", "daemon_heartbeat_failed", "watch_refresh_failed",
}  # fmt: skip


@pytest.mark.timeout(180)
def test_database_locked_by_another_process(tmp_path: Path) -> None:
    """Another process holds the write lock for longer than the 5 s busy timeout while memd
    extracts: memd logs it, neither crashes nor spins, and resumes when the lock is released."""
    home = fk.make_home(
        tmp_path,
        extract_concurrency=2,
        retry_base_s=1,
        consolidation__delay_s=0,
        consolidation__min_interval_s=0,
        consolidation__max_traces_per_project=10_000,
    )
    manifest = generate_corpus(home.sessions, n_files=30, size_mix=SMALL_SIZE_MIX, seed=3)
    proc = fk.start(home, "memd", env=SLOW)
    try:
        assert fk.wait_for(lambda: fk.count(home, "SELECT COUNT(*) FROM memories") >= 3, 60, procs=[proc])
        log_path = home.log_path("memd")
        before = len(log_path.read_text().splitlines())
        locker = sqlite3.connect(home.db_path, timeout=10, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            time.sleep(LOCK_S)
            assert proc.poll() is None
            during = log_path.read_text().splitlines()[before:]
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        assert fk.wait_for(lambda: fk.all_done(home), 90, procs=[proc])
        assert fk.stop(proc) == 0
    finally:
        fk.kill(proc)
    evts = fk.events(home.log_path("memd"))
    lock_events = [json.loads(line) for line in during if line.startswith("{")]
    assert fk.named(lock_events, "store_locked"), "memd did not say the database was locked"
    locked = fk.named(lock_events, "store_locked")
    follow_ups = [e for e in lock_events if e["event"] in LOCK_FOLLOW_UPS]
    assert len(follow_ups) >= len(locked) >= 2, "a failed store operation without an event saying what happens next"
    assert len(during) < 100, f"{len(during)} log lines in {LOCK_S} s: memd spins while the database is locked"
    assert [e for e in evts if "exception" in e] == []  # expected faults: no traceback
    fault = fk.status_json(home)["last_fault"]
    assert fault["event"] in LOCK_FOLLOW_UPS and "database is locked" in fault["error"]
    figures = fk.check_invariants(home)
    assert figures.eligible == len(_eligible(manifest)) and figures.lost == 0


def _consolidation_recorder(record: Path) -> list[str]:
    """A consolidation command that logs start/stop (O_APPEND) around the built-in consolidator."""
    script = (
        "import os, subprocess, sys, time\n"
        "root, project, record = sys.argv[1:4]\n"
        "def note(what):\n"
        "    fd = os.open(record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)\n"
        "    os.write(fd, f'{what}\\t{time.time_ns()}\\t{os.getpid()}\\t{project}\\n'.encode())\n"
        "    os.close(fd)\n"
        "note('start')\n"
        "time.sleep(0.3)\n"
        "code = subprocess.call([sys.executable, '-m', 'memd', 'consolidate', '--root', root])\n"
        "note('stop')\n"
        "sys.exit(code)\n"
    )
    return [sys.executable, "-c", script, "{memory_root}", "{project}", str(record)]


@pytest.mark.timeout(180)
def test_two_daemons_on_the_same_state(tmp_path: Path) -> None:
    """Each thread is extracted once, and each project has at most one consolidation at a time."""
    record = tmp_path / "consolidations.tsv"
    home = fk.make_home(
        tmp_path,
        extract_concurrency=2,
        consolidation__delay_s=0,
        consolidation__min_interval_s=0,
        consolidation__max_traces_per_project=10_000,
        consolidation__command=json.dumps(_consolidation_recorder(record)),
    )
    manifest = generate_corpus(home.sessions, n_files=60, size_mix=SMALL_SIZE_MIX, seed=5)
    a = fk.start(home, "a", env=SLOW)
    b = None
    try:
        assert fk.wait_for(lambda: fk.named(fk.events(home.log_path("a")), "extract_done"), 60, procs=[a])
        b = fk.start(home, "b", env=SLOW)  # joins with most of the work still queued
        assert fk.wait_for(lambda: fk.status_json(home)["daemon"].get("count") == 2, 30, procs=[a, b])
        assert fk.wait_for(lambda: fk.all_done(home), 120, procs=[a, b])
        assert fk.stop(a) == 0 and fk.stop(b) == 0
    finally:
        fk.kill(a)
        if b is not None:
            fk.kill(b)
    logs = {name: fk.events(home.log_path(name)) for name in ("a", "b")}
    done: dict[str, int] = {}
    for name, evts in logs.items():
        extracted = fk.named(evts, "extract_done")
        assert extracted, f"daemon {name} extracted nothing"
        for event in extracted:
            done[event["thread_id"]] = done.get(event["thread_id"], 0) + 1
    eligible = _eligible(manifest)
    assert sorted(done) == eligible and set(done.values()) == {1}
    assert not any(fk.named(evts, "job_reclaimed") for evts in logs.values())

    runs: dict[str, list[tuple[int, str]]] = {}
    for line in record.read_text().splitlines():
        what, at, _pid, project = line.split("\t")
        runs.setdefault(project, []).append((int(at), what))
    assert runs
    for project, marks in runs.items():
        kinds = [what for _, what in sorted(marks)]
        assert kinds == ["start", "stop"] * (len(kinds) // 2), f"overlapping consolidations of {project}: {kinds}"
    acquired = [e for evts in logs.values() for e in fk.named(evts, "consolidate_lease_acquired")]
    assert len(acquired) == sum(len(m) // 2 for m in runs.values())
    figures = fk.check_invariants(home)
    assert figures.eligible == len(eligible)


@pytest.mark.timeout(120)
def test_consolidation_command_printing_megabytes(tmp_path: Path) -> None:
    """20 MB of output per run: the daemon keeps running, its log stays small, and each project
    records its success or its failure (with a bounded message)."""
    manifest_dir = tmp_path / "sessions"
    manifest = generate_corpus(manifest_dir, n_files=15, size_mix=SMALL_SIZE_MIX, seed=9)
    failing_project = next(f.cwd for f in manifest.files if f.thread_id in _eligible(manifest))
    script = (
        "import os, sys\n"
        "line = 'x' * 1023 + '\\n'\n"
        "for _ in range(20 * 1024):\n"
        "    sys.stdout.write(line)\n"
        "sys.exit(3 if sys.argv[1] == os.environ['MEMD_TEST_FAIL_PROJECT'] else 0)\n"
    )
    home = fk.make_home(
        tmp_path,
        consolidation__delay_s=2,
        consolidation__min_interval_s=600,
        consolidation__command=json.dumps([sys.executable, "-c", script, "{project}"]),
    )
    proc = fk.start(home, "memd", env={"MEMD_TEST_FAIL_PROJECT": failing_project})
    try:
        projects = {f.cwd for f in manifest.files if f.thread_id in _eligible(manifest)}
        attempted = "SELECT COUNT(*) FROM projects WHERE last_attempt_at IS NOT NULL"
        assert fk.wait_for(lambda: fk.count(home, attempted) == len(projects), 90, procs=[proc])
        report = fk.status_json(home)
        assert proc.poll() is None
        assert fk.stop(proc) == 0
    finally:
        fk.kill(proc)
    rows = {r["project"]: r for r in fk.query(home, "SELECT * FROM projects")}
    assert set(rows) == projects
    for project, row in rows.items():
        if project == failing_project:
            assert row["last_error"].startswith("exit_code 3: xxx") and len(row["last_error"]) < 400
            assert row["failures"] == 1 and row["consolidated_seq"] < row["memory_seq"]
        else:
            assert row["last_error"] is None and row["failures"] == 0 and row["last_consolidated_at"]
    [shown] = [p for p in report["projects"] if p["project"] == failing_project]
    assert shown["last_error"].startswith("exit_code 3")
    evts = fk.events(home.log_path("memd"))
    suppressed = fk.named(evts, "consolidate_output_suppressed")
    assert len(suppressed) == len(projects) and all(e["output_bytes"] == 20 * 1024 * 1024 for e in suppressed)
    started = [e["project"] for e in fk.named(evts, "consolidate_started")]
    assert started.count(failing_project) == 1  # retried only after min_interval_s
    assert home.log_path("memd").stat().st_size < 512 * 1024


# --------------------------------------------------------------------------- shutdown


@pytest.mark.timeout(120)
def test_sigterm_lets_running_jobs_finish_within_the_grace_period(tmp_path: Path) -> None:
    home = fk.make_home(tmp_path, extract_concurrency=2, shutdown_grace_s=30)
    generate_corpus(home.sessions, n_files=8, size_mix=SMALL_SIZE_MIX, seed=2)
    proc = fk.start(home, "memd", env={"MEMD_TEST_EXTRACT_DELAY_S": "3"})
    try:
        started = lambda: len(fk.named(fk.events(home.log_path("memd")), "extract_started")) == 2  # noqa: E731
        assert fk.wait_for(started, 60, procs=[proc])
        assert fk.stop(proc, timeout_s=30) == 0
    finally:
        fk.kill(proc)
    evts = fk.events(home.log_path("memd"))
    names = [e["event"] for e in evts]
    stopping = names.index("daemon_stopping")
    in_flight = {e["thread_id"] for e in fk.named(evts, "extract_started")}
    finished = {e["thread_id"] for e in evts[stopping:] if e["event"] == "extract_done"}
    assert finished == in_flight and len(in_flight) == 2
    assert "extract_started" not in names[stopping:]  # no new claim after the signal
    assert names[-1] == "daemon_stopped"
    assert fk.count(home, "SELECT COUNT(*) FROM jobs WHERE status = 'running'") == 0
    assert fk.count(home, "SELECT COUNT(*) FROM memories") == 2
    assert fk.count(home, "SELECT COUNT(*) FROM daemons WHERE stopped_at IS NULL") == 0


@pytest.mark.timeout(120)
def test_second_signal_forces_the_exit_and_gives_claims_back(tmp_path: Path) -> None:
    home = fk.make_home(tmp_path, extract_concurrency=2, shutdown_grace_s=300)
    generate_corpus(home.sessions, n_files=8, size_mix=SMALL_SIZE_MIX, seed=2)
    proc = fk.start(home, "memd", env={"MEMD_TEST_EXTRACT_DELAY_S": "600"})
    try:
        running = "SELECT COUNT(*) FROM jobs WHERE status = 'running'"
        assert fk.wait_for(lambda: fk.count(home, running) == 2, 60, procs=[proc])
        proc.send_signal(15)
        waiting = lambda: fk.named(fk.events(home.log_path("memd")), "daemon_stopping")  # noqa: E731
        assert fk.wait_for(waiting, 30, procs=[proc])
        assert proc.poll() is None  # inside the 300 s grace period, the jobs are still running
        assert fk.stop(proc, timeout_s=30) == 0
    finally:
        fk.kill(proc)
    evts = fk.events(home.log_path("memd"))
    names = [e["event"] for e in evts]
    assert "shutdown_forced" in names and "shutdown_forced_cancel" in names and names[-1] == "daemon_stopped"
    released = fk.named(evts, "extract_released")
    assert len(released) == 2 and all(e["released"] for e in released)
    assert fk.count(home, "SELECT COUNT(*) FROM jobs WHERE status = 'running'") == 0
    assert fk.count(home, "SELECT COUNT(*) FROM jobs WHERE status = 'pending' AND attempts = 0") >= 2
    assert fk.count(home, "SELECT COUNT(*) FROM memories") == 0
    assert fk.status_json(home)["daemon"]["running"] is False


@pytest.mark.timeout(120)
def test_sigterm_terminates_the_consolidation_subprocess_and_releases_its_lease(tmp_path: Path) -> None:
    pid_file = tmp_path / "consolidation.pid"
    script = "import os, sys, time\nopen(sys.argv[1], 'w').write(str(os.getpid()))\ntime.sleep(600)\n"
    home = fk.make_home(
        tmp_path,
        shutdown_grace_s=1,
        consolidation__delay_s=0,
        consolidation__kill_grace_s=2,
        consolidation__concurrency=1,  # one command at a time: the one whose pid is written
        consolidation__command=json.dumps([sys.executable, "-c", script, str(pid_file)]),
    )
    generate_corpus(home.sessions, n_files=3, size_mix=SMALL_SIZE_MIX, seed=4)
    proc = fk.start(home, "memd")
    try:
        assert fk.wait_for(lambda: pid_file.exists() and pid_file.read_text().isdigit(), 60, procs=[proc])
        child = int(pid_file.read_text())
        assert pid_alive(child)
        held = "SELECT COUNT(*) FROM leases WHERE owner IS NOT NULL"
        assert fk.count(home, held) == 1
        assert fk.stop(proc, timeout_s=30) == 0
    finally:
        fk.kill(proc)
    assert fk.wait_for(lambda: not pid_alive(child), 10)
    assert fk.count(home, "SELECT COUNT(*) FROM leases WHERE owner IS NOT NULL") == 0
    names = [e["event"] for e in fk.events(home.log_path("memd"))]
    assert names.index("daemon_stopping") < names.index("consolidate_terminated") < names.index("consolidate_lease_released")
    assert names[-1] == "daemon_stopped"
