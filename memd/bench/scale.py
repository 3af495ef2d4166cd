"""memd over a long history: cost proportional to change, not to history (SPEC §15, issue 14).

A heavy user gathers tens of thousands of sessions over years. This module builds such a history
synthetically and measures what must not grow with it:

* ``idle_cpu_s_per_10min_20k`` — CPU seconds per 10 minutes of an idle ``memd run`` over a state
  that has learned 20k sessions (nothing changes on disk while it is measured);
* ``extract_ms_per_session_1k`` / ``extract_ms_per_session_20k`` — ``memd once``'s extraction
  phase (claim, read, build the input, extract offline, commit) per extracted session, over 1k and
  20k sessions; their ratio must stay ≤ 1.2 (claims are indexed queries);
* ``consolidate_ms_per_project`` — ``memd once``'s consolidation phase per consolidated project
  (≈ 50 ms: the child's start-up is the overhead);
* ``status_json_peak_rss_mb_20k`` — peak RSS of ``memd status --json`` over the 20k state (the
  output is streamed, so it stays flat in the thread count).

The corpus (:func:`generate_scale_corpus`): small Codex rollouts (5–20 KB, every envelope variant
and source kind of :mod:`memd.bench.corpus`, exec and sub-agent sessions included), started over the
last three years, each file's mtime set to its last line (so the idle gate has passed), with cwds
spread over ``N / 20`` projects.

Every measurement runs memd as a child process (``python -m memd ...`` with ``PYTHONPATH`` set to
the code under test, isolated ``HOME`` / ``XDG_*``, offline, ``nice``), so the same driver measures
an older checkout for a before/after table::

    python -m memd.bench.scale --sizes 1000,5000,20000 --workdir /tmp/scale --code DIR --json out.json

Times are wall-clock milliseconds of phases read off ``memd once``'s own JSON log (event
timestamps), with the CPU seconds of the process tree over the same phases beside them (sampled
from ``/proc``; the machine may be shared, CPU time is the steadier figure).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from memd.bench import corpus
from memd.bench.child import isolated_env
from memd.bench.procfs import reported_peak_mb, self_reporting_memd_argv, tree_cpu_s, vm_hwm_mb

#: SPEC §15 targets of the scale figures: key -> (comparison, threshold).
SCALE_TARGETS: dict[str, tuple[str, float]] = {
    "idle_cpu_s_per_10min_20k": ("<=", 0.5),
    "extract_ms_per_session_1k": ("<=", math.inf),
    "extract_ms_per_session_20k": ("<=", math.inf),
    "extract_ms_ratio_20k_1k": ("<=", 1.2),
    "consolidate_ms_per_project": ("<=", 50.0),
    "status_json_peak_rss_mb_20k": ("<=", 100.0),
}
#: The figure keys this module reports, in table order.
SCALE_KEYS: tuple[str, ...] = tuple(SCALE_TARGETS)

#: Sessions per project in the synthetic history.
SESSIONS_PER_PROJECT = 20
#: The history spans this many days (three years).
SPAN_DAYS = 3 * 365.0
#: Name of the manifest written beside a generated corpus (lets a run reuse it).
MANIFEST = "scale-corpus.json"
#: CPU sampling period of the measured process tree, seconds.
SAMPLE_S = 0.25
#: ``nice`` increment for every measured child (the machine is shared).
NICE = 10


@dataclass(frozen=True, slots=True)
class ScaleCorpus:
    """A generated history.

    Attributes:
        root: the sessions root (Codex layout ``YYYY/MM/DD/rollout-*.jsonl``).
        sessions: rollout files written.
        projects: distinct cwds (``/home/dev/src/proj-NNNN``; not on disk, so each is its own
            project key).
        total_bytes: sum of the file sizes.
        seed: the seed used.
        now_s: the generation time; every session ended at least a day before it.
    """

    root: Path
    sessions: int
    projects: int
    total_bytes: int
    seed: int
    now_s: float


def project_cwd(k: int) -> str:
    """The cwd of synthetic project number ``k``."""
    return f"/home/dev/src/proj-{k:04d}"


def _thread_id(r: random.Random, t_s: float) -> str:
    """A UUIDv7-shaped session id for start time ``t_s`` (epoch s)."""
    ms = int(t_s * 1000) & ((1 << 48) - 1)
    h = f"{ms:012x}"
    ra, rb = r.getrandbits(12), r.getrandbits(62)
    return f"{h[:8]}-{h[8:]}-7{ra:03x}-{0x8000 | (rb >> 48):04x}-{rb & ((1 << 48) - 1):012x}"


def generate_scale_corpus(
    root: Path, *, n_sessions: int, seed: int = 0, now_s: float | None = None, span_days: float = SPAN_DAYS
) -> ScaleCorpus:
    """Write ``n_sessions`` small Codex rollouts spread over ``span_days`` under ``root``.

    Reuses ``root`` when its manifest (:data:`MANIFEST`) records the same ``n_sessions`` and
    ``seed`` (a 20k history takes about a minute to write).

    Args:
        root: the sessions root; created if missing.
        n_sessions: rollouts to write (≥ 1).
        seed: makes the history deterministic (given ``now_s``).
        now_s: the present, epoch seconds (default: now). Sessions start in
            ``[now - span, now - 1 day)``; each file's mtime is its last line's time.
        span_days: how far back the history goes.

    Returns:
        The :class:`ScaleCorpus`.

    Raises:
        ValueError: ``n_sessions`` < 1.
        OSError: a file cannot be written.
    """
    if n_sessions < 1:
        raise ValueError("n_sessions must be ≥ 1")
    root = Path(root)
    manifest = root / MANIFEST
    if manifest.is_file():
        known = json.loads(manifest.read_text())
        if known.get("sessions") == n_sessions and known.get("seed") == seed:
            return ScaleCorpus(root=root, **{k: v for k, v in known.items() if k != "root"})
        shutil.rmtree(root)
    now_s = time.time() if now_s is None else now_s
    n_projects = max(1, n_sessions // SESSIONS_PER_PROJECT)
    span_s = span_days * 86_400.0
    weights = [p[2] for p in corpus.PROFILES]
    (lo, hi, _), *_ = corpus.SMALL_SIZE_MIX
    total = 0
    for i in range(n_sessions):
        r = random.Random(f"memd-bench-scale:{seed}:{i}")
        variant, source, _ = corpus.PROFILES[i] if i < len(corpus.PROFILES) else r.choices(corpus.PROFILES, weights)[0]
        started = now_s - span_s + r.uniform(0, span_s - 86_400.0)
        thread_id = _thread_id(r, started)
        facts = corpus.generate_rollout(
            root / corpus.rollout_relpath(thread_id, started),
            target_bytes=int(math.exp(r.uniform(math.log(lo), math.log(hi)))),
            variant=variant,
            seed=r.getrandbits(63),
            source=source,
            cwd=project_cwd(i % n_projects),
            start_s=started,
            thread_id=thread_id,
        )
        os.utime(facts.path, (facts.updated_at, facts.updated_at))
        total += facts.size_bytes
    made = ScaleCorpus(root=root, sessions=n_sessions, projects=n_projects, total_bytes=total, seed=seed, now_s=now_s)
    manifest.write_text(json.dumps({k: v for k, v in asdict(made).items() if k != "root"}))
    return made


# --- child processes -----------------------------------------------------------------------------


def memd_argv(*args: str, nice: int = NICE) -> list[str]:
    """``nice -n N python -m memd ARGS`` with this interpreter."""
    return ["nice", "-n", str(nice), sys.executable, "-m", "memd", *args]


@dataclass(slots=True)
class _Sampler:
    """Samples the CPU seconds of a process tree every :data:`SAMPLE_S` in a thread."""

    pid: int
    samples: list[tuple[float, float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.is_set():
                cpu = tree_cpu_s(self.pid)
                if cpu is not None:
                    self.samples.append((time.time(), cpu))
                self._stop.wait(SAMPLE_S)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def cpu_at(self, t_s: float) -> float:
        """CPU seconds at wall time ``t_s`` (linear between samples)."""
        if not self.samples:
            return 0.0
        prev = self.samples[0]
        for sample in self.samples:
            if sample[0] >= t_s:
                if sample[0] == prev[0]:
                    return sample[1]
                frac = (t_s - prev[0]) / (sample[0] - prev[0])
                return prev[1] + frac * (sample[1] - prev[1])
            prev = sample
        return self.samples[-1][1]


def _ts(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


def read_log(path: Path) -> list[dict[str, Any]]:
    """The JSON log events of a memd run, in order (lines that are not JSON objects skipped)."""
    events: list[dict[str, Any]] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict) and "event" in obj and "timestamp" in obj:
                events.append(obj)
    return events


@dataclass(slots=True)
class OncePhases:
    """Phases of one ``memd once``, wall seconds and tree CPU seconds.

    Attributes:
        wall_s / cpu_s: the whole command.
        extracted: sessions extracted (``extract_done`` events).
        extract_wall_s / extract_cpu_s: first ``extract_started`` to last ``extract_done``.
        consolidated: projects consolidated (``consolidate_done`` events of the runner).
        consolidate_wall_s / consolidate_cpu_s: first ``consolidate_lease_acquired`` to last
            ``consolidate_lease_released``.
        exit_code: the command's exit status.
    """

    wall_s: float
    cpu_s: float
    extracted: int
    extract_wall_s: float
    extract_cpu_s: float
    consolidated: int
    consolidate_wall_s: float
    consolidate_cpu_s: float
    exit_code: int


def _span(events: list[dict[str, Any]], first: str, last: str) -> tuple[float, float] | None:
    starts = [_ts(e) for e in events if e["event"] == first]
    ends = [_ts(e) for e in events if e["event"] == last]
    if not starts or not ends:
        return None
    return min(starts), max(ends)


def run_once(sessions: Path, home: Path, code: Path | None, *, timeout_s: float = 7200.0) -> OncePhases:
    """Run ``memd once --sessions S --max-age-days 0`` on a fresh state under ``home``.

    Raises:
        RuntimeError: it failed or timed out (the tail of its log in the message).
    """
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    log_path = home / "once.log"
    with open(log_path, "wb") as err, open(home / "once.out", "wb") as out:
        t0 = time.time()
        proc = subprocess.Popen(
            memd_argv("once", "--sessions", str(sessions), "--max-age-days", "0"),
            env=isolated_env(home, code),
            cwd=home,
            stdout=out,
            stderr=err,
        )
        sampler = _Sampler(proc.pid)
        sampler.start()
        try:
            code_ = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"memd once timed out after {timeout_s:g} s") from None
        finally:
            sampler.stop()
        wall = time.time() - t0
    if code_ not in (0,):
        tail = log_path.read_bytes()[-600:].decode("utf-8", "replace")
        raise RuntimeError(f"memd once exited {code_}: {tail}")
    events = read_log(log_path)
    cpu_total = sampler.samples[-1][1] if sampler.samples else 0.0
    extract = _span(events, "extract_started", "extract_done") or (t0, t0)
    consolidate = _span(events, "consolidate_lease_acquired", "consolidate_lease_released") or (t0, t0)
    return OncePhases(
        wall_s=wall,
        cpu_s=cpu_total,
        extracted=sum(1 for e in events if e["event"] == "extract_done"),
        extract_wall_s=extract[1] - extract[0],
        extract_cpu_s=sampler.cpu_at(extract[1]) - sampler.cpu_at(extract[0]),
        consolidated=sum(1 for e in events if e["event"] == "consolidate_done" and "project" in e),
        consolidate_wall_s=consolidate[1] - consolidate[0],
        consolidate_cpu_s=sampler.cpu_at(consolidate[1]) - sampler.cpu_at(consolidate[0]),
        exit_code=code_,
    )


_CLAIM_SCRIPT = """
import asyncio, json, sys, time
from pathlib import Path
from memd.clock import SystemClock
from memd.store.records import JobKind
from memd.store.store import Store, make_owner

