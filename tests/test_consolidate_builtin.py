"""The built-in consolidator: offline merge, staging and swap, git history (SPEC §7)."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from memd.consolidate import builtin, gitlog
from memd.consolidate.builtin import (
    Consolidated,
    ConsolidationInput,
    Skill,
    consolidate_root,
    parse_trace,
)
from memd.errors import ConsolidationError, MemoryWriteError
from memd.memory import files as memory_files

PROJECT = "/home/u/proj"
DAY = 86_400.0
T0 = 1_767_373_200.0  # 2026-01-02T17:00:00Z

NEWEST = """# Fixed the flaky CI test by pinning pytest-asyncio
Trace context: /home/u/proj, 2026-01-02, codex, gpt-5
User preferences:
- Always run tests with `pytest -x` (asked to stop at the first failure)
- Never commit; the developer commits
## Task: Fix flaky test
Outcome: success
Key steps: ran `.venv/bin/pytest -q tests/test_io.py`
Things that did not work / things that can be improved:
- `pip install -U pytest-asyncio` broke the fixtures
  (the new version needs `loop_scope`)
Reusable knowledge:
- Tests run with `.venv/bin/pytest -q`
- CI config lives in `.github/workflows/ci.yml`
Pointers and references (annotate why each item matters): none
## Task: Update the README
Outcome: uncertain
Reusable knowledge: none
"""

OLDER = """# Set up the development environment
Trace context: /home/u/proj, 2026-01-01, codex, gpt-5
User preferences: none observed
## Task: Create the virtualenv
Outcome: partial
Things that did not work / things that can be improved: none
Reusable knowledge:
- tests run with .venv/bin/pytest -q.
- Nothing beyond the steps above.
"""


def _write_trace(root: Path, thread_id: str, updated_at: float, body: str) -> str:
    relpath = memory_files.trace_relpath(thread_id, body.splitlines()[0])
    header = memory_files.TraceHeader(thread_id, PROJECT, PROJECT, f"/rollouts/{thread_id}.jsonl", updated_at)
    memory_files.stage_file(root, relpath, memory_files.render_trace_file(header, body)).commit()
    return relpath


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = memory_files.ensure_project_root(tmp_path / "projects", PROJECT)
    _write_trace(root, "t-new", T0, NEWEST)
    _write_trace(root, "t-old", T0 - DAY, OLDER)
    return root


NEW_TRACE = "trace_summaries/t_new_fixed_the_flaky_ci_test_by_pinning_pytest_asyncio.md"
OLD_TRACE = "trace_summaries/t_old_set_up_the_development_environment.md"

EXPECTED = f"""# Project memory: {PROJECT}

Merged offline by memd from 2 trace memories (2026-01-01 to 2026-01-02); newer guidance wins.

## User preferences
- Always run tests with `pytest -x` (asked to stop at the first failure) (trace: {NEW_TRACE})
- Never commit; the developer commits (trace: {NEW_TRACE})

## Reusable knowledge
- Tests run with `.venv/bin/pytest -q` (seen in 2 sessions; trace: {NEW_TRACE})
- CI config lives in `.github/workflows/ci.yml` (trace: {NEW_TRACE})

## Failures to avoid
- `pip install -U pytest-asyncio` broke the fixtures
  (the new version needs `loop_scope`) (trace: {NEW_TRACE})

