"""Memory layout, slugs, trace file format and the stage/commit protocol (SPEC §5, §8)."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from memd.errors import MemoryWriteError
from memd.memory import files as memory_files
from memd.memory import recover as memory_recover
from memd.memory.files import TraceHeader
from memd.rollout.records import Agent


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _header(thread_id: str = "019a0000-aaaa-bbbb-cccc-000000000001") -> TraceHeader:
    return TraceHeader(
        thread_id=thread_id,
        project="/home/u/proj",
        cwd="/home/u/proj/sub",
        rollout_path="/home/u/.codex/sessions/2026/01/02/rollout-x.jsonl",
        updated_at=1_767_373_200.0,
        agent=Agent.CLAUDE,
        started_at=1_767_369_600.0,
        source_watermark=4096,
    )


# --------------------------------------------------------------------------- layout


def test_project_root_is_sha256_of_key(tmp_path: Path) -> None:
    key = "/home/u/proj"
    expected = tmp_path / hashlib.sha256(key.encode()).hexdigest() / "memory"
    assert memory_files.project_root(tmp_path, key) == expected
    assert memory_files.project_root(tmp_path, key + "2") != expected


def test_ensure_project_root_modes_and_project_file(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        memory_dir = tmp_path / "projects"
        root = memory_files.ensure_project_root(memory_dir, "/home/u/proj")
    finally:
        os.umask(old_umask)
    assert root == memory_files.project_root(memory_dir, "/home/u/proj")
    assert (root / "PROJECT").read_text() == "/home/u/proj\n"
    assert _mode(root / "PROJECT") == 0o600
    assert _mode(root) == 0o700
    assert _mode(root.parent) == 0o700
    assert _mode(memory_dir) == 0o700
    inode = (root / "PROJECT").stat().st_ino
    memory_files.ensure_project_root(memory_dir, "/home/u/proj")
    assert (root / "PROJECT").stat().st_ino == inode, "unchanged PROJECT must not be rewritten"


# --------------------------------------------------------------------------- slugs


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Fix the flaky CI test!", "fix_the_flaky_ci_test"),
        ("../../etc/passwd", "etc_passwd"),
        ("..", "trace"),
        ("", "trace"),
        ("///", "trace"),
        ("a\x00b", "a_b"),
        ("Ünïcödé title", "n_c_d_title"),
        ("日本語", "trace"),
        ("  --Hello--World--  ", "hello_world"),
        ("019a1b2c-3d4e-5f60-7a8b-9c0d1e2f3a4b", "019a1b2c_3d4e_5f60_7a8b_9c0d1e2f3a4b"),
    ],
)
def test_slugify(text: str, expected: str) -> None:
    assert memory_files.slugify(text) == expected


def test_slugify_long_titles_are_capped_and_trimmed() -> None:
    slug = memory_files.slugify("word " * 100)
    assert len(slug) <= 64
    assert not slug.endswith("_") and not slug.startswith("_")
    assert len(memory_files.slugify("x" * 1000)) == 64


@pytest.mark.parametrize(
    "title", ["../../etc/passwd", "/abs/path", "a\x00/../b", "..\\..\\win", "é" * 500, "x" * 5000]
)
def test_trace_relpath_never_escapes(tmp_path: Path, title: str) -> None:
    relpath = memory_files.trace_relpath("../../../tmp/evil", title)
    parts = Path(relpath).parts
    assert parts[0] == "trace_summaries" and len(parts) == 2
    assert ".." not in relpath and "\x00" not in relpath and "/" not in parts[1]
    assert len(parts[1]) <= 64 + 1 + 64 + 3
    target = (tmp_path / relpath).resolve()
    assert target.parent == (tmp_path / "trace_summaries").resolve()


# --------------------------------------------------------------------------- trace file format


def test_render_and_parse_round_trip() -> None:
    header = _header()
    body = "# Fixed the build\nTrace context: x\n\n## Task: build\nOutcome: success"
    text = memory_files.render_trace_file(header, body)
    assert text.splitlines()[:9] == [
        f"thread_id: {header.thread_id}",
        "agent: claude",
        "project: /home/u/proj",
        "cwd: /home/u/proj/sub",
        f"rollout_path: {header.rollout_path}",
        "session_date: 2026-01-02T16:00:00Z",
        "updated_at: 2026-01-02T17:00:00Z",
        "source_watermark: 4096",
        "",
    ]
    parsed, parsed_body = memory_files.parse_trace_file(text)
    assert parsed == header
    assert parsed_body == body


def test_render_folds_header_injection() -> None:
    header = TraceHeader("t1", "p", "/evil\nthread_id: other", "r", 0.0)
    parsed, body = memory_files.parse_trace_file(memory_files.render_trace_file(header, "body"))
    assert parsed.thread_id == "t1"
    assert parsed.cwd == "/evil thread_id: other"
    assert body == "body"


def test_a_header_written_before_agent_date_and_watermark_existed_still_parses() -> None:
    old = "thread_id: t1\nproject: /p\ncwd: /p\nrollout_path: /r.jsonl\nupdated_at: 2026-01-02T17:00:00Z\n\n# Body\n"
    header, body = memory_files.parse_trace_file(old)
    assert header == TraceHeader("t1", "/p", "/p", "/r.jsonl", 1_767_373_200.0, "codex", 0.0, 0)
    assert body == "# Body"


def test_trace_names_keep_safe_ids_verbatim_and_slug_the_rest() -> None:
    codex = "019a085e-04c1-7f81-a09e-9555f6a1fb40"
    assert memory_files.trace_relpath(codex, "Build a Pomodoro timer!") == (
        f"trace_summaries/{codex}_build_a_pomodoro_timer.md"
    )
    claude = "4c2ddfdc-b619-4525-8d03-1950fb1b0257"
    assert memory_files.trace_relpath(claude, "").startswith(f"trace_summaries/{claude}_trace")
    assert memory_files.trace_relpath("../x y", "t") == "trace_summaries/x_y_t.md"
    assert memory_files.trace_relpath("a" * 65, "t") == f"trace_summaries/{'a' * 64}_t.md"


def test_parse_tolerates_missing_header() -> None:
    header, body = memory_files.parse_trace_file("# Just a memory\nno header here\n")
    assert header == TraceHeader("", "", "", "", 0.0)
    assert body == "# Just a memory\nno header here"


# --------------------------------------------------------------------------- stage / commit


def test_stage_then_commit(tmp_path: Path) -> None:
    root = tmp_path / "root"
    relpath = memory_files.trace_relpath("t1", "Fix build")
    staged = memory_files.stage_file(root, relpath, "hello\n")
    final = root / relpath
    assert not final.exists(), "nothing visible before commit"
    assert staged.temp.exists() and memory_files.TEMP_MARKER in staged.temp.name
    assert _mode(staged.temp) == 0o600
    assert _mode(root / "trace_summaries") == 0o700
    staged.commit()
    assert final.read_text() == "hello\n"
    assert _mode(final) == 0o600
    assert not staged.temp.exists()
    assert staged.commit() == []  # idempotent


def test_abort_keeps_old_file(tmp_path: Path) -> None:
    memory_files.write_file_atomic(tmp_path, "MEMORY.md", "old\n")
    with memory_files.stage_file(tmp_path, "MEMORY.md", "new\n") as staged:
        pass  # the "database transaction" rolled back: leaving the block aborts
    assert staged.state == "aborted"
    assert (tmp_path / "MEMORY.md").read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["MEMORY.md"]
    with pytest.raises(MemoryWriteError):
        staged.commit()


def test_commit_removes_other_trace_files_of_same_thread(tmp_path: Path) -> None:
    tid = "019a0000-aaaa-bbbb-cccc-000000000001"
    other = "019a0000-aaaa-bbbb-cccc-000000000001x"  # shares the slug prefix, another thread
    first = memory_files.trace_relpath(tid, "Old title")
    sibling = memory_files.trace_relpath(other, "Other")
    memory_files.stage_file(tmp_path, first, memory_files.render_trace_file(_header(tid), "v1")).commit()
    memory_files.stage_file(tmp_path, sibling, memory_files.render_trace_file(_header(other), "o")).commit()
    second = memory_files.trace_relpath(tid, "New title")
    removed = memory_files.stage_file(tmp_path, second, memory_files.render_trace_file(_header(tid), "v2")).commit()
    assert removed == [first]
    names = sorted(p.name for p in (tmp_path / "trace_summaries").iterdir())
    assert names == sorted([Path(second).name, Path(sibling).name])


def test_stage_refuses_escaping_relpath(tmp_path: Path) -> None:
    for bad in ("../x.md", "/etc/passwd", "a/../../b"):
        with pytest.raises(MemoryWriteError):
            memory_files.stage_file(tmp_path / "root", bad, "x")
    assert not (tmp_path / "x.md").exists()


def test_disk_full_while_staging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    memory_files.write_file_atomic(tmp_path, "memory_summary.md", "old\n")
    real_write = os.write
    calls = []

    def full_disk(fd: int, data: bytes) -> int:
        calls.append(fd)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(memory_files.os, "write", full_disk)
    with capture_logs() as logs, pytest.raises(MemoryWriteError, match="disk full"):
        memory_files.stage_file(tmp_path, "memory_summary.md", "new content\n")
    monkeypatch.setattr(memory_files.os, "write", real_write)
    assert calls, "the write was attempted"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory_summary.md"], "no temp left"
    assert (tmp_path / "memory_summary.md").read_text() == "old\n"
    assert [e["event"] for e in logs] == ["memory_write_failed"]


def test_remove_trace(tmp_path: Path) -> None:
    tid = "t-1"
    rel = memory_files.trace_relpath(tid, "title")
    memory_files.stage_file(tmp_path, rel, memory_files.render_trace_file(_header(tid), "x")).commit()
    assert memory_files.remove_trace(tmp_path, tid) == [rel]
    assert not (tmp_path / rel).exists()
    assert memory_files.remove_trace(tmp_path, tid) == []
    assert memory_files.remove_trace(tmp_path / "missing", tid) == []


def test_trace_exists(tmp_path: Path) -> None:
    rel = memory_files.trace_relpath("t1", "a")
    assert not memory_files.trace_exists(tmp_path, rel)
    memory_files.stage_file(tmp_path, rel, memory_files.render_trace_file(_header("t1"), "body v1")).commit()
    assert memory_files.trace_exists(tmp_path, rel)
    assert memory_files.trace_exists(tmp_path, rel, "body v1")
    assert not memory_files.trace_exists(tmp_path, rel, "body v2")
    assert not memory_files.trace_exists(tmp_path, "../etc/passwd")


# --------------------------------------------------------------------------- recovery


def test_recover_after_crash_between_stage_and_commit(tmp_path: Path) -> None:
    keep_rel = memory_files.trace_relpath("t1", "kept")
    memory_files.stage_file(tmp_path, keep_rel, memory_files.render_trace_file(_header("t1"), "old")).commit()
    # a crash after staging: the temp files stay, nothing was renamed
    crashed = memory_files.stage_file(tmp_path, keep_rel, memory_files.render_trace_file(_header("t1"), "new"))
    crashed_summary = memory_files.stage_file(tmp_path, "memory_summary.md", "x")
    orphan_rel = memory_files.trace_relpath("t2", "forgotten")
    memory_files.stage_file(tmp_path, orphan_rel, memory_files.render_trace_file(_header("t2"), "o")).commit()
    (tmp_path / ".staging-deadbeef" / "skills").mkdir(parents=True)
    (tmp_path / ".staging-deadbeef" / "MEMORY.md").write_text("half")
    (tmp_path / "trace_summaries" / "notes.txt").write_text("not a trace")

    report = memory_recover.recover(tmp_path, {keep_rel})

    assert sorted(report.temp_files) == sorted(
        [crashed.temp.relative_to(tmp_path).as_posix(), crashed_summary.temp.name]
    )
    assert report.staging_dirs == (".staging-deadbeef",)
    assert report.orphan_traces == (orphan_rel,)
    assert report.removed == 4
    assert memory_files.trace_exists(tmp_path, keep_rel, "old"), "the old pair is intact"
    assert sorted(p.name for p in (tmp_path / "trace_summaries").iterdir()) == sorted(
        [Path(keep_rel).name, "notes.txt"]
    )
    assert not (tmp_path / "memory_summary.md").exists()
    assert memory_recover.recover(tmp_path, lambda rel: rel == keep_rel) == memory_recover.RecoveryReport()


def test_recover_min_age_spares_fresh_files(tmp_path: Path) -> None:
    staged = memory_files.stage_file(tmp_path, "MEMORY.md", "x")
    (tmp_path / ".staging-1").mkdir()
    report = memory_recover.recover(tmp_path, set(), min_age_s=3600)
    assert report == memory_recover.RecoveryReport()
    assert staged.temp.exists() and (tmp_path / ".staging-1").exists()
    staged.commit()
    assert (tmp_path / "MEMORY.md").read_text() == "x"


def test_recover_missing_root(tmp_path: Path) -> None:
    assert memory_recover.recover(tmp_path / "nope", set()) == memory_recover.RecoveryReport()


def test_a_trace_header_with_an_unknown_or_missing_agent_reads_as_codex() -> None:
    unknown, _ = memory_files.parse_trace_file("thread_id: t1\nagent: gemini\n\n# body\n")
    missing, body = memory_files.parse_trace_file("thread_id: t1\n\n# body\n")
    assert unknown.agent is Agent.CODEX and missing.agent is Agent.CODEX and body == "# body"
