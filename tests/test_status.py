"""``memd status`` (SPEC §10, issue 5): the operator's view of a database in a known state.

The state is written through the store's own API (threads in every state, jobs failed, dead and
running, a held lease, a failed consolidation, today's tokens, a running daemon), then the real
command line prints it. The ``--json`` keys are the ones SPEC §10 fixes for scripts.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from memd.cli import main
from memd.clock import FakeClock
from memd.config import default_state_dir
from memd.rollout.project import Ineligible
from memd.store.daemons import daemon_alive, pid_alive
from memd.store.records import DaemonRecord, FileRecord, MemoryRecord, ThreadRecord
from memd.store.store import Store, make_owner

THREAD_KEYS = {"id", "project", "cwd", "source", "user_messages", "eligible", "reason", "state"}
PROJECT_KEYS = {"project", "memory_root", "traces", "last_consolidated_at"}


def _thread(thread_id: str, project: str, *, now: float, watermark: int = 100, reason: str | None = None) -> ThreadRecord:
    return ThreadRecord(
        id=thread_id,
        path=f"/sessions/rollout-{thread_id}.jsonl",
        project=project,
        cwd=project,
        source="exec" if reason == "source:exec" else "cli",
        originator="codex_cli_rs",
        cli_version="0.77.0",
        model="gpt-5",
        title=f"task {thread_id}",
        created_at=now - 7200,
        updated_at=now - 3600,
        watermark=watermark,
        user_messages=0 if reason == "no_user_messages" else 2,
        skipped_lines=0,
        eligible=reason is None,
        reason=Ineligible.parse(reason) if reason else None,
    )


def _memory(thread_id: str, project: str, watermark: int, now: float) -> MemoryRecord:
    return MemoryRecord(
        thread_id=thread_id,
        project=project,
        path=f"trace_summaries/{thread_id}_task.md",
        trace_memory="## Task: t\nOutcome: success",
        summary="did t",
        source_watermark=watermark,
        generated_at=now,
        extractor="offline",
        tokens_in=0,
        tokens_out=0,
    )


async def _record(store: Store, thread: ThreadRecord) -> None:
    file = FileRecord(
        path=thread.path, kind="codex", dev=1, inode=abs(hash(thread.id)) % 10**9, size=thread.watermark,
        mtime=thread.updated_at, watermark=thread.watermark, head_hash="0" * 64, thread_id=thread.id,
    )  # fmt: skip
    await store.threads.record(thread, "{}", file)


async def _known_state(db_path: Path, owner: str) -> dict[str, str]:
    """Write the known state; return {label: thread id}."""
    now = time.time()
    clock = FakeClock(now)
    store = await Store.open(db_path, clock=clock)
    try:
        await store.daemons.register(owner, os.getpid(), socket.gethostname())
        p1, p2 = "/home/dev/alpha", "/home/dev/beta"
        ids = {label: f"019c0000-0000-7000-8000-00000000000{i}" for i, label in
               enumerate(["done", "error", "dead", "running", "skipped", "stale", "waiting"])}  # fmt: skip
        for label, thread_id in ids.items():
            project = p1 if label in ("done", "stale", "waiting") else p2
            await _record(store, _thread(thread_id, project, now=now, reason="source:exec" if label == "skipped" else None))
        await store.projects.ensure(p1, "/memory/alpha")
        await store.projects.ensure(p2, "/memory/beta")
        for label in ("done", "stale", "error", "dead", "running"):
            await store.jobs.upsert_extract(ids[label], 100 if label != "stale" else 50, priority=now - 3600)
        labels = {thread_id: label for label, thread_id in ids.items()}
        for _ in range(5):
            job = await store.jobs.claim("extract", owner, 900)
            assert job is not None
            label = labels[job.key]
            if label in ("done", "stale"):  # stale's memory covers 50 of the thread's 100 bytes
                assert await store.jobs.finish_extract(job, _memory(job.key, p1, job.input_watermark, now))
            elif label == "error":
                assert await store.jobs.fail(job, "ExtractorError: the model returned malformed JSON", now + 60, dead=False)
            elif label == "dead":
                assert await store.jobs.fail(job, "MemoryWriteError: disk full (ENOSPC)", None, dead=True)
            # "running" keeps its claim
        token = await store.leases.acquire(f"consolidate:{p1}", owner, 600)
        assert token is not None
        assert await store.projects.mark_consolidated(p1, 2, f"consolidate:{p1}", owner, token)
        assert await store.leases.release(f"consolidate:{p1}", owner, token)
        token2 = await store.leases.acquire(f"consolidate:{p2}", owner, 600)
        assert token2 is not None
        assert await store.projects.mark_failed(p2, "exit_code 3: boom", f"consolidate:{p2}", owner, token2)
        fault = {"at": "2026-01-02T03:04:05Z", "event": "claim_failed", "error": "database is locked: ..."}
        await store.meta.set("last_fault", json.dumps(fault))
        await store.usage.record_usage("extract", "gpt-5", 1000, 200, 0)
        clock.advance(-2 * 86_400)
        await store.usage.record_usage("extract", "gpt-5", 5000, 5000, 0)  # two days ago: not today
    finally:
        await store.close()
    return ids


def test_status_json_keys_and_states(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMD_DAILY_TOKEN_BUDGET", "5000")
    owner = make_owner()
    ids = asyncio.run(_known_state(default_state_dir() / "memd.sqlite3", owner))
    capsys.readouterr()  # the store's own log lines

    assert main(["status", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"extractor", "threads", "projects", "jobs", "leases"} <= set(report)
    assert report["extractor"] == "offline"
    states = {row["id"]: row["state"] for row in report["threads"]}
    assert states == {thread_id: label for label, thread_id in ids.items()}
    for row in report["threads"]:
        assert THREAD_KEYS <= set(row)
    skipped = next(r for r in report["threads"] if r["id"] == ids["skipped"])
    assert (skipped["eligible"], skipped["reason"], skipped["source"]) == (False, "source:exec", "exec")
    error = next(r for r in report["threads"] if r["id"] == ids["error"])
    assert error["last_error"] == "ExtractorError: the model returned malformed JSON"

    projects = {row["project"]: row for row in report["projects"]}
    assert all(PROJECT_KEYS <= set(row) for row in projects.values())
    alpha, beta = projects["/home/dev/alpha"], projects["/home/dev/beta"]
    assert (alpha["memory_root"], alpha["traces"], alpha["last_error"]) == ("/memory/alpha", 2, None)
    assert alpha["last_consolidated_at"] is not None and alpha["fresh"] is True
    assert (beta["last_consolidated_at"], beta["last_error"], beta["fresh"]) == (None, "exit_code 3: boom", True)

    jobs = {(j["kind"], j["key"]): j for j in report["jobs"]}
    failed = jobs[("extract", ids["error"])]
    assert failed["status"] == "error" and failed["retry_at"] and failed["attempts"] == 1
    assert jobs[("extract", ids["dead"])]["last_error"] == "MemoryWriteError: disk full (ENOSPC)"
    running = jobs[("extract", ids["running"])]
    assert running["status"] == "running" and running["owner"] == owner and running["age_s"] >= 0
    leases = {lease["name"]: lease for lease in report["leases"]}
    assert leases["consolidate:/home/dev/beta"]["held"] is True and leases["consolidate:/home/dev/beta"]["owner"] == owner
    assert leases["consolidate:/home/dev/alpha"]["held"] is False and leases["consolidate:/home/dev/alpha"]["fencing_token"] == 1

    assert report["daemon"]["running"] is True and report["daemon"]["pid"] == os.getpid()
    assert report["daemon"]["uptime_s"] >= 0
    assert report["usage"]["tokens_today"] == 1200 and report["usage"]["daily_token_budget"] == 5000
    assert report["last_fault"] == {"at": "2026-01-02T03:04:05Z", "event": "claim_failed", "error": "database is locked: ..."}
    totals = report["totals"]
    assert (totals["queue_depth"], totals["running"], totals["error"], totals["dead"]) == (1, 1, 1, 1)

    assert main(["status"]) == 0
    text = capsys.readouterr().out
    assert f"daemon: running (pid {os.getpid()}" in text
    assert "tokens today: 1200 / 5000" in text
    assert f"dead  extract {ids['dead']} attempts 1: MemoryWriteError: disk full (ENOSPC)" in text
    assert f"error extract {ids['error']} attempts 1 (retry at " in text
    assert f"extract {ids['running']} age " in text and f"owner {owner}" in text
    assert "last consolidation failed: exit_code 3: boom" in text
    assert "last fault survived: 2026-01-02T03:04:05Z claim_failed: database is locked: ..." in text
    assert f"consolidate:/home/dev/beta held by {owner}" in text


def test_status_shows_a_killed_daemon_as_not_running(capsys: pytest.CaptureFixture[str]) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()  # reaped: its pid no longer exists

    async def register() -> None:
        store = await Store.open(default_state_dir() / "memd.sqlite3", clock=FakeClock(time.time()))
        try:
            await store.daemons.register("host:1:dead", gone.pid, socket.gethostname())  # kill -9: never unregistered
        finally:
            await store.close()

    asyncio.run(register())
    capsys.readouterr()
    assert main(["status", "--json"]) == 0
    daemon = json.loads(capsys.readouterr().out)["daemon"]
    assert daemon["running"] is False and daemon["last_pid"] == gone.pid and daemon["stopped_at"] is None
    assert main(["status"]) == 0
    assert f"daemon: not running (last: pid {gone.pid}" in capsys.readouterr().out


def test_daemon_alive_rules() -> None:
    now = 1_800_000_000.0
    here = socket.gethostname()
    me = DaemonRecord(owner="a", pid=os.getpid(), host=here, started_at=now - 60, heartbeat_at=now - 10, stopped_at=None)
    assert daemon_alive(me, now)
    assert not daemon_alive(DaemonRecord(**{**_fields(me), "stopped_at": now}), now)
    assert not daemon_alive(DaemonRecord(**{**_fields(me), "heartbeat_at": now - 121}), now)
    # On another host the process cannot be checked: the heartbeat decides.
    assert daemon_alive(DaemonRecord(**{**_fields(me), "host": "elsewhere", "pid": 999_999_999}), now)
    assert not pid_alive(0)


def _fields(record: DaemonRecord) -> dict[str, object]:
    return {name: getattr(record, name) for name in DaemonRecord.__dataclass_fields__}
