"""Start-up repair of memory roots: legacy trace names are renamed once, with no duplicate left
behind, and the new name carries the full header (SPEC §8, issue 9)."""

from __future__ import annotations

from pathlib import Path

from memd.clock import FakeClock
from memd.faults import FaultLog
from memd.memory import files as memory_files
from memd.memory.recover import MemoryRepair
from memd.store.records import FileRecord, JobKind, MemoryRecord, ThreadRecord
from memd.store.store import Store

TID = "019a085e-04c1-7f81-a09e-9555f6a1fb40"
PROJECT = "/home/me/pomodoro"
BODY = "# Build a Pomodoro timer\nTrace context: x\n## Task: Build a Pomodoro timer\nOutcome: success"


async def _memory_with_legacy_file(store: Store, memory_dir: Path) -> tuple[Path, str]:
    """A thread, its committed memory row and trace file under the name memd 0.1 gave it."""
    thread = ThreadRecord(
        id=TID, path=f"/s/rollout-{TID}.jsonl", project=PROJECT, cwd=PROJECT, source="cli",
        originator="codex_cli_rs", cli_version="0.47.0", model="gpt-5-codex", title="Build a Pomodoro timer",
        created_at=1_761_000_000.0, updated_at=1_761_003_600.0, watermark=155_731, user_messages=3,
        skipped_lines=0, eligible=True, reason=None,
    )  # fmt: skip
    file = FileRecord(thread.path, "codex", 1, 2, 155_731, 1.0, 155_731, "", TID)
    await store.threads.record(thread, "{}", file)
    root = memory_files.ensure_project_root(memory_dir, PROJECT)
    legacy = f"trace_summaries/{memory_files.slugify(TID)}_build_a_pomodoro_timer.md"
    assert legacy.startswith("trace_summaries/019a085e_04c1_")  # the hyphens were lost
    old_header = memory_files.TraceHeader(TID, PROJECT, PROJECT, thread.path, thread.updated_at)
    memory_files.stage_file(root, legacy, memory_files.render_trace_file(old_header, BODY), thread_id=TID).commit()
    await store.jobs.upsert_extract(TID, thread.watermark, thread.updated_at)
    job = await store.jobs.claim(JobKind.EXTRACT, "h:1:a", 600)
    assert job is not None
    memory = MemoryRecord(TID, PROJECT, legacy, BODY, "summary", thread.watermark, 2.0, "offline", 0, 0)
    assert await store.jobs.finish_extract(job, memory)
    await store.projects.ensure(PROJECT, str(root))
    return root, legacy


def _repair(store: Store, memory_dir: Path) -> MemoryRepair:
    return MemoryRepair(store, FakeClock(), memory_dir=memory_dir, max_traces_per_project=10, faults=FaultLog())


async def test_a_legacy_trace_name_is_migrated_once_with_no_duplicate(store: Store, tmp_path: Path) -> None:
    memory_dir = tmp_path / "memory"
    root, legacy = await _memory_with_legacy_file(store, memory_dir)
    seq_before = (await store.projects.get(PROJECT)).memory_seq  # type: ignore[union-attr]

    await _repair(store, memory_dir).recover_all(min_age_s=0)

    new = f"trace_summaries/{TID}_build_a_pomodoro_timer.md"
    assert sorted(p.name for p in (root / "trace_summaries").iterdir()) == [Path(new).name]
    row = await store.memories.get(TID)
    assert row is not None and row.path == new
    header, body = memory_files.parse_trace_file((root / new).read_text())
    assert (header.thread_id, header.agent, header.source_watermark) == (TID, "codex", 155_731)
    assert header.started_at == 1_761_000_000.0 and body == BODY
    # memory_summary.md names the files: the project is consolidated again.
    assert (await store.projects.get(PROJECT)).memory_seq == seq_before + 1  # type: ignore[union-attr]

    again = _repair(store, memory_dir)
    assert await again.migrate_names(await store.projects.get(PROJECT)) == 0  # type: ignore[arg-type]
    assert (root / new).read_text() == memory_files.render_trace_file(header, BODY)


