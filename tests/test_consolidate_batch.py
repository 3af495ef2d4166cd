"""Cheap consolidation (issue 14, SPEC §7): memd's own consolidator takes several projects per
process and the runner runs a bounded number of processes at once — every project still under its
own lease, with its own outcome, recorded and released as soon as its result is known."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from memd.bench.scale import generate_scale_corpus, project_cwd
from memd.cli import main
from memd.clock import FakeClock
from memd.config import Settings
from memd.consolidate.builtin import RESULT_PREFIX, RootOutcome
from memd.consolidate.env import consolidation_env
from memd.consolidate.runner import (
    INTERRUPTED,
    LEASE_LOST,
    SKIPPED_LEASE_HELD,
    TIMEOUT,
    ConsolidationRunner,
    batchable,
    offline_command,
)
from memd.memory import files as memory_files
from memd.store.records import FileRecord, MemoryRecord, ThreadRecord
from memd.store.store import Store
from tests.fakes import run_once

REPO = Path(__file__).resolve().parents[1]
OWNER = "host:1:runner"
OWN = [sys.executable, "-m", "memd", "consolidate", "--root", "{memory_root}"]


def project_key(k: int) -> str:
    return f"/home/u/proj-{k}"


async def add_memories(store: Store, memory_dir: Path, project: str, n: int, now: float) -> None:
    """``n`` extracted sessions of ``project`` with their trace files (through the job API)."""
    for i in range(n):
        thread_id = f"{project.rsplit('-', 1)[1]}-t{i}"
        path = f"/rollouts/{thread_id}.jsonl"
        thread = ThreadRecord(
            id=thread_id, path=path, project=project, cwd=project, source="cli", originator="codex_cli_rs",
            cli_version="0.50.0", model="gpt-5", title=f"task {i}", created_at=now - 100, updated_at=now - 50 + i,
            watermark=100, user_messages=1, skipped_lines=0, eligible=True, reason=None,
        )  # fmt: skip
        file = FileRecord(path, "codex", 1, abs(hash(thread_id)) % 10**9, 100, now, 100, "h", thread_id)
        await store.threads.record(thread, "{}", file)
        await store.jobs.upsert_extract(thread_id, 100, now)
        job = await store.jobs.claim("extract", "worker", 60)
        assert job is not None and job.key == thread_id
        root = memory_files.ensure_project_root(memory_dir, project)
        relpath = memory_files.trace_relpath(thread_id, thread.title)
        header = memory_files.TraceHeader(thread_id, project, project, path, now)
        body = f"# Session {i}\n\n## Task: task {i} of {project}\n\nOutcome: success\n\n- Reusable knowledge: `make {i}` builds it\n"
        staged = memory_files.stage_file(root, relpath, memory_files.render_trace_file(header, body))
        memory = MemoryRecord(thread_id, project, relpath, body, f"did task {i}", 100, now, "offline", 0, 0)
        assert await store.jobs.finish_extract(job, memory)
        staged.commit()


def own_offline(store: Store) -> list[str]:
    """memd's own consolidator as an offline daemon runs it."""
    return offline_command(OWN, state_db=store.path, max_unused_days=90)


def runner(store: Store, clock: FakeClock, memory_dir: Path, command: list[str], **kw: object) -> ConsolidationRunner:
    kw.setdefault("timeout_s", 60)
    kw.setdefault("kill_grace_s", 0.5)
    env = {**consolidation_env(OWN, uses_model=False), "PYTHONPATH": str(REPO)}
    return ConsolidationRunner(store, clock, memory_dir=memory_dir, command=command, owner=OWNER, env=env, **kw)  # type: ignore[arg-type]


@pytest.fixture
async def projects(store: Store, clock: FakeClock, tmp_path: Path) -> list[str]:
    keys = [project_key(k) for k in range(5)]
    for key in keys:
        await add_memories(store, tmp_path / "projects", key, 2, clock.now())
    return keys