## Recent tasks
- 2026-01-02 Fix flaky test — success (trace: {NEW_TRACE})
- 2026-01-02 Update the README — uncertain (trace: {NEW_TRACE})
- 2026-01-01 Create the virtualenv — partial (trace: {OLD_TRACE})
"""


# --------------------------------------------------------------------------- offline merge


def test_offline_merge_is_deterministic(root: Path, tmp_path: Path) -> None:
    result = consolidate_root(root, git=False)
    assert result.traces == 2 and result.memory_changed and not result.skills_changed
    text = (root / "MEMORY.md").read_text()
    assert text == EXPECTED
    assert stat.S_IMODE((root / "MEMORY.md").stat().st_mode) == 0o600
    # a copy of the same traces (files written in another order) gives the same bytes
    other = memory_files.ensure_project_root(tmp_path / "other", PROJECT)
    _write_trace(other, "t-old", T0 - DAY, OLDER)
    _write_trace(other, "t-new", T0, NEWEST)
    consolidate_root(other, git=False)
    assert (other / "MEMORY.md").read_bytes() == (root / "MEMORY.md").read_bytes()


def test_now_and_max_traces(root: Path) -> None:
    consolidate_root(root, max_traces=1, now_s=T0 + 60, git=False)
    text = (root / "MEMORY.md").read_text()
    assert "Generated: 2026-01-02T17:01:00Z" in text
    assert "from 1 trace memories" in text and "Create the virtualenv" not in text


def test_dedupe_keeps_newest_wording_and_counts_sessions(tmp_path: Path) -> None:
    root = memory_files.ensure_project_root(tmp_path, PROJECT)
    for i, wording in enumerate(["use `make test`.", "Use make test", "**Use** `make test`!"]):
        body = f"# s{i}\nUser preferences: none observed\n## Task: t{i}\nOutcome: success\n"
        body += f"Reusable knowledge:\n- {wording}\n- fact {i}\n"
        _write_trace(root, f"t{i}", T0 + i, body)
    consolidate_root(root, git=False)
    section = (root / "MEMORY.md").read_text().split("## Reusable knowledge\n")[1].split("\n\n")[0]
    lines = section.splitlines()
    assert lines[0].startswith(
        "- **Use** `make test`! (seen in 3 sessions; trace: trace_summaries/t2_"
    )
    assert [line.split(" (")[0] for line in lines[1:]] == ["- fact 2", "- fact 1", "- fact 0"]


def test_conflicting_preferences_newer_wins(tmp_path: Path) -> None:
    root = memory_files.ensure_project_root(tmp_path, PROJECT)
    _write_trace(root, "old", T0, "# a\nUser preferences:\n- Never use tabs\n")
    _write_trace(root, "new", T0 + DAY, "# b\nUser preferences:\n- Always use tabs\n")
    consolidate_root(root, git=False)
    prefs = (root / "MEMORY.md").read_text().split("## User preferences\n")[1].split("\n\n")[0]
    assert prefs.splitlines() == [
        '- Always use tabs (supersedes older guidance: "Never use tabs"; '
        "trace: trace_summaries/new_b.md)"
    ]


def test_conflicting_preferences_older_with_stronger_evidence_kept(tmp_path: Path) -> None:
    root = memory_files.ensure_project_root(tmp_path, PROJECT)
    _write_trace(root, "old1", T0, "# a\nUser preferences:\n- Don't run `git push`\n")
    _write_trace(root, "old2", T0 + 1, "# b\nUser preferences:\n- Never run git push.\n")
    _write_trace(root, "new", T0 + DAY, "# c\nUser preferences:\n- Always run `git push`\n")
    consolidate_root(root, git=False)
    prefs = (root / "MEMORY.md").read_text().split("## User preferences\n")[1].split("\n\n")[0]
    lines = prefs.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("- Always run `git push` (newer guidance; contradicts an older")
    assert lines[1].startswith("- Never run git push. (older guidance, stated in 2 sessions;")
    assert (
        "confirm with the user; seen in 2 sessions; trace: trace_summaries/old2_b.md)" in lines[1]
    )


def test_parse_trace_is_lenient() -> None:
    body = """# Title line
