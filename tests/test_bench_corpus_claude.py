"""The synthetic Claude Code session generator (memd.bench.corpus_claude): layouts, determinism, and the
parser against the facts the generator knows by construction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memd.bench.corpus_claude import (
    CLAUDE_VARIANTS,
    append_claude_turn,
    claude_relpath,
    generate_claude_corpus,
    generate_claude_session,
)
from memd.rollout.claude import HEAD_LINES, parse_claude_bytes, session_meta, total_usage
from memd.rollout.records import Compaction, UserMessage
from memd.rollout.session import ThreadStats, commands, patched_files


@pytest.mark.parametrize("variant", CLAUDE_VARIANTS)
def test_a_session_parses_to_its_facts(tmp_path: Path, variant: str) -> None:
    facts = generate_claude_session(tmp_path, target_bytes=300_000, variant=variant, seed=5, subagents=2)
    assert facts.path == tmp_path / claude_relpath(facts.cwd, facts.session_id)
    data = facts.path.read_bytes()
    assert len(data) == facts.size_bytes and data.count(b"\n") == facts.lines
    assert all(isinstance(json.loads(line), dict) for line in data.splitlines())
    parsed = parse_claude_bytes(data)
    assert (parsed.skipped_lines, parsed.unknown_lines) == (0, 0)
    assert tuple(i.text for i in parsed.items if isinstance(i, UserMessage) and not i.injected) == facts.user_messages
    assert [(r.command, r.exit_code) for r in commands(parsed.items)] == [
        (c.command, c.exit_code) for c in facts.commands
    ]
    assert tuple(patched_files(parsed.items)) == facts.patched_files
    assert sum(isinstance(i, Compaction) for i in parsed.items) == facts.compactions == 1
    assert total_usage(parsed.items).output_tokens == facts.output_tokens
    meta = session_meta(data.splitlines()[:HEAD_LINES])
    assert meta is not None
    assert (meta.thread_id, meta.cwd, meta.cli_version, meta.entrypoint) == (
        facts.session_id,
        facts.cwd,
        facts.version,
        facts.entrypoint,
    )
    stats = ThreadStats()
    stats.feed(parsed)
    assert stats.user_messages == len(facts.user_messages) and stats.title.startswith("Fix the ")


def test_layouts_of_sub_agents(tmp_path: Path) -> None:
    old = generate_claude_session(tmp_path / "a", target_bytes=300_000, variant="2.0", seed=1, subagents=2)
    new = generate_claude_session(tmp_path / "b", target_bytes=300_000, variant="2.1", seed=1, subagents=2)
    assert [p.parent for p in old.subagent_paths] == [old.path.parent] * 2
    assert all(p.name.startswith("agent-") for p in old.subagent_paths)
    assert [p.parent for p in new.subagent_paths] == [new.path.parent / new.session_id / "subagents"] * 3
    assert new.subagent_paths[-1].name.startswith("agent-acompact-")
    for path in (*old.subagent_paths, *new.subagent_paths):
        meta = session_meta(path.read_bytes().splitlines()[:HEAD_LINES])
        assert meta is not None and meta.subagent_id is not None
        assert meta.thread_id in (old.session_id, new.session_id)
        assert not [i for i in parse_claude_bytes(path.read_bytes()).items]  # sidechain only


def test_sessions_are_deterministic_and_corpora_mix_layouts(tmp_path: Path) -> None:
    one = generate_claude_session(tmp_path / "1", target_bytes=50_000, seed=9)
    two = generate_claude_session(tmp_path / "2", target_bytes=50_000, seed=9)
    assert one.path.read_bytes() == two.path.read_bytes()
    corpus = generate_claude_corpus(tmp_path / "c", n_sessions=10, seed=2, size_mix=((5_000, 60_000, 1.0),))
    assert {f.variant for f in corpus} == set(CLAUDE_VARIANTS)
    assert [f.entrypoint for f in corpus].count("sdk-cli") == 1
    with pytest.raises(ValueError):
        generate_claude_session(tmp_path, target_bytes=1_000, variant="1.0")


def test_append_writes_complete_lines_that_parse(tmp_path: Path) -> None:
    facts = generate_claude_session(tmp_path, target_bytes=20_000, seed=4, subagents=0)
    before = facts.path.stat().st_size
    appended = append_claude_turn(facts, seed=1, target_bytes=3_000)
    data = facts.path.read_bytes()
    assert len(data) == before + appended.bytes_appended and data.endswith(b"\n")
    tail = parse_claude_bytes(data[before:])
    assert [i.text for i in tail.items if isinstance(i, UserMessage)] == [appended.user_message]
    assert [(r.command, r.exit_code) for r in commands(tail.items)] == [(appended.command.command, 0)]