async def test_a_crash_between_writing_the_new_name_and_moving_the_row_leaves_one_file(
    store: Store, tmp_path: Path
) -> None:
    memory_dir = tmp_path / "memory"
    root, legacy = await _memory_with_legacy_file(store, memory_dir)
    # The crash: the new file was written, the row still names the legacy file.
    crashed = root / f"trace_summaries/{TID}_build_a_pomodoro_timer.md"
    crashed.write_text("half of a migration")

    await _repair(store, memory_dir).recover_all(min_age_s=0)

    names = sorted(p.name for p in (root / "trace_summaries").iterdir())
    assert names == [crashed.name]
    assert memory_files.parse_trace_file(crashed.read_text())[1] == BODY
    assert (await store.memories.get(TID)).path == f"trace_summaries/{crashed.name}"  # type: ignore[union-attr]


def _trace(root: Path, thread_id: str, slug: str) -> str:
    """Commit a trace file of ``thread_id`` named after ``slug``; return its relpath."""
    relpath = memory_files.trace_relpath(thread_id, slug)
    header = memory_files.TraceHeader(thread_id, PROJECT, PROJECT, f"/s/rollout-{thread_id}.jsonl", 1_761_000_000.0)
    memory_files.stage_file(
        root, relpath, memory_files.render_trace_file(header, f"# {slug}"), thread_id=thread_id
    ).commit()
    return relpath


async def test_start_up_keeps_a_trace_whose_thread_has_no_row(store: Store, tmp_path: Path) -> None:
    """A reinstall (state removed, memories kept) or a ``memd db recover`` that could not take a trace
    back leaves trace files no row names: they are the only copy of those memories and stay."""
    memory_dir = tmp_path / "memory"
    root, legacy = await _memory_with_legacy_file(store, memory_dir)  # the project has a row now
    indexed_no_row = "019a085e-0000-7000-8000-000000000001"
    thread = ThreadRecord(
        id=indexed_no_row, path="/s/other.jsonl", project=PROJECT, cwd=PROJECT, source="cli", originator="codex_cli_rs",
        cli_version="0.47.0", model="m", title="t", created_at=1.0, updated_at=2.0, watermark=10, user_messages=1,
        skipped_lines=0, eligible=True, reason=None,
    )  # fmt: skip
    await store.threads.record(thread, "{}", FileRecord(thread.path, "codex", 1, 3, 10, 1.0, 10, "", indexed_no_row))
    kept_indexed = _trace(root, indexed_no_row, "an old session")
    kept_unknown = _trace(root, "019a085e-0000-7000-8000-000000000002", "rollout gone")

    await _repair(store, memory_dir).recover_all(min_age_s=0)

    assert (root / kept_indexed).is_file() and (root / kept_unknown).is_file()
    await _repair(store, memory_dir).recover_all(min_age_s=0)  # and at every later start
    assert (root / kept_indexed).is_file() and (root / kept_unknown).is_file()


async def test_start_up_removes_superseded_and_forgotten_traces(store: Store, tmp_path: Path) -> None:
    memory_dir = tmp_path / "memory"
    root, legacy = await _memory_with_legacy_file(store, memory_dir)
    await _repair(store, memory_dir).recover_all(min_age_s=0)  # the legacy name is migrated
    row = await store.memories.get(TID)
    assert row is not None and row.path is not None
    # A crash after the row of a retitled thread committed, before its old file was removed:
    old_name = root / "trace_summaries" / f"{TID}_an_older_title.md"
    old_name.write_text((root / row.path).read_text())
    forgotten_id = "019a085e-0000-7000-8000-000000000003"
    forgotten = _trace(root, forgotten_id, "forgotten session")
    memory_files.add_tombstone(memory_dir, forgotten_id)

    await _repair(store, memory_dir).recover_all(min_age_s=0)

    assert sorted(p.name for p in (root / "trace_summaries").iterdir()) == [Path(row.path).name]
    assert not (root / forgotten).exists()
