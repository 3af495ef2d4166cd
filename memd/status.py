"""``memd status``: the operator's view, built from the store (SPEC §10).

Three text views for people and one JSON document for scripts:

* :func:`write_overview` (``memd status``) — the daemon, totals, the queue, problems (failed and
  dead jobs, failed consolidations, the last fault survived, a model pause), held leases, and the
  :data:`RECENT_PROJECTS` most recently active projects. Its length does not grow with history.
* :func:`write_threads` (``memd status --threads``) — every thread, newest activity first.
* :func:`write_project` (``memd status --project P``) — one project and its threads.
* :func:`write_json` (``memd status --json``) — one object whose keys are fixed by SPEC §10 and
  documented in the README (scripts depend on them). It is *streamed*: rows are read from the
  store a page at a time (:data:`PAGE_ROWS`) and written at once, so its memory does not grow with
  the number of threads.

Times are ISO-8601 UTC strings; durations are seconds.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from memd.clock import Clock, iso_utc
from memd.extract.redact import redact_many
from memd.store.daemons import daemon_alive
from memd.store.records import (
    DaemonRecord,
    JobRecord,
    JobStatus,
    ProjectActivity,
    ProjectRecord,
    ProjectStatus,
    ThreadStatus,
)
from memd.store.store import Store

#: Rows read from the store per query while streaming.
PAGE_ROWS = 500
#: Projects the overview shows.
RECENT_PROJECTS = 20
#: Failed or dead jobs (and failed projects) the overview lists; the rest are counted.
PROBLEM_ROWS = 20


def _day_start(now_s: float) -> float:
    day = datetime.fromtimestamp(now_s, tz=UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return day.timestamp()


def _fault(raw: str | None) -> dict[str, str] | None:
    try:
        value = json.loads(raw) if raw else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _redact_fields(fields: list[tuple[dict[str, Any], str]]) -> None:
    """Redact the text fields that may quote a session (titles, errors) in place, in one batch
    (SPEC §14: every text memd prints is redacted; rows stored before that rule are covered too)."""
    present = [(row, key) for row, key in fields if isinstance(row.get(key), str) and row[key]]
    if not present:
        return
    clean, count = redact_many([row[key] for row, key in present])
    if count:
        for (row, key), text in zip(present, clean, strict=True):
            row[key] = text


async def _redacted_rows(rows: AsyncIterator[dict[str, Any]], keys: Sequence[str]) -> AsyncIterator[dict[str, Any]]:
    """``rows`` with the text fields ``keys`` redacted, a page (:data:`PAGE_ROWS`) at a time."""
    batch: list[dict[str, Any]] = []
    async for row in rows:
        batch.append(row)
        if len(batch) >= PAGE_ROWS:
            _redact_fields([(r, key) for r in batch for key in keys])
            for done in batch:
                yield done
            batch = []
    _redact_fields([(r, key) for r in batch for key in keys])
    for done in batch:
        yield done


def _iso(ts: float | None) -> str | None:
    return iso_utc(ts) if ts else None


def _usage_counts(db_path: Path) -> dict[str, int]:
    """Uses of each project's memory by later sessions (memd MCP calls, Codex citations; SPEC §18)."""
    import sqlite3

    from memd.store.search import SearchIndex

    try:
        index = SearchIndex.open(db_path)
    except sqlite3.Error:
        return {}
    if index is None:
        return {}
    try:
        return index.usage_counts()
    except sqlite3.Error:
        return {}
    finally:
        index.close()


async def usage_counts(store: Store) -> dict[str, int]:
    """``{project: uses of its memory by later sessions}`` (one small query, off the event loop)."""
    return await asyncio.to_thread(_usage_counts, store.path)