async def test_several_projects_per_process_each_under_its_own_lease(
    store: Store, clock: FakeClock, tmp_path: Path, projects: list[str]
) -> None:
    memory_dir = tmp_path / "projects"
    run = runner(store, clock, memory_dir, own_offline(store), batch_size=3, concurrency=2)
    with capture_logs() as logs:
        outcomes = await run.run_many([(p, None) for p in projects])
    assert [o.project for o in outcomes] == projects
    assert all(o.ok and o.error is None and o.exit_code == 0 for o in outcomes), outcomes
    for key in projects:
        root = memory_files.project_root(memory_dir, key)
        assert f"task 1 of {key}" in (root / "MEMORY.md").read_text()
        record = await store.projects.get(key)
        assert record is not None and record.consolidated_seq == record.memory_seq == 2
        lease = await store.leases.get(f"consolidate:{key}")
        assert lease is not None and lease.owner is None and lease.fencing_token == 1
    started = [e for e in logs if e["event"] == "consolidate_started"]
    pids = {e["pid"] for e in started}
    assert len(started) == 5 and len(pids) == 2, "5 projects, 2 processes (batches of 3 and 2)"
    acquired = [e["project"] for e in logs if e["event"] == "consolidate_lease_acquired"]
    released = [e["project"] for e in logs if e["event"] == "consolidate_lease_released"]
    assert sorted(acquired) == sorted(released) == sorted(projects)


async def test_one_failing_root_fails_alone(
    store: Store, clock: FakeClock, tmp_path: Path, projects: list[str]
) -> None:
    memory_dir = tmp_path / "projects"
    broken = memory_files.project_root(memory_dir, projects[1])
    (broken / "MEMORY.md").mkdir()  # a directory where the handbook must go: it cannot be written
    run = runner(store, clock, memory_dir, own_offline(store), batch_size=5)
    outcomes = await run.run_many([(p, None) for p in projects])
    assert [o.ok for o in outcomes] == [True, False, True, True, True]
    assert outcomes[1].error is not None and outcomes[1].error.startswith("consolidate_failed: ")
    assert outcomes[1].exit_code == 1, "the process says that one of its roots failed"
    record = await store.projects.get(projects[1])
    assert record is not None and record.failures == 1 and record.last_error == outcomes[1].error
    assert record.consolidated_seq == 0
    for key in (projects[0], *projects[2:]):
        record = await store.projects.get(key)
        assert record is not None and record.consolidated_seq == 2 and record.last_error is None


async def test_a_held_lease_skips_only_its_project(
    store: Store, clock: FakeClock, tmp_path: Path, projects: list[str]
) -> None:
    assert await store.leases.acquire(f"consolidate:{projects[2]}", "other:2:x", 600) is not None
    run = runner(store, clock, tmp_path / "projects", own_offline(store), batch_size=5)
    outcomes = await run.run_many([(p, None) for p in projects])
    assert [o.error for o in outcomes] == [None, None, SKIPPED_LEASE_HELD, None, None]
    assert not (memory_files.project_root(tmp_path / "projects", projects[2]) / "MEMORY.md").exists()
    assert (await store.leases.get(f"consolidate:{projects[2]}")).owner == "other:2:x"  # type: ignore[union-attr]


FAKE_MEMD = """#!{python}
import json, os, sys, time
roots = [sys.argv[i + 1] for i, a in enumerate(sys.argv) if a == "--root"]
print({prefix!r} + json.dumps({{"root": roots[0], "ok": True, "error": None}}), flush=True)
while not os.path.exists({go!r}):  # the test looks at the first project's lease meanwhile
    time.sleep(0.02)
print("stuck on the second root", flush=True)
time.sleep(300)
"""


def fake_memd(tmp_path: Path) -> tuple[list[str], Path]:
    """A ``memd`` that reports its first root, waits for the test, then hangs."""
    go = tmp_path / "go"
    script = tmp_path / "bin" / "memd"
    script.parent.mkdir()
    script.write_text(FAKE_MEMD.format(python=sys.executable, prefix=RESULT_PREFIX, go=str(go)))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return [str(script), "consolidate", "--root", "{memory_root}"], go


