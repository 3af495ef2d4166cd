"""``memd hooks`` / ``memd mcp install``: editing the agents' files safely (SPEC §18)."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import pytest

from memd.read.hooks import (
    Agent,
    Connection,
    HookFileError,
    Installation,
    claude_mcp_argv,
    install_codex_mcp,
    install_hook,
    installed_report,
    is_memd_hook,
    uninstall_codex_mcp,
    uninstall_hook,
)

OTHER_TOOLS_SETTINGS = {
    "permissions": {"allow": ["Bash(npm test:*)"]},
    "env": {"FOO": "1"},
    "hooks": {
        "SessionStart": [{"matcher": "startup", "hooks": [{"type": "command", "command": "claude-mem start"}]}],
        "PreToolUse": [{"matcher": "Bash", "hooks": [{"type": "command", "command": "guard.sh"}]}],
    },
    "model": "opus",
}

CODEX_CONFIG = """# my codex settings
model = "gpt-5-codex"  # the one I like

[features]
web_search = true   # keep this comment

[mcp_servers.docs]
command = "docs-mcp"
args = ["--stdio"]
"""


@pytest.fixture
def inst(tmp_path: Path) -> Installation:
    return Installation(
        Path("/opt/memd/.venv/bin/memd"), tmp_path / "cfg dir" / "memd.toml", tmp_path / "state", tmp_path / "memory"
    )


@pytest.fixture
def home_env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir()
    return {"HOME": str(home), "CODEX_HOME": str(home / ".codex")}


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_hook_command_carries_the_absolute_path_and_resolved_dirs(inst: Installation) -> None:
    command = inst.hook_command(Agent.CLAUDE)
    assert command == (
        f"MEMD_CONFIG='{inst.config_path}' MEMD_STATE_DIR={inst.state_dir} MEMD_MEMORY_DIR={inst.memory_dir} "
        "/opt/memd/.venv/bin/memd context --format claude-hook"
    )
    assert is_memd_hook({"type": "command", "command": command})
    assert not is_memd_hook({"type": "command", "command": "claude-mem start"})
    assert not is_memd_hook({"type": "command", "command": "echo memd context --format text"})


def test_claude_install_twice_leaves_one_hook_and_everything_else(inst: Installation, home_env: dict[str, str]) -> None:
    path = Path(home_env["HOME"]) / ".claude" / "settings.json"
    path.parent.mkdir()
    path.write_text(json.dumps(OTHER_TOOLS_SETTINGS, indent=4))
    original = path.read_text()
    [first] = install_hook(Agent.CLAUDE, inst, home_env)
    [second] = install_hook(Agent.CLAUDE, inst, home_env)
    assert first.changed and first.backup is not None and first.backup.read_text() == original
    assert not second.changed
    data = json.loads(path.read_text())
    groups = data["hooks"]["SessionStart"]
    assert groups[0] == OTHER_TOOLS_SETTINGS["hooks"]["SessionStart"][0]  # another tool's hook survives
    assert groups[1] == {
        "matcher": "startup|clear|compact",
        "hooks": [{"type": "command", "command": inst.hook_command(Agent.CLAUDE), "timeout": 10}],
    }
    assert {k: v for k, v in data.items() if k != "hooks"} == {
        k: v for k, v in OTHER_TOOLS_SETTINGS.items() if k != "hooks"
    }
    assert data["hooks"]["PreToolUse"] == OTHER_TOOLS_SETTINGS["hooks"]["PreToolUse"]
    [removed] = uninstall_hook(Agent.CLAUDE, home_env)
    assert removed.changed and json.loads(path.read_text()) == OTHER_TOOLS_SETTINGS
    assert not uninstall_hook(Agent.CLAUDE, home_env)[0].changed


def test_claude_settings_locations(inst: Installation, home_env: dict[str, str], tmp_path: Path) -> None:
    install_hook(Agent.CLAUDE, inst, {**home_env, "CLAUDE_CONFIG_DIR": str(tmp_path / "cc") + ",/elsewhere"})
    assert (tmp_path / "cc" / "settings.json").is_file()
    project = tmp_path / "proj"
    project.mkdir()
    [change] = install_hook(Agent.CLAUDE, inst, home_env, project)
    assert change.path == project / ".claude" / "settings.local.json" and change.path.is_file()
    assert not (Path(home_env["HOME"]) / ".claude").exists()


def test_a_settings_file_that_does_not_parse_is_refused_and_untouched(inst: Installation, home_env: dict[str, str]) -> None:
    path = Path(home_env["HOME"]) / ".claude" / "settings.json"
    path.parent.mkdir()
    path.write_text('{"hooks": {"SessionStart": [}\n')
    before = snapshot(path.parent)
    with pytest.raises(HookFileError, match=r"not valid JSON \(line 1, column 29"):
        install_hook(Agent.CLAUDE, inst, home_env)
    with pytest.raises(HookFileError, match="not valid JSON"):
        uninstall_hook(Agent.CLAUDE, home_env)
    path.write_text('{"hooks": {"SessionStart": {"matcher": "startup"}}}')
    before = snapshot(path.parent)
    with pytest.raises(HookFileError, match='"hooks.SessionStart" is not a list'):
        install_hook(Agent.CLAUDE, inst, home_env)
    assert snapshot(path.parent) == before


def test_codex_install_writes_hooks_json_and_the_feature_keeping_comments(
    inst: Installation, home_env: dict[str, str]
) -> None:
    codex = Path(home_env["CODEX_HOME"])
    codex.mkdir()
    (codex / "config.toml").write_text(CODEX_CONFIG)
    (codex / "AGENTS.md").write_text("mine")
    (codex / "memories").mkdir()
    (codex / "memories" / "MEMORY.md").write_text("codex's own")
    hooks_change, toml_change = install_hook(Agent.CODEX, inst, home_env)
    assert hooks_change.changed and toml_change.changed and toml_change.backup is not None
    hooks = json.loads((codex / "hooks.json").read_text())
    assert hooks == {
        "hooks": {
            "SessionStart": [
                {
                    "matcher": "startup|resume|clear",
                    "hooks": [{"type": "command", "command": inst.hook_command(Agent.CODEX), "timeout": 10}],
                }
            ]
        }
    }
    text = (codex / "config.toml").read_text()
    assert text.startswith(CODEX_CONFIG.split("[features]")[0])  # comments and order survive
    assert "web_search = true   # keep this comment\nhooks = true\n" in text
    assert tomllib.loads(text)["mcp_servers"]["docs"] == {"command": "docs-mcp", "args": ["--stdio"]}
    again = install_hook(Agent.CODEX, inst, home_env)
    assert [c.changed for c in again] == [False, False]
    assert (codex / "AGENTS.md").read_text() == "mine"
    assert (codex / "memories" / "MEMORY.md").read_text() == "codex's own"
    assert not (codex / "AGENTS.md.memd-backup").exists()
    uninstall_hook(Agent.CODEX, home_env)
    assert json.loads((codex / "hooks.json").read_text()) == {}


def test_codex_config_that_does_not_parse_is_refused_and_nothing_is_written(
    inst: Installation, home_env: dict[str, str]
) -> None:
    codex = Path(home_env["CODEX_HOME"])
    codex.mkdir()
    (codex / "config.toml").write_text('model = "gpt-5\n[features\n')
    before = snapshot(codex)
    with pytest.raises(HookFileError, match="not valid TOML"):
        install_hook(Agent.CODEX, inst, home_env)
    with pytest.raises(HookFileError, match="not valid TOML"):
        install_codex_mcp(inst, home_env)
    assert snapshot(codex) == before  # not even hooks.json was written


def test_codex_mcp_server_is_registered_once_with_its_environment(inst: Installation, home_env: dict[str, str]) -> None:
    codex = Path(home_env["CODEX_HOME"])
    codex.mkdir()
    (codex / "config.toml").write_text(CODEX_CONFIG)
    assert install_codex_mcp(inst, home_env).changed
    assert not install_codex_mcp(inst, home_env).changed
    doc = tomllib.loads((codex / "config.toml").read_text())
    assert doc["mcp_servers"]["memd"] == {
        "command": "/opt/memd/.venv/bin/memd",
        "args": ["mcp"],
        "env": {
            "MEMD_CONFIG": str(inst.config_path),
            "MEMD_STATE_DIR": str(inst.state_dir),
            "MEMD_MEMORY_DIR": str(inst.memory_dir),
        },
    }
    assert doc["mcp_servers"]["docs"] == {"command": "docs-mcp", "args": ["--stdio"]}
    report = {r.what: r for r in installed_report(home_env)}
    assert report["codex mcp"].installed and not report["codex hook"].installed
    assert uninstall_codex_mcp(home_env).changed
    assert (codex / "config.toml").read_text() == CODEX_CONFIG


def test_doctor_report_sees_hooks_and_a_missing_feature_flag(inst: Installation, home_env: dict[str, str]) -> None:
    install_hook(Agent.CLAUDE, inst, home_env)
    install_hook(Agent.CODEX, inst, home_env)
    report = {r.what: r for r in installed_report(home_env)}
    assert report["claude hook"].installed and report["codex hook"].installed
    assert "not true" not in report["codex hook"].detail and report[Connection.CODEX_HOOK].runs
    (Path(home_env["CODEX_HOME"]) / "config.toml").write_text("[features]\nhooks = false\n")
    report = {r.what: r for r in installed_report(home_env)}
    assert "Codex will not run it" in report["codex hook"].detail and not report[Connection.CODEX_HOOK].runs
    from memd.doctor import Verdict, check_connections

    verdicts = {c.name: c.verdict for c in check_connections(home_env)}
    assert verdicts == {
        Connection.CLAUDE_HOOK: Verdict.OK,
        Connection.CODEX_HOOK: Verdict.WARN,
        Connection.CODEX_MCP: Verdict.OK,
        Connection.CLAUDE_MCP: Verdict.OK,
    }
    assert not report["claude mcp"].installed


def test_claude_mcp_command(inst: Installation) -> None:
    assert claude_mcp_argv(inst) == [
        "claude", "mcp", "add", "-s", "user", "memd",
        "-e", f"MEMD_CONFIG={inst.config_path}",
        "-e", f"MEMD_STATE_DIR={inst.state_dir}",
        "-e", f"MEMD_MEMORY_DIR={inst.memory_dir}",
        "--", "/opt/memd/.venv/bin/memd", "mcp",
    ]  # fmt: skip


def test_files_keep_their_mode(inst: Installation, home_env: dict[str, str]) -> None:
    path = Path(home_env["HOME"]) / ".claude" / "settings.json"
    path.parent.mkdir()
    path.write_text("{}")
    os.chmod(path, 0o640)
    install_hook(Agent.CLAUDE, inst, home_env)
    assert path.stat().st_mode & 0o777 == 0o640


def test_a_symlinked_settings_file_stays_a_link_and_its_target_is_updated(
    inst: Installation, home_env: dict[str, str], tmp_path: Path
) -> None:
    dotfiles = tmp_path / "dotfiles" / "claude"
    dotfiles.mkdir(parents=True)
    target = dotfiles / "settings.json"
    target.write_text(json.dumps({"model": "opus"}))
    os.chmod(target, 0o640)
    link = Path(home_env["HOME"]) / ".claude" / "settings.json"
    link.parent.mkdir()
    link.symlink_to(target)
    [change] = install_hook(Agent.CLAUDE, inst, home_env)
    assert link.is_symlink() and link.readlink() == target
    data = json.loads(target.read_text())
    assert data["model"] == "opus" and is_memd_hook(data["hooks"]["SessionStart"][0]["hooks"][0])
    assert target.stat().st_mode & 0o777 == 0o640
    assert change.backup is not None and json.loads(change.backup.read_text()) == {"model": "opus"}
    assert sorted(p.name for p in dotfiles.iterdir()) == ["settings.json"]  # no temporary file left
    uninstall_hook(Agent.CLAUDE, home_env)
    assert link.is_symlink() and json.loads(target.read_text()) == {"model": "opus"}


def test_a_symlinked_codex_config_stays_a_link(inst: Installation, home_env: dict[str, str], tmp_path: Path) -> None:
    target = tmp_path / "dotfiles" / "config.toml"
    target.parent.mkdir()
    target.write_text(CODEX_CONFIG)
    codex = Path(home_env["CODEX_HOME"])
    codex.mkdir()
    (codex / "config.toml").symlink_to(target)
    install_hook(Agent.CODEX, inst, home_env)
    install_codex_mcp(inst, home_env)
    assert (codex / "config.toml").is_symlink()
    doc = tomllib.loads(target.read_text())
    assert doc["features"]["hooks"] is True and doc["mcp_servers"]["memd"]["args"] == ["mcp"]


def test_a_file_that_cannot_be_written_is_a_hook_file_error_and_nothing_changes(
    inst: Installation, home_env: dict[str, str]
) -> None:
    codex = Path(home_env["CODEX_HOME"])
    codex.mkdir()
    (codex / "config.toml").write_text(CODEX_CONFIG)
    (codex / "hooks.json").mkdir()  # cannot be read as a file, nor replaced
    before = snapshot(codex)
    with pytest.raises(HookFileError, match="hooks.json"):
        install_hook(Agent.CODEX, inst, home_env)
    assert snapshot(codex) == before
    env = {**home_env, "CLAUDE_CONFIG_DIR": "/proc/self"}
    with pytest.raises(
        HookFileError, match=r"^/proc/self/settings.json cannot be written \(.+\); nothing was changed$"
    ):
        install_hook(Agent.CLAUDE, inst, env)
