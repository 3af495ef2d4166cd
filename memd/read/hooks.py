"""``memd hooks install|uninstall`` and ``memd mcp install``: connect memd to the agents (SPEC §18).

Files memd edits, and only these (never AGENTS.md, CLAUDE.md, or the agents' own memory folders):

* Claude Code: ``$CLAUDE_CONFIG_DIR/settings.json`` (first entry of a comma-separated list), else
  ``~/.claude/settings.json``; with ``--project DIR``: ``DIR/.claude/settings.local.json``. One
  SessionStart hook, matcher ``startup|clear|compact`` (Claude Code 2.1.x settings format:
  ``{"hooks": {"SessionStart": [{"matcher": ..., "hooks": [{"type": "command", "command": ...,
  "timeout": 10}]}]}}``). The MCP server is registered by Claude's own CLI:
  ``claude mcp add -s user -e ... memd -- <memd> mcp`` (run when ``claude`` is on PATH, else printed).
* Codex CLI: ``$CODEX_HOME/hooks.json`` (the same layout; matcher ``startup|resume|clear``) and
  ``[features] hooks = true`` in ``$CODEX_HOME/config.toml`` (the name since Codex 0.16x; ``codex_hooks``
  is the deprecated alias and is left as the user wrote it); ``[mcp_servers.memd]`` (``command``,
  ``args``, ``env``) in the same ``config.toml``. ``--project DIR`` uses ``DIR/.codex/``.

Every installed command carries this installation's absolute ``memd`` path and what memd resolved
at install time — ``MEMD_CONFIG`` (when a config file is in use), ``MEMD_STATE_DIR`` and
``MEMD_MEMORY_DIR`` — because Codex starts MCP servers with only HOME, PATH, LANG, SHELL and TERM:
as an environment prefix of the hook's shell command, and as the MCP server's ``env`` table.

Editing rules: installing twice leaves one hook; every other key, hook and comment survives (TOML
through tomlkit, which preserves formatting); the previous file is copied to
``<name>.memd-backup-<UTC time>`` before a change; a file that does not parse, or whose shape is not
the documented one, is refused with :class:`HookFileError` and left untouched; ``uninstall`` removes
only memd's entries. Writes are atomic (temporary file + rename) and keep the file's mode; a symlinked
file stays a link (its target is rewritten). A file that cannot be written is a :class:`HookFileError`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from memd.errors import MemdError


class Agent(StrEnum):
    """The agents memd connects to."""

    CLAUDE = "claude"
    CODEX = "codex"


#: SessionStart matchers (Claude Code: new, /clear and after compaction; Codex: new, resumed, /clear).
MATCHERS = {Agent.CLAUDE: "startup|clear|compact", Agent.CODEX: "startup|resume|clear"}
HOOK_TIMEOUT_S = 10
SERVER_NAME = "memd"

# memd's hook: a command running a program named memd with "context --format <agent>-hook".
_MEMD_HOOK = re.compile(r"(?:^|[\s/'\"])memd['\"]?\s+(?:--\S+\s+\S+\s+)*context\b.*--format[ =](claude|codex)-hook")


class HookFileError(MemdError):
    """An agent's settings file cannot be edited safely (does not parse, unexpected shape); it was left untouched."""


@dataclass(frozen=True, slots=True)
class Installation:
    """What memd resolved at install time, carried by every installed command.

    Attributes:
        memd_path: absolute path of this installation's ``memd`` executable.
        config_path: the config file in use, or ``None``.
        state_dir: resolved ``state_dir``.
        memory_dir: resolved ``memory_dir``.
    """

    memd_path: Path
    config_path: Path | None
    state_dir: Path
    memory_dir: Path

    def env(self) -> dict[str, str]:
        """The environment the installed commands get (``MEMD_CONFIG`` only when a file is in use)."""
        env = {"MEMD_STATE_DIR": str(self.state_dir), "MEMD_MEMORY_DIR": str(self.memory_dir)}
        if self.config_path is not None:
            env = {"MEMD_CONFIG": str(self.config_path), **env}
        return env

    def hook_command(self, agent: Agent) -> str:
        """The hook's shell command: environment assignments, the absolute memd path, the context call."""
        assignments = " ".join(f"{name}={shlex.quote(value)}" for name, value in self.env().items())
        return f"{assignments} {shlex.quote(str(self.memd_path))} context --format {agent.value}-hook"