def _daemon(daemons: Sequence[DaemonRecord], now: float) -> dict[str, Any]:
    live = [d for d in daemons if daemon_alive(d, now)]
    if live:
        newest = max(live, key=lambda d: d.started_at)
        return {
            "running": True,
            "pid": newest.pid,
            "host": newest.host,
            "owner": newest.owner,
            "started_at": _iso(newest.started_at),
            "uptime_s": round(now - newest.started_at, 1),
            "heartbeat_at": _iso(newest.heartbeat_at),
            "count": len(live),
        }
    if daemons:
        last = daemons[0]  # most recently started
        return {
            "running": False,
            "last_pid": last.pid,
            "last_host": last.host,
            "last_heartbeat_at": _iso(last.heartbeat_at),
            "stopped_at": _iso(last.stopped_at),
        }
    return {"running": False}


async def status_header(
    store: Store, clock: Clock, *, extractor: str, extractor_reason: str, daily_token_budget: int
) -> dict[str, Any]:
    """The small part of the report, read at once: ``extractor``, ``extractor_reason``,
    ``daemon``, ``totals``, ``usage`` and ``last_fault`` (see the README)."""
    now = clock.now()
    counts = await store.counts()
    header: dict[str, Any] = {
        "extractor": extractor,
        "extractor_reason": extractor_reason,
        "daemon": _daemon(await store.daemons.list_all(), now),
        "totals": {
            "threads": counts.threads,
            "eligible": counts.eligible,
            "memories": counts.memories,
            "queue_depth": counts.jobs_pending + counts.jobs_error,
            "running": counts.jobs_running,
            "error": counts.jobs_error,
            "dead": counts.jobs_dead,
        },
        "usage": {
            "tokens_today": await store.usage.tokens_since(_day_start(now)),
            "daily_token_budget": daily_token_budget,
            "model_paused": await store.meta.get("model_pause") or None,
        },
        "last_fault": _fault(await store.meta.get("last_fault")),
    }
    if header["last_fault"]:
        _redact_fields([(header["last_fault"], "error")])
    return header


# ------------------------------------------------------------------ rows (JSON shapes)


def thread_row(s: ThreadStatus) -> dict[str, Any]:
    """A ``threads`` entry of the JSON report."""
    t = s.thread
    return {
        "id": t.id,
        "project": t.project,
        "cwd": t.cwd,
        "agent": str(t.agent),
        "source": t.source,
        "user_messages": t.user_messages,
        "eligible": bool(t.eligible),
        "reason": str(t.reason) if t.reason is not None else None,
        "state": str(s.state),
        "title": t.title,
        "updated_at": _iso(t.updated_at),
        "watermark": t.watermark,
        "skipped_lines": t.skipped_lines,
        "attempts": s.attempts,
        "last_error": s.last_error,
    }


def project_row(s: ProjectStatus, usage_count: int) -> dict[str, Any]:
    """A ``projects`` entry of the JSON report."""
    p = s.project
    return {
        "project": p.project,
        "memory_root": p.memory_root,
        "traces": s.traces,
        "usage_count": usage_count,
        "last_consolidated_at": _iso(p.last_consolidated_at),
        "last_memory_at": _iso(p.last_memory_at),
        "fresh": p.consolidated_seq >= p.memory_seq,
        "last_error": p.last_error,
    }


def job_row(j: JobRecord, now: float) -> dict[str, Any]:
    """A ``jobs`` entry of the JSON report."""
    return {
        "kind": j.kind,
        "key": j.key,
        "status": j.status,
        "attempts": j.attempts,
        "owner": j.owner,
        "age_s": round(now - j.started_at, 1) if j.status is JobStatus.RUNNING and j.started_at else None,
        "lease_until": _iso(j.lease_until),
        "retry_at": _iso(j.retry_at),
        "last_error": j.last_error,
    }


