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
    forget_thread,
    render_skill,
)
from memd.consolidate.harvest import read_trace
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


NEW_TRACE = "trace_summaries/t-new_fixed_the_flaky_ci_test_by_pinning_pytest_asyncio.md"
OLD_TRACE = "trace_summaries/t-old_set_up_the_development_environment.md"

EXPECTED = f"""# Project memory: {PROJECT}

Kept by memd, merged incrementally: newer guidance wins; `[019a085e 2025-10-21]` names the newest
session that said it. Guidance, not truth: the repository and the user win.

## Start here
- Tests run with `.venv/bin/pytest -q` [t-new 2026-01-02; 2 sessions]
- CI config lives in `.github/workflows/ci.yml` [t-new 2026-01-02]

## User preferences
- Always run tests with `pytest -x` (asked to stop at the first failure) [t-new 2026-01-02]
- Never commit; the developer commits [t-new 2026-01-02]

## Pitfalls and pivots
- `pip install -U pytest-asyncio` broke the fixtures (the new version needs `loop_scope`) [t-new 2026-01-02]

## Verification
none yet (how changes were checked)

## Open follow-ups
- Create the virtualenv — left partial [t-old 2026-01-01]

## Recent tasks
- Update the README — uncertain [t-new 2026-01-02]
- Fix flaky test — success [t-new 2026-01-02]
- Create the virtualenv — partial [t-old 2026-01-01]
"""


def _memory(root: Path) -> str:
    """MEMORY.md without its merged-traces comment."""
    text = (root / "MEMORY.md").read_text()
    return text.split("\n<!-- memd merged:")[0]


def _section(root: Path, name: str) -> list[str]:
    return _memory(root).split(f"## {name}\n")[1].split("\n\n")[0].splitlines()


def _session(
    n: int, *, prefs: str = "", knowledge: str = "", problems: str = "", task: str = "", outcome: str = "success"
) -> str:
    day = f"2026-01-{n + 1:02d}"
    body = f"# session {n}\nTrace context: {PROJECT}, {day}, codex, gpt-5\n"
    body += f"User preferences:\n{prefs}" if prefs else "User preferences: none observed\n"
    body += f"## Task: {task or f'task {n}'}\nOutcome: {outcome}\n"
    if problems:
        body += f"Things that did not work / things that can be improved:\n{problems}"
    if knowledge:
        body += f"Reusable knowledge:\n{knowledge}"
    return body


# --------------------------------------------------------------------------- offline merge


def test_offline_merge_is_deterministic(root: Path, tmp_path: Path) -> None:
    result = consolidate_root(root, git=False)
    assert result.traces == 2 and result.memory_changed and not result.skills_changed
    text = (root / "MEMORY.md").read_text()
    assert _memory(root) == EXPECTED
    assert text.rstrip().endswith("-->") and "memd merged: t-new:" in text and " t-old:" in text
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
    assert "Create the virtualenv" not in text


def test_dedupe_keeps_newest_wording_and_counts_sessions(tmp_path: Path) -> None:
    root = memory_files.ensure_project_root(tmp_path, PROJECT)
    for i, wording in enumerate(["use `make test`.", "Use make test", "**Use** `make test`!"]):
        _write_trace(root, f"t{i}", T0 + i, _session(i, knowledge=f"- {wording}\n- fact {i}\n"))
    consolidate_root(root, git=False)
    lines = _section(root, "Start here")
    assert lines[0] == "- **Use** `make test`! [t2 2026-01-03; 3 sessions]"
    assert lines[1:] == ["- fact 2 [t2 2026-01-03]", "- fact 1 [t1 2026-01-02]", "- fact 0 [t0 2026-01-01]"]
    bullets = [line for line in _memory(root).splitlines() if line.startswith("- ")]
    assert len(bullets) == len({b.split(" [")[0].lower() for b in bullets}), "no repeated bullet"


def test_conflicting_preferences_newer_wins(tmp_path: Path) -> None:
    root = memory_files.ensure_project_root(tmp_path, PROJECT)
    _write_trace(root, "old", T0, _session(0, prefs="- Never use tabs\n"))
    _write_trace(root, "new", T0 + DAY, _session(1, prefs="- Always use tabs\n"))
    consolidate_root(root, git=False)
    assert _section(root, "User preferences") == [
        '- Always use tabs _(supersedes "Never use tabs" [old 2026-01-01])_ [new 2026-01-02]'
    ]


