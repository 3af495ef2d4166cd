"""Lay the real Claude Code transcripts of ``../shared/rollouts/claude`` out as Claude Code does.

The shared folder flattens the tree (``<tag>-<session8>-subagents-agent-<id>.jsonl``,
``<tag>-<session8>-agent-<id>.jsonl``). Tests that need the real tree copy the files into a
temporary projects root:

* a session: ``<encoded cwd>/<sessionId>.jsonl``;
* a 2.1.x sub-agent: ``<encoded cwd>/<sessionId>/subagents/agent-<id>.jsonl``;
* a 2.0.x sub-agent: ``<encoded cwd>/agent-<id>.jsonl`` beside its session.

The copies live only in the test's temporary directory (never in the repository).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

_SUBAGENT_21 = re.compile(r"-subagents-(agent-[A-Za-z0-9-]+)\.jsonl$")
_SUBAGENT_20 = re.compile(r"-[0-9a-f]{8}-(agent-[0-9a-f]+)\.jsonl$")


def encode_cwd(cwd: str) -> str:
    """Claude Code's project folder name for a cwd: every non-alphanumeric character becomes ``-``."""
    return "".join(c if c.isascii() and c.isalnum() else "-" for c in cwd)


def _identity(path: Path) -> tuple[str, str]:
    """``(sessionId, cwd)`` of the first records that carry them."""
    sid = cwd = ""
    with open(path, "rb") as f:
        for raw in f:
            try:
                obj = json.loads(raw)
            except ValueError:
                continue
            if isinstance(obj, dict):
                if not sid and isinstance(obj.get("sessionId"), str):
                    sid = obj["sessionId"]
                if not cwd and isinstance(obj.get("cwd"), str) and obj.get("sessionId") == sid:
                    cwd = obj["cwd"]
            if sid and cwd:
                break
    return sid, cwd or "/unknown"


def lay_out(src: Path, root: Path) -> dict[str, Path]:
    """Copy every ``*.jsonl`` of ``src`` into ``root`` in Claude Code's layout.

    Returns:
        The new path of every source file, keyed by the source file name.
    """
    placed: dict[str, Path] = {}
    for path in sorted(src.glob("*.jsonl")):
        sid, cwd = _identity(path)
        project = root / encode_cwd(cwd)
        m21, m20 = _SUBAGENT_21.search(path.name), _SUBAGENT_20.search(path.name)
        if m21:
            dest = project / sid / "subagents" / f"{m21.group(1)}.jsonl"
        elif m20:
            dest = project / f"{m20.group(1)}.jsonl"
        else:
            dest = project / f"{sid}.jsonl"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
        placed[path.name] = dest
    return placed