def find_memd() -> Path:
    """The absolute path of this installation's ``memd`` script: the one beside the running
    interpreter, else ``memd`` on PATH. There is no ``<python> -m memd`` fallback (an installed
    command needs one executable path), so no script at all raises.

    Raises:
        HookFileError: no ``memd`` executable can be found.
    """
    import sys

    beside = Path(sys.executable).parent / "memd"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside.absolute()
    found = shutil.which("memd")
    if found:
        return Path(found).absolute()
    raise HookFileError(f"cannot find the memd executable (looked beside {sys.executable} and on PATH)")


@dataclass(frozen=True, slots=True)
class Change:
    """The outcome of an install or uninstall on one file.

    Attributes:
        path: the file.
        changed: whether it was written.
        backup: the copy of the previous content, when one was made.
        detail: one line for the user.
    """

    path: Path
    changed: bool
    backup: Path | None
    detail: str


# --------------------------------------------------------------------------- locations


def claude_settings_path(environ: Mapping[str, str], project: Path | None = None) -> Path:
    """Claude Code's settings file memd edits (see the module docstring)."""
    if project is not None:
        return project / ".claude" / "settings.local.json"
    config_dir = environ.get("CLAUDE_CONFIG_DIR", "").split(",")[0].strip()
    base = Path(config_dir).expanduser() if config_dir else Path(environ.get("HOME", "~")).expanduser() / ".claude"
    return base / "settings.json"


def claude_user_config(environ: Mapping[str, str]) -> Path:
    """Where Claude Code keeps user-scope MCP servers: ``$CLAUDE_CONFIG_DIR/.claude.json``, else ``~/.claude.json``."""
    config_dir = environ.get("CLAUDE_CONFIG_DIR", "").split(",")[0].strip()
    if config_dir:
        return Path(config_dir).expanduser() / ".claude.json"
    return Path(environ.get("HOME", "~")).expanduser() / ".claude.json"


def codex_dir(environ: Mapping[str, str], project: Path | None = None) -> Path:
    """``$CODEX_HOME`` (default ``~/.codex``), or ``DIR/.codex`` for ``--project DIR``."""
    if project is not None:
        return project / ".codex"
    home = environ.get("CODEX_HOME", "").strip()
    return Path(home).expanduser() if home else Path(environ.get("HOME", "~")).expanduser() / ".codex"


# --------------------------------------------------------------------------- file helpers


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise HookFileError(f"{path} cannot be read ({exc}); nothing was changed") from None


def _write(path: Path, text: str, old: str | None) -> Path | None:
    """Atomically replace the file at ``path`` with ``text``; back up ``old`` first. Returns the backup.

    A symlinked ``path`` (a settings file kept in a dotfiles repository) stays a link: the resolved
    target is replaced, with the temporary file beside the target and the target's mode kept. The
    backup is made beside ``path``, the name the user knows.

    Raises:
        HookFileError: the file cannot be written (read-only or missing folder, disk full, ...); the
            file is untouched and no backup is left behind.
    """
    target = Path(os.path.realpath(path))
    backup = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        mode = target.stat().st_mode & 0o777 if old is not None else 0o600
        if old is not None:
            backup = _backup_name(path)
            shutil.copy2(target, backup)
        _replace(target, text, mode)
    except OSError as exc:
        if backup is not None:
            backup.unlink(missing_ok=True)
        reason = exc.strerror or type(exc).__name__
        raise HookFileError(f"{path} cannot be written ({reason}); nothing was changed") from None
    return backup


def _backup_name(path: Path) -> Path:
    """``<name>.memd-backup-<UTC time>`` beside ``path`` (with a counter when taken)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    backup = path.with_name(f"{path.name}.memd-backup-{stamp}")
    counter = 1
    while backup.exists():
        backup = path.with_name(f"{path.name}.memd-backup-{stamp}-{counter}")
        counter += 1
    return backup


def _replace(target: Path, text: str, mode: int) -> None:
    """Write ``text`` to a temporary file beside ``target`` (mode ``mode``), fsync, rename over it.

    Raises:
        OSError: from any step; the temporary file is removed.
    """
    temp = target.with_name(f".{target.name}.memd-tmp-{os.getpid()}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, mode)
        os.replace(temp, target)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise


def _load_json(path: Path) -> tuple[dict[str, Any], str | None]:
    old = _read_text(path)
    if old is None or not old.strip():
        return {}, old
    try:
        data = json.loads(old)
    except json.JSONDecodeError as exc:
        raise HookFileError(
            f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); fix it or move it "
            "away, then run the command again. Nothing was changed."
        ) from None
    if not isinstance(data, dict):
        raise HookFileError(f"{path} does not hold a JSON object; nothing was changed")
    return data, old


def _session_start_groups(data: dict[str, Any], path: Path) -> list[Any]:
    hooks = data.setdefault("hooks", {})
    if not isinstance(hooks, dict):
        raise HookFileError(f'{path}: "hooks" is not an object; nothing was changed')
    groups = hooks.setdefault("SessionStart", [])
    if not isinstance(groups, list):
        raise HookFileError(f'{path}: "hooks.SessionStart" is not a list; nothing was changed')
    return groups


def is_memd_hook(entry: Any) -> bool:
    """Whether a hook entry (``{"type": "command", "command": ...}``) is one memd installed."""
    return (
        isinstance(entry, dict) and isinstance(entry.get("command"), str) and bool(_MEMD_HOOK.search(entry["command"]))
    )


def _without_memd(groups: list[Any]) -> tuple[list[Any], int]:
    """SessionStart groups without memd's hooks (groups left empty by that are dropped)."""
    kept: list[Any] = []
    removed = 0
    for group in groups:
        if not isinstance(group, dict) or not isinstance(group.get("hooks"), list):
            kept.append(group)
            continue
        hooks = [h for h in group["hooks"] if not is_memd_hook(h)]
        removed += len(group["hooks"]) - len(hooks)
        if hooks:
            kept.append({**group, "hooks": hooks})
        elif len(group["hooks"]) == 0:
            kept.append(group)
    return kept, removed


