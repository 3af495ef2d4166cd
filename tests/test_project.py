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
    assert eligibility(meta(source_kind="exec"), 2, INCLUDE).reason == "source:exec"
    assert eligibility(meta(source_kind="mcp"), 2, INCLUDE).reason == "source:mcp"
    assert eligibility(meta(source_kind="subagent", source_detail="review"), 1, INCLUDE).reason == "source:subagent:review"
    # memd's own consolidation sessions never become memories, even when "internal" is listed
    internal = meta(source_kind="internal", source_detail="memory_consolidation")
    assert not eligibility(internal, 1, (*INCLUDE, "internal")).eligible
    assert eligibility(meta(source_kind="cli", memory_mode="disabled"), 1, INCLUDE).reason == "memory_mode:disabled"
    assert eligibility(meta(source_kind="cli", thread_source="subagent"), 1, INCLUDE).reason == "thread_source:subagent"
    assert eligibility(meta(source_kind="cli", thread_source="user"), 1, INCLUDE).eligible
    assert eligibility(meta(source_kind="cli"), 0, INCLUDE).reason == "no_user_messages"
    assert eligibility(None, 5, INCLUDE).reason == "no_session_meta"


def test_include_sources_is_configurable() -> None:
    assert eligibility(meta(source_kind="exec"), 1, (*INCLUDE, "exec")).eligible