**User preferences:**
- prefers `uv` over pip (said so)
### Reusable knowledge
- build with `make`
```sh
- not a bullet: inside a fence
Outcome: not a label here
```
Raw notes: whatever
"""
    digest = parse_trace(body)
    assert digest.title == "Title line"
    assert digest.preferences == [["prefers `uv` over pip (said so)"]]
    assert len(digest.tasks) == 1 and digest.tasks[0].name == "Title line"
    assert digest.tasks[0].knowledge == [
        ["build with `make`", "```sh", "- not a bullet: inside a fence",
         "Outcome: not a label here", "```"],
    ]  # fmt: skip
    assert digest.tasks[0].outcome == "uncertain"


def test_traceless_and_empty_root(tmp_path: Path) -> None:
    root = memory_files.ensure_project_root(tmp_path, PROJECT)
    consolidate_root(root, git=False)
    text = (root / "MEMORY.md").read_text()
    assert "No trace memories yet." in text and text.count("none yet") == 4
    _write_trace(root, "t", T0, "just some raw text without the skeleton")
    consolidate_root(root, git=False)
    assert (
        "- 2026-01-02 t — uncertain (trace: trace_summaries/t_just_some_raw_text"
        in (root / "MEMORY.md").read_text()
    )


def test_root_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConsolidationError):
        consolidate_root(tmp_path / "missing")


# --------------------------------------------------------------------------- writer seam, skills


def test_writer_seam_and_skills(root: Path) -> None:
    seen: list[ConsolidationInput] = []

    def writer(data: ConsolidationInput) -> Consolidated:
        seen.append(data)
        skills = (
            Skill("run-tests", "Use when running\nthe tests.", "1. `make test`\n"),
            Skill("../../escape", 'desc with "quotes"', "body"),
        )
        return Consolidated(memory_md="# handbook\n", skills=skills)

    (root / "MEMORY.md").write_text("previous\n")
    result = consolidate_root(root, writer=writer, git=False)
    assert result.memory_changed and result.skills_changed
    data = seen[0]
    assert data.project == PROJECT and data.previous_memory_md == "previous\n"
    assert [t.header.thread_id for t in data.traces] == ["t-new", "t-old"]
    assert data.existing_skills == ()
    assert (root / "skills" / "run_tests" / "SKILL.md").read_text() == (
        '---\nname: "run-tests"\ndescription: "Use when running the tests."\n---\n\n'
        "1. `make test`\n"
    )
    assert (
        (root / "skills" / "escape" / "SKILL.md")
        .read_text()
        .startswith('---\nname: "../../escape"\ndescription: "desc with \\"quotes\\""\n---\n')
    )
    assert stat.S_IMODE((root / "skills" / "run_tests").stat().st_mode) == 0o700

    again = consolidate_root(root, writer=writer, git=False)
    assert not again.memory_changed and not again.skills_changed
    assert seen[1].existing_skills == ("escape", "run_tests")

    offline = consolidate_root(root, git=False)  # skills=None: skills/ untouched
    assert not offline.skills_changed and (root / "skills" / "run_tests" / "SKILL.md").exists()
    cleared = consolidate_root(root, writer=lambda d: Consolidated("# h\n", ()), git=False)
    assert cleared.skills_changed and list((root / "skills").iterdir()) == []


def test_staging_failure_leaves_previous_outputs(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = Consolidated("# old handbook\n", (Skill("old-skill", "d", "old body"),))
    consolidate_root(root, writer=lambda d: old, git=False)
    before = {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    real_write = builtin._write_file

    def disk_full_on_skill(path: Path, data: bytes) -> None:
        if "skills" in path.parts:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(builtin, "_write_file", disk_full_on_skill)
    new = Consolidated("# new handbook\n", (Skill("new-skill", "d", "new body"),))
    with capture_logs() as logs, pytest.raises(MemoryWriteError, match="No space left"):
        consolidate_root(root, writer=lambda d: new, git=False)
    after = {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert after == before, "MEMORY.md and skills/ untouched, nothing left behind"
    assert not list(root.glob(".staging-*"))
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["consolidate_write_failed"]


def test_swap_failure_restores_skills(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    consolidate_root(
        root, writer=lambda d: Consolidated("# old\n", (Skill("a", "d", "a"),)), git=False
    )

    def fail(staged: Path, final: Path) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(builtin, "_replace_memory", fail)
    with pytest.raises(MemoryWriteError):
        consolidate_root(root, writer=lambda d: Consolidated("# new\n", (Skill("b", "d", "b"),)),
                         git=False)  # fmt: skip
    assert (root / "MEMORY.md").read_text() == "# old\n"
    assert sorted(p.name for p in (root / "skills").iterdir()) == ["a"]
    assert not list(root.glob(".staging-*"))


def test_unchanged_output_is_not_rewritten(root: Path) -> None:
    assert consolidate_root(root, git=False).memory_changed
    first = (root / "MEMORY.md").stat()
    second = consolidate_root(root, git=False)
    assert not second.memory_changed
    now = (root / "MEMORY.md").stat()
    assert (now.st_ino, now.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)


def test_stale_staging_dirs_are_removed(root: Path) -> None:
    stale = root / ".staging-0123456789abcdef"
    (stale / "skills").mkdir(parents=True)
    (stale / "MEMORY.md").write_text("half-written")
    consolidate_root(root, git=False)
    assert not stale.exists()
    assert (root / "MEMORY.md").read_text() == EXPECTED


# --------------------------------------------------------------------------- git history


def _git_log(root: Path) -> list[str]:
    out = subprocess.run(
        ["git", "log", "--format=%an|%s"], cwd=root, capture_output=True, text=True, check=True
    )
    return out.stdout.splitlines()


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_commit_per_successful_consolidation(root: Path) -> None:
    first = consolidate_root(root)
    assert first.committed
    assert _git_log(root) == ["memd|memd: consolidate 2 trace memories"]
    tracked = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True).stdout
    assert "MEMORY.md" in tracked and NEW_TRACE in tracked
    assert not consolidate_root(root).committed, "nothing changed, no commit"
    memory_files.stage_file(root, "memory_summary.md", "pending")  # a temp file is never committed
    _write_trace(root, "t-3", T0 + DAY, "# third\n## Task: x\nOutcome: fail\n")
    assert consolidate_root(root).committed
    assert len(_git_log(root)) == 2
    tracked = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True).stdout
    assert memory_files.TEMP_MARKER not in tracked


def test_works_without_git(root: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(gitlog, "_missing_logged", False)
    with capture_logs() as logs:
        result = consolidate_root(root)
        consolidate_root(root)
    assert result.memory_changed and not result.committed
    assert not (root / ".git").exists()
    assert [e["event"] for e in logs].count("git_unavailable") == 1


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_failure_is_logged_not_raised(root: Path) -> None:
    (root / ".git").write_text("not a repository")  # makes every git command fail
    with capture_logs() as logs:
        result = consolidate_root(root)
    assert result.memory_changed and not result.committed
    assert [e["event"] for e in logs if e["event"].startswith("git_")] == ["git_commit_failed"]
    assert os.path.isfile(root / ".git")