def test_conflicting_preferences_older_with_stronger_evidence_kept(tmp_path: Path) -> None:
    root = memory_files.ensure_project_root(tmp_path, PROJECT)
    _write_trace(root, "old1", T0, _session(0, prefs="- Don't run `git push`\n"))
    _write_trace(root, "old2", T0 + 1, _session(1, prefs="- Never run git push.\n"))
    _write_trace(root, "new", T0 + DAY, _session(2, prefs="- Always run `git push`\n"))
    consolidate_root(root, git=False)
    lines = _section(root, "User preferences")
    assert len(lines) == 2
    assert lines[0].startswith("- Never run git push. _(older, stated in 2 sessions; contradicted by")
    assert "confirm with the user)_ [old2 2026-01-02; 2 sessions]" in lines[0]
    assert lines[1].startswith("- Always run `git push` _(newer; contradicts an older, better-supported")


def test_read_trace_is_lenient() -> None:
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
    facts = read_trace(body)
    assert facts.title == "Title line"
    assert facts.preferences == ["prefers `uv` over pip (said so)"]
    assert len(facts.tasks) == 1 and facts.tasks[0].name == "Title line"
    assert facts.tasks[0].knowledge == ["build with `make`"]
    assert facts.tasks[0].outcome == "uncertain"


def test_empty_root_gets_no_memory_and_raw_traces_still_count(tmp_path: Path) -> None:
    root = memory_files.ensure_project_root(tmp_path, PROJECT)
    result = consolidate_root(root, git=False)
    assert not result.memory_changed and not (root / "MEMORY.md").exists()
    _write_trace(root, "t", T0, "just some raw text without the skeleton")
    consolidate_root(root, git=False)
    assert "- just some raw text without the skeleton — uncertain [t 2026-01-02]" in _memory(root)


def test_root_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConsolidationError):
        consolidate_root(tmp_path / "missing")


# --------------------------------------------------------------------------- incremental


def test_knowledge_outlives_pruned_traces_and_is_counted_once(tmp_path: Path) -> None:
    root = memory_files.ensure_project_root(tmp_path, PROJECT)
    first = _write_trace(root, "s0", T0, _session(0, prefs="- Always run the linters before committing\n",
                                                   knowledge="- Build with `make build`\n"))  # fmt: skip
    consolidate_root(root, git=False)
    consolidate_root(root, git=False)  # nothing new: merged once, not counted again
    assert _section(root, "Start here") == ["- Build with `make build` [s0 2026-01-01]"]
    (root / first).unlink()  # the runner pruned the oldest trace
    for n in range(1, 12):
        _write_trace(root, f"s{n}", T0 + n * DAY, _session(n, knowledge="- Build with `make build`\n"))
        consolidate_root(root, git=False)
    assert _section(root, "User preferences") == ["- Always run the linters before committing [s0 2026-01-01]"]
    assert _section(root, "Start here") == ["- Build with `make build` [s11 2026-01-12; 12 sessions]"]
    tasks = _section(root, "Recent tasks")
    assert tasks[0] == "- task 11 — success [s11 2026-01-12]" and tasks[-1] == "- task 0 — success [s0 2026-01-01]"


def test_a_success_closes_the_follow_up_and_tasks_are_deduplicated(tmp_path: Path) -> None:
    root = memory_files.ensure_project_root(tmp_path, PROJECT)
    problem = "- `make deploy` failed (exit 2): `missing credentials` — not resolved\n"
    _write_trace(root, "a", T0, _session(0, task="Deploy to staging", outcome="partial", problems=problem))
    consolidate_root(root, git=False)
    assert _section(root, "Open follow-ups") == [
        "- Deploy to staging — left partial: `make deploy` failed (exit 2): `missing credentials` [a 2026-01-01]"
    ]
    _write_trace(root, "b", T0 + DAY, _session(1, task="Deploy to staging"))
    consolidate_root(root, git=False)
    assert _section(root, "Open follow-ups")[0].startswith("none yet")
    assert _section(root, "Recent tasks") == ["- Deploy to staging — success [b 2026-01-02; 2 sessions]"]


