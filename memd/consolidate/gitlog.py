"""History of a memory root as a local git repository (SPEC §7).

Each successful consolidation becomes one commit, so a person can read and revert what memd
wrote. git is optional: without it (or when it fails) memd carries on and says so once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

GIT_TIMEOUT_S = 60.0
#: ``.git/info/exclude`` of a memory root: only the files memd writes are ever committed (SPEC §14):
#: everything is ignored except ``PROJECT``, ``MEMORY.md``, ``memory_summary.md``,
#: ``trace_summaries/`` and ``skills/``; temp files and staging directories never.
EXCLUDE_PATTERNS = (
    "# written by memd: commit only what memd writes",
    "/*",
    "!/PROJECT",
    "!/MEMORY.md",
    "!/memory_summary.md",
    "!/trace_summaries/",
    "!/skills/",
    "*.tmp-memd-*",
    ".staging-*",
)
#: Modes inside ``.git``: private to the user, like the memory files (SPEC §14).
GIT_DIR_MODE = 0o700
GIT_FILE_MODE = 0o600

_missing_logged = False


def _git_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env["GIT_TERMINAL_PROMPT"] = "0"
    env["LC_ALL"] = "C"  # messages in English: "nothing to commit" is recognised
    return env


def _git(git: str, root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [git, "-c", "commit.gpgsign=false", "-c", "core.hooksPath=/dev/null", *args],
        cwd=root,
        env=_git_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=GIT_TIMEOUT_S,
        check=check,
    )


#: Appended to ``.git/config`` at ``git init``: the identity of memd's commits, and files git
#: creates from then on are 0600 and directories 0700. Written as text, not with ``git config``:
#: a consolidation pays for every process it starts.
_CONFIG = "[user]\n\tname = memd\n\temail = memd@localhost\n[core]\n\tsharedRepository = 0600\n"


def _init(git: str, root: Path) -> None:
    _git(git, root, "-c", "init.defaultBranch=main", "init", "-q")
    with open(root / ".git" / "config", "a", encoding="utf-8") as handle:
        handle.write(_CONFIG)
    log.info("git_repo_initialised", root=str(root))


def _write_exclude(root: Path) -> None:
    """(Re)write ``.git/info/exclude`` with :data:`EXCLUDE_PATTERNS` (repositories made by an
    older memd get the allow-list too)."""
    exclude = root / ".git" / "info" / "exclude"
    exclude.parent.mkdir(mode=GIT_DIR_MODE, parents=True, exist_ok=True)
    text = "\n".join(EXCLUDE_PATTERNS) + "\n"
    try:
        if exclude.read_text("utf-8") == text:
            return
    except OSError:
        pass
    exclude.write_text(text, encoding="utf-8")


def make_git_private(git_dir: Path) -> int:
    """Make ``git_dir`` and everything in it private: directories 0700, files 0600 (objects
    included). Returns how many modes were changed."""
    changed = 0
    for dirpath, dirnames, filenames in os.walk(git_dir):
        for name, mode in [(dirpath, GIT_DIR_MODE)] + [(os.path.join(dirpath, f), GIT_FILE_MODE) for f in filenames]:
            try:
                st = os.lstat(name)
            except OSError:
                continue
            if (st.st_mode & 0o777) != mode and not os.path.islink(name):
                os.chmod(name, mode)
                changed += 1
        dirnames.sort()
    return changed


def commit_memory_root(root: Path, message: str) -> bool:
    """Commit every change under ``root`` to its git repository, creating it if missing.

    The repository is local to the memory root (``<root>/.git``) with a local identity
    ``memd <memd@localhost>``; temp files and staging directories are excluded; signing and
    hooks are disabled for these commits. Two git processes per call (``add``, ``commit``), one
    more the first time (``init``).

    Args:
        root: the memory root.
        message: the commit message.

    Returns:
        ``True`` when a commit was made; ``False`` when there was nothing to commit, git is not
        on ``PATH`` (event ``git_unavailable``, logged once per process) or git failed (event
        ``git_commit_failed``). Never raises.
    """
    global _missing_logged
    git = shutil.which("git")
    if git is None:
        if not _missing_logged:
            log.info("git_unavailable", reason="git not on PATH; memory history is not recorded")
            _missing_logged = True
        return False
    root = Path(root)
    try:
        if not (root / ".git").exists():
            _init(git, root)
        _write_exclude(root)
        _git(git, root, "add", "-A")
        done = _git(git, root, "commit", "-q", "--no-verify", "-m", message, check=False)
        make_git_private(root / ".git")
        if done.returncode == 1 and "nothing to commit" in done.stdout + done.stderr:
            return False
        done.check_returncode()
    except subprocess.CalledProcessError as exc:
        error = (exc.stderr or exc.stdout or "").strip()[-500:]
        log.warning("git_commit_failed", root=str(root), exit_code=exc.returncode, error=error)
        return False
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("git_commit_failed", root=str(root), error=str(exc))
        return False
    log.info("git_committed", root=str(root))
    return True


def drop_history(root: Path) -> bool:
    """Delete a memory root's git history (``memd forget``): the earlier commits still hold the
    forgotten session. The next consolidation commits into a new repository, so the history is
    re-rooted at a state without the session.

    Returns:
        Whether there was a history to delete.
    """
    git_dir = Path(root) / ".git"
    if not git_dir.is_dir() or git_dir.is_symlink():
        return False
    shutil.rmtree(git_dir)
    log.info("git_history_dropped", root=str(root), reason="forget; re-rooted at the next consolidation")
    return True
