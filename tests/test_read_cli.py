"""The read path through the command line and the daemon (SPEC §18): context, hooks, mcp, index, usage."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mcp import Client, StdioServerParameters

from memd.__main__ import _command
from memd.cli import main
from memd.config import Settings, load_settings
from memd.memory import files as memory_files
from memd.store.search import SearchIndex
from tests.builders import simple_turns, thread_id, write_rollout
from tests.fakes import run_once

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def read_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    sessions = tmp_path / "sessions"
    sessions.mkdir()
    monkeypatch.setenv("MEMD_SESSIONS", str(sessions))
    monkeypatch.setenv("MEMD_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("MEMD_MEMORY_DIR", str(tmp_path / "memory"))
    monkeypatch.setenv("MEMD_MIN_IDLE_S", "0")
    monkeypatch.setenv("MEMD_MAX_AGE_DAYS", "0")
    return load_settings(None, {})


async def once(settings: Settings) -> None:
    await run_once(settings)


def project_dir(settings: Settings) -> Path:
    cwd = settings.sessions[0].parent / "proj"
    (cwd / ".git").mkdir(parents=True, exist_ok=True)
    return cwd.resolve()


def mcp_call_turns(project: Path) -> list[dict[str, object]]:
    return [{"user": "how were the tests run last time?", "commands": [], "answer": "With make test."}]


def add_memd_calls(path: Path, project: Path, hit_path: str) -> None:
    """Append a Codex 0.171-style memd MCP call (namespace tool) and a citation to a rollout."""
    answer = {
        "project": str(project),
        "memory_root": "/x",
        "next_cursor": None,
        "note": None,
        "hits": [
            {
                "path": hit_path,
                "line_start": 1,
                "line_end": 9,
                "kind": "trace",
                "heading": "Task: x",
                "snippet": "make test",
                "entry": "",
                "session_ids": [],
                "date": None,
            }
        ],
    }
    lines = [
        {
            "timestamp": "2026-01-01T10:05:00Z",
            "type": "response_item",
            "payload": {
                "type": "function_call",
                "name": "memory_search",
                "namespace": "mcp__memd",
                "arguments": '{"query": "tests"}',
                "call_id": "call_m1",
            },
        },
        {
            "timestamp": "2026-01-01T10:05:01Z",
            "type": "response_item",
            "payload": {
                "type": "function_call_output",
                "call_id": "call_m1",
                "output": "Wall time: 0.0846 seconds\nOutput:\n" + json.dumps(answer),
            },
        },
    ]
    with path.open("a") as handle:
        handle.write("".join(json.dumps(line) + "\n" for line in lines))


async def test_once_indexes_memory_and_a_later_session_records_its_use(read_env: Settings, capsys) -> None:  # type: ignore[no-untyped-def]
    project = project_dir(read_env)
    write_rollout(read_env.sessions[0], thread_id(1), project, simple_turns("first"))
    await once(read_env)
    root = memory_files.project_root(read_env.memory_dir, str(project))
    index = SearchIndex.open(read_env.db_path)
    assert index is not None
    try:
        assert index.chunk_count(str(project)) > 0  # indexed after extraction and consolidation
        hits = index.search(str(project), "make test")
        assert hits and any(h.chunk.path.startswith("trace_summaries/") for h in hits)
        trace = next(h.chunk.path for h in hits if h.chunk.kind.value == "trace")
        later = write_rollout(read_env.sessions[0], thread_id(2), project, mcp_call_turns(project))
        add_memd_calls(later, project, trace)
        await once(read_env)
        usage = index.usage(str(project))
        assert usage[(trace, "")].usage_count == 1
    finally:
        index.close()
    assert (root / "MEMORY.md").is_file()
    capsys.readouterr()  # the daemon's log lines
    assert await asyncio.to_thread(main, ["status", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    [row] = [p for p in report["projects"] if p["project"] == str(project)]
    assert row["usage_count"] == 1


async def test_context_command_through_main_and_the_console_fast_path(read_env: Settings, capsys) -> None:  # type: ignore[no-untyped-def]
    project = project_dir(read_env)
    write_rollout(read_env.sessions[0], thread_id(1), project, simple_turns("ctx"))
    await once(read_env)
    capsys.readouterr()  # the daemon's log lines
    assert await asyncio.to_thread(main, ["context", "--cwd", str(project), "--format", "json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["project"] == str(project) and payload["tokens"] <= 1500
    assert payload["context"].startswith(f'<memd-context project="{project}"')
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "memd", "context", "--format", "codex-hook"],
        input=json.dumps({"cwd": str(project), "hook_event_name": "SessionStart", "source": "startup"}),
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert result.returncode == 0
    answer = json.loads(result.stdout)
    assert answer["hookSpecificOutput"]["additionalContext"] == payload["context"]
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time")}
    assert "memd.read.context" in imported
    assert not imported & {"pydantic", "pydantic_settings", "structlog", "memd.config", "mcp", "aiosqlite"}
    assert "memd.extract.redact" not in imported  # the daemon found nothing to redact in these files


def test_global_options_before_the_command() -> None:
    assert _command(["--config", "x.toml", "--log-level", "debug", "context", "--cwd", "/"]) == "context"
    assert _command(["--version"]) is None and _command(["status", "--json"]) == "status"


async def test_hooks_and_mcp_install_through_the_cli(read_env: Settings, tmp_path: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    home = Path(os.environ["HOME"])
    codex = home / ".codex"
    codex.mkdir(parents=True)
    (codex / "config.toml").write_text('# mine\nmodel = "o3"\n')
    assert await asyncio.to_thread(main, ["hooks", "install", "codex"]) == 0
    out = capsys.readouterr().out
    assert "review and trust" in out and "hooks.json" in out
    command = json.loads((codex / "hooks.json").read_text())["hooks"]["SessionStart"][0]["hooks"][0]["command"]
    assert f"MEMD_STATE_DIR={read_env.state_dir}" in command and f"MEMD_MEMORY_DIR={read_env.memory_dir}" in command
    assert command.endswith(" context --format codex-hook") and command.split()[-4].startswith("/")
    assert await asyncio.to_thread(main, ["mcp", "install", "codex"]) == 0
    text = (codex / "config.toml").read_text()
    assert text.startswith('# mine\nmodel = "o3"\n') and "[mcp_servers.memd]" in text and "hooks = true" in text
    assert await asyncio.to_thread(main, ["doctor"]) in (0, 1)
    doctor = capsys.readouterr().out
    assert "codex hook" in doctor and "memd context --format codex-hook" in doctor.replace("/memd ", " memd ")
    assert await asyncio.to_thread(main, ["mcp", "install"]) == 2
    claude = home / ".claude" / "settings.json"
    claude.parent.mkdir()
    claude.write_text("{ not json")
    assert await asyncio.to_thread(main, ["hooks", "install", "claude"]) == 1
    assert "not valid JSON" in capsys.readouterr().err and claude.read_text() == "{ not json"
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))  # no `claude` on PATH: print the command
    assert await asyncio.to_thread(main, ["mcp", "install", "claude"]) == 0
    assert "claude mcp add -s user memd -e MEMD_STATE_DIR=" in capsys.readouterr().out
    assert await asyncio.to_thread(main, ["hooks", "uninstall", "codex"]) == 0
    assert json.loads((codex / "hooks.json").read_text()) == {}


async def test_memd_mcp_over_stdio_finds_the_daemons_memory(read_env: Settings) -> None:
    project = project_dir(read_env)
    write_rollout(read_env.sessions[0], thread_id(1), project, simple_turns("stdio"))
    await once(read_env)
    # What Codex passes an MCP server: only HOME, PATH and the env table memd installed.
    child_env = {
        "HOME": os.environ["HOME"],
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(REPO_ROOT),
        "MEMD_STATE_DIR": str(read_env.state_dir),
        "MEMD_MEMORY_DIR": str(read_env.memory_dir),
    }
    params = StdioServerParameters(command=sys.executable, args=["-m", "memd", "mcp"], env=child_env, cwd=str(project))
    async with Client(params) as client:
        result = await client.call_tool("memory_search", {"query": "make test"})
    assert result.is_error is False and result.structured_content["hits"]  # type: ignore[index]


def test_hooks_install_into_an_unwritable_folder_is_one_line_and_exit_1(read_env: Settings, tmp_path: Path) -> None:
    env = {**os.environ, "CLAUDE_CONFIG_DIR": "/proc/self", "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "memd", "hooks", "install", "claude"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout
    assert "memd hooks: /proc/self/settings.json cannot be written (" in done.stderr
    assert not Path("/proc/self/settings.json").exists()


async def test_claude_mcp_add_that_hangs_is_one_line_and_exit_1(
    read_env: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "claude").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "claude").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")

    def hang(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        raise subprocess.TimeoutExpired(argv, float(kwargs["timeout"]))  # type: ignore[arg-type]

    monkeypatch.setattr("memd.read.hooks.subprocess.run", hang)
    assert await asyncio.to_thread(main, ["mcp", "install", "claude"]) == 1
    err = capsys.readouterr().err
    assert "memd mcp: " in err and "mcp remove -s user memd did not finish within 60 s" in err
    assert not (Path(os.environ["HOME"]) / ".claude.json").exists()
