"""``peak_rss_large_mb`` of ``memd bench`` (SPEC §15: extracting one very large rollout, peak RSS ≤ 200 MB).

A child process runs ``memd once`` with the offline extractor over a sessions tree that holds one
generated rollout (:func:`memd.bench.corpus.generate_rollout`, Codex 0.125 envelope; 100 MB in
``--quick``, 300 MB in the full run), in a temporary ``HOME`` and ``XDG_*`` tree without an API key:
it indexes the file, streams it into the extraction input, extracts and consolidates that one
session. The figure is the peak resident set of that process in MB (MiB): its ``VmHWM`` (Linux
``/proc/self/status``, ``proc(5)``), read by the process itself as it exits. Not ``ru_maxrss`` of
the child: Linux carries the parent's resident set at the fork into it (``exec`` keeps the old
high-water mark), so a bench process that has grown would be measured instead. The consolidation
command ``memd once`` starts is a process of its own, not counted. Baseline: the same command over
a 1 MB rollout, measured in the same run (what memd costs whatever the size of the file). Memory
bounded by the output means the two stay close.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from memd.bench.child import isolated_env
from memd.bench.corpus import generate_rollout
from memd.bench.procfs import reported_peak_mb, self_reporting_memd_argv

#: key -> (comparison, threshold).
LARGE_TARGETS: dict[str, tuple[str, float]] = {"peak_rss_large_mb": ("<=", 200.0)}

#: Size of the baseline's rollout (bytes).
BASELINE_ROLLOUT_BYTES = 1_000_000

_THREAD_ID = "019c0000-0000-7000-8000-0000000000b1"


def bench_large_rollout(workdir: Path, *, rollout_bytes: int, seed: int = 0) -> tuple[float | None, float | None, str]:
    """Peak RSS of ``memd once`` extracting one rollout of ``rollout_bytes``, and its baseline.

    Args:
        workdir: where the sessions trees and state go (the rollouts are deleted afterwards).
        rollout_bytes: size of the large rollout (bytes); ``0`` skips the figure.
        seed: content seed of the generated rollouts.

    Returns:
        ``(peak MB, baseline peak MB, note)``; ``None`` with the reason in the note when a run
        fails (the tail of its stderr) or the figure is skipped.
    """
    if rollout_bytes <= 0:
        return None, None, "skipped: no large rollout size given"
    peak, error = _peak_rss_mb(workdir / "large-rollout", rollout_bytes, seed)
    if peak is None:
        return None, None, error
    baseline, error = _peak_rss_mb(workdir / "large-rollout-baseline", BASELINE_ROLLOUT_BYTES, seed)
    note = (
        f"memd once (offline) over one {rollout_bytes / 1e6:.0f} MB rollout, its VmHWM; "
        f"baseline: the same over {BASELINE_ROLLOUT_BYTES / 1e6:.0f} MB"
    )
    return peak, baseline, note if baseline is not None else f"{note} ({error})"


def _peak_rss_mb(root: Path, rollout_bytes: int, seed: int) -> tuple[float | None, str]:
    """Generate the rollout under ``root``, run ``memd once`` there; ``(peak MB, "")`` or
    ``(None, why)``."""
    home = root / "home"
    sessions = home / ".codex" / "sessions"
    rollout = sessions / "2026" / "03" / "01" / f"rollout-2026-03-01T10-00-00-{_THREAD_ID}.jsonl"
    generate_rollout(rollout, target_bytes=rollout_bytes, variant="0.125", seed=seed, thread_id=_THREAD_ID)
    hwm_path = root / "once.vmhwm"
    argv = self_reporting_memd_argv(hwm_path, "once", "--sessions", str(sessions))
    argv += ["--min-idle", "0", "--max-age-days", "0"]
    err_path = root / "once.stderr"
    try:
        with open(root / "once.stdout", "wb") as out, open(err_path, "wb") as err:
            try:
                code = subprocess.run(argv, env=isolated_env(home), cwd=root, stdout=out, stderr=err).returncode
            except OSError as exc:
                return None, f"memd once could not start: {exc}"
    finally:
        rollout.unlink(missing_ok=True)
    if code != 0:
        tail = err_path.read_text(errors="replace").strip().splitlines()[-3:]
        return None, f"memd once exited with code {code}: {' | '.join(tail)}"
    peak = reported_peak_mb(hwm_path)
    if peak is None:
        return None, "the child did not report its VmHWM (no /proc/self/status?)"
    return peak, ""
