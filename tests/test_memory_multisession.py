"""A project over many sessions: real rollouts copied with new ids and dates (built in a temporary
folder at test time, never committed), one `memd once` per arriving session, traces pruned to two.

What must hold (SPEC §19): a preference stated in the first session survives the pruning of its
trace; "never" then "always" on the same subject resolves newer-wins with a note; the
verification sequence repeated across sessions becomes a skill; tasks are dated by the session.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from memd.config import ConsolidationSettings, Settings
from memd.daemon import Daemon
from memd.memory import files as memory_files
from tests.conftest import CODEX_ROLLOUTS, REPO_ROOT

POMODORO = CODEX_ROLLOUTS / "aisessions-codex-pomodor-timer.jsonl"
COMPACTION = CODEX_ROLLOUTS / "rollout-2026-05-11T11-26-55-019e1625-789d-76c0-80ab-3724b5ddb799.jsonl"
DAY0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)


def _shift(stamp: str, to: datetime, origin: datetime) -> str:
    moved = datetime.fromisoformat(stamp.replace("Z", "+00:00")) - origin + to
    return moved.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _copy(source: Path, sessions: Path, n: int, cwd: Path, *, add_to_request: str = "", request: int = 0) -> str:
    """Copy a real Codex rollout as session ``n``: a new id, dates moved to ``DAY0 + n`` days, the
    cwd set to ``cwd``, and ``add_to_request`` appended to the real request number ``request``."""
    thread_id = f"0a{n:06d}-0000-7000-8000-{n:012d}"
    lines = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    origin = datetime.fromisoformat(lines[0]["payload"]["timestamp"].replace("Z", "+00:00"))
    day = DAY0 + timedelta(days=n)
    first_request = None
    seen = 0
    for obj in lines:
        if "timestamp" in obj:
            obj["timestamp"] = _shift(obj["timestamp"], day, origin)
        payload = obj.get("payload", {})
        if obj.get("type") == "session_meta":
            payload.update(id=thread_id, timestamp=_shift(payload["timestamp"], day, origin), cwd=str(cwd))
        elif obj.get("type") == "turn_context" and "cwd" in payload:
            payload["cwd"] = str(cwd)
        elif obj.get("type") == "event_msg" and payload.get("type") == "user_message" and first_request is None:
            if not payload["message"].startswith(("<", "#")):
                seen += 1
                if seen > request:
                    first_request = payload["message"]
                    payload["message"] += add_to_request
    for obj in lines:  # the same request as the model saw it
        payload = obj.get("payload", {})
        if payload.get("type") == "message" and payload.get("role") == "user":
            for part in payload.get("content", []):
                if part.get("text") == first_request:
                    part["text"] += add_to_request
    folder = sessions / day.strftime("%Y/%m/%d")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"rollout-{day.strftime('%Y-%m-%dT%H-%M-%S')}-{thread_id}.jsonl"
    path.write_text("".join(json.dumps(obj) + "\n" for obj in lines))
    stamp = day.timestamp() + 3600
    os.utime(path, (stamp, stamp))
    return thread_id


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    if not POMODORO.is_file() or not COMPACTION.is_file():
        pytest.skip(f"real transcripts not available: {CODEX_ROLLOUTS} is absent")
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))  # the consolidation subprocess runs `python -m memd`
    return Settings(
        sessions=[tmp_path / "sessions"],
        state_dir=tmp_path / "state",
        memory_dir=tmp_path / "memory",
        min_idle_s=0,
        max_age_days=0,
        extractor="offline",
        consolidation=ConsolidationSettings(max_traces_per_project=2),
    )


async def test_memory_outlives_pruning_resolves_conflicts_and_grows_skills(tmp_path: Path, settings: Settings) -> None:
    project = tmp_path / "proj"
    project.mkdir()
    # (rollout, text added to a request, which request): 019e1625's first request is "show tools".
    plan = [
        (POMODORO, "\nNever use tabs for indentation.", 0),
        (COMPACTION, "", 1),
        (COMPACTION, "", 1),
        (COMPACTION, "\nAlways use tabs for indentation.", 1),
    ]
    daemon = await Daemon.open(settings)
    ids = []
    try:
        for n, (source, extra, request) in enumerate(plan):
            ids.append(_copy(source, tmp_path / "sessions", n, project, add_to_request=extra, request=request))
            summary = await daemon.once()  # one session arrives, is extracted, the project consolidated
            assert (summary.extracted, summary.failed, summary.consolidation_failed) == (1, 0, 0), n
    finally:
        await daemon.close()

    root = memory_files.project_root(settings.memory_dir, str(project))
    traces = sorted(p.name for p in (root / "trace_summaries").iterdir())
    assert len(traces) == 2 and not any(t.startswith(ids[0]) for t in traces), "pruned"
    memory = (root / "MEMORY.md").read_text()
    prefs = memory.split("## User preferences\n")[1].split("\n\n")[0].splitlines()
    # Stated only in the first session, whose trace is gone: still there, with its provenance.
    assert "- Don't use any external frameworks — keep it pure HTML, CSS, and JS. [0a000000 2026-03-01]" in prefs
    # "Never use tabs" (first session) against "Always use tabs" (last): newer wins, with a note.
    tabs = [p for p in prefs if "tabs" in p]
    assert len(tabs) == 1 and tabs[0].startswith('- Always use tabs for indentation. _(supersedes "Never use tabs')
    assert tabs[0].endswith("[0a000003 2026-03-04]")
    # The same checks in three sessions: counted once each, and a skill.
    verification = memory.split("## Verification\n")[1].split("\n\n")[0]
    assert "`npm run build`" in verification and "[0a000003 2026-03-04; 3 sessions]" in verification
    skill = root / "skills" / "verify_npm_test_npm_run" / "SKILL.md"
    text = skill.read_text()
    assert text.startswith('---\nname: "verify_npm_test_npm_run"\ndescription: "Verify a change in this project')
    assert "Sessions it came from: [0a000003 2026-03-04], [0a000002 2026-03-03] and 1 earlier session." in text
    # Tasks are dated by the session, newest first, each once.
    tasks = memory.split("## Recent tasks\n")[1].split("\n\n")[0].splitlines()
    assert tasks[0].startswith("- let's update the defailt context compart to 90 in env var — success")
    assert tasks[0].endswith("[0a000003 2026-03-04; 3 sessions]")
    assert tasks[-1] == "- add a Pause/Resume feature — uncertain [0a000000 2026-03-01]" or any(
        "Pomodoro" in t and "[0a000000 2026-03-01]" in t for t in tasks
    )
    bullets = [line.split(" [")[0] for line in memory.splitlines() if line.startswith("- ")]
    assert len(bullets) == len(set(bullets)), "no repeated bullet"
    assert len(memory.encode()) < 24_000
    assert len((root / "memory_summary.md").read_bytes()) <= 7_200