async def test_a_reported_project_is_released_at_once_and_a_hung_one_times_out_alone(
    store: Store, clock: FakeClock, tmp_path: Path, projects: list[str]
) -> None:
    command, go = fake_memd(tmp_path)
    run = runner(store, clock, tmp_path / "projects", command, batch_size=3, timeout_s=1.5)
    task = asyncio.create_task(run.run_batch([(p, None) for p in projects[:3]]))
    first = f"consolidate:{projects[0]}"
    for _ in range(600):  # the first project's result arrives while the process still runs
        lease = await store.leases.get(first)
        if lease is not None and lease.owner is None:
            break
        await asyncio.sleep(0.02)
    assert lease is not None and lease.owner is None
    assert (await store.leases.get(f"consolidate:{projects[1]}")).owner == OWNER  # type: ignore[union-attr]
    record = await store.projects.get(projects[0])
    assert record is not None and record.consolidated_seq == 2
    go.write_text("go")
    outcomes = await asyncio.wait_for(task, 60)
    assert [o.error for o in outcomes] == [None, TIMEOUT, TIMEOUT]
    assert "stuck on the second root" in outcomes[1].output_tail
    for key in projects[1:3]:
        record = await store.projects.get(key)
        assert record is not None and record.last_error == TIMEOUT and record.consolidated_seq == 0
        assert (await store.leases.get(f"consolidate:{key}")).owner is None  # type: ignore[union-attr]


async def test_a_lost_lease_stops_the_batch_and_the_others_are_retried_later(
    store: Store, clock: FakeClock, tmp_path: Path, projects: list[str]
) -> None:
    command, go = fake_memd(tmp_path)
    run = runner(store, clock, tmp_path / "projects", command, batch_size=3, lease_s=0.3)
    task = asyncio.create_task(run.run_batch([(p, None) for p in projects[:3]]))
    go.write_text("go")  # the process reports the first root, then hangs
    for _ in range(600):  # every lease was taken and the first project is settled
        lease = await store.leases.get(f"consolidate:{projects[0]}")
        if lease is not None and lease.owner is None:
            break
        await asyncio.sleep(0.02)
    taken = None
    for _ in range(500):  # the second project's lease expires (fake time): another daemon takes it
        clock.advance(1000)
        taken = await store.leases.acquire(f"consolidate:{projects[1]}", "other:2:x", 600)
        if taken is not None:
            break
        await asyncio.sleep(0.01)
    assert taken is not None
    outcomes = await asyncio.wait_for(task, 60)
    errors = [o.error for o in outcomes]
    assert errors[1] == LEASE_LOST and errors[2] == INTERRUPTED, errors
    assert outcomes[1].exit_code == -15
    assert (await store.leases.get(f"consolidate:{projects[1]}")).owner == "other:2:x"  # type: ignore[union-attr]
    assert (await store.leases.get(f"consolidate:{projects[2]}")).owner is None  # type: ignore[union-attr]


def test_only_memds_own_consolidator_takes_a_batch(tmp_path: Path) -> None:
    assert batchable(OWN) and batchable(["/usr/bin/memd", "consolidate", "--root", "{memory_root}"])
    assert not batchable(["codex", "exec", "--cd", "{memory_root}", "consolidate"])
    assert not batchable([*OWN, "--project", "{project}"])
    db = tmp_path / "memd.sqlite3"
    assert offline_command(OWN, state_db=db, max_unused_days=90) == [
        sys.executable, "-m", "memd", "consolidate", "--offline", "--state-db", str(db), "--max-unused-days", "90",
        "--root", "{memory_root}",
    ]  # fmt: skip
    codex = ["codex", "exec", "{memory_root}"]
    assert offline_command(codex, state_db=db, max_unused_days=90) == codex
    with pytest.raises(ValueError, match="only memd's own consolidator"):
        ConsolidationRunner(
            None,
            FakeClock(),
            memory_dir=tmp_path,
            command=["codex", "{memory_root}"],
            owner=OWNER,
            batch_size=4,  # type: ignore[arg-type]
        )


