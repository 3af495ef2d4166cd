"""``memd context`` (SPEC §18): the bounded block a new session receives, and its hook formats."""

from __future__ import annotations

import io
import json
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from memd.read.context import (
    EMPTY_HOOK_ANSWER,
    MAX_BUDGET_TOKENS,
    RULE_LINES,
    ContextFormat,
    ContextRequest,
    build_context,
    estimate_tokens,
    load_context_settings,
    memory_root_of,
    parse_args,
    run,
)
from memd.rollout.guard import strip_memd_context
from memd.store.search import SCHEMA_SQL, entry_key
from tests.builders import make_memory


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "app"
    (path / "src" / "deep").mkdir(parents=True)
    (path / ".git").mkdir()
    return path.resolve()


def settings(**env: str):  # type: ignore[no-untyped-def]
    return load_context_settings(None, {**os.environ, **env})


def call(request: ContextRequest, stdin: str = "", **env: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = run(request, stdin=io.StringIO(stdin), stdout=out, stderr=err, environ={**os.environ, **env}, now_s=1.8e9)
    return code, out.getvalue(), err.getvalue()


def test_the_block_has_header_summary_sections_pointers_and_the_rule(repo: Path) -> None:
    s = settings()
    root = make_memory(s.memory_dir, str(repo))
    block = build_context(s, str(repo), now_s=1.8e9)
    assert block is not None
    lines = block.text.splitlines()
    assert lines[0].startswith(f'<memd-context project="{repo}"') and lines[-1] == "</memd-context>"
    assert lines[1] == f"# Memory of {repo} (memd)"
    assert "Add a pause button: partial (trace 019b7f94)" in block.text  # the summary, links shortened
    assert "### Start here" in block.text and "npx jest" in block.text
    assert "Merged offline" not in block.text  # text outside a section is not a section
    assert f"- Full handbook: {root / 'MEMORY.md'}" in block.text
    assert "mcp__memd__memory_search" in block.text
    assert lines[-4:-1] == list(RULE_LINES)
    assert block.tokens == estimate_tokens(block.text) <= s.budget_tokens
    assert strip_memd_context(block.text) == ""  # the guard removes all of it from a later transcript


def test_nothing_for_this_project_prints_nothing_and_hooks_answer_empty(repo: Path) -> None:
    for fmt in (ContextFormat.TEXT, ContextFormat.JSON):
        assert call(ContextRequest(str(repo), None, fmt, None)) == (0, "", "")
    for fmt in (ContextFormat.CLAUDE_HOOK, ContextFormat.CODEX_HOOK):
        code, out, _ = call(ContextRequest(str(repo), None, fmt, None))
        assert code == 0 and json.loads(out) == EMPTY_HOOK_ANSWER


def test_a_subdirectory_finds_its_repositorys_memory_and_never_another(repo: Path, tmp_path: Path) -> None:
    s = settings()
    make_memory(s.memory_dir, str(repo))
    other = tmp_path / "other"
    other.mkdir()
    code, out, _ = call(ContextRequest(str(repo / "src" / "deep"), None, ContextFormat.TEXT, None))
    assert code == 0 and f'project="{repo}"' in out
    assert call(ContextRequest(str(other), None, ContextFormat.TEXT, None))[1] == ""


def test_the_budget_is_kept_and_sections_are_cut_at_whole_bullets(repo: Path) -> None:
    s = settings()
    make_memory(s.memory_dir, str(repo), bullets=400)
    full = build_context(s, str(repo))
    small = build_context(s, str(repo), budget_tokens=300)
    huge = build_context(s, str(repo), budget_tokens=50_000)
    assert full and small and huge
    assert full.tokens <= 1_500 and small.tokens <= 300 and huge.tokens <= MAX_BUDGET_TOKENS
    assert small.text.endswith("</memd-context>") and RULE_LINES[0] in small.text
    assert all(
        line.startswith(("- ", "#", "<", "Updated", "Memory", "The ", "Verify")) or not line
        for line in small.text.splitlines()
    )


def test_sections_rank_by_usage_then_recency(repo: Path) -> None:
    s = settings()
    make_memory(s.memory_dir, str(repo))
    block = build_context(s, str(repo))
    assert block is not None
    # Newest cited date first: Pitfalls (2026-01-02) and Recent tasks (2026-01-02) before the 2025 sections.
    assert block.sections[:2] == ("Pitfalls and pivots", "Recent tasks")
    s.state_dir.mkdir(parents=True)
    conn = sqlite3.connect(s.db_path)
    conn.executescript(
        "CREATE TABLE threads (id TEXT PRIMARY KEY, created_at REAL);"
        "CREATE TABLE memories (thread_id TEXT, project TEXT);" + SCHEMA_SQL
    )
    key = entry_key("- Keep it pure HTML, CSS and JS: no frameworks. [019a085e 2025-10-21]")
    conn.execute("INSERT INTO memory_use VALUES (?, 'MEMORY.md', ?, 't9', 'call-1', 1.0)", (str(repo), key))
    conn.execute("INSERT INTO threads VALUES ('t1', 1767379185.0)")
    conn.execute("INSERT INTO memories VALUES ('t1', ?)", (str(repo),))
    conn.commit()
    conn.close()
    block = build_context(s, str(repo))
    assert block is not None and block.sections[0] == "User preferences"
    assert 'sessions="1"' in block.text and "the newest started 2026-01-02" in block.text


def test_hook_formats_read_the_cwd_from_stdin_and_print_additional_context(repo: Path, tmp_path: Path) -> None:
    s = settings()
    make_memory(s.memory_dir, str(repo))
    payload = {
        "session_id": "abc",
        "transcript_path": "/x.jsonl",
        "cwd": str(repo / "src"),
        "hook_event_name": "SessionStart",
        "source": "startup",
    }
    code, out, err = call(ContextRequest(str(tmp_path), None, ContextFormat.CODEX_HOOK, None), json.dumps(payload))
    answer = json.loads(out)
    assert code == 0 and err == ""
    assert answer["hookSpecificOutput"]["hookEventName"] == "SessionStart"
    assert answer["hookSpecificOutput"]["additionalContext"].startswith(f'<memd-context project="{repo}"')


def test_a_hook_stdin_that_is_not_json_is_named_and_the_hook_still_answers(repo: Path) -> None:
    s = settings()
    make_memory(s.memory_dir, str(repo))
    code, out, err = call(ContextRequest(str(repo), None, ContextFormat.CLAUDE_HOOK, None), "{not json")
    assert code == 0
    assert "hook input on stdin is not JSON" in err
    assert json.loads(out)["hookSpecificOutput"]["additionalContext"].startswith("<memd-context")  # --cwd used


def test_a_cwd_that_does_not_exist_is_a_clear_answer(tmp_path: Path) -> None:
    gone = tmp_path / "gone" / "away"
    code, out, err = call(ContextRequest(str(gone), None, ContextFormat.TEXT, None))
    assert (code, out) == (0, "") and f"no such directory: {gone}" in err
    s = settings()
    make_memory(s.memory_dir, str(gone))  # a deleted checkout keeps its memory under its path
    code, out, _ = call(ContextRequest(str(gone), None, ContextFormat.TEXT, None))
    assert code == 0 and out.startswith(f'<memd-context project="{gone}"')


def test_the_off_switch_prints_nothing(repo: Path, tmp_path: Path) -> None:
    s = settings()
    make_memory(s.memory_dir, str(repo))
    assert call(ContextRequest(str(repo), None, ContextFormat.TEXT, None), MEMD_CONTEXT__ENABLED="false")[1] == ""
    code, out, _ = call(ContextRequest(str(repo), None, ContextFormat.CODEX_HOOK, None), MEMD_CONTEXT__ENABLED="0")
    assert json.loads(out) == EMPTY_HOOK_ANSWER
    config = tmp_path / "memd.toml"
    config.write_text("[context]\nenabled = false\n")
    assert call(ContextRequest(str(repo), None, ContextFormat.TEXT, config))[1] == ""


def test_bad_configuration_fails_open_in_hooks_and_exits_78_otherwise(repo: Path, tmp_path: Path) -> None:
    config = tmp_path / "memd.toml"
    config.write_text("[context\nbudget_tokens = 'many'\n")
    code, out, err = call(ContextRequest(str(repo), None, ContextFormat.TEXT, config))
    assert (code, out) == (78, "") and "not valid TOML" in err
    code, out, err = call(ContextRequest(str(repo), None, ContextFormat.CLAUDE_HOOK, config))
    assert code == 0 and json.loads(out) == EMPTY_HOOK_ANSWER and "configuration error" in err
    code, _, err = call(ContextRequest(str(repo), None, ContextFormat.TEXT, None), MEMD_CONTEXT__BUDGET_TOKENS="9999")
    assert code == 78 and "context.budget_tokens" in err and "9999" not in err


def test_arguments() -> None:
    assert parse_args(["context", "--cwd", "/x", "--budget=700", "--format", "codex-hook"]) == ContextRequest(
        "/x", 700, ContextFormat.CODEX_HOOK, None
    )
    assert parse_args(["--config", "/c.toml", "context"]).config_path == Path("/c.toml")
    for bad in (["--format", "yaml"], ["--budget", "lots"], ["--cwd"], ["--frobnicate"]):
        with pytest.raises(ValueError):
            parse_args(bad)


def test_settings_follow_env_over_file_over_xdg(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'memory_dir = "{tmp_path}/m"\nstate_dir = "~/st"\n[context]\nbudget_tokens = 900\n')
    s = load_context_settings(config, {"HOME": str(tmp_path), "MEMD_CONTEXT__BUDGET_TOKENS": "1200"})
    assert (s.memory_dir, s.state_dir, s.budget_tokens) == (tmp_path / "m", Path(os.environ["HOME"]) / "st", 1200)
    s = load_context_settings(None, {"XDG_DATA_HOME": "/d", "XDG_STATE_HOME": "/s", "XDG_CONFIG_HOME": "/nope"})
    assert (s.memory_dir, s.state_dir, s.config_path) == (Path("/d/memd/projects"), Path("/s/memd"), None)


def test_a_git_worktree_shares_its_main_repositorys_memory(tmp_path: Path) -> None:
    main = tmp_path / "main"
    main.mkdir()
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q", str(main)], check=True)
    subprocess.run([*git, "-C", str(main), "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    subprocess.run([*git, "-C", str(main), "worktree", "add", "-q", str(tmp_path / "wt")], check=True)
    s = settings()
    make_memory(s.memory_dir, str(main.resolve()))
    code, out, _ = call(ContextRequest(str(tmp_path / "wt"), None, ContextFormat.TEXT, None))
    assert code == 0 and f'project="{main.resolve()}"' in out


@pytest.mark.parametrize(
    ("toml", "env"),
    [
        ("", {}),
        ("[context]\nenabled = false\nbudget_tokens = 700\n", {}),
        (
            'memory_dir = "~/mem"\nstate_dir = "/tmp/st"\nproject_key = "cwd"\n[context]\nbudget_tokens = 900\n',
            {"MEMD_CONTEXT__BUDGET_TOKENS": "1200", "MEMD_MEMORY_DIR": "/tmp/m2"},
        ),
        ("[context]\nenabled = true\n", {"MEMD_CONTEXT__ENABLED": "false", "MEMD_STATE_DIR": "~/s"}),
        (None, {"XDG_DATA_HOME": "/tmp/xd", "XDG_STATE_HOME": "/tmp/xs"}),
    ],
)
def test_the_light_reader_agrees_with_memds_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, toml: str | None, env: dict[str, str]
) -> None:
    from memd.config import load_settings

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    path = None
    if toml is not None:
        path = tmp_path / "memd.toml"
        path.write_text(toml)
    full = load_settings(path)
    light = load_context_settings(path)
    assert (light.memory_dir, light.state_dir, light.project_key_rule) == (
        full.memory_dir,
        full.state_dir,
        full.project_key,
    )
    assert (light.enabled, light.budget_tokens) == (full.context.enabled, full.context.budget_tokens)


def test_an_empty_memory_prints_nothing(repo: Path) -> None:
    s = settings()
    root = memory_root_of(s.memory_dir, str(repo))
    (root / "trace_summaries").mkdir(parents=True)
    (root / "MEMORY.md").write_text("")
    (root / "memory_summary.md").write_text("\n\n")
    assert build_context(s, str(repo)) is None
    assert call(ContextRequest(str(repo), None, ContextFormat.TEXT, None)) == (0, "", "")
    code, out, _ = call(ContextRequest(str(repo), None, ContextFormat.CLAUDE_HOOK, None))
    assert code == 0 and json.loads(out) == EMPTY_HOOK_ANSWER


def test_files_nobody_checked_go_through_the_redactor(repo: Path) -> None:
    s = settings()
    root = make_memory(s.memory_dir, str(repo))
    secret = "sk-proj-abcdefghijklmnopqrstuvwxyz0123456789ABCD"
    (root / "MEMORY.md").write_text((root / "MEMORY.md").read_text() + f"- deploy with OPENAI_API_KEY={secret}\n")
    block = build_context(s, str(repo))
    assert block is not None and secret not in block.text and "[REDACTED_SECRET]" in block.text


def test_a_reader_that_goes_away_does_not_fail_the_hook(repo: Path) -> None:
    """An agent that closes the hook's stdout early gets no traceback: the hook still exits 0."""
    s = settings()
    make_memory(s.memory_dir, str(repo))

    class ClosedPipe(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    request = parse_args(["--format", "claude-hook", "--cwd", str(repo)])
    stderr = io.StringIO()
    code = run(request, stdin=io.StringIO(""), stdout=ClosedPipe(), stderr=stderr, environ=dict(os.environ))
    assert code == 0 and "Traceback" not in stderr.getvalue()
