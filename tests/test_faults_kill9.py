"""The ``kill -9`` harness (SPEC §13, issue 5): memd killed at random moments loses nothing and
duplicates nothing.

``memd run`` (with a slow extractor, :mod:`tests.slow_memd`) works through a synthetic corpus of
200 rollouts; at seeded random moments the harness sends ``SIGKILL`` and starts memd again, at
least 20 times. Kills land during start-up (migration, scan), while extractions are in flight,
while consolidation subprocesses run, and while idle. Then memd runs undisturbed until every
eligible thread has its memory and every project is consolidated, is stopped with SIGTERM (exit
0), and :func:`tests.faultkit.check_invariants` checks the result.

Why ``max_traces_per_project`` is 10 000 here: the prune step of consolidation deletes trace
files beyond the newest N on purpose; with N above the corpus size every ``memories`` row with a
path must keep exactly one trace file, the strongest form of "nothing lost".

Leases are short (3 s) so that the claims and consolidation leases a killed daemon held expire
quickly, as they would after ``extract_lease_s`` / ``consolidation.lease_s`` in production.
"""

from __future__ import annotations

import functools
import json
import os
import random
import time
from pathlib import Path

import pytest

from memd.bench.corpus import SMALL_SIZE_MIX, generate_corpus
from tests import faultkit as fk

KILLS = 20
#: The harness is deterministic for a seed (kill moments, corpus); another seed explores others:
#: ``MEMD_KILL9_SEED=7 pytest tests/test_faults_kill9.py -s``.
SEED = int(os.environ.get("MEMD_KILL9_SEED", "20260521"))


def _started(log_path: Path) -> bool:
    return bool(fk.named(fk.events(log_path), "daemon_started"))


def _moment(evts: list[dict]) -> str:
    """What the killed daemon was doing, from its log."""
    names = [e.get("event") for e in evts]
    if "daemon_started" not in names:
        return "start-up"
    in_flight = len([n for n in names if n == "extract_started"]) - len(
        [n for n in names if n in ("extract_done", "extract_failed", "extract_released")]
    )
    consolidating = len([n for n in names if n == "consolidate_started"]) - len(
        [n for n in names if n in ("consolidate_done", "consolidate_failed")]
    )
    if in_flight > 0 and consolidating > 0:
        return "extracting+consolidating"
    if in_flight > 0:
        return "extracting"
    if consolidating > 0:
        return "consolidating"
    return "idle"


@pytest.mark.timeout(300)
def test_kill9_at_random_moments_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    started = time.monotonic()
    home = fk.make_home(
        tmp_path,
        extract_lease_s=3,
        extract_concurrency=4,
        shutdown_grace_s=5,
        consolidation__lease_s=3,
        consolidation__delay_s=0,
        consolidation__min_interval_s=1,
        consolidation__max_traces_per_project=10_000,
    )
    manifest = generate_corpus(home.sessions, n_files=200, size_mix=SMALL_SIZE_MIX, seed=SEED)
    assert len(manifest.files) == 200
    delay = {"MEMD_TEST_EXTRACT_DELAY_S": "0.2"}
    rng = random.Random(SEED)

    moments: dict[str, int] = {}
    for cycle in range(KILLS):
        proc = fk.start(home, f"cycle{cycle:02d}", env=delay)
        try:
            if cycle % 2:  # half the kills aim at a daemon that is up, however slow start-up is on a loaded machine
                fk.wait_for(functools.partial(_started, home.log_path(f"cycle{cycle:02d}")), 60, procs=[proc])
            time.sleep(rng.uniform(0.2, 2.0))
            assert proc.poll() is None, f"memd exited on its own (code {proc.returncode}) in cycle {cycle}"
        finally:
            fk.kill(proc)
        moment = _moment(fk.events(home.log_path(f"cycle{cycle:02d}")))
        moments[moment] = moments.get(moment, 0) + 1
    memories_after_kills = fk.count(home, "SELECT COUNT(*) FROM memories")

    final = fk.start(home, "final", env=delay)
    try:
        # The killed runs may have finished everything already: SIGTERM only once memd is up.
        def is_up() -> bool:
            return bool(fk.named(fk.events(home.log_path("final")), "daemon_started"))

        assert fk.wait_for(is_up, 60, procs=[final]), "memd did not start"
        assert fk.wait_for(lambda: fk.all_done(home), 150, procs=[final]), "memd did not finish after the kills"
        assert fk.stop(final) == 0
    finally:
        fk.kill(final)
    figures = fk.check_invariants(home)

    logs = [home.log_path(f"cycle{c:02d}") for c in range(KILLS)] + [home.log_path("final")]
    all_events = [e for path in logs for e in fk.events(path)]
    done_per_thread: dict[str, int] = {}
    for event in fk.named(all_events, "extract_done"):
        done_per_thread[event["thread_id"]] = done_per_thread.get(event["thread_id"], 0) + 1
    extracted_twice = sorted(t for t, n in done_per_thread.items() if n > 1)
    assert extracted_twice == [], f"threads committed more than once: {extracted_twice[:5]}"
    final_events = fk.events(home.log_path("final"))
    assert fk.named(final_events, "daemon_stopped")
    assert not [e for e in final_events if e.get("level") in ("error", "critical")], [
        e for e in final_events if e.get("level") in ("error", "critical")
    ][:3]

    report = {
        "kills": KILLS,
        "kill_moments": moments,
        "rollouts": len(manifest.files),
        "eligible_threads": figures.eligible,
        "memories_after_kills": memories_after_kills,
        "memories": figures.memories,
        "trace_files": figures.trace_files,
        "projects": figures.projects,
        "lost": figures.lost,
        "duplicated": figures.duplicated + len(extracted_twice),
        "claims_reclaimed": len(fk.named(all_events, "job_reclaimed")),
        "recoveries": len(fk.named(all_events, "memory_recovered")),
        "runtime_s": round(time.monotonic() - started, 1),
    }
    (tmp_path / "kill9-figures.json").write_text(json.dumps(report, indent=2))
    print("kill -9 harness:", json.dumps(report))
    # Eligible by construction (SPEC §4): an interactive source, a user message, memory not disabled.
    expected = [
        f for f in manifest.files
        if f.source_kind in ("cli", "vscode", "unknown") and f.user_messages and f.memory_mode != "disabled"
    ]
    assert figures.eligible == len(expected) >= 150
    assert sum(moments.values()) == KILLS and moments.get("extracting", 0) + moments.get("extracting+consolidating", 0) >= 1
