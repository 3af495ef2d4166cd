"""Memory quality against hand-read facts (memd.bench.quality).

The real-rollout test runs ``memd once`` offline over ../shared/rollouts and holds the minimums
of ``quality_fact_recall`` / maximums of ``quality_filler_ratio``; raise them as the offline
extractor improves (the figures are in the README and the closing note of issue 12).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from memd.bench import quality
from memd.bench.quality import Fact, MemoryView, SessionFacts
from tests.conftest import SHARED_ROLLOUTS

#: Raise these as the extractor improves (measured figures: see the README).
MIN_FACT_RECALL = 0.95  # before the SPEC §19 extractor: 0.926 (Codex only), 0.904 with the Claude sessions
# Measured with the 13 Claude Code sessions read too: 0.071 (MEMORY.md 7/90, traces 10/150; the rest
# are quoted corrections of the two long design discussions codemie-196820da / codemie-624a4a58).
MAX_FILLER_RATIO = 0.08  # before: 0.805 (Codex only); 0.683 with the Claude sessions

KINDS = {"request", "changed_file", "failure", "pivot", "verification", "preference", "knowledge", "outcome"}


def _view(**kwargs: object) -> MemoryView:
    base: dict[str, object] = {
        "traces": {},
        "trace_projects": {},
        "memory_md": {},
        "memory_roots": {},
        "threads": {},
        "thread_projects": {},
    }
    base.update(kwargs)
    return MemoryView(**base)  # type: ignore[arg-type]


def test_facts_file_is_well_formed() -> None:
    sessions = quality.load_facts()
    assert len(sessions) >= 29
    files = [s.file for s in sessions]
    assert len(files) == len(set(files)), "one entry per rollout file"
    for s in sessions:
        assert s.agent in ("codex", "claude"), s.file
        assert s.facts, f"{s.file}: no fact"
        if s.memory != "expected":
            assert s.why, f"{s.file}: memory = {s.memory} needs a reason"
        for fact in s.facts:
            assert fact.kind in KINDS, (s.file, fact.kind)
            assert fact.text and fact.alternatives and all(a.strip() for a in fact.alternatives), s.file


def test_every_shared_rollout_has_hand_read_facts() -> None:
    if not SHARED_ROLLOUTS.is_dir():
        pytest.skip(f"real transcripts not available: {SHARED_ROLLOUTS} is absent")
    on_disk = {p.relative_to(SHARED_ROLLOUTS).as_posix() for p in SHARED_ROLLOUTS.glob("*/*.jsonl")}
    listed = {s.file for s in quality.load_facts()}
    assert on_disk - listed == set(), "rollouts without hand-read facts"
    assert listed - on_disk == set(), "facts about files that do not exist"


def test_bad_facts_file_is_refused_with_its_name(tmp_path: Path) -> None:
    broken = tmp_path / "facts.toml"
    broken.write_text("[[session]\nfile = 1\n")
    with pytest.raises(ValueError, match="facts.toml: invalid TOML"):
        quality.load_facts(broken)
    broken.write_text('[[session]]\nfile = "codex/x.jsonl"\nagent = "codex"\nthread = "t"\nmemory = "maybe"\n')
    with pytest.raises(ValueError, match=r"codex/x.jsonl.*memory must be one of"):
        quality.load_facts(broken)
    broken.write_text('[[session]]\nfile = "codex/y.jsonl"\nagent = "codex"\nmemory = "none"\n')
    with pytest.raises(ValueError, match=r"codex/y.jsonl.*missing key 'thread'"):
        quality.load_facts(broken)


def test_normalise_and_bullets() -> None:
    assert quality.normalise("Run  `npm   test`\n**now**") == "run npm test now"
    assert quality.normalise("Don\u2019t") == "don't"
    text = "# T\n- one\n  * two\n1. three\n```\n- not a bullet\n```\nplain line\n+ four"
    assert quality.bullets(text) == ["one", "two", "three", "four"]


def test_filler_definition() -> None:
    facts = [Fact("preference", "no frameworks", ("external frameworks",))]
    text = "\n".join(
        [
            "- none observed",  # placeholder
            "- nothing beyond the steps above",  # placeholder
            "- No test run or user confirmation verified the change.",  # boilerplate
            "- `npm test` fails: `jest` not found; `npx jest` works",  # anchored
            "- Don't use external frameworks",  # a hand-read fact, no anchor
            "- `npm test` fails: `jest` not found; `npx jest` works",  # a repeat
            "- User asked: [REDACTED_MESSAGE len=32 sha=821fd802]",  # only a placeholder
            "- edit src/app/page.tsx [019a085e 2025-10-21]",  # a path
            "- set OPENCODE_CONFIG_CONTENT",  # an env var
            "- failed with exit 2",  # an exit code
            "- " + "pasted answer with `code` " * 20,  # over 400 characters
        ]
    )
    assert quality.filler_flags(text, facts) == [
        True,
        True,
        True,
        False,
        False,
        True,
        True,
        False,
        False,
        False,
        True,
    ]


def test_score_counts_recall_filler_and_checks() -> None:
    sessions = [
        SessionFacts(
            "codex/a.jsonl",
            "codex",
            "t-a",
            "expected",
            "",
            (
                Fact("request", "build it", ("build the timer",)),
                Fact("changed_file", "x.py", ("x.py",)),
                Fact("preference", "tabs", ("use tabs",)),
            ),
        ),
        SessionFacts("codex/b.jsonl", "codex", "t-b", "none", "trivial", (Fact("request", "ls", ("ls",)),)),
        SessionFacts("codex/c.jsonl", "codex", "t-c", "none", "exec", (Fact("request", "q", ("q",)),)),
        SessionFacts("codex/d.jsonl", "codex", "t-d", "expected", "", (Fact("request", "d", ("dd",)),)),
        SessionFacts("claude/e.jsonl", "claude", "t-e", "expected", "", (Fact("request", "e", ("ee",)),)),
    ]
    view = _view(
        traces={"t-a": "# Build the timer\n- changed `x.py`\n- none observed", "t-b": "# ls\n- none"},
        trace_projects={"t-a": "/p", "t-b": "/q"},
        memory_md={"/p": "## User preferences\n- Always use tabs [t-a 2025-01-01]\n- none yet"},
        memory_roots={"/p": Path("/m/p"), "/q": Path("/m/q"), "/r": Path("/m/r")},
        threads={"t-a": "codex", "t-b": "codex", "t-c": "codex", "t-d": "codex"},
        thread_projects={"t-a": "/p", "t-b": "/q", "t-c": "/r", "t-d": "/p"},
    )
    report = quality.score(sessions, view)
    status = {r.session.file: r.status for r in report.rows}
    assert status == {
        "codex/a.jsonl": "scored",
        "codex/b.jsonl": "unexpected trace",
        "codex/c.jsonl": "memory folder",
        "codex/d.jsonl": "no trace",
        "claude/e.jsonl": "not read",
    }
    assert report.unread_agents == ("claude",)
    # 3 of a's facts (the preference from MEMORY.md) + 0 of d's: 3 / 4; claude left out.
    assert report.fact_recall == pytest.approx(3 / 4)
    # trace a: 1 filler of 2 bullets; MEMORY.md: 1 filler ("none yet") of 2.
    assert report.filler_ratio == pytest.approx(2 / 4)
    table = quality.format_rows(report)
    assert "| a.jsonl | codex | expected | scored | 3/3 | 1/2 |" in table
    assert "d.jsonl: request: d" in quality.format_missed(report)


def test_bench_quality_without_rollouts_reports_none(tmp_path: Path) -> None:
    figures = quality.bench_quality(tmp_path / "absent", tmp_path)
    assert [f.key for f in figures] == list(quality.QUALITY_KEYS)
    assert all(f.value is None and "not available" in f.note for f in figures)


def test_memd_once_on_the_real_rollouts_meets_the_minimums(tmp_path: Path) -> None:
    if not SHARED_ROLLOUTS.is_dir():
        pytest.skip(f"real transcripts not available: {SHARED_ROLLOUTS} is absent")
    report = quality.measure(SHARED_ROLLOUTS, tmp_path)
    print("\n" + quality.format_rows(report))
    print(f"quality_fact_recall={report.fact_recall} quality_filler_ratio={report.filler_ratio}")
    assert report.fact_recall is not None and report.filler_ratio is not None
    assert report.fact_recall >= MIN_FACT_RECALL
    assert report.filler_ratio <= MAX_FILLER_RATIO
    assert "codex" not in report.unread_agents
    # Sessions that must leave nothing behind leave nothing: no trace, no empty memory folder.
    assert [r.session.file for r in report.rows if r.status in ("unexpected trace", "memory folder")] == []