def test_a_previous_handbook_of_the_older_format_is_read(tmp_path: Path) -> None:
    root = memory_files.ensure_project_root(tmp_path, PROJECT)
    live = _write_trace(root, "t", T0, _session(0, knowledge="- `make test` runs the suite\n"))
    (root / "MEMORY.md").write_text(
        f"# Project memory: {PROJECT}\n\nMerged offline by memd from 2 trace memories.\n\n"
        "## User preferences\n- Prefer pnpm over npm (trace: trace_summaries/gone.md)\n\n"
        f"## Reusable knowledge\n- `make test` runs the suite (trace: {live})\n"
        "- Secrets live in `.env.local` (seen in 2 sessions; trace: trace_summaries/gone.md)\n\n"
        "## Failures to avoid\nnone yet\n\n## Recent tasks\n- 2026-11-29 Old task — success (trace: trace_summaries/gone.md)\n"
    )
    consolidate_root(root, git=False)
    assert _section(root, "User preferences") == ["- Prefer pnpm over npm [undated]"]
    assert _section(root, "Start here") == [
        "- Secrets live in `.env.local` [undated; 2 sessions]",  # its trace is gone: kept
        "- `make test` runs the suite [t 2026-01-01]",  # its trace is live: merged again, once
    ]
    assert "- Old task — success [2026-11-29]" in _section(root, "Recent tasks")


def test_memory_md_stays_under_24_kb(tmp_path: Path) -> None:
    root = memory_files.ensure_project_root(tmp_path, PROJECT)
    for n in range(40):
        knowledge = "".join(f"- fact {n}.{k}: `{'x' * 200}`\n" for k in range(10))
        problems = "".join(f"- `cmd{n}.{k}` failed (exit 1): `{'y' * 200}`\n" for k in range(5))
        _write_trace(root, f"s{n:02d}", T0 + n, _session(n % 28, knowledge=knowledge, problems=problems))
    consolidate_root(root, git=False)
    text = (root / "MEMORY.md").read_text()
    assert len(text.encode()) < 24_000
    assert len(_section(root, "Recent tasks")) <= 30


def test_forget_takes_a_session_out_of_the_handbook(tmp_path: Path) -> None:
    root = memory_files.ensure_project_root(tmp_path, PROJECT)
    _write_trace(root, "keep", T0, _session(0, knowledge="- shared fact\n- kept fact\n"))
    _write_trace(root, "gone", T0 + DAY, _session(1, knowledge="- shared fact\n- secret fact\n"))
    consolidate_root(root, git=False)
    assert forget_thread(root, "gone")
    text = _memory(root)
    assert "secret fact" not in text and "task 1" not in text
    assert "- shared fact [gone 2026-01-02]" in text  # stated by another session too: one session less
    assert "gone:" not in (root / "MEMORY.md").read_text()
    assert not forget_thread(root, "never-seen")


# --------------------------------------------------------------------------- offline skills


VERIFY = "- Verify with `npm test -- --run`: passed (`16 passed`)\n"
STEPS = "Key steps:\n- Ran: `npm run build`\n"


def test_a_procedure_repeated_in_two_sessions_becomes_a_skill(tmp_path: Path) -> None:
    root = memory_files.ensure_project_root(tmp_path, PROJECT)
    pivot = "- `git push` failed (exit 128): `fatal: no upstream branch`; `git push --set-upstream origin main` works\n"
    for n in range(2):
        body = _session(n, knowledge=VERIFY, problems=pivot).replace("Outcome: success\n", "Outcome: success\n" + STEPS)
        _write_trace(root, f"s{n}", T0 + n * DAY, body)
    (root / "skills" / "deploy").mkdir(parents=True)
    (root / "skills" / "deploy" / "SKILL.md").write_text(render_skill(Skill("deploy", "Deploy.", "1. `make deploy`")))
    result = consolidate_root(root, git=False)
    assert result.skills_changed
    names = sorted(p.name for p in (root / "skills").iterdir())
    assert names == ["deploy", "fix_git_push", "verify_npm_test_npm_run"]
    verify = (root / "skills" / "verify_npm_test_npm_run" / "SKILL.md").read_text()
    assert verify.startswith('---\nname: "verify_npm_test_npm_run"\ndescription: "Verify a change')
    assert "1. Run `npm test -- --run`.\n2. Run `npm run build`." in verify
    assert "Sessions it came from: [s1 2026-01-02], [s0 2026-01-01]." in verify
    fix = (root / "skills" / "fix_git_push" / "SKILL.md").read_text()
    assert "`git push --set-upstream origin main` works" in fix
    assert not consolidate_root(root, git=False).skills_changed  # regenerated identically
    # one session alone makes no skill
    single = memory_files.ensure_project_root(tmp_path / "single", PROJECT)
    _write_trace(
        single, "s0", T0, _session(0, knowledge=VERIFY).replace("Outcome: success\n", "Outcome: success\n" + STEPS)
    )
    assert not consolidate_root(single, git=False).skills_changed and not (single / "skills").exists()


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
        '---\nname: "run-tests"\ndescription: "Use when running the tests."\n---\n\n1. `make test`\n'
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


