"""``memd doctor``: check the configuration, the paths, the inotify limits, the model endpoint, and what
is installed in the agents (hooks, MCP servers).

Each check gives a verdict (``ok``, ``warn`` or ``fail``) and one line of detail; the command
exits 1 when any check fails.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import sys
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TextIO

from memd.config import Settings


class Verdict(StrEnum):
    """How one check came out; any ``FAIL`` makes ``memd doctor`` exit 1."""

    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True, slots=True)
class Check:
    """One verdict: ``name``, ``verdict`` and a one-line ``detail``."""

    name: str
    verdict: Verdict
    detail: str


def _read_int(path: str) -> int | None:
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None


def count_dirs(roots: Sequence[Path], limit: int = 200_000) -> int:
    """Directories under ``roots`` (each needs one inotify watch); stops counting at ``limit``."""
    count = 0
    for root in roots:
        if not root.is_dir():
            continue
        for _dirpath, _dirnames, _files in os.walk(root):
            count += 1
            if count >= limit:
                return count
    return count


def check_config(config_path: Path | None) -> list[Check]:
    """The configuration loaded (it did, or ``memd`` would have exited 78): which file, and
    whether a file that holds ``llm.api_key`` is private (SPEC §14: a 0600 file)."""
    if config_path is None:
        return [Check("configuration", Verdict.OK, "valid; no config file (defaults and environment)")]
    checks = [Check("configuration", Verdict.OK, f"valid; {config_path}")]
    try:
        with config_path.open("rb") as handle:
            holds_key = "api_key" in (tomllib.load(handle).get("llm") or {})
        mode = stat.S_IMODE(config_path.stat().st_mode)
    except (OSError, tomllib.TOMLDecodeError, AttributeError):
        return checks
    if holds_key and mode & 0o077:
        checks.append(
            Check(
                "config secrets",
                Verdict.WARN,
                f"{config_path} holds llm.api_key and is mode {mode:04o}; run chmod 600 on it",
            )
        )
    return checks


def check_paths(settings: Settings) -> list[Check]:
    """Rollout roots exist and are readable; state and memory directories are writable."""
    checks = []
    for root in settings.sessions:
        if root.is_dir():
            readable = os.access(root, os.R_OK | os.X_OK)
            checks.append(
                Check(
                    f"sessions {root}",
                    Verdict.OK if readable else Verdict.FAIL,
                    "readable" if readable else "not readable",
                )
            )
        else:
            checks.append(Check(f"sessions {root}", Verdict.WARN, "does not exist yet (watched once it appears)"))
    for name, path in (("state_dir", settings.state_dir), ("memory_dir", settings.memory_dir)):
        probe = path
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        writable = os.access(probe, os.W_OK | os.X_OK)
        detail = f"{path} ({'exists' if path.exists() else 'will be created'})"
        checks.append(
            Check(name, Verdict.OK if writable else Verdict.FAIL, detail if writable else f"{path}: not writable")
        )
    if settings.db_path.is_file():
        try:
            conn = sqlite3.connect(f"file:{settings.db_path}?mode=ro", uri=True, timeout=5)
            try:
                result = conn.execute("PRAGMA quick_check").fetchone()[0]
                version = conn.execute("PRAGMA user_version").fetchone()[0]
            finally:
                conn.close()
            verdict = Verdict.OK if result == "ok" else Verdict.FAIL
            checks.append(Check("database", verdict, f"{settings.db_path}: quick_check {result}, schema v{version}"))
        except sqlite3.Error as exc:
            checks.append(Check("database", Verdict.FAIL, f"{settings.db_path}: {exc}"))
    else:
        checks.append(Check("database", Verdict.OK, f"{settings.db_path} will be created on first run"))
    return checks


def check_inotify(settings: Settings) -> list[Check]:
    """Compare the inotify watch limit with the directories the roots hold."""
    if settings.force_polling:
        return [Check("inotify", Verdict.OK, "force_polling = true: polling, no inotify watches needed")]
    watches = _read_int("/proc/sys/fs/inotify/max_user_watches")
    instances = _read_int("/proc/sys/fs/inotify/max_user_instances")
    if watches is None:
        return [Check("inotify", Verdict.WARN, "cannot read /proc/sys/fs/inotify (not Linux?); scans still run")]
    needed = count_dirs(settings.sessions)
    verdict = Verdict.OK if needed * 2 < watches else (Verdict.WARN if needed < watches else Verdict.FAIL)
    detail = f"{needed} directories to watch, max_user_watches = {watches}, max_user_instances = {instances}"
    if verdict is not Verdict.OK:
        detail += "; raise fs.inotify.max_user_watches (sysctl) or set force_polling = true"
    return [Check("inotify", verdict, detail)]


def check_consolidation(settings: Settings) -> list[Check]:
    """The consolidation command can be found; git is there for memory history."""
    argv0 = settings.consolidation.command[0]
    found = shutil.which(argv0) if os.sep not in argv0 else (argv0 if os.access(argv0, os.X_OK) else None)
    checks = [
        Check(
            "consolidation.command",
            Verdict.OK if found else Verdict.FAIL,
            f"{argv0} found" if found else f"{argv0}: not found or not executable",
        )
    ]
    git = shutil.which("git")
    checks.append(
        Check("git", Verdict.OK if git else Verdict.WARN, git or "not installed: memory history is not recorded")
    )
    return checks


async def check_model(settings: Settings) -> list[Check]:
    """Which extractor runs and why; for ``openai``, whether the endpoint answers."""
    name, reason = settings.resolved_extractor()
    checks = [Check("extractor", Verdict.OK, f"{name} ({reason})")]
    if name != "openai":
        return checks
    from memd.daemon import llm_config
    from memd.llm.check import check_endpoint

    result = await check_endpoint(llm_config(settings))
    verdict = Verdict.FAIL if not result.ok else (Verdict.WARN if result.model_listed is False else Verdict.OK)
    detail = result.detail
    if verdict is Verdict.WARN:
        detail += f"; check llm.model (requests for {settings.llm.model!r} may be refused)"
    checks.append(Check("model endpoint", verdict, detail))
    return checks


async def collect_checks(settings: Settings, *, config_path: Path | None = None) -> list[Check]:
    """Run every check: configuration, paths and database, inotify, consolidation command and
    git, extractor and model endpoint (in that order)."""
    checks = check_config(config_path)
    checks += check_paths(settings)
    checks += check_inotify(settings)
    checks += check_consolidation(settings)
    checks += await check_model(settings)
    checks += check_connections(os.environ)
    return checks


def check_connections(environ: Mapping[str, str]) -> list[Check]:
    """What of memd is installed in the agents' own files (hooks, MCP servers): read only (SPEC §18)."""
    from memd.read.hooks import Connection, installed_report

    checks = []
    hint = {
        Connection.CLAUDE_HOOK: "memd hooks install claude",
        Connection.CODEX_HOOK: "memd hooks install codex",
        Connection.CLAUDE_MCP: "memd mcp install claude",
        Connection.CODEX_MCP: "memd mcp install codex",
    }
    for item in installed_report(environ):
        if not item.installed:
            checks.append(Check(item.what, Verdict.OK, f"not installed ({hint[item.what]} connects it)"))
        else:
            verdict = Verdict.OK if item.runs else Verdict.WARN
            checks.append(Check(item.what, verdict, f"{item.where}: {item.detail}"))
    return checks


def print_checks(checks: Sequence[Check], *, out: TextIO | None = None) -> int:
    """Print one line per check (``OK``/``WARN``/``FAIL``, name, detail) and a summary line to
    ``out`` (default ``sys.stdout``); return 0 when none failed, else 1."""
    out = out or sys.stdout
    width = max(len(c.name) for c in checks)
    for c in checks:
        print(f"{c.verdict.upper():<5} {c.name:<{width}}  {c.detail}", file=out)
    failed = [c for c in checks if c.verdict is Verdict.FAIL]
    print(f"\n{len(failed)} failed, {sum(c.verdict is Verdict.WARN for c in checks)} warnings", file=out)
    return 1 if failed else 0


async def run_doctor(settings: Settings, *, config_path: Path | None = None, out: TextIO | None = None) -> int:
    """``memd doctor``: run every check (:func:`collect_checks`) and print them
    (:func:`print_checks`); return 0 when none failed, else 1.

    Args:
        settings: the loaded settings.
        config_path: the TOML file they were read from, if any.
        out: where to print (default ``sys.stdout``).
    """
    return print_checks(await collect_checks(settings, config_path=config_path), out=out)
