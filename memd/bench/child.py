"""The environment of a ``memd`` the benchmarks run as a child process.

Every measured child gets a private ``HOME`` and XDG tree (so it reads and writes nothing of the
user's), none of this shell's memd, model, Codex or Claude Code settings, the offline extractor, and
a ``PYTHONPATH`` that makes it import the memd under test.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The checkout (or site-packages folder) this memd was imported from.
PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def isolated_env(home: Path, code: Path | None = None) -> dict[str, str]:
    """The environment of a measured child ``memd``.

    Args:
        home: the child's ``HOME``; ``CODEX_HOME``, ``CLAUDE_CONFIG_DIR`` and ``XDG_*`` lie under it.
        code: the checkout the child imports memd from (default: this memd's own).

    Returns:
        A new environment: this process's, without ``MEMD_*``, ``OPENAI_*``, ``CLAUDE_*``,
        ``CODEX_*``, ``NOTIFY_SOCKET`` and ``JOURNAL_STREAM``, with ``MEMD_EXTRACTOR=offline``.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEMD_", "OPENAI_", "CLAUDE_", "CODEX_"))}
    env.pop("NOTIFY_SOCKET", None)
    env.pop("JOURNAL_STREAM", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(code or PACKAGE_ROOT), env.get("PYTHONPATH")) if p)
    env.update(
        HOME=str(home),
        CODEX_HOME=str(home / ".codex"),
        CLAUDE_CONFIG_DIR=str(home / ".claude"),
        XDG_CONFIG_HOME=str(home / ".config"),
        XDG_DATA_HOME=str(home / ".local" / "share"),
        XDG_STATE_HOME=str(home / ".local" / "state"),
        XDG_CACHE_HOME=str(home / ".cache"),
        XDG_RUNTIME_DIR=str(home / "run"),
        MEMD_EXTRACTOR="offline",
    )
    return env
