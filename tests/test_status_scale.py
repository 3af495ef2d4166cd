"""``memd status`` after a long history (issue 14): a bounded overview for people, every thread on
request (``--threads``, ``--project P``), and a JSON report for scripts that is streamed a page at
a time with the SPEC §10 keys."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from memd import status
from memd.cli import main
from memd.clock import FakeClock
from memd.config import default_state_dir
from memd.store.records import FileRecord, MemoryRecord, ThreadRecord
from memd.store.store import Store

N_PROJECTS = 30
THREADS_PER_PROJECT = 3


def project_key(k: int) -> str:
    return f"/home/dev/src/proj-{k:02d}"


def thread_id(n: int) -> str:
    return f"019c0000-0000-7000-8000-{n:012d}"


def thread(n: int, now: float) -> ThreadRecord:
    """Thread ``n`` of project ``n % N_PROJECTS``; a higher ``n`` was active more recently."""
    project = project_key(n % N_PROJECTS)
    return ThreadRecord(
        id=thread_id(n), path=f"/sessions/rollout-{n}.jsonl", project=project, cwd=project, source="cli",
        originator="codex_cli_rs", cli_version="0.77.0", model="gpt-5", title=f"task {n}",
        created_at=now - 100_000 + n, updated_at=now - 50_000 + n * 10, watermark=100, user_messages=1,
        skipped_lines=0, eligible=True, reason=None,
    )  # fmt: skip


async def long_history(now: float, *, failed: int = 0) -> None:
    """``N_PROJECTS * THREADS_PER_PROJECT`` threads, every one extracted except threads ``0`` to
    ``failed - 1``, whose jobs are dead."""
    clock = FakeClock(now)
    store = await Store.open(default_state_dir() / "memd.sqlite3", clock=clock)
    try:
        threads = [thread(n, now) for n in range(N_PROJECTS * THREADS_PER_PROJECT)]
        files = [
            FileRecord(t.path, "codex", 1, n, 100, t.updated_at, 100, "0" * 64, t.id) for n, t in enumerate(threads)
        ]
        await store.threads.record_many([(t, "{}", f) for t, f in zip(threads, files, strict=True)])
        for t in threads:
            await store.jobs.upsert_extract(t.id, 100, t.updated_at)
        for _ in threads:
            job = await store.jobs.claim("extract", "host:1:a", 60)
            assert job is not None
            if int(job.key[-12:]) < failed:  # threads 0 .. failed - 1
                assert await store.jobs.fail(job, f"ExtractorError: failure of {job.key}", None, dead=True)
                continue
            t = next(t for t in threads if t.id == job.key)
            await store.projects.ensure(t.project, f"/memory/{t.project.rsplit('-', 1)[1]}")
            memory = MemoryRecord(t.id, t.project, f"trace_summaries/{t.id}.md", "## Task: t", "did t", 100, now,
                                  "offline", 0, 0)  # fmt: skip
            assert await store.jobs.finish_extract(job, memory)
    finally:
        await store.close()


@pytest.fixture
def history(capsys: pytest.CaptureFixture[str]) -> float:
    now = time.time()
    asyncio.run(long_history(now, failed=25))
    capsys.readouterr()
    return now


def test_the_overview_is_bounded_and_lists_the_twenty_most_recently_active_projects(
    history: float, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status"]) == 0
    text = capsys.readouterr().out
    threads = N_PROJECTS * THREADS_PER_PROJECT
    assert f"threads: {threads} ({threads} eligible) · memories: {threads - 25} · projects: {N_PROJECTS}" in text
    assert "dead: 25" in text
    # The newest threads are n = 89, 88, ...: their projects 29, 28, ... are the most recent.
    listed = [line.split(":")[0].strip() for line in text.splitlines() if line.startswith("  /home/dev/src/proj-")]
    assert listed == [project_key(k) for k in range(N_PROJECTS - 1, N_PROJECTS - 21, -1)]
    assert f"recently active projects (20 of {N_PROJECTS}):" in text
    # Problems: 20 dead jobs listed, the other 5 counted; no thread table.
    assert sum(1 for line in text.splitlines() if line.startswith("  dead  extract ")) == status.PROBLEM_ROWS
    assert "... and 5 more dead jobs (memd status --json)" in text
    assert "THREAD" not in text and thread_id(0) in text  # thread 0's job is a listed dead one
    assert "memd status --threads" in text


def test_threads_lists_every_thread_newest_first_and_project_one_project(
    history: float, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(status, "PAGE_ROWS", 7)  # several pages
    assert main(["status", "--threads"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("THREAD")
    ids = [line.split()[0] for line in lines[1:]]
    assert ids == [thread_id(n) for n in range(N_PROJECTS * THREADS_PER_PROJECT - 1, -1, -1)]
    states = {line.split()[0]: line.split()[4] for line in lines[1:]}
    assert states[thread_id(0)] == "dead" and states[thread_id(89)] == "done"

    assert main(["status", "--project", project_key(4)]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"project: {project_key(4)}\n")
    assert "/memory/04" in text
    shown = [line.split()[0] for line in text.splitlines() if line.startswith("019c")]
    assert shown == [thread_id(64), thread_id(34), thread_id(4)]

    assert main(["status", "--project", "/nowhere/at/all"]) == 1
    assert "no project /nowhere/at/all" in capsys.readouterr().err


def test_json_is_streamed_a_page_at_a_time_and_keeps_its_keys(
    history: float, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(status, "PAGE_ROWS", 7)
    pages: list[int] = []
    real_page = Store.__init__

    def spy_init(self: Store, *args: object, **kwargs: object) -> None:
        real_page(self, *args, **kwargs)  # type: ignore[arg-type]
        original = self.threads.status_page

        async def status_page(**kw):  # type: ignore[no-untyped-def]
            rows = await original(**kw)
            pages.append(len(rows))
            return rows

        self.threads.status_page = status_page  # type: ignore[method-assign]

    monkeypatch.setattr(Store, "__init__", spy_init)
    assert main(["status", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report) == [
        "extractor", "extractor_reason", "daemon", "totals", "usage", "last_fault", "threads", "projects", "jobs",
        "leases",
    ]  # fmt: skip
    total = N_PROJECTS * THREADS_PER_PROJECT
    assert len(report["threads"]) == total and len(report["jobs"]) == total
    assert max(pages) == 7 and sum(pages) == total  # read 7 rows at a time, never all at once
    assert {row["state"] for row in report["threads"]} == {"done", "dead"}
    traces = {row["project"]: row["traces"] for row in report["projects"]}
    assert traces == {project_key(k): THREADS_PER_PROJECT - (k < 25) for k in range(N_PROJECTS)}


def test_json_and_a_text_view_together_are_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--json", "--threads"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_an_empty_state_prints_a_short_overview_and_valid_json(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["status", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["threads"], report["projects"], report["jobs"], report["leases"]) == ([], [], [], [])
    assert main(["status", "--threads"]) == 0
    assert capsys.readouterr().out == "no threads yet\n"
