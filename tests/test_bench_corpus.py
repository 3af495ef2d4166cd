"""The synthetic rollout generator (memd.bench.corpus): shape, sizes, determinism, facts."""

from __future__ import annotations

import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from memd.bench.corpus import (
    PROFILES,
    SMALL_SIZE_MIX,
    VARIANTS,
    RolloutFacts,
    append_turn,
    generate_corpus,
    generate_rollout,
    rollout_relpath,
)

_NAME = re.compile(
    r"^(\d{4})/(\d{2})/(\d{2})/rollout-(\d{4})-(\d{2})-(\d{2})T\d{2}-\d{2}-\d{2}-"
    r"([0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12})\.jsonl$"
)


def _lines(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert data.endswith(b"\n")
    return [json.loads(line) for line in data.split(b"\n")[:-1]]


def _kinds(objs: list[dict]) -> Counter[str]:
    out: Counter[str] = Counter()
    for o in objs:
        p = o.get("payload")
        if isinstance(p, dict) and "type" in p:
            out[f"{o['type']}/{p['type']}"] += 1
        else:
            out[str(o.get("type", o.get("record_type")))] += 1
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_line_is_json_and_the_first_identifies_the_thread(
    tmp_path: Path, variant: str
) -> None:
    facts = generate_rollout(tmp_path / "r.jsonl", target_bytes=300_000, variant=variant, seed=7)
    objs = _lines(facts.path)
    assert len(objs) == facts.lines
    head = objs[0]
    if variant == "legacy":
        assert "type" not in head and head["id"] == facts.thread_id
        assert {"record_type": "state"} in objs
        assert all("timestamp" not in o for o in objs[1:])
    else:
        assert head["type"] == "session_meta"
        assert head["payload"]["id"] == facts.thread_id
        assert head["payload"]["cli_version"] == facts.cli_version
        assert all(set(o) >= {"timestamp", "type", "payload"} for o in objs)


def test_variant_traits(tmp_path: Path) -> None:
    """Each variant carries the traits the real files of its era show (SOURCES.md table)."""
    objs = {
        v: _lines(
            generate_rollout(tmp_path / f"{v}.jsonl", target_bytes=400_000, variant=v, seed=3).path
        )
        for v in VARIANTS
    }
    k = {v: _kinds(o) for v, o in objs.items()}

    meta47 = objs["0.47"][0]["payload"]
    assert meta47["instructions"] is None and "git" not in meta47 and "model_provider" not in meta47
    assert any(
        o["payload"].get("kind") == "plain" for o in objs["0.47"] if o["type"] == "event_msg"
    )

    assert k["0.77"]["turn_context"] > k["0.77"]["event_msg/user_message"]  # before every request
    assert k["0.77"]["response_item/ghost_snapshot"] == 1
    outputs77 = [
        o["payload"]["output"]
        for o in objs["0.77"]
        if o["payload"].get("type") == "function_call_output"
    ]
    assert any(
        json.loads(out)["metadata"]["exit_code"] is not None
        for out in outputs77
        if out.startswith("{")
    )

    for v in ("0.104", "0.125", "0.146"):
        meta = objs[v][0]["payload"]
        assert "text" in meta["base_instructions"]
        assert k[v]["event_msg/task_started"] == k[v]["event_msg/task_complete"] >= 1
        assert k[v]["event_msg/exec_command_end"] >= 1
        assert k[v]["compacted"] >= 1 and k[v]["event_msg/context_compacted"] == k[v]["compacted"]
        outs = [
            o["payload"]["output"]
            for o in objs[v]
            if o["payload"].get("type") == "function_call_output"
        ]
        assert any(
            o.startswith("Chunk ID: ") and "\nProcess exited with code " in o and "\nOutput:\n" in o
            for o in outs
        )
        developer = [o for o in objs[v] if o["payload"].get("role") == "developer"]
        assert developer[0]["payload"]["content"][0]["text"].startswith(
            "<permissions instructions>"
        )
        compacted = next(o for o in objs[v] if o["type"] == "compacted")
        assert compacted["payload"]["replacement_history"]

    meta146 = objs["0.146"][0]["payload"]
    assert meta146["session_id"] == meta146["id"]
    assert meta146["thread_source"] == "user" and meta146["memory_mode"] == "enabled"
    assert [o["ordinal"] for o in objs["0.146"]] == list(range(len(objs["0.146"])))
    assert k["0.146"]["world_state"] >= 1


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "legacy"])
def test_common_content(tmp_path: Path, variant: str) -> None:
    facts = generate_rollout(tmp_path / "r.jsonl", target_bytes=300_000, variant=variant, seed=11)
    objs = _lines(facts.path)
    kinds = _kinds(objs)
    assert kinds["event_msg/token_count"] >= facts.turns
    reasoning = [o["payload"] for o in objs if o["payload"].get("type") == "reasoning"]
    assert reasoning and all(r["encrypted_content"].startswith("gAAAAAB") for r in reasoning)
    patches = [
        o["payload"]["input"] for o in objs if o["payload"].get("type") == "custom_tool_call"
    ]
    assert patches and all(
        p.startswith("*** Begin Patch\n*** ") and p.endswith("*** End Patch") for p in patches
    )
    user_texts = [
        c["text"]
        for o in objs
        if o["payload"].get("type") == "message" and o["payload"].get("role") == "user"
        for c in o["payload"]["content"]
    ]
    assert any(t.startswith("<environment_context>") for t in user_texts)
    # Both copies of every real user message: the response item and the event.
    events = [o["payload"]["message"] for o in objs if o["payload"].get("type") == "user_message"]
    assert events == list(facts.user_messages)
    assert all(t in user_texts for t in events)