async def iter_threads(store: Store, *, project: str | None = None) -> AsyncIterator[ThreadStatus]:
    """Every thread (of ``project``), newest activity first, read :data:`PAGE_ROWS` at a time."""
    after = None
    while True:
        page = await store.threads.status_page(after=after, limit=PAGE_ROWS, project=project)
        for row in page:
            yield row
        if len(page) < PAGE_ROWS:
            return
        after = (page[-1].thread.updated_at, page[-1].thread.id)


async def iter_projects(store: Store) -> AsyncIterator[ProjectStatus]:
    """Every project with its trace count, by project key, read :data:`PAGE_ROWS` at a time."""
    after = None
    while True:
        page = await store.projects.status_page(after=after, limit=PAGE_ROWS)
        for row in page:
            yield row
        if len(page) < PAGE_ROWS:
            return
        after = page[-1].project.project


async def iter_jobs(store: Store, *, status: JobStatus | None = None) -> AsyncIterator[JobRecord]:
    """Every job (in ``status``), by kind and key, read :data:`PAGE_ROWS` at a time."""
    after = None
    while True:
        page = await store.jobs.page(after=after, limit=PAGE_ROWS, status=status)
        for job in page:
            yield job
        if len(page) < PAGE_ROWS:
            return
        after = (str(page[-1].kind), page[-1].key)


# ------------------------------------------------------------------ JSON


async def write_json(
    store: Store, clock: Clock, out: TextIO, *, extractor: str, extractor_reason: str, daily_token_budget: int
) -> None:
    """Write the report as one JSON object to ``out``, streaming the long lists.

    Keys (SPEC §10, the README): ``extractor``, ``extractor_reason``, ``daemon``, ``totals``,
    ``usage``, ``last_fault`` (the newest fault a daemon survived — ``{"at", "event", "error"}``
    — or ``null``), then ``threads``, ``projects``, ``jobs`` and ``leases``, one entry per line.
    """
    now = clock.now()
    header = await status_header(
        store, clock, extractor=extractor, extractor_reason=extractor_reason, daily_token_budget=daily_token_budget
    )
    out.write("{\n")
    for key, value in header.items():
        out.write(f"  {json.dumps(key)}: {json.dumps(value)},\n")

    async def threads() -> AsyncIterator[dict[str, Any]]:
        async for s in iter_threads(store):
            yield thread_row(s)

    async def projects() -> AsyncIterator[dict[str, Any]]:
        used = await usage_counts(store)
        async for s in iter_projects(store):
            yield project_row(s, used.get(s.project.project, 0))

    async def jobs() -> AsyncIterator[dict[str, Any]]:
        async for j in iter_jobs(store):
            yield job_row(j, now)

    async def leases() -> AsyncIterator[dict[str, Any]]:
        for lease in await store.leases.list_all():
            yield {
                "name": lease.name,
                "owner": lease.owner,
                "fencing_token": lease.fencing_token,
                "expires_at": _iso(lease.expires_at),
                "held": lease.owner is not None and lease.expires_at > now,
            }

    lists = (
        ("threads", _redacted_rows(threads(), ("title", "last_error"))),
        ("projects", _redacted_rows(projects(), ("last_error",))),
        ("jobs", _redacted_rows(jobs(), ("last_error",))),
        ("leases", leases()),
    )
    for n, (key, rows) in enumerate(lists):
        out.write(f"  {json.dumps(key)}: [")
        first = True
        async for row in rows:
            out.write(("\n    " if first else ",\n    ") + json.dumps(row))
            first = False
        out.write("]" if first else "\n  ]")
        out.write(",\n" if n < len(lists) - 1 else "\n")
    out.write("}\n")


async def collect_status(
    store: Store, clock: Clock, *, extractor: str, extractor_reason: str, daily_token_budget: int
) -> dict[str, Any]:
    """The report of :func:`write_json` as one dict, for tools and tests in the same process.

    Its memory grows with the number of threads: ``memd status --json`` streams instead.
    """
    buffer = io.StringIO()
    await write_json(
        store,
        clock,
        buffer,
        extractor=extractor,
        extractor_reason=extractor_reason,
        daily_token_budget=daily_token_budget,
    )
    report: dict[str, Any] = json.loads(buffer.getvalue())
    return report