def test_staging_failure_leaves_previous_outputs(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
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
    consolidate_root(root, writer=lambda d: Consolidated("# old\n", (Skill("a", "d", "a"),)), git=False)

    def fail(staged: Path, final: Path) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(builtin, "_replace_memory", fail)
    with pytest.raises(MemoryWriteError):
        consolidate_root(root, writer=lambda d: Consolidated("# new\n", (Skill("b", "d", "b"),)),
                         git=False)  # fmt: skip
    assert _memory(root) == "# old\n"
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
    assert _memory(root) == EXPECTED


# --------------------------------------------------------------------------- git history


def _git_log(root: Path) -> list[str]:
    out = subprocess.run(["git", "log", "--format=%an|%s"], cwd=root, capture_output=True, text=True, check=True)
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


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_history_is_private_and_holds_only_memds_files(root: Path) -> None:
    # The user (or a tool) left files in the memory root: they are never committed (SPEC §14).
    (root / ".env").write_text("API_TOKEN=zz\n")
    (root / "notes.txt").write_text("mine\n")
    (root / "trace_summaries" / "draft.md.tmp-memd-0011").write_text("half written\n")
    consolidate_root(root)
    tracked = subprocess.run(
        ["git", "-C", str(root), "ls-files"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert set(tracked) == {"PROJECT", "MEMORY.md", NEW_TRACE, OLD_TRACE}
    git_dir = root / ".git"
    modes = {
        path: stat.S_IMODE(path.lstat().st_mode) for path in [git_dir, *git_dir.rglob("*")] if not path.is_symlink()
    }
    loose = [p for p in modes if "objects" in p.parts and p.is_file()]
    assert loose, "a commit stores objects"
    assert {modes[p] for p in modes if p.is_dir()} == {0o700}
    assert {modes[p] for p in modes if p.is_file()} == {0o600}


def test_consolidate_refuses_a_folder_memd_did_not_make(tmp_path: Path) -> None:
    repo = tmp_path / "my-repo"
    repo.mkdir()
    (repo / ".env").write_text("SECRET=1\n")
    with pytest.raises(ConsolidationError, match="no PROJECT marker written by memd"):
        consolidate_root(repo)
    assert sorted(p.name for p in repo.iterdir()) == [".env"]  # no git init, no MEMORY.md
    # A PROJECT file must be memd's: one line, the project key.
    (repo / "PROJECT").write_text("# my project\nnotes\n")
    with pytest.raises(ConsolidationError, match="not the one-line project key memd writes"):
        consolidate_root(repo)
    assert not (repo / ".git").exists() and not (repo / "MEMORY.md").exists()


def test_a_crash_inside_the_skills_swap_loses_no_skill(root: Path) -> None:
    """Killed between the two renames of the swap: the old ``skills/`` sits in the staging directory
    and there is no ``skills/``. The next consolidation puts it back before removing the leftovers."""
    old_skill = render_skill(Skill("deploy", "how to deploy", "1. `make deploy`"))
    stale = root / ".staging-0123456789abcdef"
    (stale / "skills.old" / "deploy").mkdir(parents=True)
    (stale / "skills.old" / "deploy" / "SKILL.md").write_text(old_skill)
    (stale / "skills" / "half").mkdir(parents=True)
    (stale / "MEMORY.md").write_text("half-written")
    assert not (root / "skills").exists()

    consolidate_root(root, git=False)

    assert not stale.exists()
    assert (root / "skills" / "deploy" / "SKILL.md").read_text() == old_skill
    assert not (root / "skills" / "half").exists()


def test_stale_staging_never_replaces_existing_skills(root: Path) -> None:
    (root / "skills" / "current").mkdir(parents=True)
    (root / "skills" / "current" / "SKILL.md").write_text("current")
    stale = root / ".staging-fedcba9876543210"
    (stale / "skills.old" / "older").mkdir(parents=True)
    memory_files.remove_stale_staging(root)
    assert not stale.exists() and sorted(p.name for p in (root / "skills").iterdir()) == ["current"]