def test_memd_consolidate_takes_several_roots_and_reports_each(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    roots = []
    for k in range(3):
        root = memory_files.ensure_project_root(tmp_path / "projects", project_key(k))
        header = memory_files.TraceHeader(f"t{k}", project_key(k), project_key(k), "/r.jsonl", 1_800_000_000.0)
        body = f"## Task: build {k}\n\nOutcome: success\n"
        memory_files.stage_file(
            root, f"trace_summaries/t{k}_x.md", memory_files.render_trace_file(header, body)
        ).commit()
        roots.append(root)
    missing = tmp_path / "absent"
    offline = ["consolidate", "--offline", "--state-db", str(tmp_path / "none.sqlite3"), "--max-unused-days", "90"]
    args = offline + [a for r in (roots[0], missing, roots[2]) for a in ("--root", str(r))]
    assert main(args) == 1
    captured = capsys.readouterr()
    results = [RootOutcome.parse(line) for line in captured.out.splitlines()]
    assert [(r.root, r.ok) for r in results if r] == [
        (str(roots[0]), True),
        (str(missing), False),
        (str(roots[2]), True),
    ]
    assert "is not a directory" in captured.err
    assert "build 0" in (roots[0] / "MEMORY.md").read_text() and "build 2" in (roots[2] / "MEMORY.md").read_text()
    assert not (roots[1] / "MEMORY.md").exists()
    assert main([*offline, "--root", str(roots[1])]) == 0
    assert os.path.exists(roots[1] / "MEMORY.md")
    assert main(["consolidate", "--offline", "--root", str(roots[1])]) == 2  # what the daemon must pass
    assert "--offline needs --state-db and --max-unused-days" in capsys.readouterr().err


def test_the_offline_child_imports_no_settings_model_client_or_async_database(tmp_path: Path) -> None:
    root = memory_files.ensure_project_root(tmp_path / "projects", project_key(0))
    code = (
        "import json, sys\n"
        "from memd.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "heavy = ('pydantic', 'pydantic_settings', 'openai', 'httpx', 'aiosqlite', 'jinja2')\n"
        "print(json.dumps({'code': code, 'loaded': [m for m in heavy if m in sys.modules]}))\n"
    )
    argv = ["consolidate", "--offline", "--state-db", str(tmp_path / "none.sqlite3"), "--max-unused-days", "90"]
    done = subprocess.run(
        [sys.executable, "-c", code, *argv, "--root", str(root)],
        env={**consolidation_env(OWN, uses_model=False), "PYTHONPATH": str(REPO)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"code": 0, "loaded": []}, done.stderr[-2000:]


async def test_memd_once_consolidates_every_project_with_a_few_offline_processes(tmp_path: Path) -> None:
    made = generate_scale_corpus(tmp_path / "sessions", n_sessions=120, seed=3)  # 6 projects
    settings = Settings(
        sessions=[made.root], state_dir=tmp_path / "state", memory_dir=tmp_path / "memory", min_idle_s=0,
        max_age_days=0, extractor="offline",
    )  # fmt: skip
    with capture_logs() as logs:
        summary = await run_once(settings)
    assert summary.consolidated == made.projects == 6 and summary.consolidation_failed == 0
    started = [e for e in logs if e["event"] == "consolidate_started"]
    assert len(started) == 6 and len({e["pid"] for e in started}) == 2, "two processes of three projects each"
    assert {e["command"] for e in started} == {sys.executable}
    for k in range(6):
        assert (memory_files.project_root(settings.memory_dir, project_cwd(k)) / "MEMORY.md").is_file()


def test_an_unexpected_error_in_one_root_fails_that_root_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import memd.consolidate.builtin as builtin

    roots = [memory_files.ensure_project_root(tmp_path / "projects", project_key(k)) for k in range(3)]
    real = builtin.consolidate_root
    secret = "sk-proj-Q7hB2kLm9XwP4rT6yV8nZ1cF3gJ5sD0aE2uI4oK6"

    def buggy(root: Path, **kw: object) -> object:
        if root == roots[1]:
            raise KeyError(f"a bug holding {secret}")
        return real(root, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(builtin, "consolidate_root", buggy)
    offline = ["consolidate", "--offline", "--state-db", str(tmp_path / "none.sqlite3"), "--max-unused-days", "90"]
    assert main(offline + [a for r in roots for a in ("--root", str(r))]) == 1
    captured = capsys.readouterr()
    results = [r for r in (RootOutcome.parse(line) for line in captured.out.splitlines()) if r]
    assert [(r.root, r.ok) for r in results] == [(str(roots[0]), True), (str(roots[1]), False), (str(roots[2]), True)]
    assert "unexpected error: KeyError" in (results[1].error or "")
    assert secret not in captured.out and secret not in captured.err
