"""Usage-based retention (SPEC §18): unused entries age out on the project's own timeline."""

from __future__ import annotations

from pathlib import Path

from memd.consolidate.builtin import consolidate_root, offline_writer
from memd.consolidate.retention import RetentionPolicy, prune_unused, retaining
from memd.memory.files import TraceHeader, render_trace_file
from memd.store.search import Usage, entry_key

DAY = 86_400.0
NEWEST = 1_800_000_000.0  # 2027-01-15: the project's newest session

MEMORY = """# Project memory: /p

## Start here
- Build with `make` (trace: trace_summaries/old00000-0000-7000-8000-000000000001_a.md)

## User preferences
- Never push to main directly. [old00000 2025-01-01]

## Failures to avoid
- `npm test` fails: jest is not installed; `npx jest` works. [old00000 2025-01-01]
- The staging deploy needs VPN. [old00000 2025-01-01]
- `make lint` needs ruff 0.5. [new00000 2027-01-10]

## Reusable knowledge
- The API lives in `api/server.py`. [old00000 2025-01-01]
- Undated fact with no provenance at all.
"""


def policy(**uses: float) -> RetentionPolicy:
    usage = {("MEMORY.md", entry_key(text)): Usage(1, at) for text, at in uses.items()}
    return RetentionPolicy(usage=usage, max_unused_days=90)


def test_unused_old_entries_fall_out_and_used_or_protected_ones_stay() -> None:
    used = "- `npm test` fails: jest is not installed; `npx jest` works. [old00000 2025-01-01]"
    text, dropped = prune_unused(
        MEMORY, policy=policy(**{used: NEWEST - 10 * DAY}), session_dates={}, newest_session_s=NEWEST
    )
    assert dropped == 2
    assert "staging deploy needs VPN" not in text  # 2 years old, never used
    assert "The API lives in" not in text
    assert "npx jest" in text  # used ten days before the newest session
    assert "make lint" in text  # recent
    assert "Never push to main" in text and "Build with `make`" in text  # protected sections
    assert "Undated fact" in text  # no date: kept


def test_the_wall_clock_does_not_count_a_quiet_project_keeps_its_memory() -> None:
    # The newest session is itself old: nothing is older than 90 days *before it*.
    text, dropped = prune_unused(MEMORY, policy=policy(), session_dates={}, newest_session_s=1_735_700_000.0)
    assert (text, dropped) == (MEMORY, 0)


def test_a_section_is_never_emptied_by_age() -> None:
    memory = "## Reusable knowledge\n- a [x 2024-01-01]\n- b [x 2024-02-01]\n"
    text, dropped = prune_unused(memory, policy=policy(), session_dates={}, newest_session_s=NEWEST)
    assert (text, dropped) == ("## Reusable knowledge\n- b [x 2024-02-01]\n", 1)


def test_trace_links_take_the_date_of_their_session(tmp_path: Path) -> None:
    memory = (
        "## Failures to avoid\n"
        "- old failure (trace: trace_summaries/t-old_x.md)\n"
        "- new failure (trace: trace_summaries/t-new_x.md)\n"
    )
    dates = {"t-old": NEWEST - 400 * DAY, "t-new": NEWEST}
    text, dropped = prune_unused(memory, policy=policy(), session_dates=dates, newest_session_s=NEWEST)
    assert dropped == 1 and "old failure" not in text and "new failure" in text


def test_consolidation_with_the_policy(tmp_path: Path) -> None:
    root = tmp_path / "memory"
    (root / "trace_summaries").mkdir(parents=True)
    (root / "PROJECT").write_text("/p\n")
    for tid, at, fact in (("t-old", NEWEST - 400 * DAY, "staging needs the VPN"), ("t-new", NEWEST, "lint needs ruff")):
        header = TraceHeader(thread_id=tid, project="/p", cwd="/p", rollout_path="/r", updated_at=at)
        body = (
            # A pitfall: Start here (and User preferences) never age out, other sections do.
            f"# work\nUser preferences: none observed\n## Task: work\nOutcome: success\n"
            f"Things that did not work / things that can be improved:\n- {fact}\n"
        )
        (root / "trace_summaries" / f"{tid}_work.md").write_text(render_trace_file(header, body))
    consolidate_root(root, writer=retaining(offline_writer, policy()), git=False)
    text = (root / "MEMORY.md").read_text()
    assert "lint needs ruff" in text and "staging needs the VPN" not in text
    consolidate_root(root, writer=offline_writer, git=False)
    assert "staging needs the VPN" not in (root / "MEMORY.md").read_text()  # MEMORY.md is incremental: it stays out
    (root / "MEMORY.md").unlink()
    consolidate_root(root, writer=offline_writer, git=False)
    assert "staging needs the VPN" in (root / "MEMORY.md").read_text()  # without the policy it stays


def test_sessions_are_dated_by_their_start_not_by_the_trace_files_time(tmp_path: Path) -> None:
    """Copied or re-extracted rollouts have a recent last activity; the session date decides."""
    root = tmp_path / "memory"
    (root / "trace_summaries").mkdir(parents=True)
    (root / "PROJECT").write_text("/p\n")
    copied_at = NEWEST + 100 * DAY  # both rollouts were copied (or grew) long after the sessions
    sessions = (
        ("0199aaaa-0000-7000-8000-000000000001", NEWEST - 400 * DAY, "staging needs the VPN"),
        ("019a0000-0000-7000-8000-000000000002", NEWEST, "lint needs ruff"),
    )
    for tid, started, fact in sessions:
        header = TraceHeader(
            thread_id=tid, project="/p", cwd="/p", rollout_path="/r", updated_at=copied_at, started_at=started
        )
        body = (
            f"# work\nUser preferences: none observed\n## Task: work\nOutcome: success\n"
            f"Things that did not work / things that can be improved:\n- {fact}\n"
        )
        (root / "trace_summaries" / f"{tid}_work.md").write_text(render_trace_file(header, body))
    consolidate_root(root, writer=retaining(offline_writer, policy()), git=False)
    text = (root / "MEMORY.md").read_text()
    assert "lint needs ruff" in text and "staging needs the VPN" not in text
