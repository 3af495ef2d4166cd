"""Project keys and thread eligibility (SPEC §4).

The *project* of a thread is the git top-level directory containing its ``cwd`` when one can be
found on disk, else the normalised ``cwd`` (absolute, ``~`` expanded, symlinks resolved when the
path exists, no trailing slash). A linked git worktree resolves to its main repository, so every
worktree of one repository shares one memory. ``project_key = "cwd"`` restores the plain-cwd rule.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache

TYPE_CHECKING = False  # `typing` stays unimported at run time (`memd context` start-up, SPEC §15)
if TYPE_CHECKING:  # a type only: `memd context` needs project_key, not the records module (SPEC §15 start-up)
    from memd.rollout.records import SessionMeta

#: Project key of a thread whose rollout records no cwd.
UNKNOWN_PROJECT = "(unknown)"


def normalise_cwd(cwd: str | None) -> str:
    """Normalise a recorded cwd: expand ``~``, make absolute, resolve symlinks when it exists.

    Returns:
        The normalised path without a trailing slash, or :data:`UNKNOWN_PROJECT` when empty.
    """
    if not cwd or not cwd.strip():
        return UNKNOWN_PROJECT
    path = os.path.expanduser(cwd.strip())
    path = os.path.abspath(path)
    if os.path.exists(path):
        path = os.path.realpath(path)
    return path.rstrip("/") or "/"


#: Largest ``.git`` file / ``commondir`` file read (they hold one short path).
_GIT_POINTER_MAX_BYTES = 4096


@lru_cache(maxsize=4096)
def _git_toplevel(path: str) -> str | None:
    current = path
    while True:
        dot_git = os.path.join(current, ".git")
        if os.path.exists(dot_git):
            return main_worktree(current) if os.path.isfile(dot_git) else current
        parent = os.path.dirname(current)
        if parent == current:
            return None
        current = parent


def main_worktree(toplevel: str) -> str:
    """The main repository of a git working tree whose ``.git`` is a file (a linked worktree).

    Git's layout: a linked worktree's ``.git`` file says ``gitdir: <main>/.git/worktrees/<name>``
    (absolute, or relative to the worktree); that directory's ``commondir`` file names the shared
    git directory (``../..`` → ``<main>/.git``), whose parent is the main working tree. For a bare
    repository with worktrees the shared directory itself (``repo.git``) is the key. A ``.git``
    file without ``commondir`` behind it (a submodule) is its own project. The files are read as
    data (bounded), never executed.

    Args:
        toplevel: a directory holding a ``.git`` file.

    Returns:
        The main working tree (or shared git directory) path, normalised; ``toplevel`` itself
        when the pointers cannot be followed. Never raises.
    """
    gitdir_text = _read_pointer(os.path.join(toplevel, ".git"))
    if gitdir_text is None or not gitdir_text.startswith("gitdir:"):
        return toplevel
    gitdir = os.path.normpath(os.path.join(toplevel, gitdir_text[len("gitdir:") :].strip()))
    common_text = _read_pointer(os.path.join(gitdir, "commondir"))
    if not common_text:
        return toplevel
    common = os.path.realpath(os.path.join(gitdir, common_text))
    if not os.path.isdir(common):
        return toplevel
    if os.path.basename(common) == ".git":
        return os.path.dirname(common)
    return common


def _read_pointer(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            data = f.read(_GIT_POINTER_MAX_BYTES)
    except OSError:
        return None
    return data.decode("utf-8", "replace").strip()


def project_key(cwd: str | None, *, rule: str = "git") -> str:
    """Return the project key for a session cwd.

    Args:
        cwd: the cwd recorded in the rollout (untrusted text; never executed).
        rule: ``git`` (default: the enclosing git top-level when found on disk, a linked worktree
            resolved to its main repository: :func:`main_worktree`) or ``cwd``.
    """
    normalised = normalise_cwd(cwd)
    if rule == "cwd" or normalised == UNKNOWN_PROJECT or not os.path.isdir(normalised):
        return normalised
    return _git_toplevel(normalised) or normalised


class ReasonKind(StrEnum):
    """Why a thread is not a phase-1 candidate (SPEC §4, conditions 1 and 2).

    ``NOT_READ_YET`` and ``NO_USER_MESSAGES`` are provisional: they can change as more of the
    rollout is read. The others are decided by the session's head and never change.
    """

    SOURCE = "source"
    THREAD_SOURCE = "thread_source"
    MEMORY_MODE = "memory_mode"
    NO_USER_MESSAGES = "no_user_messages"
    NO_SESSION_META = "no_session_meta"
    NOT_READ_YET = "not_read_yet"
    FORGOTTEN = "forgotten"  # ``memd forget``: never a memory again (tombstone, SPEC §10)


#: Reasons that more bytes of the rollout may lift.
PROVISIONAL_REASONS = frozenset({ReasonKind.NOT_READ_YET, ReasonKind.NO_USER_MESSAGES})


@dataclass(frozen=True, slots=True)
class Ineligible:
    """A reason a thread is not eligible: a :class:`ReasonKind` and, for sources, what it was.

    Its text (``str()``) is what the database, ``memd status`` and scripts see: ``source:exec``,
    ``source:subagent:review``, ``thread_source:subagent``, ``memory_mode:disabled``,
    ``no_user_messages``, ``no_session_meta``, ``not_read_yet``.

    Attributes:
        kind: the reason.
        detail: the source label, thread source or memory mode concerned, else ``None``.
    """

    kind: ReasonKind
    detail: str | None = None

    def __str__(self) -> str:
        return f"{self.kind}:{self.detail}" if self.detail else str(self.kind)

    @property
    def provisional(self) -> bool:
        """Whether reading more of the rollout may make the thread eligible."""
        return self.kind in PROVISIONAL_REASONS

    @classmethod
    def parse(cls, text: str) -> Ineligible:
        """Read a reason back from its text.

        Raises:
            ValueError: ``text`` names no :class:`ReasonKind`.
        """
        kind, _, detail = text.partition(":")
        return cls(ReasonKind(kind), detail or None)


NOT_READ_YET = Ineligible(ReasonKind.NOT_READ_YET)
FORGOTTEN = Ineligible(ReasonKind.FORGOTTEN)
NO_USER_MESSAGES = Ineligible(ReasonKind.NO_USER_MESSAGES)


@dataclass(frozen=True, slots=True)
class Eligibility:
    """Whether a thread may become a phase-1 candidate (conditions 1 and 2 of SPEC §4).

    ``reason`` says why not (see :class:`Ineligible`). Idle gate, age and watermark (conditions
    3–5) are the scheduler's, because they change with time.
    """

    eligible: bool
    reason: Ineligible | None = None


def eligibility(meta: SessionMeta | None, user_messages: int, include_sources: Iterable[str]) -> Eligibility:
    """Decide conditions 1 and 2 of SPEC §4 for a thread.

    Args:
        meta: the thread's first session_meta, or ``None`` when the file has none.
        user_messages: real user messages counted so far (injected context excluded).
        include_sources: source kinds allowed (default ``cli``, ``vscode``, ``unknown``,
            ``custom``); ``exec``, ``mcp``, ``subagent`` and ``internal`` are excluded unless
            listed. ``internal`` (memd's own and Codex's consolidation sessions) is never allowed.
            A ``thread_source`` other than ``user`` or an allowed source kind (real 0.146 files
            write ``cli`` there) excludes the thread too.
    """
    if meta is None:
        return Eligibility(False, Ineligible(ReasonKind.NO_SESSION_META))
    allowed = set(include_sources)
    if meta.source_kind == "internal" or meta.source_kind not in allowed:
        return Eligibility(False, Ineligible(ReasonKind.SOURCE, meta.source_label))
    if meta.thread_source and meta.thread_source != "user" and meta.thread_source not in allowed:
        return Eligibility(False, Ineligible(ReasonKind.THREAD_SOURCE, meta.thread_source))
    if (meta.memory_mode or "").lower() == "disabled":
        return Eligibility(False, Ineligible(ReasonKind.MEMORY_MODE, "disabled"))
    if user_messages <= 0:
        return Eligibility(False, NO_USER_MESSAGES)
    return Eligibility(True, None)
