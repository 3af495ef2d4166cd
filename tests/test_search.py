"""The FTS5 search index over memory files and the memory-use ledger (SPEC §18)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from memd.store.search import (
    ChunkKind,
    SearchIndex,
    UseEvent,
    chunk_memory_md,
    chunk_trace,
    entry_key,
    fts_query,
)

MEMORY_MD = """# Project memory: /home/me/app

## Start here
- Run the tests with `npx jest`; `npm test` fails because jest is not installed globally. [019a085e 2025-10-21]
- The API server lives in `api/server.py`. [019b7f94 2026-01-02]

## User preferences
- Don't use any external frameworks; keep it pure HTML, CSS and JS. [019a085e 2025-10-21]
  (stated twice)

## Recent tasks
- 2026-01-02 Build a pomodoro timer — success (trace: trace_summaries/019b7f94-51b4-7593-922e-ba12b5b73b52_build.md)
"""

TRACE = """thread_id: 019b7f94-51b4-7593-922e-ba12b5b73b52
project: /home/me/app
cwd: /home/me/app
rollout_path: /x/rollout.jsonl
updated_at: 2026-01-02T18:39:45Z

# Build a pomodoro timer; changed index.html.
Trace context: /home/me/app, 2026-01-02, codex, gpt-5
User preferences: none observed
## Task: Build a pomodoro timer
Outcome: success
Key steps:
- Changed files: `index.html`, `script.js`
## Task: Add a pause button
Outcome: partial
"""


def make_root(tmp_path: Path) -> Path:
    root = tmp_path / "memory"
    (root / "trace_summaries").mkdir(parents=True)
    (root / "skills" / "run-tests").mkdir(parents=True)
    (root / "MEMORY.md").write_text(MEMORY_MD)
    (root / "trace_summaries" / "019b7f94-51b4-7593-922e-ba12b5b73b52_build.md").write_text(TRACE)
    (root / "skills" / "run-tests" / "SKILL.md").write_text(
        "---\nname: run-tests\ndescription: how to run the jest suite\n---\nRun `npx jest --ci`.\n"
    )
    (root / "memory_summary.md").write_text("- pomodoro (trace: x)\n")
    return root


def test_memory_md_is_chunked_per_bullet_under_its_heading() -> None:
    chunks = chunk_memory_md(MEMORY_MD)
    assert [(c.heading, c.line_start, c.line_end) for c in chunks] == [
        ("Start here", 4, 4),
        ("Start here", 5, 5),
        ("User preferences", 8, 9),
        ("Recent tasks", 12, 12),
    ]
    assert chunks[0].session_ids == ("019a085e",)
    assert chunks[3].session_ids == ("019b7f94-51b4-7593-922e-ba12b5b73b52",)
    assert chunks[0].date_s == 1761004800.0  # 2025-10-21T00:00:00Z
    assert all(c.entry for c in chunks)


def test_entry_key_ignores_provenance_and_formatting_but_not_content() -> None:
    a = entry_key("- Run the tests with `npx jest`. [019a085e 2025-10-21]")
    assert a == entry_key("* run the tests with npx jest (trace: trace_summaries/x_y.md) (seen in 3 sessions)")
    assert a != entry_key("- Run the tests with `npm test`.")
    assert entry_key("- [019a085e 2025-10-21]") == ""


def test_trace_chunks_carry_the_session_and_its_date() -> None:
    chunks = chunk_trace(TRACE, path="trace_summaries/t.md")
    assert [c.heading for c in chunks] == [
        "Build a pomodoro timer; changed index.html.",
        "Task: Build a pomodoro timer",
        "Task: Add a pause button",
    ]
    assert chunks[1].line_start == 10
    assert all(c.session_ids == ("019b7f94-51b4-7593-922e-ba12b5b73b52",) for c in chunks)
    assert chunks[0].date_s == 1767379185.0  # 2026-01-02T18:39:45Z


def test_search_ranks_heading_matches_first_and_stays_in_its_project(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    index = SearchIndex.scratch()
    report = index.refresh("/home/me/app", root)
    assert (report.indexed, report.removed) == (4, 0)  # MEMORY.md, summary (no chunks), one trace, one skill
    hits = index.search("/home/me/app", "pause button")
    assert hits[0].chunk.heading == "Task: Add a pause button"
    assert hits[0].chunk.kind is ChunkKind.TRACE
    hits = index.search("/home/me/app", "jest")
    assert {h.chunk.path for h in hits} == {"MEMORY.md", "skills/run-tests/SKILL.md"}
    assert index.search("/somewhere/else", "jest") == []
    only = index.search("/home/me/app", "jest", kinds=[ChunkKind.SKILL])
    assert [h.chunk.path for h in only] == ["skills/run-tests/SKILL.md"]


@pytest.mark.parametrize(
    "query", ['"unbalanced', "jest*", "NEAR(jest tests)", "-jest", "jest AND OR NOT", "path:api", "(jest"]
)
def test_fts5_syntax_in_a_query_is_plain_text(tmp_path: Path, query: str) -> None:
    index = SearchIndex.scratch()
    index.refresh("p", make_root(tmp_path))
    hits = index.search("p", query)  # never sqlite3.OperationalError: fts5 syntax error
    assert isinstance(hits, list)
    if "jest" in query.lower():
        assert hits


def test_a_query_without_words_finds_nothing() -> None:
    assert fts_query(' " * - ( ) ') == ""
    assert SearchIndex.scratch().search("p", "***") == []


def test_refresh_follows_changes_and_a_deleted_root(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    index = SearchIndex.scratch()
    index.refresh("p", root)
    assert index.refresh("p", root).unchanged == 4
    (root / "MEMORY.md").write_text("# m\n\n## Pitfalls\n- zanzibar breaks the build\n")
    os.utime(root / "MEMORY.md", ns=(1, 1))
    assert index.refresh("p", root).indexed == 1
    assert [h.chunk.heading for h in index.search("p", "zanzibar")] == ["Pitfalls"]
    assert index.search("p", "external frameworks") == []
    import shutil

    shutil.rmtree(root)
    report = index.refresh("p", root)
    assert report.removed == 4
    assert index.chunk_count("p") == 0


def test_recency_breaks_ties(tmp_path: Path) -> None:
    root = tmp_path / "m"
    (root / "trace_summaries").mkdir(parents=True)
    for name, date in (("old", "2025-01-01"), ("new", "2026-01-01")):
        (root / "trace_summaries" / f"{name}_x.md").write_text(
            f"thread_id: {name}\nupdated_at: {date}T00:00:00Z\n\n# same words here\n## Task: same words here\n"
        )
    index = SearchIndex.scratch()
    index.refresh("p", root)
    hits = index.search("p", "same words", kinds=[ChunkKind.TRACE], limit=1)
    assert hits[0].chunk.session_ids == ("new",)


def test_uses_are_counted_once_per_event(tmp_path: Path) -> None:
    index = SearchIndex.scratch()
    event = UseEvent("p", "MEMORY.md", "abc", "thread-1", "call-1", 100.0)
    assert index.record_uses([event, event]) == 1
    assert index.record_uses([event]) == 0
    index.record_uses([UseEvent("p", "MEMORY.md", "abc", "thread-2", "call-9", 200.0)])
    usage = index.usage("p")
    assert usage[("MEMORY.md", "abc")].usage_count == 2
    assert usage[("MEMORY.md", "abc")].last_used_at == 200.0
    assert index.usage_counts() == {"p": 2}


def test_open_never_creates_or_migrates_a_database(tmp_path: Path) -> None:
    missing = tmp_path / "memd.sqlite3"
    assert SearchIndex.open(missing) is None
    assert not missing.exists()
    conn = sqlite3.connect(missing)
    conn.execute("CREATE TABLE threads (id TEXT)")
    conn.execute("PRAGMA user_version = 1")
    conn.close()
    assert SearchIndex.open(missing) is None  # an older schema: the daemon migrates, readers never do


async def test_the_state_database_migration_creates_the_same_tables(db_path: Path, clock) -> None:  # type: ignore[no-untyped-def]
    from memd.store.store import Store

    store = await Store.open(db_path, clock=clock)
    await store.close()
    index = SearchIndex.open(db_path)
    assert index is not None

    def shape(conn: sqlite3.Connection) -> dict[str, list[str]]:
        names = [
            r[0]
            for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE name IN ('search_files', 'search_chunks', 'memory_use')"
            )
        ]
        return {n: [c[1] for c in conn.execute(f"PRAGMA table_info({n})")] for n in sorted(names)}

    assert shape(index._conn) == shape(SearchIndex.scratch()._conn)
    index.record_uses([UseEvent("p", "MEMORY.md", "e", "t", "c", 1.0)])
    assert index.usage_counts() == {"p": 1}
    index.close()


def test_a_quick_refresh_trusts_the_trace_folder_and_a_full_one_does_not(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    index = SearchIndex.scratch()
    index.refresh("p", root)
    trace = root / "trace_summaries" / "019b7f94-51b4-7593-922e-ba12b5b73b52_build.md"
    folder_mtime = os.stat(root / "trace_summaries").st_mtime_ns
    trace.write_text(TRACE.replace("pause button", "quokka button"))  # edited in place: the folder keeps its mtime
    os.utime(root / "trace_summaries", ns=(folder_mtime, folder_mtime))
    assert index.refresh("p", root).indexed == 0 and not index.search("p", "quokka")
    assert index.refresh("p", root, full=True).indexed == 1 and index.search("p", "quokka")
    new = root / "trace_summaries" / ".tmp-memd-x"
    new.write_text(TRACE.replace("pause button", "wombat button"))
    new.rename(root / "trace_summaries" / "019c0000-0000-7000-8000-000000000001_w.md")  # how memd writes traces
    report = index.refresh("p", root)
    assert (report.indexed, report.unchanged) == (1, 4) and index.search("p", "wombat")


def test_each_file_version_is_checked_for_secrets_once(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    (root / "memory_summary.md").write_text("- token = sk-proj-abcdefghijklmnopqrstuvwxyz0123456789ABCD\n")
    index = SearchIndex.scratch(is_clean=lambda text: "sk-proj-" not in text)
    index.refresh("p", root)
    assert index.known_clean("p", "MEMORY.md", os.stat(root / "MEMORY.md"))
    assert not index.known_clean("p", "memory_summary.md", os.stat(root / "memory_summary.md"))
    (root / "MEMORY.md").write_text(MEMORY_MD + "- one more\n")  # a new version is unknown until refreshed
    assert not index.known_clean("p", "MEMORY.md", os.stat(root / "MEMORY.md"))


def test_merge_markers_and_placeholders_are_not_content() -> None:
    text = (
        "# Project memory: /p\n\n## Verification\nnone yet (how changes were checked)\n\n"
        "## Recent tasks\n- add a pause button — partial [019a085e 2025-10-21]\n"
        "<!-- memd merged: 019a085e-04c1-7f81-a09e-9555f6a1fb40:b416a9e5 -->\n"
    )
    assert [(c.heading, c.body) for c in chunk_memory_md(text)] == [
        ("Recent tasks", "- add a pause button — partial [019a085e 2025-10-21]")
    ]


async def test_a_failed_refresh_keeps_its_projects_marked(
    tmp_path: Path, db_path: Path, clock, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    from memd.memory.files import project_root
    from memd.read.upkeep import SearchRefresher
    from memd.store.store import Store

    store = await Store.open(db_path, clock=clock)
    await store.close()
    memory_dir = tmp_path / "projects"
    project = "/home/me/app"
    root = make_root(tmp_path)
    project_root(memory_dir, project).parent.mkdir(parents=True)
    root.rename(project_root(memory_dir, project))
    refresher = SearchRefresher(db_path, memory_dir)
    refresher.mark(project)
    real_refresh = SearchIndex.refresh

    def locked(self: SearchIndex, *args: object, **kwargs: object) -> object:
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(SearchIndex, "refresh", locked)
    await refresher.refresh()
    index = SearchIndex.open(db_path)
    assert index is not None and index.search(project, "jest") == []
    monkeypatch.setattr(SearchIndex, "refresh", real_refresh)
    await refresher.refresh()  # not marked again: the failed pass kept it
    assert index.search(project, "jest")
    index.close()


async def test_a_cancelled_refresh_keeps_its_projects_marked(
    tmp_path: Path, db_path: Path, clock, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    import asyncio
    import threading

    from memd.memory.files import project_root
    from memd.read.upkeep import SearchRefresher
    from memd.store.store import Store

    store = await Store.open(db_path, clock=clock)
    await store.close()
    memory_dir = tmp_path / "projects"
    project = "/home/me/app"
    project_root(memory_dir, project).parent.mkdir(parents=True)
    make_root(tmp_path).rename(project_root(memory_dir, project))
    refresher = SearchRefresher(db_path, memory_dir)
    refresher.mark(project)
    entered, release = threading.Event(), threading.Event()
    real_open = SearchIndex.open

    def slow_open(db: Path, **kwargs: object) -> SearchIndex | None:
        entered.set()
        release.wait(30)
        return None  # as if the pass never got to the project

    monkeypatch.setattr(SearchIndex, "open", staticmethod(slow_open))
    task = asyncio.create_task(refresher.refresh())
    await asyncio.to_thread(entered.wait, 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    release.set()
    monkeypatch.setattr(SearchIndex, "open", real_open)
    await refresher.refresh()
    index = SearchIndex.open(db_path)
    assert index is not None and index.search(project, "jest")
    index.close()


async def test_two_refreshers_racing_over_a_new_project_both_succeed(tmp_path: Path, db_path: Path, clock) -> None:  # type: ignore[no-untyped-def]
    from memd.store.store import Store

    store = await Store.open(db_path, clock=clock)
    await store.close()
    root = make_root(tmp_path)
    daemon, mcp = SearchIndex.open(db_path), SearchIndex.open(db_path)  # two connections, as in two processes
    assert daemon is not None and mcp is not None
    real_read = SearchIndex._read
    raced: list[object] = []

    def read_while_the_other_refreshes(path: Path) -> str | None:
        if not raced:  # the daemon has read what it knows and not yet written: `memd mcp` refreshes now
            raced.append(mcp.refresh("p", root, full=True))
        return real_read(path)

    daemon._read = read_while_the_other_refreshes  # type: ignore[method-assign]
    report = daemon.refresh("p", root, full=True)
    assert raced and report.indexed == 4
    fresh = SearchIndex.scratch()
    fresh.refresh("p", root, full=True)
    rows = "SELECT path, heading, body FROM search_chunks WHERE project = 'p' ORDER BY 1, 2, 3"
    assert daemon._conn.execute(rows).fetchall() == fresh._conn.execute(rows).fetchall()  # no chunk twice
    assert daemon.refresh("p", root, full=True).indexed == 0
    daemon.close()
    mcp.close()
