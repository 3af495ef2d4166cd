"""The ``memd`` command line (SPEC §10): ``show``, ``forget``, ``retry``, ``status --json``,
``once`` and ``backfill --dry-run``, and the exit codes 0 / 1 / 2 / 78.

``main(argv)`` runs in a worker thread (it starts its own event loop), so the fake OpenAI server
can keep serving on the test's loop.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from memd.cli import main
from memd.clock import FakeClock
from memd.config import Settings, load_settings
from memd.memory import files as memory_files
from memd.store.store import Store
from tests import fake_openai as fk
from tests.builders import simple_turns, thread_id, write_rollout
from tests.fakes import run_once

KEY = "cli-test-key-0123456789"


@pytest.fixture
def env(tmp_path, monkeypatch) -> Settings:
    """Point memd (in-process settings and the CLI's environment) at temporary directories."""
    sessions = tmp_path / "sessions"
    sessions.mkdir()
    monkeypatch.setenv("MEMD_SESSIONS", str(sessions))
    monkeypatch.setenv("MEMD_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("MEMD_MEMORY_DIR", str(tmp_path / "memory"))
    monkeypatch.setenv("MEMD_MIN_IDLE_S", "0")
    monkeypatch.setenv("MEMD_MAX_AGE_DAYS", "0")
    monkeypatch.setenv("MEMD_CONSOLIDATION__COMMAND", json.dumps(["true"]))
    return load_settings(None, {})


async def memd(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv))


def later() -> FakeClock:
    """A clock after everything the CLI (real time) and the daemon (real time + 60 s) stamped."""
    return FakeClock(time.time() + 3600)


async def offline_once(settings: Settings, n_threads: int = 2) -> None:
    """Index and extract ``n_threads`` small sessions with the offline extractor."""
    cwd = settings.sessions[0].parent / "proj"
    cwd.mkdir(exist_ok=True)
    for n in range(n_threads):
        write_rollout(settings.sessions[0], thread_id(n), cwd, simple_turns(f"cli-{n}"))
    summary = await run_once(settings)
    assert summary.extracted == n_threads


# --------------------------------------------------------------------------- show


def write_memory(settings: Settings, project: str, text: str, summary: str = "") -> Path:
    root = memory_files.ensure_project_root(settings.memory_dir, project)
    (root / "MEMORY.md").write_text(text)
    if summary:
        (root / "memory_summary.md").write_text(summary)
    return root


async def test_show_prints_the_memory_of_the_git_project_containing_a_path(env, tmp_path, capsys):
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    (repo / "src" / "deep").mkdir(parents=True)
    write_memory(env, str(repo.resolve()), "# Repo handbook\n", "- routing map\n")
    assert await memd("show", str(repo / "src" / "deep")) == 0
    assert capsys.readouterr().out == "# Repo handbook\n"
    assert await memd("show", "--summary", str(repo)) == 0
    assert capsys.readouterr().out == "- routing map\n"


async def test_show_finds_a_cwd_keyed_project_from_a_subdirectory_and_by_its_key(env, tmp_path, capsys, monkeypatch):
    project = tmp_path / "plain"
    (project / "a" / "b").mkdir(parents=True)
    write_memory(env, str(project.resolve()), "# Plain handbook\n")
    assert await memd("show", str(project / "a" / "b")) == 0
    assert capsys.readouterr().out == "# Plain handbook\n"
    # Default: the current directory.
    monkeypatch.chdir(project / "a")
    assert await memd("show") == 0
    assert capsys.readouterr().out == "# Plain handbook\n"
    # A project key whose directory no longer exists.
    write_memory(env, "/gone/project", "# Gone\n")
    assert await memd("show", "/gone/project") == 0
    assert capsys.readouterr().out == "# Gone\n"


async def test_show_without_memory_exits_1_with_a_message(env, tmp_path, capsys):
    (tmp_path / "nothing").mkdir()
    assert await memd("show", str(tmp_path / "nothing")) == 1
    err = capsys.readouterr().err
    assert "no MEMORY.md" in err and str(tmp_path / "nothing") in err


# --------------------------------------------------------------------------- forget / retry / status


async def test_forget_removes_the_memory_and_its_trace_and_queues_reconsolidation(env, capsys):
    await offline_once(env)
    async with await Store.open(env.db_path, clock=later()) as store:
        memory = await store.memories.get(thread_id(0))
        project = await store.projects.get(memory.project)
    root = Path(project.memory_root)
    assert (root / memory.path).is_file()
    assert project.consolidated_seq == project.memory_seq  # consolidated by `once`

    assert await memd("forget", thread_id(0)) == 0
    assert "removed the memory" in capsys.readouterr().out
    async with await Store.open(env.db_path, clock=later()) as store:
        assert await store.memories.get(thread_id(0)) is None
        assert await store.memories.get(thread_id(1)) is not None
        after = await store.projects.get(memory.project)
        due = await store.projects.due(0.0, 0.0)
    assert not (root / memory.path).exists()
    assert after.memory_seq > after.consolidated_seq and [p.project for p in due] == [memory.project]

    assert await memd("forget", thread_id(0)) == 1
    assert "no memory for thread" in capsys.readouterr().err


async def test_retry_requeues_dead_and_failed_jobs(env, capsys):
    await offline_once(env, n_threads=3)
    async with await Store.open(env.db_path, clock=later()) as store:
        for n in range(3):
            await store.jobs.upsert_extract(thread_id(n), 10**9, priority=0)  # grown: pending again
        for n, dead in ((0, True), (1, False)):
            job = await store.jobs.claim("extract", "host:1:a", 900)
            await store.jobs.fail(job, "HTTP 503", None if dead else 10**10, dead)
        statuses = {j.key: j.status for j in await store.jobs.list_all("extract")}
    assert sorted(statuses.values()) == ["dead", "error", "pending"]
    dead_key = next(k for k, v in statuses.items() if v == "dead")

    capsys.readouterr()
    assert await memd("retry", dead_key) == 0
    assert capsys.readouterr().out.strip() == "memd retry: 1 job(s) re-queued"
    assert await memd("retry") == 0
    assert capsys.readouterr().out.strip() == "memd retry: 1 job(s) re-queued"
    async with await Store.open(env.db_path, clock=later()) as store:
        jobs = await store.jobs.list_all("extract")
    assert {(j.status, j.attempts, j.retry_at) for j in jobs} == {("pending", 0, None)}


async def test_status_json_has_the_documented_keys(env, capsys):
    await offline_once(env)
    capsys.readouterr()
    assert await memd("status", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert {"extractor", "threads", "projects", "jobs", "leases"} <= set(report)
    assert report["extractor"] == "offline"
    thread_keys = {"id", "project", "cwd", "source", "user_messages", "eligible", "reason", "state"}
    assert len(report["threads"]) == 2
    for row in report["threads"]:
        assert thread_keys <= set(row)
        assert (row["state"], row["eligible"], row["source"]) == ("done", True, "cli")
    [project] = report["projects"]
    assert {"project", "memory_root", "traces", "last_consolidated_at"} <= set(project)
    assert project["traces"] == 2 and project["last_consolidated_at"]
    assert {j["status"] for j in report["jobs"]} == {"done"}
    assert isinstance(report["leases"], list)


# --------------------------------------------------------------------------- once / backfill with a model


async def test_once_exits_1_and_says_so_when_the_credentials_are_rejected(env, server, monkeypatch, capsys):
    cwd = env.sessions[0].parent / "proj"
    cwd.mkdir()
    write_rollout(env.sessions[0], thread_id(1), cwd, simple_turns("auth"))
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("MEMD_EXTRACTOR", "openai")  # a bare key does not opt in (SPEC §9)
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    server.default = fk.unauthorized()
    assert await memd("once") == 1
    captured = capsys.readouterr()
    assert "model work paused: model authentication failed" in captured.err
    assert KEY not in captured.out + captured.err
    assert len(server.requests) == 1


async def test_once_with_the_daily_budget_spent_sends_nothing_exits_0_and_says_when_it_resumes(env, server, monkeypatch, capsys):
    cwd = env.sessions[0].parent / "proj"
    cwd.mkdir()
    write_rollout(env.sessions[0], thread_id(1), cwd, simple_turns("budget"))
    async with await Store.open(env.db_path, clock=FakeClock(time.time())) as store:
        await store.usage.record_usage("extract", "gpt-5-mini", 1500, 100, 0)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("MEMD_EXTRACTOR", "openai")  # a bare key does not opt in (SPEC §9)
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.setenv("MEMD_DAILY_TOKEN_BUDGET", "1000")
    assert await memd("once") == 0
    err = capsys.readouterr().err
    assert "model work paused: daily token budget reached; resumes at " in err
    assert server.requests == []
    async with await Store.open(env.db_path, clock=later()) as store:
        [job] = await store.jobs.list_all("extract")
        assert (job.status, job.attempts) == ("pending", 0)


async def test_backfill_dry_run_sends_nothing(env, server, monkeypatch, capsys):
    cwd = env.sessions[0].parent / "proj"
    cwd.mkdir()
    write_rollout(env.sessions[0], thread_id(1), cwd, simple_turns("backfill"))
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("MEMD_EXTRACTOR", "openai")  # a bare key does not opt in (SPEC §9)
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    assert await memd("backfill", "--since", "2020-01-01", "--dry-run") == 0
    assert "1 threads would be extracted" in capsys.readouterr().out
    assert server.requests == []


# --------------------------------------------------------------------------- exit codes


@pytest.mark.parametrize(
    "argv",
    [[], ["frobnicate"], ["status", "--bogus"], ["forget"], ["service"], ["backfill", "--since", "last tuesday"],
     ["once", "--min-idle", "soon"]],
    ids=["no_command", "unknown_command", "unknown_flag", "missing_argument", "service_without_action",
         "bad_date", "bad_number"],
)
async def test_usage_errors_exit_2(env, argv, capsys):
    assert await memd(*argv) == 2
    assert capsys.readouterr().err


async def test_configuration_errors_exit_78_naming_the_key_not_the_value(env, tmp_path, monkeypatch, capsys):
    assert await memd("--config", str(tmp_path / "missing.toml"), "status") == 78
    assert "config file not found" in capsys.readouterr().err
    monkeypatch.delenv("MEMD_CONFIG")  # main() exported it for child processes
    monkeypatch.setenv("MEMD_EXTRACT_CONCURRENCY", "0")
    assert await memd("status") == 78
    assert "extract_concurrency" in capsys.readouterr().err
    monkeypatch.delenv("MEMD_EXTRACT_CONCURRENCY")
    bad = tmp_path / "bad.toml"
    bad.write_text('[llm]\napi_key = "sk-this-must-not-be-printed"\ntimeout_s = -1\n')
    assert await memd("--config", str(bad), "status") == 78
    err = capsys.readouterr().err
    assert "llm.timeout_s" in err and "sk-this-must-not-be-printed" not in err
    monkeypatch.delenv("MEMD_CONFIG")


async def test_ok_exits_0_and_runtime_failures_exit_1(env, capsys):
    assert await memd("status") == 0
    assert await memd("consolidate", "--root", str(env.memory_dir / "absent")) == 1
    assert "is not a directory" in capsys.readouterr().err


def test_the_console_entry_point_exits_with_mains_code(tmp_path):
    result = subprocess.run([sys.executable, "-m", "memd", "frobnicate"], capture_output=True, text=True, timeout=60,
                            cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
                                               "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert result.returncode == 2 and "invalid choice" in result.stderr


# --------------------------------------------------------------------------- a bug


async def test_an_unexpected_error_is_one_clear_line_and_exit_1_with_the_secret_redacted(env, capsys, monkeypatch):
    import memd.cli as cli

    async def broken(args, settings):  # type: ignore[no-untyped-def]
        raise RuntimeError("boom with token ghp_abcdefghijklmnopqrstuvwxyz0123456789")

    monkeypatch.setattr(cli, "_dispatch", broken)
    assert await memd("status") == 1
    err = capsys.readouterr().err
    assert "memd status: internal error (RuntimeError: boom with token" in err
    assert "ghp_abcdefghijklmnopqrstuvwxyz0123456789" not in err