def _dump_json(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


# --------------------------------------------------------------------------- hooks


def install_hook(
    agent: Agent, installation: Installation, environ: Mapping[str, str], project: Path | None = None
) -> list[Change]:
    """Install memd's SessionStart hook for ``agent`` (idempotent; see the module docstring).

    Returns:
        One :class:`Change` per file looked at (Codex: hooks.json and config.toml).

    Raises:
        HookFileError: a file does not parse or has an unexpected shape (it is left untouched).
    """
    path = (
        claude_settings_path(environ, project) if agent is Agent.CLAUDE else codex_dir(environ, project) / "hooks.json"
    )
    data, old = _load_json(path)
    groups = _session_start_groups(data, path)
    toml_path = codex_dir(environ, project) / "config.toml"
    features = _features_edit(toml_path) if agent is Agent.CODEX else None  # parse both files before writing
    kept, _ = _without_memd(groups)
    entry = {"type": "command", "command": installation.hook_command(agent), "timeout": HOOK_TIMEOUT_S}
    kept.append({"matcher": MATCHERS[agent], "hooks": [entry]})
    data["hooks"]["SessionStart"] = kept
    text = _dump_json(data)
    changes = []
    if text == old:
        changes.append(Change(path, False, None, f"memd's SessionStart hook is already in {path}"))
    else:
        backup = _write(path, text, old)
        changes.append(Change(path, True, backup, f"added memd's SessionStart hook ({MATCHERS[agent]}) to {path}"))
    if agent is Agent.CODEX:
        changes.append(_apply(features, toml_path))
    return changes


def uninstall_hook(agent: Agent, environ: Mapping[str, str], project: Path | None = None) -> list[Change]:
    """Remove memd's SessionStart hooks for ``agent``; nothing else is touched.

    Raises:
        HookFileError: the file does not parse or has an unexpected shape (it is left untouched).
    """
    path = (
        claude_settings_path(environ, project) if agent is Agent.CLAUDE else codex_dir(environ, project) / "hooks.json"
    )
    data, old = _load_json(path)
    if old is None:
        return [Change(path, False, None, f"{path} does not exist: nothing to remove")]
    hooks = data.get("hooks")
    if not isinstance(hooks, dict) or "SessionStart" not in hooks:
        return [Change(path, False, None, f"no memd hook in {path}")]
    groups = _session_start_groups(data, path)
    kept, removed = _without_memd(groups)
    if not removed:
        return [Change(path, False, None, f"no memd hook in {path}")]
    if kept:
        hooks["SessionStart"] = kept
    else:
        del hooks["SessionStart"]
        if not hooks:
            del data["hooks"]
    backup = _write(path, _dump_json(data), old)
    return [Change(path, True, backup, f"removed memd's SessionStart hook from {path}")]


# --------------------------------------------------------------------------- Codex config.toml


@dataclass(frozen=True, slots=True)
class _TomlEdit:
    path: Path
    old: str | None
    new: str
    detail: str


def _load_toml(path: Path) -> tuple[Any, str | None]:
    import tomlkit
    from tomlkit.exceptions import ParseError

    old = _read_text(path)
    try:
        return tomlkit.parse(old or ""), old
    except ParseError as exc:
        raise HookFileError(
            f"{path} is not valid TOML ({exc}); fix it or move it away, then run the command again. "
            "Nothing was changed."
        ) from None


def _table(doc: Any, key: str, path: Path) -> Any:
    import tomlkit

    if key not in doc:
        doc[key] = tomlkit.table()
    value = doc[key]
    if not isinstance(value, dict):
        raise HookFileError(f"{path}: {key} is not a table; nothing was changed")
    return value


def _features_edit(path: Path) -> _TomlEdit | None:
    """The edit that sets ``[features] hooks = true`` (``None`` when already set). Parses before any write."""
    doc, old = _load_toml(path)
    features = _table(doc, "features", path)
    if features.get("hooks") is True:
        return None
    features["hooks"] = True
    return _TomlEdit(path, old, doc.as_string(), f"set [features] hooks = true in {path}")


def _apply(edit: _TomlEdit | None, path: Path) -> Change:
    if edit is None:
        return Change(path, False, None, f"[features] hooks = true is already set in {path}")
    backup = _write(edit.path, edit.new, edit.old)
    return Change(edit.path, True, backup, edit.detail)


def install_codex_mcp(installation: Installation, environ: Mapping[str, str], project: Path | None = None) -> Change:
    """Write ``[mcp_servers.memd]`` (command, args, env) into Codex's config.toml (idempotent).

    Raises:
        HookFileError: config.toml does not parse or ``mcp_servers`` is not a table (left untouched).
    """
    import tomlkit

    path = codex_dir(environ, project) / "config.toml"
    doc, old = _load_toml(path)
    servers = _table(doc, "mcp_servers", path)
    env = installation.env()
    wanted: dict[str, Any] = {"command": str(installation.memd_path), "args": ["mcp"], "env": env}
    current = servers.get(SERVER_NAME)
    if current is not None and not isinstance(current, dict):
        raise HookFileError(f"{path}: mcp_servers.{SERVER_NAME} is not a table; nothing was changed")
    if current is not None and {k: current.get(k) for k in wanted} == wanted:
        return Change(path, False, None, f"[mcp_servers.memd] is already in {path}")
    table = current if current is not None else tomlkit.table()
    table["command"] = wanted["command"]
    table["args"] = wanted["args"]
    env_table = tomlkit.inline_table()
    env_table.update(env)
    table["env"] = env_table
    servers[SERVER_NAME] = table
    backup = _write(path, doc.as_string(), old)
    return Change(path, True, backup, f"registered the memd MCP server as [mcp_servers.memd] in {path}")


def uninstall_codex_mcp(environ: Mapping[str, str], project: Path | None = None) -> Change:
    """Remove ``[mcp_servers.memd]`` from Codex's config.toml; nothing else is touched."""
    path = codex_dir(environ, project) / "config.toml"
    doc, old = _load_toml(path)
    servers = doc.get("mcp_servers")
    if old is None or not isinstance(servers, dict) or SERVER_NAME not in servers:
        return Change(path, False, None, f"no [mcp_servers.memd] in {path}")
    del servers[SERVER_NAME]
    if not servers:
        del doc["mcp_servers"]
    text = doc.as_string()
    if not old.endswith("\n\n"):  # the blank line tomlkit put before the table goes with it
        text = text.rstrip("\n") + "\n"
    backup = _write(path, text, old)
    return Change(path, True, backup, f"removed [mcp_servers.memd] from {path}")


# --------------------------------------------------------------------------- Claude MCP (through its CLI)


def claude_mcp_argv(installation: Installation, claude: str = "claude") -> list[str]:
    """``claude mcp add -s user memd -e K=V ... -- <memd> mcp`` (Claude Code 2.1.x CLI).

    The server name comes before the ``-e`` options: ``-e`` takes several values and would swallow it.
    """
    argv = [claude, "mcp", "add", "-s", "user", SERVER_NAME]
    for name, value in installation.env().items():
        argv += ["-e", f"{name}={value}"]
    return [*argv, "--", str(installation.memd_path), "mcp"]


def install_claude_mcp(installation: Installation, *, run: bool = True, timeout_s: float = 60.0) -> Change:
    """Register memd with Claude Code's CLI when ``claude`` is on PATH (else say what to run).

    An existing user-scope ``memd`` server is removed first, so installing twice leaves one.

    Raises:
        HookFileError: ``claude`` failed, could not be started, or did not finish within ``timeout_s``.
    """
    claude = shutil.which("claude") if run else None
    argv = claude_mcp_argv(installation, claude or "claude")
    printable = shlex.join(argv)
    if claude is None:
        return Change(claude_user_config(os.environ), False, None, f"run this to register the MCP server: {printable}")
    _run_claude([claude, "mcp", "remove", "-s", "user", SERVER_NAME], timeout_s)
    done = _run_claude(argv, timeout_s)
    if done.returncode != 0:
        raise HookFileError(f"{printable} failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-500:]}")
    return Change(claude_user_config(os.environ), True, None, f"ran: {printable}")


def _run_claude(argv: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    """Run Claude Code's CLI (output captured as text).

    Raises:
        HookFileError: it could not be started or did not finish within ``timeout_s``.
    """
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise HookFileError(f"{shlex.join(argv)} did not finish within {timeout_s:g} s; stopped it") from None
    except (OSError, subprocess.SubprocessError) as exc:
        raise HookFileError(f"{shlex.join(argv)} could not be run ({exc})") from None


def uninstall_claude_mcp(*, run: bool = True, timeout_s: float = 60.0) -> Change:
    """``claude mcp remove -s user memd`` when ``claude`` is on PATH (else say what to run).

    Raises:
        HookFileError: ``claude`` could not be started or did not finish within ``timeout_s``.
    """
    claude = shutil.which("claude") if run else None
    argv = [claude or "claude", "mcp", "remove", "-s", "user", SERVER_NAME]
    if claude is None:
        return Change(
            claude_user_config(os.environ), False, None, f"run this to remove the MCP server: {shlex.join(argv)}"
        )
    done = _run_claude(argv, timeout_s)
    detail = (
        f"ran: {shlex.join(argv)}"
        if done.returncode == 0
        else f"no user-scope memd server to remove ({shlex.join(argv)})"
    )
    return Change(claude_user_config(os.environ), done.returncode == 0, None, detail)


# --------------------------------------------------------------------------- doctor


class Connection(StrEnum):
    """The connections between memd and the agents that ``memd doctor`` reports."""

    CLAUDE_HOOK = "claude hook"
    CODEX_HOOK = "codex hook"
    CODEX_MCP = "codex mcp"
    CLAUDE_MCP = "claude mcp"


@dataclass(frozen=True, slots=True)
class Installed:
    """What ``memd doctor`` reports about one connection: ``what`` is installed at ``where`` or not.

    Attributes:
        what: the connection.
        where: the file that holds it.
        installed: memd's entry is there.
        detail: one line for the user (the installed command, or why it will not run).
        runs: ``False`` when it is installed but the agent will not run it (Codex without
            ``[features] hooks = true``).
    """

    what: Connection
    where: Path
    installed: bool
    detail: str
    runs: bool = True


def _hooks_in(path: Path) -> list[str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        groups = data.get("hooks", {}).get("SessionStart", [])
        return [h["command"] for g in groups if isinstance(g, dict) for h in g.get("hooks", []) if is_memd_hook(h)]
    except (OSError, ValueError, AttributeError, TypeError):
        return []


def installed_report(environ: Mapping[str, str], project: Path | None = None) -> list[Installed]:
    """What of memd is installed in the agents' files (read only)."""
    report = []
    claude = claude_settings_path(environ, project)
    commands = _hooks_in(claude)
    report.append(
        Installed(Connection.CLAUDE_HOOK, claude, bool(commands), commands[0] if commands else "not installed")
    )
    cdir = codex_dir(environ, project)
    commands = _hooks_in(cdir / "hooks.json")
    features = mcp = None
    try:
        import tomllib

        with open(cdir / "config.toml", "rb") as handle:
            doc = tomllib.load(handle)
        features = doc.get("features", {}).get("hooks", doc.get("features", {}).get("codex_hooks"))
        mcp = doc.get("mcp_servers", {}).get(SERVER_NAME)
    except (OSError, ValueError, AttributeError):
        pass
    detail = commands[0] if commands else "not installed"
    runs = not commands or features is True
    if not runs:
        detail += "; [features] hooks is not true in config.toml: Codex will not run it"
    report.append(Installed(Connection.CODEX_HOOK, cdir / "hooks.json", bool(commands), detail, runs))
    report.append(
        Installed(
            Connection.CODEX_MCP,
            cdir / "config.toml",
            isinstance(mcp, dict),
            f"{mcp.get('command')} {' '.join(mcp.get('args', []))}" if isinstance(mcp, dict) else "not installed",
        )
    )
    claude_json = claude_user_config(environ)
    server = None
    try:
        server = json.loads(claude_json.read_text(encoding="utf-8")).get("mcpServers", {}).get(SERVER_NAME)
    except (OSError, ValueError, AttributeError):
        pass
    report.append(
        Installed(
            Connection.CLAUDE_MCP,
            claude_json,
            isinstance(server, dict),
            f"{server.get('command')} {' '.join(server.get('args', []))}"
            if isinstance(server, dict)
            else "not installed",
        )
    )
    return report