def test_sizes_near_target(tmp_path: Path) -> None:
    for n, target in enumerate((5_000, 20_000, 150_000, 3_000_000)):
        for variant in ("legacy", "0.77", "0.125"):
            facts = generate_rollout(
                tmp_path / f"{n}-{variant}.jsonl", target_bytes=target, variant=variant, seed=n
            )
            assert facts.size_bytes == facts.path.stat().st_size
            # Never smaller than one turn; otherwise within 10 % or 5 KB of the target.
            assert abs(facts.size_bytes - target) <= max(0.1 * target, 5_000), (
                variant,
                target,
                facts.size_bytes,
            )


def test_deterministic_with_a_seed(tmp_path: Path) -> None:
    a = generate_corpus(tmp_path / "a", n_files=12, seed=5, size_mix=SMALL_SIZE_MIX)
    b = generate_corpus(tmp_path / "b", n_files=12, seed=5, size_mix=SMALL_SIZE_MIX)
    c = generate_corpus(tmp_path / "c", n_files=12, seed=6, size_mix=SMALL_SIZE_MIX)
    rel = lambda m: [p.relative_to(m.root) for p in m.paths]  # noqa: E731
    assert rel(a) == rel(b)
    assert all(pa.read_bytes() == pb.read_bytes() for pa, pb in zip(a.paths, b.paths, strict=True))
    assert rel(a) != rel(c)


def test_corpus_layout_and_mix(tmp_path: Path) -> None:
    manifest = generate_corpus(tmp_path / "sessions", n_files=30, seed=1, size_mix=SMALL_SIZE_MIX)
    assert len(manifest.files) == 30
    assert manifest.total_bytes == sum(p.stat().st_size for p in manifest.paths)
    assert sorted(p for p in manifest.root.rglob("*") if p.is_file()) == sorted(manifest.paths)
    for facts in manifest.files:
        m = _NAME.match(facts.path.relative_to(manifest.root).as_posix())
        assert m, facts.path
        assert m.group(7) == facts.thread_id
        assert m.groups()[:3] == m.groups()[3:6]  # folder date = file name date
        assert facts.path.relative_to(manifest.root) == rollout_relpath(
            facts.thread_id, facts.started_at
        )
        assert 4_000 <= facts.size_bytes <= 26_000
    assert {f.variant for f in manifest.files} == set(VARIANTS)
    sources = Counter((f.source_kind, f.source_detail) for f in manifest.files)
    assert {
        ("cli", None),
        ("vscode", None),
        ("exec", None),
        ("subagent", "review"),
        ("unknown", None),
    } <= set(sources)
    assert sources[("cli", None)] + sources[("vscode", None)] > len(manifest.files) / 2
    assert len({f.cwd for f in manifest.files}) >= 3
    assert len(manifest.by_thread()) == 30
    assert len(PROFILES) <= 30