# ------------------------------------------------------------------ text


def _short(text: str | None, width: int) -> str:
    text = text or "-"
    return text if len(text) <= width else "…" + text[-(width - 1) :]


def _daemon_line(d: dict[str, Any]) -> str:
    if d.get("running"):
        others = f", {d['count'] - 1} more" if d.get("count", 1) > 1 else ""
        return f"daemon: running (pid {d['pid']} on {d['host']}, up {d['uptime_s']:.0f} s{others})"
    if d.get("last_pid"):
        stopped = d.get("stopped_at")
        how = f"stopped at {stopped}" if stopped else f"died; last heartbeat {d['last_heartbeat_at']}"
        return f"daemon: not running (last: pid {d['last_pid']} on {d['last_host']}, {how})"
    return "daemon: not running"


def _job_problem(j: JobRecord) -> str:
    retry = f" (retry at {_iso(j.retry_at)})" if j.status is JobStatus.ERROR and j.retry_at else ""
    return f"  {j.status:<5} {j.kind} {j.key} attempts {j.attempts}{retry}: {j.last_error}"


async def _problems(store: Store, header: dict[str, Any]) -> list[str]:
    """Lines about what needs a person: the last fault, a model pause, failed and dead jobs and
    failed consolidations (at most :data:`PROBLEM_ROWS` of each, the rest counted)."""
    lines: list[str] = []
    fault = header["last_fault"]
    if fault:
        lines.append(f"  last fault survived: {fault.get('at')} {fault.get('event')}: {fault.get('error')}")
    if header["usage"]["model_paused"]:
        lines.append(f"  model work paused: {header['usage']['model_paused']}")
    totals = header["totals"]
    for status, total in ((JobStatus.ERROR, totals["error"]), (JobStatus.DEAD, totals["dead"])):
        shown = 0
        async for job in iter_jobs(store, status=status):
            lines.append(_job_problem(job))
            shown += 1
            if shown == PROBLEM_ROWS:
                break
        if total > shown:
            lines.append(f"  ... and {total - shown} more {status} jobs (memd status --json)")
    failing, total = await store.projects.failing(PROBLEM_ROWS)
    for project in failing:
        lines.append(f"  {project.project}: last consolidation failed: {project.last_error}")
    if total > len(failing):
        lines.append(f"  ... and {total - len(failing)} more failing projects (memd status --json)")
    return redact_many(lines)[0] if lines else lines


def _project_lines(
    activity: ProjectActivity | None, status: ProjectStatus | None, name: str, usage_count: int
) -> list[str]:
    record: ProjectRecord | None = status.project if status else None
    threads = f"{activity.threads} threads, last active {_iso(activity.last_active_at)}" if activity else "no threads"
    if record is None:
        return [f"  {name}: {threads}, no memory yet"]
    fresh = "fresh" if record.consolidated_seq >= record.memory_seq else "pending consolidation"
    last = _iso(record.last_consolidated_at) or "never"
    used = f", used {usage_count} times" if usage_count else ""
    lines = [
        f"  {name}: {threads}; {status.traces if status else 0} traces{used}, last consolidated {last} ({fresh})",
        f"    {record.memory_root}",
    ]
    if record.last_error:
        lines.append(f"    last consolidation failed: {record.last_error}")
    return lines


