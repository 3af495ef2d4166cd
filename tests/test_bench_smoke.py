"""The benchmark harness (memd.bench.harness) end to end on a tiny workload.

No timed assertions: the figures are checked for presence and finiteness only.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from pathlib import Path

from structlog.testing import capture_logs

from memd.bench import harness
from memd.bench.harness import FIGURE_KEYS, BenchSizes, Figure
from memd.config import Settings, load_settings
from memd.daemon import build_components

TINY = BenchSizes(
    append_rollout_bytes=1_000_000,
    append_repeats=3,
    index_files=20,
    corpus_files=10,
    pool_jobs=8,
    pool_concurrency=4,
    pool_latency_s=0.02,
    idle_settle_s=0.3,
    idle_window_s=2.0,
    large_rollout_bytes=3_000_000,
    scale_small=30,
    scale_large=60,
    scale_settle_s=1.0,
    scale_window_s=2.0,
)

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


async def gather_pool(n_jobs: int, concurrency: int, latency_s: float) -> float:
    """A trivial worker pool: ``n_jobs`` sleeps of ``latency_s``, ``concurrency`` at a time."""
    slots = asyncio.Semaphore(concurrency)

    async def job() -> None:
        async with slots:
            await asyncio.sleep(latency_s)

    t0 = time.perf_counter()
    await asyncio.gather(*(job() for _ in range(n_jobs)))
    return time.perf_counter() - t0


def bench_settings(tmp_path: Path) -> Settings:
    """Settings the bench overrides per figure (paths and limits); here in a scratch folder."""
    return load_settings(None, {"state_dir": tmp_path / "state", "memory_dir": tmp_path / "memory"})


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def test_run_bench_writes_every_key(tmp_path: Path) -> None:
    lines: list[str] = []
    json_path = tmp_path / "out" / "bench.json"
    result = harness.run_bench(
        quick=True,
        json_path=json_path,
        workdir=tmp_path / "work",
        out=lines.append,
        settings=bench_settings(tmp_path),
        factory=build_components,
        run_pool=gather_pool,
        daemon_argv=SLEEPER,
        sizes=TINY,
    )
    doc = json.loads(json_path.read_text())
    for key in FIGURE_KEYS:
        for k in (key, f"baseline_{key}"):
            assert k in doc and k in result, k
            assert doc[k] is None or _is_number(doc[k]), (k, doc[k])
            assert doc[k] == result[k]
        assert isinstance(doc["notes"][key], str)
    assert doc["quick"] is True and doc["sizes"]["index_files"] == 20

    # Components that exist give numbers.
    assert _is_number(doc["pool_efficiency"]) and _is_number(doc["baseline_pool_efficiency"])
    assert _is_number(doc["idle_cpu_s_per_10min"]) and doc["idle_cpu_s_per_10min"] >= 0
    assert _is_number(doc["rss_mb"]) and doc["rss_mb"] > 0
    assert _is_number(doc["baseline_index_cold_s_per_10k"])
    assert "scaled" in doc["notes"]["index_cold_s_per_10k"]
    assert _is_number(doc["append_1k_ms"]) and _is_number(doc["baseline_append_1k_ms"])
    for key in ("input_build_mb_s", "input_ratio_synthetic"):
        assert _is_number(doc[key]) and 0 < doc[key], key
    assert doc["baseline_input_ratio_synthetic"] == 1.0
    real = harness.default_real_dir()
    if (real.parent / "claude").is_dir():
        assert _is_number(doc["input_ratio_real_claude"]) and doc["input_ratio_real_claude"] <= 1 / 3
    if real.is_dir():
        assert _is_number(doc["input_ratio_real"])
    else:
        assert (
            doc["input_ratio_real"] is None
            and "not available" in doc["notes"]["input_ratio_real"]
        )
    assert _is_number(doc["index_cold_s_per_10k"]) and _is_number(doc["index_warm_s_per_10k"])
    assert _is_number(doc["peak_rss_large_mb"]) and _is_number(doc["baseline_peak_rss_large_mb"])
    assert doc["peak_rss_large_mb"] > 0 and "3 MB rollout" in doc["notes"]["peak_rss_large_mb"]
    # The scale figures are named after the history sizes really measured (30 and 60 sessions);
    # the SPEC's 20k keys stay empty and say why.
    for key in ("extract_ms_per_session_30", "extract_ms_per_session_60", "extract_ms_ratio_60_30"):
        assert _is_number(doc[key]) and doc[key] > 0, (key, doc["notes"].get(key))
    assert _is_number(doc["idle_cpu_s_per_10min_60"]) and doc["idle_cpu_s_per_10min_60"] >= 0
    assert _is_number(doc["status_json_peak_rss_mb_60"]) and doc["status_json_peak_rss_mb_60"] > 0
    assert _is_number(doc["consolidate_ms_per_project"]) and "60 sessions" in doc["notes"]["consolidate_ms_per_project"]
    assert doc["idle_cpu_s_per_10min_20k"] is None and "not measured" in doc["notes"]["idle_cpu_s_per_10min_20k"]

    table = "\n".join(lines)
    for key in FIGURE_KEYS:
        assert key in table
    assert "baseline" in table and "target" in table


def test_missing_components_report_none_with_a_reason(tmp_path: Path) -> None:
    (idle_cpu, rss) = harness.bench_idle(
        ["/nonexistent/memd-daemon"], tmp_path, settle_s=0.1, window_s=0.1
    )
    assert idle_cpu.value is None and rss.value is None
    assert "not found" in idle_cpu.note

    (pool,) = harness.bench_pool(None, n_jobs=4, concurrency=2, latency_s=0.01)
    assert pool.value is None and "run_pool" in pool.note

    (ratio,) = harness.bench_input_ratio_real(tmp_path / "absent")
    assert ratio.value is None and "not available" in ratio.note
    (claude_ratio,) = harness.bench_input_ratio_real_claude(tmp_path / "absent")
    assert claude_ratio.value is None and "not available" in claude_ratio.note

    from memd.bench.corpus import SMALL_SIZE_MIX, generate_corpus

    manifest = generate_corpus(tmp_path / "s", n_files=3, size_mix=SMALL_SIZE_MIX)
    cold, warm = harness.bench_index(
        manifest.paths, [manifest.root], index_fn=None, state_dir=tmp_path / "state"
    )
    assert cold.value is None and warm.value is None and "index_fn" in cold.note
    assert _is_number(cold.baseline)


def test_daemon_that_exits_early_is_reported(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "import sys; sys.stderr.write('boom: no config'); sys.exit(3)"]
    idle_cpu, _ = harness.bench_idle(argv, tmp_path, settle_s=0.5, window_s=1.0)
    assert idle_cpu.value is None
    assert "exited with code 3" in idle_cpu.note and "boom: no config" in idle_cpu.note


def test_index_fn_is_called_cold_then_warm(tmp_path: Path) -> None:
    from memd.bench.corpus import SMALL_SIZE_MIX, generate_corpus

    manifest = generate_corpus(tmp_path / "s", n_files=4, size_mix=SMALL_SIZE_MIX)
    calls: list[tuple[list[Path], Path, bool]] = []

    async def index(roots: list[Path], state_dir: Path) -> None:
        calls.append((roots, state_dir, (state_dir / "marker").exists()))
        state_dir.mkdir(parents=True, exist_ok=True)
        (state_dir / "marker").touch()

    cold, warm = harness.bench_index(
        manifest.paths, [manifest.root], index_fn=index, state_dir=tmp_path / "state"
    )
    # Two cold runs on empty states, then two warm runs on the last cold run's state.
    assert [c[2] for c in calls] == [False, False, True, True]
    assert calls[0][1] != calls[1][1] and calls[1][1] == calls[2][1] == calls[3][1]
    assert all(c[0] == [manifest.root] for c in calls)
    assert _is_number(cold.value) and _is_number(warm.value)
    assert "×2500" in cold.note


def test_a_failing_figure_does_not_stop_the_run(tmp_path: Path) -> None:
    def broken_pool(n_jobs: int, concurrency: int, latency_s: float) -> float:
        raise RuntimeError("pool exploded")

    with capture_logs() as logs:
        result = harness.run_bench(
            quick=True,
            json_path=None,
            workdir=tmp_path,
            out=lambda _line: None,
            index_fn=None,
            run_pool=broken_pool,
            daemon_argv=None,
            real_dir=None,
            sizes=TINY,
        )
    assert result["pool_efficiency"] is None
    failed = [e for e in logs if e["event"] == "bench_figure_failed"]
    assert len(failed) == 1 and "pool exploded" in failed[0]["error"]
    assert result["idle_cpu_s_per_10min"] is None
    # Every SPEC key, plus the scale figures named after the sizes this run measured.
    sized = ["extract_ms_per_session_30", "extract_ms_per_session_60", "extract_ms_ratio_60_30"]
    sized += ["idle_cpu_s_per_10min_60", "status_json_peak_rss_mb_60"]
    keys = [*FIGURE_KEYS, *sized]
    assert set(result) == set(keys) | {f"baseline_{k}" for k in keys}


def test_table_marks_pass_and_miss() -> None:
    table = harness.format_table(
        [
            Figure("append_1k_ms", 3.0, 900.0, "ok"),
            Figure("rss_mb", 250.0, 9.0, ""),
            Figure("pool_efficiency", None),
        ]
    )
    rows = {line.split()[0]: line for line in table.splitlines()[2:]}
    assert " pass " in rows["append_1k_ms"]
    assert " miss " in rows["rss_mb"]
    assert " n/a " in rows["pool_efficiency"]


def test_real_pool_runs_every_job(tmp_path: Path) -> None:
    run_pool = harness.component_pool_fn(tmp_path, bench_settings(tmp_path), build_components)
    wall = asyncio.run(run_pool(6, 3, 0.01))
    assert _is_number(wall) and wall >= 2 * 0.01  # two rounds of sleeps at least
    (fig,) = harness.bench_pool(run_pool, n_jobs=6, concurrency=3, latency_s=0.01)
    assert _is_number(fig.value) and _is_number(fig.baseline)
    # Each run made its own state, and every job wrote its trace file.
    states = sorted(tmp_path.glob("pool-*"))
    assert len(states) == 3
    for state in states:
        assert len(list((state / "memory").rglob("trace_summaries/*.md"))) == 6


def test_a_childs_peak_rss_is_its_own_not_its_parents(tmp_path: Path) -> None:
    """wait4's ru_maxrss would report this process's ~300 MB; the child reports its own VmHWM."""
    import subprocess
    import sys

    from memd.bench.procfs import reported_peak_mb, self_reporting_memd_argv

    ballast = bytearray(300 << 20)
    ballast[:: 1 << 12] = b"\x01" * len(range(0, len(ballast), 1 << 12))  # touch every page
    report = tmp_path / "child.vmhwm"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": ":".join(sys.path)}
    subprocess.run(self_reporting_memd_argv(report, "--version"), cwd=tmp_path, env=env, check=True, capture_output=True)
    peak = reported_peak_mb(report)
    assert peak is not None and 5 < peak < 200, peak
    del ballast
