"""Project keys and eligibility (SPEC §4)."""

from __future__ import annotations

import os
from pathlib import Path

from memd.rollout.project import UNKNOWN_PROJECT, eligibility, normalise_cwd, project_key
from memd.rollout.records import SessionMeta

INCLUDE = ("cli", "vscode", "unknown", "custom")


def test_project_key_is_git_toplevel_when_found(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    (repo / "src" / "pkg").mkdir(parents=True)
    assert project_key(str(repo / "src" / "pkg")) == str(repo.resolve())
    assert project_key(str(repo / "src" / "pkg"), rule="cwd") == str((repo / "src" / "pkg").resolve())


def test_project_key_falls_back_to_normalised_cwd(tmp_path: Path) -> None:
    assert project_key("/no/such/dir/") == "/no/such/dir"
    assert project_key("~/proj") == os.path.join(os.path.expanduser("~"), "proj")
    assert project_key(None) == UNKNOWN_PROJECT
    assert project_key("   ") == UNKNOWN_PROJECT


def test_symlinks_are_resolved(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    assert normalise_cwd(str(link) + "/") == str(real.resolve())


def meta(**kw: object) -> SessionMeta:
    return SessionMeta(thread_id="t", **kw)  # type: ignore[arg-type]


def test_interactive_sources_are_eligible() -> None:
    assert eligibility(meta(source_kind="cli"), 1, INCLUDE).eligible
    assert eligibility(meta(source_kind="vscode"), 3, INCLUDE).eligible
    assert eligibility(meta(source_kind="custom", source_detail="x"), 1, INCLUDE).eligible


def test_excluded_sources_give_a_reason() -> None:
    assert str(eligibility(meta(source_kind="exec"), 2, INCLUDE).reason) == "source:exec"
    assert str(eligibility(meta(source_kind="mcp"), 2, INCLUDE).reason) == "source:mcp"
    assert str(eligibility(meta(source_kind="subagent", source_detail="review"), 1, INCLUDE).reason) == "source:subagent:review"
    # memd's own consolidation sessions never become memories, even when "internal" is listed
    internal = meta(source_kind="internal", source_detail="memory_consolidation")
    assert not eligibility(internal, 1, (*INCLUDE, "internal")).eligible
    assert str(eligibility(meta(source_kind="cli", memory_mode="disabled"), 1, INCLUDE).reason) == "memory_mode:disabled"
    assert str(eligibility(meta(source_kind="cli", thread_source="subagent"), 1, INCLUDE).reason) == "thread_source:subagent"
    assert eligibility(meta(source_kind="cli", thread_source="user"), 1, INCLUDE).eligible
    assert str(eligibility(meta(source_kind="cli"), 0, INCLUDE).reason) == "no_user_messages"
    assert str(eligibility(None, 5, INCLUDE).reason) == "no_session_meta"


def test_include_sources_is_configurable() -> None:
    assert eligibility(meta(source_kind="exec"), 1, (*INCLUDE, "exec")).eligible


def _worktree(main: Path, name: str, where: Path, *, relative: bool = False) -> Path:
    """Lay out a linked worktree the way `git worktree add` does (no git binary needed)."""
    admin = main / ".git" / "worktrees" / name
    admin.mkdir(parents=True)
    (admin / "commondir").write_text("../..\n")
    where.mkdir(parents=True)
    (admin / "gitdir").write_text(str(where / ".git") + "\n")
    target = os.path.relpath(admin, where) if relative else str(admin)
    (where / ".git").write_text(f"gitdir: {target}\n")
    return where


def test_a_worktree_resolves_to_its_main_repository(tmp_path: Path) -> None:
    main = tmp_path / "app"
    (main / ".git").mkdir(parents=True)
    wt1 = _worktree(main, "feature", tmp_path / "app-worktrees" / "feature")
    wt2 = _worktree(main, "fix", tmp_path / "elsewhere" / "fix", relative=True)
    (wt1 / "src").mkdir()
    expected = str(main.resolve())
    assert project_key(str(wt1 / "src")) == expected
    assert project_key(str(wt2)) == expected
    assert project_key(str(main)) == expected
    assert project_key(str(wt1), rule="cwd") == str(wt1.resolve())  # the plain-cwd rule stays plain


def test_a_worktree_of_a_bare_repository_and_a_submodule(tmp_path: Path) -> None:
    bare = tmp_path / "repo.git"
    admin = bare / "worktrees" / "main"
    admin.mkdir(parents=True)
    (admin / "commondir").write_text("../..\n")
    wt = tmp_path / "checkout"
    wt.mkdir()
    (wt / ".git").write_text(f"gitdir: {admin}\n")
    assert project_key(str(wt)) == str(bare.resolve())
    # A submodule's .git file points at .git/modules/<name>, which has no commondir: its own project.
    sub_admin = tmp_path / "super" / ".git" / "modules" / "lib"
    sub_admin.mkdir(parents=True)
    sub = tmp_path / "super" / "lib"
    sub.mkdir()
    (sub / ".git").write_text("gitdir: ../.git/modules/lib\n")
    assert project_key(str(sub)) == str(sub.resolve())


def test_broken_worktree_pointers_fall_back_to_the_worktree(tmp_path: Path) -> None:
    for n, content in enumerate(["gitdir: /no/such/admin\n", "not a pointer", "", "gitdir: \n"]):
        wt = tmp_path / f"wt{n}"
        wt.mkdir()
        (wt / ".git").write_text(content)
        assert project_key(str(wt)) == str(wt.resolve())


def test_a_real_git_worktree(tmp_path: Path) -> None:
    import shutil
    import subprocess

    import pytest

    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed")
    main = tmp_path / "main"
    env = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}
    run = lambda *args: subprocess.run([git, *args], check=True, capture_output=True, env=env)  # noqa: E731
    run("init", "-q", str(main))
    run("-C", str(main), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "i")
    run("-C", str(main), "worktree", "add", "-q", str(tmp_path / "wt"), "-b", "wt")
    assert project_key(str(tmp_path / "wt")) == str(main.resolve())