def test_facts_include_failures_and_compactions(tmp_path: Path) -> None:
    facts = generate_rollout(
        tmp_path / "big.jsonl", target_bytes=4_000_000, variant="0.104", seed=2
    )
    assert facts.turns >= 10 and facts.compactions >= 1
    assert any(c.exit_code != 0 for c in facts.commands)
    assert any(c.exit_code == 0 for c in facts.commands)
    assert facts.patched_files
    assert facts.updated_at > facts.started_at


def _has_parser() -> bool:
    return importlib.util.find_spec("memd.rollout.session") is not None


def _parser():
    return pytest.importorskip("memd.rollout.session", reason="rollout parser not written yet")


def _check_against_parser(facts: RolloutFacts) -> None:
    session = _parser()
    from memd.rollout.records import Compaction

    parsed = session.parse_rollout_bytes(facts.path.read_bytes(), path=str(facts.path))
    assert parsed.meta is not None and parsed.meta.thread_id == facts.thread_id
    assert parsed.meta.source_kind == facts.source_kind
    assert parsed.meta.source_detail == facts.source_detail
    assert parsed.meta.cwd == facts.cwd
    assert parsed.meta.legacy == (facts.variant == "legacy")
    assert parsed.meta.thread_source == facts.thread_source
    assert parsed.meta.memory_mode == facts.memory_mode
    assert parsed.lines == facts.lines and parsed.skipped_lines == 0
    assert [m.text for m in session.real_user_messages(parsed.items)] == list(facts.user_messages)
    assert [(c.command, c.exit_code) for c in session.commands(parsed.items)] == [
        (c.command, c.exit_code) for c in facts.commands
    ]
    assert session.patched_files(parsed.items) == list(facts.patched_files)
    assert sum(isinstance(i, Compaction) for i in parsed.items) == facts.compactions


def test_parser_recovers_the_facts(tmp_path: Path) -> None:
    _parser()
    manifest = generate_corpus(
        tmp_path / "s", n_files=14, seed=9, size_mix=((5_000, 400_000, 1.0),)
    )
    for facts in manifest.files:
        _check_against_parser(facts)


@pytest.mark.parametrize("variant", VARIANTS)
def test_append_turn(tmp_path: Path, variant: str) -> None:
    facts = generate_rollout(tmp_path / "r.jsonl", target_bytes=30_000, variant=variant, seed=4)
    before = facts.path.stat().st_size
    added = append_turn(facts.path, seed=1, ts_s=facts.updated_at + 60)
    data = facts.path.read_bytes()
    assert len(data) == before + added.bytes_appended
    assert 700 <= added.bytes_appended <= 1_400
    assert data.endswith(b"\n")
    new = [json.loads(line) for line in data[before:].split(b"\n")[:-1]]
    assert len(new) == added.lines
    if variant == "0.146":
        assert all("ordinal" in o for o in new)
    if _has_parser():
        session = _parser()
        parsed = session.parse_rollout_bytes(data)
        texts = [m.text for m in session.real_user_messages(parsed.items)]
        assert texts == [*facts.user_messages, added.user_message]
        last = session.commands(parsed.items)[-1]
        assert (last.command, last.exit_code) == (added.command.command, added.command.exit_code)


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown variant"):
        generate_rollout(tmp_path / "x.jsonl", target_bytes=10_000, variant="0.99")
    with pytest.raises(ValueError):
        generate_rollout(tmp_path / "x.jsonl", target_bytes=0)
    with pytest.raises(ValueError):
        generate_corpus(tmp_path, n_files=-1)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"not json\n")
    with pytest.raises(ValueError, match="not JSON"):
        append_turn(bad)
    assert bad.read_bytes() == b"not json\n"  # nothing appended
