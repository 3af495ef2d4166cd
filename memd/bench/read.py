"""Read-path figures of ``memd bench`` (SPEC §15, §18): ``context_ms`` and ``search_ms``.

* ``context_ms``: the median wall time of ``memd context --format codex-hook`` as a fresh process (memory
  indexed and checked by the daemon beforehand, as in use), through
  the ``memd`` console script beside the interpreter when there is one (what
  a SessionStart hook pays), fed a hook's stdin, against ``baseline_context_ms``: a bare
  ``python -c pass`` by the same interpreter, measured interleaved in the same run. Target: at most 6×
  the baseline.
* ``search_ms``: the median time of one ``memory_search`` (index refresh by stat + bm25 query, what
  the MCP tool does per call) over a project holding 1,000 synthetic trace memories. Target: 50 ms.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from memd.read.context import memory_root_of
from memd.read.mcp import MemoryReader

#: key -> (comparison, threshold); ``<=x`` compares with ``threshold`` times the figure's baseline.
READ_TARGETS: dict[str, tuple[str, float]] = {
    "context_ms": ("<=x", 6.0),
    "search_ms": ("<=", 50.0),
}

_WORDS = (
    "build test lint deploy cache docker compose migration schema index query parser token budget retry "
    "timeout lease worker pool queue socket config toml yaml json api client server router handler "
    "middleware session cookie auth jwt oauth webhook cron backup restore archive compress stream"
).split()


def _trace(n: int) -> str:
    pick = [_WORDS[(n * 7 + i * 13) % len(_WORDS)] for i in range(12)]
    return (
        f"thread_id: 019c0000-0000-7000-8000-{n:012d}\nproject: /bench/app\ncwd: /bench/app\n"
        f"rollout_path: /bench/r{n}.jsonl\nupdated_at: 2026-{1 + n % 12:02d}-{1 + n % 28:02d}T10:00:00Z\n\n"
        f"# Fix the {pick[0]} {pick[1]} in the {pick[2]} module (session {n})\n"
        f"Trace context: /bench/app, 2026-01-01, codex, gpt-5\nUser preferences: none observed\n"
        f"## Task: Fix the {pick[0]} {pick[1]}\nOutcome: success\n"
        f"Key steps:\n- Ran `make {pick[3]}` (exit 0)\n- Changed `src/{pick[4]}.py`, `tests/test_{pick[5]}.py`\n"
        f"Things that did not work: `{pick[6]} --{pick[7]}` failed with `{pick[8]} error`; {pick[9]} fixed it.\n"
        f"Reusable knowledge: the {pick[10]} settings live in `config/{pick[11]}.toml`.\n"
    )


def make_search_corpus(memory_dir: Path, project: str, n_traces: int) -> Path:
    """Write a memory root with ``n_traces`` synthetic trace files and a MEMORY.md; return the root."""
    root = memory_root_of(memory_dir, project)
    (root / "trace_summaries").mkdir(parents=True, exist_ok=True)
    (root / "PROJECT").write_text(project + "\n")
    for n in range(n_traces):
        (root / "trace_summaries" / f"019c0000-0000-7000-8000-{n:012d}_fix.md").write_text(_trace(n))
    bullets = "".join(
        f"- Run `make {w}` before pushing. [019c0000 2026-01-0{1 + i % 9}]\n" for i, w in enumerate(_WORDS)
    )
    (root / "MEMORY.md").write_text("# Project memory: /bench/app\n\n## Start here\n" + bullets)
    return root


def bench_search(workdir: Path, *, n_traces: int = 1_000, repeats: int = 30) -> tuple[float, str]:
    """Median ms of one memory_search over ``n_traces`` trace memories (refresh + query), and a note."""
    from memd.read.context import ContextSettings

    memory_dir = workdir / "search-memory"
    state_dir = workdir / "search-state"
    state_dir.mkdir(parents=True, exist_ok=True)
    make_search_corpus(memory_dir, "/bench/app", n_traces)
    settings = ContextSettings(True, 1500, memory_dir, state_dir, "cwd", None)
    reader = MemoryReader(settings, environ={}, cwd="/bench/app")
    reader.search("warm up the index")  # the first call indexes every file (the daemon does it ahead)
    queries = [f"{a} {b}" for a, b in zip(_WORDS, reversed(_WORDS), strict=False)][:repeats]
    times = []
    for query in queries:
        started = time.perf_counter()
        answer = reader.search(query, limit=5)
        times.append((time.perf_counter() - started) * 1000)
        assert answer.hits or answer.note
    return statistics.median(times), f"{n_traces} trace memories + MEMORY.md, {len(queries)} queries, median"


def _index_as_the_daemon_does(db_path: Path, project: str, root: Path) -> None:
    """Create the state database and index the project with the secret check, as a running daemon would."""
    import asyncio

    from memd.clock import SystemClock
    from memd.extract.redact import redact
    from memd.store.search import SearchIndex
    from memd.store.store import Store

    async def create() -> None:
        store = await Store.open(db_path, clock=SystemClock())
        await store.close()

    asyncio.run(create())
    index = SearchIndex.open(db_path, is_clean=lambda text: redact(text)[1] == 0)
    assert index is not None
    try:
        index.refresh(project, root, full=True)
    finally:
        index.close()


def bench_context(workdir: Path, *, repeats: int = 15) -> tuple[float, float, str]:
    """Median ms of ``memd context --format codex-hook`` (fresh process) and of ``python -c pass``."""
    memory_dir = workdir / "context-memory"
    state_dir = workdir / "context-state"
    state_dir.mkdir(parents=True, exist_ok=True)
    root = make_search_corpus(memory_dir, "/bench/app", 10)
    _index_as_the_daemon_does(state_dir / "memd.sqlite3", "/bench/app", root)
    env = {
        **os.environ,
        "MEMD_MEMORY_DIR": str(memory_dir),
        "MEMD_STATE_DIR": str(state_dir),
        "MEMD_PROJECT_KEY": "cwd",
    }
    stdin = json.dumps({"cwd": "/bench/app", "hook_event_name": "SessionStart", "source": "startup"})
    script = Path(sys.executable).parent / "memd"  # what an installed hook runs: the console script
    launcher = [str(script)] if script.is_file() else [sys.executable, "-m", "memd"]
    context_argv = [*launcher, "context", "--format", "codex-hook"]
    base_argv = [sys.executable, "-c", "pass"]
    ctx: list[float] = []
    base: list[float] = []
    for _ in range(repeats):  # interleaved, so load on the machine hits both alike
        for argv, sink in ((base_argv, base), (context_argv, ctx)):
            started = time.perf_counter()
            done = subprocess.run(argv, input=stdin, capture_output=True, text=True, env=env, timeout=60, check=False)
            sink.append((time.perf_counter() - started) * 1000)
            if argv is context_argv and (done.returncode != 0 or "memd-context" not in done.stdout):
                raise RuntimeError(f"memd context gave no block: {done.stderr.strip()[-300:]}")
    median_ctx, median_base = statistics.median(ctx), statistics.median(base)
    note = f"{repeats} runs each, interleaved; ratio {median_ctx / median_base:.1f}x (target <= 6x)"
    return median_ctx, median_base, note