async def main():
    store = await Store.open(Path(sys.argv[1]), clock=SystemClock())
    try:
        owner, n = make_owner(), int(sys.argv[2])
        await store.jobs.claim(JobKind.EXTRACT, owner, 60.0)  # warm the page cache
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            job = await store.jobs.claim(JobKind.EXTRACT, owner, 60.0)
            if job is not None:
                await store.jobs.release(job)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        await store.close()
    print(json.dumps({"claim_ms": wall * 1000 / n, "claim_cpu_ms": cpu * 1000 / n}))

asyncio.run(main())
"""


def measure_claim(home: Path, code: Path | None, *, n: int = 200) -> dict[str, float]:
    """Milliseconds per extract claim (wall and CPU) over the state under ``home``, when nothing
    is claimable (every job done: the query's worst case before it was indexed)."""
    db = home / ".local" / "state" / "memd" / "memd.sqlite3"
    out = subprocess.run(
        ["nice", "-n", str(NICE), sys.executable, "-c", _CLAIM_SCRIPT, str(db), str(n)],
        env=isolated_env(home, code),
        cwd=home,  # not this checkout's directory: ``-c`` puts the cwd first on sys.path
        capture_output=True,
        check=True,
        timeout=600,
    )
    last = out.stdout.strip().splitlines()[-1]  # structlog may print before it
    result: dict[str, float] = json.loads(last)
    return result


def _run_measured(args: Sequence[str], env: dict[str, str], cwd: Path, stdout: Path) -> tuple[int, float, float]:
    """Run ``memd ARGS`` (niced) to its end with its output in ``stdout``: ``(exit code, peak RSS
    MB, wall s)``; the peak RSS is the child's own ``VmHWM`` as it exits (``nan`` when it reported
    none), see :mod:`memd.bench.procfs`."""
    report = stdout.with_suffix(".vmhwm")
    argv = ["nice", "-n", str(NICE), *self_reporting_memd_argv(report, *args)]
    t0 = time.perf_counter()
    with open(stdout, "wb") as out:
        code = subprocess.run(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.DEVNULL).returncode
    peak = reported_peak_mb(report)
    return code, math.nan if peak is None else peak, time.perf_counter() - t0


def measure_status(home: Path, code: Path | None) -> dict[str, float]:
    """Peak RSS (MB), wall seconds and output size (MB) of ``memd status --json`` over ``home``'s
    state, and the line count of the plain ``memd status``.

    Raises:
        RuntimeError: a command failed or the JSON is not one valid document.
    """
    env = isolated_env(home, code)
    json_path, text_path = home / "status.json", home / "status.txt"
    code_, rss_mb, wall_s = _run_measured(("status", "--json"), env, home, json_path)
    if code_ != 0:
        raise RuntimeError(f"memd status --json exited {code_}")
    json.loads(json_path.read_bytes())
    code_, _, _ = _run_measured(("status",), env, home, text_path)
    if code_ != 0:
        raise RuntimeError(f"memd status exited {code_}")
    return {
        "status_json_peak_rss_mb": rss_mb,
        "status_json_s": wall_s,
        "status_json_mb": json_path.stat().st_size / 1e6,
        "status_text_lines": float(text_path.read_bytes().count(b"\n")),
    }


def measure_idle(
    sessions: Path, home: Path, code: Path | None, *, settle_s: float, window_s: float
) -> dict[str, float]:
    """CPU seconds per 10 minutes (and peak RSS, MB) of ``memd run`` idle over ``home``'s state.

    The daemon starts over the learned state (its start-up scan and first planning pass happen
    in ``settle_s``), then its process tree's CPU time is measured over ``window_s`` and scaled.

    Raises:
        RuntimeError: the daemon exited early.
    """
    env = isolated_env(home, code)
    with open(home / "run.log", "wb") as out:
        proc = subprocess.Popen(
            memd_argv("run", "--sessions", str(sessions), "--max-age-days", "0"),
            env=env,
            cwd=home,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            time.sleep(settle_s)
            start = tree_cpu_s(proc.pid)
            t0 = time.monotonic()
            while time.monotonic() - t0 < window_s and proc.poll() is None:
                time.sleep(1.0)
            elapsed = time.monotonic() - t0
            end = tree_cpu_s(proc.pid)
            rss = vm_hwm_mb(proc.pid)
            if proc.poll() is not None or start is None or end is None:
                raise RuntimeError(f"memd run exited early with {proc.returncode}")
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    return {
        "idle_cpu_s_per_10min": (end - start) * 600.0 / elapsed,
        "idle_window_s": elapsed,
        "idle_rss_mb": rss or 0.0,
    }


def measure_size(
    n_sessions: int,
    workdir: Path,
    code: Path | None,
    *,
    label: str,
    settle_s: float,
    window_s: float,
    seed: int = 0,
    reuse: bool = False,
    out: Callable[[str], Any] = print,
) -> dict[str, float]:
    """Every scale figure at one history size (see the module docstring).

    With ``reuse``, a state left by an earlier ``memd once`` of the same label and size is
    measured again without running ``memd once`` (its phases are read back from ``once.json``).

    Returns:
        ``{name: value}``: ``sessions``, ``projects``, ``once_wall_s``, ``once_cpu_s``, ``extracted``,
        ``extract_ms_per_session`` (+ ``_cpu``), ``consolidated``, ``consolidate_ms_per_project``
        (+ ``_cpu``), ``claim_ms`` (+ ``claim_cpu_ms``), ``status_json_peak_rss_mb``,
        ``status_json_s``, ``status_json_mb``, ``status_text_lines``, ``idle_cpu_s_per_10min``,
        ``idle_rss_mb``, ``load_avg_1m`` (at the end, to judge the noise).
    """
    t0 = time.perf_counter()
    made = generate_scale_corpus(workdir / f"corpus-{n_sessions}", n_sessions=n_sessions, seed=seed)
    out(
        f"  {n_sessions} sessions, {made.projects} projects, {made.total_bytes / 1e6:.0f} MB "
        f"({time.perf_counter() - t0:.0f} s)"
    )
    home = workdir / f"{label}-{n_sessions}"
    saved = home / "once.json"
    if reuse and saved.is_file():
        once = OncePhases(**json.loads(saved.read_text()))
    else:
        once = run_once(made.root, home, code)
        saved.write_text(json.dumps(asdict(once)))
    out(
        f"  memd once: {once.wall_s:.1f} s wall, {once.cpu_s:.1f} s CPU; {once.extracted} extracted in "
        f"{once.extract_wall_s:.1f} s, {once.consolidated} projects consolidated in {once.consolidate_wall_s:.1f} s"
    )
    result: dict[str, float] = {
        "sessions": float(n_sessions),
        "projects": float(made.projects),
        "once_wall_s": once.wall_s,
        "once_cpu_s": once.cpu_s,
        "extracted": float(once.extracted),
        "extract_ms_per_session": once.extract_wall_s * 1000 / max(1, once.extracted),
        "extract_cpu_ms_per_session": once.extract_cpu_s * 1000 / max(1, once.extracted),
        "consolidated": float(once.consolidated),
        "consolidate_ms_per_project": once.consolidate_wall_s * 1000 / max(1, once.consolidated),
        "consolidate_cpu_ms_per_project": once.consolidate_cpu_s * 1000 / max(1, once.consolidated),
    }
    result.update(measure_claim(home, code))
    out(f"  claim: {result['claim_ms']:.2f} ms")
    result.update(measure_status(home, code))
    out(f"  status --json: {result['status_json_peak_rss_mb']:.0f} MB peak, {result['status_json_mb']:.1f} MB out")
    result.update(measure_idle(made.root, home, code, settle_s=settle_s, window_s=window_s))
    out(f"  idle: {result['idle_cpu_s_per_10min']:.2f} s CPU / 10 min")
    result["load_avg_1m"] = os.getloadavg()[0]
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m memd.bench.scale``: measure the scale figures at several history sizes."""
    p = argparse.ArgumentParser(prog="python -m memd.bench.scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1000,5000,20000", help="history sizes, comma-separated")
    p.add_argument("--workdir", type=Path, required=True, help="corpora and states go here (kept)")
    p.add_argument("--code", type=Path, default=None, help="the memd checkout to measure (default: this one)")
    p.add_argument("--label", default="run", help="prefix of the state directories")
    p.add_argument("--settle", type=float, default=60.0, help="seconds before the idle window")
    p.add_argument("--window", type=float, default=600.0, help="idle window, seconds")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    p.add_argument("--reuse", action="store_true", help="keep the states of an earlier run (no memd once)")
    args = p.parse_args(argv)
    results: dict[str, dict[str, float]] = {}
    for size in (int(s) for s in args.sizes.split(",")):
        print(f"· {size} sessions ({args.label})", flush=True)
        results[str(size)] = measure_size(
            size,
            args.workdir,
            args.code,
            label=args.label,
            settle_s=args.settle,
            window_s=args.window,
            reuse=args.reuse,
            out=lambda s: print(s, flush=True),
        )
        if args.json is not None:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