async def write_overview(
    store: Store, clock: Clock, out: TextIO, *, extractor: str, extractor_reason: str, daily_token_budget: int
) -> None:
    """Write the overview for a person (``memd status``); its length does not grow with history."""
    now = clock.now()
    header = await status_header(
        store, clock, extractor=extractor, extractor_reason=extractor_reason, daily_token_budget=daily_token_budget
    )
    counts = await store.counts()
    t, u = header["totals"], header["usage"]
    lines = [
        _daemon_line(header["daemon"]),
        f"extractor: {header['extractor']} ({header['extractor_reason']})",
        f"threads: {t['threads']} ({t['eligible']} eligible) · memories: {t['memories']} · projects: {counts.projects}",
        f"queue: {counts.jobs_pending} pending · running: {t['running']} · errors: {t['error']} · dead: {t['dead']}",
        f"tokens today: {u['tokens_today']} / {u['daily_token_budget'] or 'unlimited'}",
    ]
    running = [j async for j in iter_jobs(store, status=JobStatus.RUNNING)]
    if running:
        lines += ["", "running jobs:"]
        for j in running:
            age = round(now - j.started_at, 1) if j.started_at else None
            lines.append(f"  {j.kind} {j.key} age {age} s owner {j.owner} lease until {_iso(j.lease_until)}")
    problems = await _problems(store, header)
    if problems:
        lines += ["", "problems:", *problems]
    held = [lease for lease in await store.leases.list_all() if lease.owner is not None and lease.expires_at > now]
    if held:
        lines += ["", "leases:"]
        for lease in held:
            lines.append(
                f"  {lease.name} held by {lease.owner} until {_iso(lease.expires_at)}"
                f" (fencing token {lease.fencing_token})"
            )
    recent = await store.threads.recent_projects(RECENT_PROJECTS)
    if recent:
        statuses = await store.projects.status_of([a.project for a in recent])
        used = await usage_counts(store)
        more = f" of {counts.projects}" if counts.projects > len(recent) else ""
        lines += ["", f"recently active projects ({len(recent)}{more}):"]
        for activity in recent:
            lines += _project_lines(
                activity, statuses.get(activity.project), activity.project, used.get(activity.project, 0)
            )
    lines += ["", "more: memd status --threads (every thread) · --project PATH (one project) · --json (scripts)"]
    out.write("\n".join(lines) + "\n")


def _thread_header() -> str:
    return f"{'THREAD':<38} {'AGENT':<6} {'SOURCE':<16} {'MSGS':>4} {'STATE':<8} {'UPDATED':<20} {'PROJECT / REASON'}"


def _thread_line(s: ThreadStatus) -> str:
    t = s.thread
    extra = t.project if t.eligible else f"{t.project}  [{t.reason}]"
    return (
        f"{_short(t.id, 38):<38} {t.agent:<6} {_short(t.source, 16):<16} {t.user_messages:>4} {s.state:<8} "
        f"{_iso(t.updated_at) or '-':<20} {extra}"
    )


async def write_threads(store: Store, out: TextIO, *, project: str | None = None) -> int:
    """Write every thread (of ``project``), newest activity first, one line each, streamed.

    Returns:
        How many threads were written.
    """
    n = 0
    async for s in iter_threads(store, project=project):
        if n == 0:
            out.write(_thread_header() + "\n")
        out.write(_thread_line(s) + "\n")
        n += 1
    return n


async def write_project(store: Store, out: TextIO, candidates: Sequence[str]) -> bool:
    """Write one project (``memd status --project P``): its memory and every thread of it.

    Args:
        store: the state store.
        out: where to write.
        candidates: project keys the user's argument may name, best first (the first one that
            has threads or a memory is shown).

    Returns:
        ``False`` (writing nothing) when none of ``candidates`` is a known project.
    """
    statuses = await store.projects.status_of(candidates)
    used = await usage_counts(store)
    for key in candidates:
        activity = await store.threads.project_activity(key)
        status = statuses.get(key)
        if activity is None and status is None:
            continue
        lines = _project_lines(activity, status, key, used.get(key, 0))
        out.write(f"project: {key}\n" + "\n".join(lines).replace("  ", "", 1) + "\n")
        if activity is not None:
            out.write("\n")
            await write_threads(store, out, project=key)
        return True
    return False
