"""``memd status``: the operator's view, built from the store (SPEC §10).

:func:`collect_status` returns a plain JSON-ready dict whose keys are fixed by SPEC §10 and
documented in the README (scripts depend on them); :func:`render_status` turns it into text.
"""

from __future__ import annotations

import asyncio
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from memd.clock import Clock, iso_utc
from memd.extract.redact import redact_many
from memd.store.daemons import daemon_alive
from memd.store.records import JobKind, JobStatus
from memd.store.store import Store


def _day_start(now_s: float) -> float:
    day = datetime.fromtimestamp(now_s, tz=UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return day.timestamp()


def _thread_state(eligible: bool, job: Any, memory_watermark: int | None, watermark: int) -> str:
    if job is not None and job.status in (JobStatus.PENDING, JobStatus.RUNNING, JobStatus.ERROR, JobStatus.DEAD):
        return job.status
    if memory_watermark is not None and memory_watermark >= watermark:
        return "done"
    if memory_watermark is not None:
        return "stale"
    return "waiting" if eligible else "skipped"


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


async def collect_status(
    store: Store, clock: Clock, *, extractor: str, extractor_reason: str, daily_token_budget: int
) -> dict[str, Any]:
    """Gather the status report.

    Returns:
        A dict with the SPEC §10 keys ``extractor``, ``threads``, ``projects``, ``jobs`` and
        ``leases``, plus ``daemon``, ``totals``, ``usage`` and ``last_fault`` (the newest
        infrastructure fault a daemon survived — ``{"at", "event", "error"}`` — or ``None``),
        documented in the README.
        Times are ISO-8601 UTC strings; durations are seconds.
    """
    now = clock.now()
    threads = await store.threads.list_all()
    jobs = await store.jobs.list_all()
    extract_jobs = {j.key: j for j in jobs if j.kind is JobKind.EXTRACT}
    memories = await store.memories.watermarks()
    projects = await store.projects.list_all()
    leases = await store.leases.list_all()
    daemons = await store.daemons.list_all()
    tokens_today = await store.usage.tokens_since(_day_start(now))
    pause = await store.meta.get("model_pause")
    fault = await store.meta.get("last_fault")

    live = [d for d in daemons if daemon_alive(d, now)]
    daemon = None
    if live:
        newest = max(live, key=lambda d: d.started_at)
        daemon = {
            "running": True,
            "pid": newest.pid,
            "host": newest.host,
            "owner": newest.owner,
            "started_at": _iso(newest.started_at),
            "uptime_s": round(now - newest.started_at, 1),
            "heartbeat_at": _iso(newest.heartbeat_at),
            "count": len(live),
        }
    elif daemons:
        last = daemons[0]  # most recently started
        daemon = {
            "running": False,
            "last_pid": last.pid,
            "last_host": last.host,
            "last_heartbeat_at": _iso(last.heartbeat_at),
            "stopped_at": _iso(last.stopped_at),
        }
    thread_rows = []
    for t in threads:
        job = extract_jobs.get(t.id)
        thread_rows.append(
            {
                "id": t.id,
                "project": t.project,
                "cwd": t.cwd,
                "agent": str(t.agent),
                "source": t.source,
                "user_messages": t.user_messages,
                "eligible": bool(t.eligible),
                "reason": str(t.reason) if t.reason is not None else None,
                "state": _thread_state(bool(t.eligible), job, memories.get(t.id), t.watermark),
                "title": t.title,
                "updated_at": _iso(t.updated_at),
                "watermark": t.watermark,
                "skipped_lines": t.skipped_lines,
                "attempts": job.attempts if job else 0,
                "last_error": job.last_error if job else None,
            }
        )
    usage_counts = await asyncio.to_thread(_usage_counts, store.path)
    trace_counts: dict[str, int] = {}
    for project in projects:
        trace_counts[project.project] = sum(1 for m in await store.memories.list_for_project(project.project) if m.path)
    project_rows = [
        {
            "project": p.project,
            "memory_root": p.memory_root,
            "traces": trace_counts.get(p.project, 0),
            "usage_count": usage_counts.get(p.project, 0),
            "last_consolidated_at": _iso(p.last_consolidated_at),
            "last_memory_at": _iso(p.last_memory_at),
            "fresh": p.consolidated_seq >= p.memory_seq,
            "last_error": p.last_error,
        }
        for p in projects
    ]
    job_rows = [
        {
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
        for j in jobs
    ]
    lease_rows = [
        {
            "name": lease.name,
            "owner": lease.owner,
            "fencing_token": lease.fencing_token,
            "expires_at": _iso(lease.expires_at),
            "held": lease.owner is not None and lease.expires_at > now,
        }
        for lease in leases
    ]
    by_status: dict[str, int] = {}
    for j in jobs:
        by_status[j.status] = by_status.get(j.status, 0) + 1
    last_fault = _fault(fault)
    _redact_fields(
        [(row, "title") for row in thread_rows]
        + [(row, "last_error") for rows in (thread_rows, project_rows, job_rows) for row in rows]
        + ([(last_fault, "error")] if last_fault else [])
    )
    return {
        "extractor": extractor,
        "extractor_reason": extractor_reason,
        "daemon": daemon or {"running": False},
        "totals": {
            "threads": len(threads),
            "eligible": sum(1 for t in threads if t.eligible),
            "memories": len(memories),
            "queue_depth": by_status.get("pending", 0) + by_status.get("error", 0),
            "running": by_status.get("running", 0),
            "error": by_status.get("error", 0),
            "dead": by_status.get("dead", 0),
        },
        "usage": {
            "tokens_today": tokens_today,
            "daily_token_budget": daily_token_budget,
            "model_paused": pause or None,
        },
        "last_fault": last_fault,
        "threads": thread_rows,
        "projects": project_rows,
        "jobs": job_rows,
        "leases": lease_rows,
    }


def _short(text: str | None, width: int) -> str:
    text = text or "-"
    return text if len(text) <= width else "…" + text[-(width - 1) :]


def render_status(report: dict[str, Any]) -> str:
    """Render the report as text for a person (the JSON form is for scripts)."""
    lines: list[str] = []
    d = report["daemon"]
    if d.get("running"):
        others = f", {d['count'] - 1} more" if d.get("count", 1) > 1 else ""
        lines.append(f"daemon: running (pid {d['pid']} on {d['host']}, up {d['uptime_s']:.0f} s{others})")
    elif d.get("last_pid"):
        how = (
            f"stopped at {d['stopped_at']}" if d.get("stopped_at") else f"died; last heartbeat {d['last_heartbeat_at']}"
        )
        lines.append(f"daemon: not running (last: pid {d['last_pid']} on {d['last_host']}, {how})")
    else:
        lines.append("daemon: not running")
    lines.append(f"extractor: {report['extractor']} ({report['extractor_reason']})")
    t = report["totals"]
    lines.append(
        f"threads: {t['threads']} ({t['eligible']} eligible) · memories: {t['memories']} · "
        f"queue: {t['queue_depth']} · running: {t['running']} · errors: {t['error']} · dead: {t['dead']}"
    )
    u = report["usage"]
    budget = u["daily_token_budget"] or "unlimited"
    lines.append(f"tokens today: {u['tokens_today']} / {budget}")
    if u.get("model_paused"):
        lines.append(f"model work paused: {u['model_paused']}")
    fault = report.get("last_fault")
    if fault:
        lines.append(f"last fault survived: {fault.get('at')} {fault.get('event')}: {fault.get('error')}")
    if report["threads"]:
        lines.append("")
        lines.append(f"{'THREAD':<38} {'AGENT':<6} {'SOURCE':<16} {'MSGS':>4} {'STATE':<8} {'PROJECT / REASON'}")
        for row in report["threads"]:
            extra = row["project"] if row["eligible"] else f"{row['project']}  [{row['reason']}]"
            lines.append(
                f"{_short(row['id'], 38):<38} {row['agent']:<6} {_short(row['source'], 16):<16} "
                f"{row['user_messages']:>4} {row['state']:<8} {extra}"
            )
    running = [j for j in report["jobs"] if j["status"] == "running"]
    if running:
        lines.append("")
        lines.append("running jobs:")
        for j in running:
            lines.append(
                f"  {j['kind']} {j['key']} age {j['age_s']} s owner {j['owner']} lease until {j['lease_until']}"
            )
    failed = [j for j in report["jobs"] if j["status"] in ("error", "dead")]
    if failed:
        lines.append("")
        lines.append("errors:")
        for j in failed:
            retry = f" (retry at {j['retry_at']})" if j["status"] == "error" and j.get("retry_at") else ""
            lines.append(
                f"  {j['status']:<5} {j['kind']} {j['key']} attempts {j['attempts']}{retry}: {j['last_error']}"
            )
    if report["projects"]:
        lines.append("")
        lines.append("projects:")
        for p in report["projects"]:
            fresh = "fresh" if p["fresh"] else "pending consolidation"
            last = p["last_consolidated_at"] or "never"
            used = f", used {p['usage_count']} times" if p.get("usage_count") else ""
            lines.append(f"  {p['project']}: {p['traces']} traces{used}, last consolidated {last} ({fresh})")
            lines.append(f"    {p['memory_root']}")
            if p.get("last_error"):
                lines.append(f"    last consolidation failed: {p['last_error']}")
    held = [lease for lease in report["leases"] if lease["held"]]
    if held:
        lines.append("")
        lines.append("leases:")
        for lease in held:
            lines.append(
                f"  {lease['name']} held by {lease['owner']} until {lease['expires_at']}"
                f" (fencing token {lease['fencing_token']})"
            )
    return "\n".join(lines) + os.linesep
