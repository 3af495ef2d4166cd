"""The consolidation runner against the real store and real subprocesses (SPEC §7, §13)."""

from __future__ import annotations

import asyncio
import os
import sys
import tracemalloc
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from memd.clock import FakeClock
from memd.consolidate.env import consolidation_env
from memd.consolidate.runner import (
    LEASE_LOST,
    SKIPPED_LEASE_HELD,
    TIMEOUT,
    ConsolidationRunner,
    ConsolidationStatus,
    render_memory_summary,
)
from memd.memory import files as memory_files
from memd.store.records import FileRecord, MemoryRecord, ThreadRecord
from memd.store.store import Store

PROJECT = "/home/u/proj"
LEASE = f"consolidate:{PROJECT}"
OWNER = "host:1:runner"


@pytest.fixture
def memory_dir(tmp_path: Path) -> Path:
    return tmp_path / "projects"


def _py(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


def _runner(store: Store, clock: FakeClock, memory_dir: Path, command: list[str], **kw) -> ConsolidationRunner:
    kw.setdefault("timeout_s", 30)
    kw.setdefault("kill_grace_s", 0.5)
    return ConsolidationRunner(store, clock, memory_dir=memory_dir, command=command, owner=OWNER, **kw)


async def _add_memory(store: Store, memory_dir: Path, thread_id: str, updated_at: float, summary: str) -> MemoryRecord:
    """Index a thread, extract it through the job API and write its trace file."""
    path = f"/rollouts/{thread_id}.jsonl"
    thread = ThreadRecord(
        id=thread_id, path=path, project=PROJECT, cwd=PROJECT, source="cli",
        originator="codex_cli_rs", cli_version="0.50.0", model="gpt-5", title=f"title {thread_id}",
        created_at=updated_at - 100, updated_at=updated_at, watermark=100, user_messages=1,
        skipped_lines=0, eligible=True, reason=None,
    )  # fmt: skip
    file = FileRecord(path, "codex", 1, hash(thread_id) & 0xFFFF, 100, updated_at, 100, "h", thread_id)
    await store.threads.record(thread, "{}", file)
    await store.jobs.upsert_extract(thread_id, 100, updated_at)
    job = await store.jobs.claim("extract", "worker", 60)
    assert job is not None and job.key == thread_id
    root = memory_files.ensure_project_root(memory_dir, PROJECT)
    relpath = memory_files.trace_relpath(thread_id, thread.title)
    header = memory_files.TraceHeader(thread_id, PROJECT, PROJECT, path, updated_at)
    staged = memory_files.stage_file(root, relpath, memory_files.render_trace_file(header, f"# {summary}"))
    memory = MemoryRecord(thread_id, PROJECT, relpath, f"# {summary}", summary, 100, updated_at,
                          "offline", 0, 0)  # fmt: skip
    assert await store.jobs.finish_extract(job, memory)
    staged.commit()
    return memory


def _gone(pid: int) -> bool:
    """A process is gone when it no longer exists or is a zombie awaiting its reaper."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


async def _eventually_gone(pid: int) -> bool:
    for _ in range(200):  # a SIGKILLed process disappears asynchronously
        if _gone(pid):
            return True
        await asyncio.sleep(0.025)
    return False


async def _wait_for(path: Path) -> None:
    for _ in range(800):
        if path.exists() and path.read_text().strip():
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"{path} never appeared")


async def _assert_released(store: Store) -> None:
    lease = await store.leases.get(LEASE)
    assert lease is not None and lease.owner is None, lease


# --------------------------------------------------------------------------- success


async def test_success_prunes_writes_summary_and_records(
    store: Store, clock: FakeClock, memory_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(3):
        await _add_memory(store, memory_dir, f"t{i}", clock.now() - 1000 + i, f"summary {i}")
    seq = (await store.projects.get(PROJECT)).memory_seq
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-must-not-leak-000000000000")
    code = (
        "import os, sys; open('MEMORY.md', 'w').write('new handbook');"
        "print('root', sys.argv[1] == os.getcwd(), 'project', sys.argv[2]);"
        "print('key', os.environ.get('OPENAI_API_KEY'))"
    )
    runner = _runner(store, clock, memory_dir, _py(code, "{memory_root}", "p={project}"),
                     max_traces_per_project=2)  # fmt: skip
    with capture_logs() as logs:
        outcome = await runner.run(PROJECT, seq)

    root = memory_files.project_root(memory_dir, PROJECT)
    assert outcome.ok and outcome.error is None and outcome.exit_code == 0, outcome
    assert outcome.status is ConsolidationStatus.DONE
    assert f"root True project p={PROJECT}" in outcome.output_tail
    assert "key None" in outcome.output_tail, "the API key must not reach the command"
    assert (root / "MEMORY.md").read_text() == "new handbook"
    traces = sorted(p.name for p in (root / "trace_summaries").iterdir())
    assert traces == sorted(Path(memory_files.trace_relpath(t, f"title {t}")).name for t in ("t1", "t2"))
    assert (root / "memory_summary.md").read_text() == (
        f"# Memory summary: {PROJECT}\n\n- summary 2 [t2 2025-12-31]\n- summary 1 [t1 2025-12-31]\n"
    )  # short provenance: the session's id and date
    project = await store.projects.get(PROJECT)
    assert project.consolidated_seq == seq and project.failures == 0
    await _assert_released(store)
    events = [e["event"] for e in logs]
    assert events.index("consolidate_lease_acquired") < events.index("consolidate_started")
    assert "consolidate_output" in events and events[-1] == "consolidate_lease_released"


BUILTIN = (
    "import sys; from pathlib import Path; from memd.consolidate.builtin import consolidate_root;"
    "print(consolidate_root(Path(sys.argv[1])))"
)


async def test_runs_the_builtin_consolidator_end_to_end(store: Store, clock: FakeClock, memory_dir: Path) -> None:
    await _add_memory(store, memory_dir, "t1", clock.now() - 10, "older")
    await _add_memory(store, memory_dir, "t2", clock.now(), "newer")
    repo = Path(__file__).resolve().parents[1]
    env = {**consolidation_env([sys.executable, "-m", "memd"], uses_model=False), "PYTHONPATH": str(repo)}
    runner = _runner(store, clock, memory_dir, _py(BUILTIN, "{memory_root}"), env=env)
    outcome = await runner.run(PROJECT, 2)
    assert outcome.ok, outcome
    text = (memory_files.project_root(memory_dir, PROJECT) / "MEMORY.md").read_text()
    assert text.startswith(f"# Project memory: {PROJECT}\n")
    assert text.index("newer — uncertain") < text.index("older — uncertain")


async def test_seq_read_from_store_when_not_given(store: Store, clock: FakeClock, memory_dir: Path) -> None:
    await _add_memory(store, memory_dir, "t1", clock.now(), "s")
    outcome = await _runner(store, clock, memory_dir, _py("pass")).run(PROJECT)
    assert outcome.ok
    project = await store.projects.get(PROJECT)
    assert project.consolidated_seq == project.memory_seq == 1


async def test_a_project_with_only_no_op_sessions_gets_no_memory_folder(
    store: Store, clock: FakeClock, memory_dir: Path
) -> None:
    path = "/rollouts/noop.jsonl"
    thread = ThreadRecord(
        id="noop", path=path, project=PROJECT, cwd=PROJECT, source="cli", originator="codex_cli_rs",
        cli_version="0.50.0", model="gpt-5", title="hi", created_at=1.0, updated_at=2.0, watermark=100,
        user_messages=1, skipped_lines=0, eligible=True, reason=None,
    )  # fmt: skip
    await store.threads.record(thread, "{}", FileRecord(path, "codex", 1, 7, 100, 2.0, 100, "h", "noop"))
    await store.jobs.upsert_extract("noop", 100, 2.0)
    job = await store.jobs.claim("extract", "worker", 60)
    assert job is not None
    assert await store.jobs.finish_extract(job, MemoryRecord("noop", PROJECT, None, "", "", 100, 2.0, "offline", 0, 0))
    marker = memory_dir / "ran"
    outcome = await _runner(store, clock, memory_dir, _py(f"open({str(marker)!r}, 'w')")).run(PROJECT)
    assert outcome.ok and outcome.exit_code is None, outcome
    assert outcome.status is ConsolidationStatus.NOTHING_TO_DO
    assert not marker.exists(), "nothing to consolidate: the command is not run"
    assert not memory_files.project_root(memory_dir, PROJECT).exists()
    project = await store.projects.get(PROJECT)
    assert project is not None and project.consolidated_seq == project.memory_seq  # not due again
    await _assert_released(store)


async def test_skipped_when_lease_held(store: Store, clock: FakeClock, memory_dir: Path) -> None:
    assert await store.leases.acquire(LEASE, "other", 600) is not None
    marker = memory_dir / "ran"
    runner = _runner(store, clock, memory_dir, _py(f"open({str(marker)!r}, 'w')"))
    outcome = await runner.run(PROJECT, 1)
    assert not outcome.ok and outcome.error == SKIPPED_LEASE_HELD and outcome.exit_code is None
    assert outcome.status is ConsolidationStatus.SKIPPED and not outcome.failed
    assert not marker.exists()
    assert (await store.leases.get(LEASE)).owner == "other"


async def test_a_held_lease_is_logged_once_per_holder_and_a_dead_holder_is_taken_back(
    store: Store, clock: FakeClock, memory_dir: Path
) -> None:
    from structlog.testing import capture_logs

    assert await store.leases.acquire(LEASE, "other", 600) is not None
    asked: list[int] = []

    async def on_lease_held() -> int:
        asked.append(1)
        return 0  # nobody dead: the lease stays held

    runner = _runner(store, clock, memory_dir, _py("pass"), on_lease_held=on_lease_held)
    with capture_logs() as logs:
        for _ in range(5):
            assert (await runner.run(PROJECT, 1)).error == SKIPPED_LEASE_HELD
    skipped = [e for e in logs if e["event"] == "consolidate_skipped"]
    assert [e["log_level"] for e in skipped] == ["info"] + ["debug"] * 4
    assert skipped[0]["holder"] == "other" and len(asked) == 5

    # The holder died: the callback takes its lease back and the run proceeds at once.
    async def take_back() -> int:
        await store.daemons.register("other", 1, "h")
        await store.daemons.take_back(["other"])
        return 1

    runner.on_lease_held = take_back
    await _add_memory(store, memory_dir, "t1", 1000.0, "first")
    with capture_logs() as logs:
        outcome = await runner.run(PROJECT, None)
    assert outcome.error != SKIPPED_LEASE_HELD
    assert [e for e in logs if e["event"] == "consolidate_lease_acquired"]


# --------------------------------------------------------------------------- failures


async def test_non_zero_exit_keeps_memory_and_records_failure(store: Store, clock: FakeClock, memory_dir: Path) -> None:
    await _add_memory(store, memory_dir, "t1", clock.now(), "s")
    root = memory_files.project_root(memory_dir, PROJECT)
    (root / "MEMORY.md").write_text("previous handbook\n")
    code = "import sys; print('working', flush=True);print('boom: cannot merge', file=sys.stderr); sys.exit(3)"
    with capture_logs() as logs:
        outcome = await _runner(store, clock, memory_dir, _py(code)).run(PROJECT, 1)
    assert not outcome.ok and outcome.exit_code == 3
    assert outcome.error == "exit_code 3: boom: cannot merge"
    assert outcome.status is ConsolidationStatus.FAILED and outcome.failed
    assert "working" in outcome.output_tail
    assert (root / "MEMORY.md").read_text() == "previous handbook\n"
    project = await store.projects.get(PROJECT)
    assert project.failures == 1 and project.last_error == outcome.error
    assert project.consolidated_seq == 0
    await _assert_released(store)
    failed = [e for e in logs if e["event"] == "consolidate_failed"]
    assert len(failed) == 1 and failed[0]["error"] == outcome.error


async def test_missing_command(store: Store, clock: FakeClock, memory_dir: Path) -> None:
    await _add_memory(store, memory_dir, "t1", clock.now(), "s")
    argv0 = str(memory_dir / "no-such-consolidator")
    with capture_logs() as logs:
        outcome = await _runner(store, clock, memory_dir, [argv0, "--root", "{memory_root}"]).run(PROJECT, 1)
    assert not outcome.ok and outcome.exit_code is None
    assert outcome.error == f"command_not_found: {argv0}"
    assert all("exc_info" not in e for e in logs), "no traceback for a missing command"
    assert (await store.projects.get(PROJECT)).last_error == outcome.error
    await _assert_released(store)


HANG = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, '-c',
    'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)'])
open('pids.tmp', 'w').write(f'{os.getpid()} {child.pid}')
os.rename('pids.tmp', 'pids')
print('hanging', flush=True)
time.sleep(300)
"""


async def test_hang_past_timeout_kills_the_process_group(store: Store, clock: FakeClock, memory_dir: Path) -> None:
    await _add_memory(store, memory_dir, "t1", clock.now(), "s")
    root = memory_files.project_root(memory_dir, PROJECT)
    runner = _runner(store, clock, memory_dir, _py(HANG), timeout_s=1, kill_grace_s=0.5)
    with capture_logs() as logs:
        outcome = await runner.run(PROJECT, 1)
    assert not outcome.ok and outcome.error == TIMEOUT
    assert outcome.status is ConsolidationStatus.TIMEOUT and outcome.failed
    assert outcome.exit_code == -9, "SIGTERM is ignored, so SIGKILL after the grace period"
    leader, grandchild = map(int, (root / "pids").read_text().split())
    assert await _eventually_gone(leader)
    assert await _eventually_gone(grandchild), "the whole process group is killed"
    assert "hanging" in outcome.output_tail
    events = [e["event"] for e in logs]
    assert "consolidate_timeout" in events and "consolidate_killed" in events
    assert (await store.projects.get(PROJECT)).last_error == TIMEOUT
    await _assert_released(store)


async def test_background_process_left_by_the_command_is_killed(
    store: Store, clock: FakeClock, memory_dir: Path
) -> None:
    await _add_memory(store, memory_dir, "t1", clock.now(), "s")
    root = memory_files.project_root(memory_dir, PROJECT)
    code = (
        "import subprocess, sys\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
        "open('pid', 'w').write(str(child.pid))\n"
        "print('leaving a child behind')\n"
    )
    with capture_logs() as logs:
        outcome = await _runner(store, clock, memory_dir, _py(code)).run(PROJECT, 1)
    assert outcome.ok and outcome.exit_code == 0
    assert "leaving a child behind" in outcome.output_tail
    assert await _eventually_gone(int((root / "pid").read_text()))
    assert "consolidate_stragglers_killed" in [e["event"] for e in logs]


async def test_lease_lost_mid_run_terminates_command(store: Store, clock: FakeClock, memory_dir: Path) -> None:
    await _add_memory(store, memory_dir, "t1", clock.now(), "s")
    root = memory_files.project_root(memory_dir, PROJECT)
    code = "import os, time; open('pid', 'w').write(str(os.getpid())); time.sleep(300)"
    runner = _runner(store, clock, memory_dir, _py(code), lease_s=0.3, timeout_s=60)
    task = asyncio.create_task(runner.run(PROJECT, 1))
    await _wait_for(root / "pid")
    other = None
    for _ in range(100):  # the lease expires (fake time); another daemon takes it over
        clock.advance(1000)
        other = await store.leases.acquire(LEASE, "other:2:x", 600)
        if other is not None:
            break
    assert other is not None
    outcome = await asyncio.wait_for(task, 30)
    assert not outcome.ok and outcome.error == LEASE_LOST
    assert outcome.status is ConsolidationStatus.LEASE_LOST
    assert outcome.exit_code == -15, "terminated with SIGTERM"
    assert await _eventually_gone(int((root / "pid").read_text()))
    lease = await store.leases.get(LEASE)
    assert lease.owner == "other:2:x" and lease.fencing_token == other, "the new holder keeps the lease"
    project = await store.projects.get(PROJECT)
    assert project.consolidated_seq == 0
    assert (project.failures, project.last_error) == (0, None), "a lost lease is not the project's failure"


async def test_cancellation_terminates_child_and_releases_lease(
    store: Store, clock: FakeClock, memory_dir: Path
) -> None:
    await _add_memory(store, memory_dir, "t1", clock.now(), "s")
    root = memory_files.project_root(memory_dir, PROJECT)
    code = "import os, time; open('pid', 'w').write(str(os.getpid())); time.sleep(300)"
    task = asyncio.create_task(_runner(store, clock, memory_dir, _py(code)).run(PROJECT, 1))
    await _wait_for(root / "pid")
    assert (await store.leases.get(LEASE)).owner == OWNER
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await _eventually_gone(int((root / "pid").read_text()))
    await _assert_released(store)


async def test_megabytes_of_output_keep_a_bounded_tail(store: Store, clock: FakeClock, memory_dir: Path) -> None:
    await _add_memory(store, memory_dir, "t1", clock.now(), "s")
    code = (
        "import sys\n"
        "line = 'x' * 199 + '\\n'\n"
        "for i in range(50_000): sys.stdout.write(line)\n"  # 10 MB of lines
        "sys.stdout.write('y' * 4_000_000)\n"  # one 4 MB line without a newline
        "sys.stdout.write('\\nLAST LINE\\n')\n"
    )
    runner = _runner(store, clock, memory_dir, _py(code), output_cap_bytes=4096)
    tracemalloc.start()
    try:
        with capture_logs() as logs:
            outcome = await runner.run(PROJECT, 1)
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert outcome.ok, outcome.error
    assert len(outcome.output_tail.encode()) <= 4096
    assert outcome.output_tail.endswith("y\nLAST LINE\n")
    assert peak_bytes < 3_000_000, f"14 MB of output must not be held in memory ({peak_bytes})"
    lines = [e for e in logs if e["event"] == "consolidate_output"]
    assert len(lines) == 1000 and all(len(e["line"]) <= 1001 for e in lines)
    suppressed = [e for e in logs if e["event"] == "consolidate_output_suppressed"]
    assert len(suppressed) == 1 and suppressed[0]["output_bytes"] == 50_000 * 200 + 4_000_011


# --------------------------------------------------------------------------- summary rendering


def test_render_memory_summary_folds_lines_and_stays_small() -> None:
    memory = MemoryRecord("t", PROJECT, "trace_summaries/t_x.md", "m", "two\nlines  here", 1, 0.0,
                          "offline", 0, 0)  # fmt: skip
    empty = MemoryRecord("u", PROJECT, "trace_summaries/u_y.md", "m", "", 1, 0.0, "offline", 0, 0)
    dated = MemoryRecord("019a085e-04c1", PROJECT, "trace_summaries/v.md",
                         "# x\nTrace context: p, 2025-10-21, codex, gpt-5\n", "s", 1, 0.0, "offline", 0, 0)  # fmt: skip
    assert render_memory_summary(PROJECT, [memory, empty, dated]).splitlines()[2:] == [
        "- two lines here [t undated]",
        "- (no summary) [u undated]",
        "- s [019a085e 2025-10-21]",
    ]
    assert "No trace memories yet." in render_memory_summary(PROJECT, [])
    many = [MemoryRecord(f"t{n}", PROJECT, f"trace_summaries/t{n}.md", "m", "word " * 120, 1, 0.0, "offline", 0, 0)
            for n in range(40)]  # fmt: skip
    text = render_memory_summary(PROJECT, many)
    assert len(text.encode()) <= 7_200  # about 1,800 tokens at 4 bytes a token
    assert text.rstrip().endswith("older sessions: see `trace_summaries/` and MEMORY.md")


async def test_the_prune_spares_a_trace_re_extracted_after_the_list_was_read(
    store: Store, clock: FakeClock, memory_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(3):
        await _add_memory(store, memory_dir, f"t{i}", clock.now() - 1000 + i, f"summary {i}")
    stale = await store.memories.list_for_project(PROJECT)  # t0 is the oldest: beyond the newest 2
    # Meanwhile a worker extracts t0 again (it grew), under the same name.
    root = memory_files.project_root(memory_dir, PROJECT)
    relpath = memory_files.trace_relpath("t0", "title t0")
    await store.jobs.upsert_extract("t0", 200, clock.now())
    job = await store.jobs.claim("extract", "worker", 60)
    assert job is not None and job.key == "t0"
    header = memory_files.TraceHeader("t0", PROJECT, PROJECT, "/rollouts/t0.jsonl", clock.now(), source_watermark=200)
    staged = memory_files.stage_file(root, relpath, memory_files.render_trace_file(header, "# fresh"))
    fresh = MemoryRecord("t0", PROJECT, relpath, "# fresh", "fresh", 200, clock.now(), "offline", 0, 0)
    assert await store.jobs.finish_extract(job, fresh)
    staged.commit()

    async def read_before_the_commit(project: str) -> list[MemoryRecord]:
        return stale

    monkeypatch.setattr(store.memories, "list_for_project", read_before_the_commit)
    runner = _runner(store, clock, memory_dir, _py("pass"), max_traces_per_project=2)
    assert (await runner.run(PROJECT)).ok
    assert memory_files.parse_trace_file((root / relpath).read_text())[1] == "# fresh"


async def test_a_trace_without_a_row_counts_among_the_newest_traces(
    store: Store, clock: FakeClock, memory_dir: Path
) -> None:
    for i in range(2):
        await _add_memory(store, memory_dir, f"t{i}", clock.now() - 1000 + i, f"summary {i}")
    root = memory_files.project_root(memory_dir, PROJECT)

    def rowless(thread_id: str, updated_at: float) -> Path:
        header = memory_files.TraceHeader(thread_id, PROJECT, PROJECT, f"/gone/{thread_id}.jsonl", updated_at)
        relpath = memory_files.trace_relpath(thread_id, "kept after a reinstall")
        memory_files.stage_file(root, relpath, memory_files.render_trace_file(header, "# old")).commit()
        return root / relpath

    newer, older = rowless("r-new", clock.now() - 500), rowless("r-old", clock.now() - 5000)
    runner = _runner(store, clock, memory_dir, _py("pass"), max_traces_per_project=3)
    assert (await runner.run(PROJECT)).ok
    assert newer.is_file() and not older.exists()  # r-new, t1, t0 are the newest 3
    assert len(list((root / "trace_summaries").iterdir())) == 3


async def test_a_secret_in_the_failing_commands_output_is_stored_redacted(
    store: Store, clock: FakeClock, memory_dir: Path, db_path: Path
) -> None:
    import sqlite3

    token = "ghp_Zq8mX0pLw4Tn2Vb6Yc1Rd5Sf9Gh3Jk7Lm0Np"  # a generated shape, not a real token
    await _add_memory(store, memory_dir, "t1", clock.now(), "s")
    code = f"import sys; print('push failed: https://x:{token}@github.com/o/r.git', file=sys.stderr); sys.exit(2)"
    outcome = await _runner(store, clock, memory_dir, _py(code)).run(PROJECT, 1)
    assert outcome.error == "exit_code 2: push failed: https://[REDACTED_SECRET]@github.com/o/r.git"
    project = await store.projects.get(PROJECT)
    assert project is not None and project.last_error == outcome.error
    with sqlite3.connect(db_path) as conn:
        assert token not in "\n".join(conn.iterdump())


async def test_during_a_shutdown_a_command_ignoring_sigterm_is_killed_by_the_deadline(
    store: Store, clock: FakeClock, memory_dir: Path
) -> None:
    await _add_memory(store, memory_dir, "t1", clock.now(), "s")
    root = memory_files.project_root(memory_dir, PROJECT)
    code = (
        "import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
        " open('pid', 'w').write(str(os.getpid())); time.sleep(300)"
    )
    runner = _runner(store, clock, memory_dir, _py(code), kill_grace_s=600)  # far beyond systemd's stop timeout
    task = asyncio.create_task(runner.run(PROJECT, 1))
    await _wait_for(root / "pid")
    runner.stop_by(asyncio.get_running_loop().time() + 2)
    task.cancel()
    with capture_logs() as logs:
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(task), 60)  # with the 600 s grace this would time out
    assert [e["signal"] for e in logs if e["event"] == "consolidate_killed"] == ["SIGKILL"]
    assert await _eventually_gone(int((root / "pid").read_text()))
    await _assert_released(store)
