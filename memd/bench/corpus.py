"""Deterministic synthetic Codex rollouts and Claude Code sessions for benchmarks and tests (SPEC §15).

The generator writes realistic rollouts (Codex rollout format, SPEC §3.2) into the Codex layout
``<root>/YYYY/MM/DD/rollout-<time>-<uuid>.jsonl`` and returns what each file holds *by
construction* (thread id, real user messages, commands with their exit codes, patched files, ...)
so that tests can check a parser against it without reading the parser's own output.

Envelope variants (one per ``variant`` value), modelled on the real files in
``../shared/rollouts/codex``:

* ``legacy`` — before ~0.36: bare header ``{"id", "timestamp", "instructions", "git", "cwd"}``,
  ``{"record_type": "state"}`` markers, bare response items (no envelope, no timestamp).
* ``0.47`` — envelope; ``session_meta`` without ``model_provider``/``git``; ``shell`` tool with
  argv and JSON-string outputs ``{"output", "metadata": {"exit_code", "duration_seconds"}}``;
  ``user_message`` with ``kind: plain``; rate limits with ``resets_in_seconds``.
* ``0.77`` — adds ``model_provider``, ``git``, ``instructions`` text; ``turn_context`` before every
  model request; ``ghost_snapshot``; ``shell`` and ``shell_command`` (text output
  ``Exit code: N\\nWall time: …\\nOutput:``); sources ``cli``, ``exec``, ``{"subagent": "review"}``.
* ``0.104`` (Codex Desktop, ``vscode``) and ``0.125`` (``codex-tui`` / ``codex_exec``) —
  ``base_instructions.text``; ``task_started``/``task_complete`` with ``turn_id``; developer
  ``<permissions instructions>`` message; ``exec_command`` with unified-exec text outputs
  (``Chunk ID:``/``Wall time:``/``Process exited with code N``/``Output:``, sometimes
  ``Process running with session ID N`` finished by ``write_stdin``); ``exec_command_end`` and
  ``patch_apply_end`` events; ``compacted {message, replacement_history}`` +
  ``context_compacted``; assistant ``phase``.
* ``0.146`` — ``session_meta`` with ``session_id``, ``thread_source``, ``memory_mode``,
  ``history_mode``; an ``ordinal`` on every line; ``world_state`` lines; compaction window ids.

Every variant has injected context (``<environment_context>``, ``# AGENTS.md instructions``),
reasoning with ``encrypted_content``, ``token_count`` events, apply_patch ``custom_tool_call`` with
``*** Begin Patch`` bodies (not legacy), long shell outputs, and both copies of every user
message (``response_item`` + ``event_msg user_message``; legacy has only the item).

Speed: large files are made of many turns whose long tool outputs are slices of a few
precomputed texts, JSON-escaped once (and twice, for outputs nested in a JSON string) and
spliced into the lines as bytes, so a 200 MB rollout is written in a few seconds.

Determinism: the same arguments (``seed`` included) give byte-identical files. File names use the
thread's start time in UTC (the generator's "local time" is UTC).

Claude Code sessions are written by :mod:`memd.bench.corpus_claude`, which shares this module's
text material (:data:`WORDS`, :func:`master_text`, :func:`text_block`) and :class:`LineWriter`.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, BinaryIO

#: Envelope variants the generator writes (see the module docstring).
VARIANTS: tuple[str, ...] = ("legacy", "0.47", "0.77", "0.104", "0.125", "0.146")

#: Default start of the corpus time range: 2026-03-01T00:00:00Z (epoch seconds).
DEFAULT_START_S = 1_772_323_200.0

#: Size buckets ``(min_bytes, max_bytes, weight)``; sizes are log-uniform inside a bucket.
DEFAULT_SIZE_MIX: tuple[tuple[int, int, float], ...] = (
    (5_000, 50_000, 0.55),
    (50_000, 1_000_000, 0.35),
    (1_000_000, 8_000_000, 0.10),
)

#: Small files only (5–20 KB), for indexing benchmarks.
SMALL_SIZE_MIX: tuple[tuple[int, int, float], ...] = ((5_000, 20_000, 1.0),)

#: Profiles ``(variant, source, weight)`` a corpus draws from; the first ``len(PROFILES)`` files
#: of a corpus take one profile each so that every variant and source kind is present.
PROFILES: tuple[tuple[str, Any, float], ...] = (
    ("0.125", "cli", 0.22),
    ("0.104", "vscode", 0.22),
    ("0.77", "cli", 0.16),
    ("0.47", "cli", 0.11),
    ("0.146", "cli", 0.12),
    ("legacy", None, 0.04),
    ("0.77", "exec", 0.04),
    ("0.125", "exec", 0.04),
    ("0.77", {"subagent": "review"}, 0.05),
)

#: Fake projects ``(cwd, package)`` the sessions run in.
PROJECTS: tuple[tuple[str, str], ...] = (
    ("/home/dev/src/atlas", "atlas"),
    ("/home/dev/src/billing-service", "billing"),
    ("/home/dev/work/webshop/frontend", "webshop"),
    ("/home/dev/src/pipeline", "pipeline"),
    ("/home/dev/src/atlas/docs", "atlas"),
)

#: Model-visible cap on unified-exec outputs (the full text is in ``exec_command_end``).
_MODEL_OUTPUT_CAP = 32 * 1024
#: Placeholder string in a line's JSON that :class:`LineWriter` replaces with a precomputed block.
SENTINEL = "@@MEMD_BENCH_BIG@@"
SENTINEL_BYTES = SENTINEL.encode()
_FLUSH_BYTES = 8 << 20
#: A turn smaller than this is not started; the file is considered full.
_MIN_TURN_BYTES = 2_500
_UNSET: Any = object()


# --- facts ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CommandFact:
    """A shell command a generated rollout ran, as the parser should report it.

    Attributes:
        command: the command line (the string inside ``bash -lc``).
        exit_code: its exit code.
    """

    command: str
    exit_code: int


@dataclass(frozen=True, slots=True)
class RolloutFacts:
    """What one generated rollout holds, known by construction.

    Attributes:
        path: the file written.
        thread_id: session id (``session_meta.payload.id`` / legacy header ``id``).
        variant: one of :data:`VARIANTS`.
        cli_version: ``session_meta.payload.cli_version`` (``None`` for legacy).
        originator: ``codex_cli_rs``, ``codex_exec``, ``codex-tui``, ``Codex Desktop`` (``None``
            for legacy).
        source_kind: normalised source as :class:`memd.rollout.records.SessionMeta` names it
            (``cli``, ``vscode``, ``exec``, ``subagent``; ``unknown`` for legacy).
        source_detail: ``review`` for a review sub-agent, else ``None``.
        cwd: the session cwd.
        thread_source / memory_mode: 0.146 fields, else ``None``.
        started_at: session start, epoch seconds.
        updated_at: timestamp of the last line, epoch seconds.
        size_bytes: file size in bytes.
        lines: number of lines.
        turns: user turns written.
        user_messages: the real user messages, each once, in order.
        commands: shell commands in call order.
        patched_files: files of successful apply_patch calls, de-duplicated, in order.
        failed_patches: apply_patch calls that failed.
        compactions: ``compacted`` lines.
    """

    path: Path
    thread_id: str
    variant: str
    cli_version: str | None
    originator: str | None
    source_kind: str
    source_detail: str | None
    cwd: str
    thread_source: str | None
    memory_mode: str | None
    started_at: float
    updated_at: float
    size_bytes: int
    lines: int
    turns: int
    user_messages: tuple[str, ...]
    commands: tuple[CommandFact, ...]
    patched_files: tuple[str, ...]
    failed_patches: int
    compactions: int

    @property
    def n_user_messages(self) -> int:
        """Number of real user messages (injected context excluded, each counted once)."""
        return len(self.user_messages)


@dataclass(frozen=True, slots=True)
class CorpusManifest:
    """A generated corpus.

    Attributes:
        root: the sessions root the files were written under.
        seed: the seed used.
        files: facts of every file, in generation order.
        total_bytes: sum of the file sizes.
    """

    root: Path
    seed: int
    files: tuple[RolloutFacts, ...]
    total_bytes: int

    @property
    def paths(self) -> list[Path]:
        """The rollout paths in generation order."""
        return [f.path for f in self.files]

    def by_thread(self) -> dict[str, RolloutFacts]:
        """Facts keyed by thread id."""
        return {f.thread_id: f for f in self.files}


@dataclass(frozen=True, slots=True)
class AppendedTurn:
    """What :func:`append_turn` added.

    Attributes:
        bytes_appended: bytes written (complete lines).
        user_message: the real user message of the turn.
        command: the shell command of the turn and its exit code.
        lines: lines written.
    """

    bytes_appended: int
    user_message: str
    command: CommandFact
    lines: int


# --- precomputed text ----------------------------------------------------------------------------

WORDS = (
    "config parser request handler session token cache index module worker queue retry "
    "timeout schema migration record thread project memory summary rollout offset client "
    "server stream buffer payload metrics router service adapter loader builder registry "
    "invoice customer order cart checkout price tax ledger event batch pipeline stage sink "
    "source window watermark lease owner fence backoff budget redact secret user assistant"
).split()
MODULES = (
    "config",
    "parser",
    "handlers",
    "store",
    "cache",
    "worker",
    "models",
    "routes",
    "utils",
    "client",
    "schema",
    "pipeline",
    "billing",
    "checkout",
    "metrics",
    "auth",
)
_ERRORS = (
    "KeyError: 'tenant_id'",
    "AssertionError: assert 3 == 4",
    "TypeError: unsupported operand type(s) for +: 'int' and 'NoneType'",
    "ValueError: invalid literal for int() with base 10: 'abc'",
    "sqlite3.OperationalError: database is locked",
    "ModuleNotFoundError: No module named 'yaml'",
    "TimeoutError: request timed out after 30.0s",
)


def _line_listing(r: random.Random) -> str:
    name = f"{r.choice(MODULES)}_{r.choice(WORDS)}.{r.choice(('py', 'ts', 'json', 'md', 'toml'))}"
    kind = "drwxr-xr-x" if r.random() < 0.15 else "-rw-r--r--"
    return (
        f"{kind}  1 dev  staff  {r.randint(64, 90_000):>6} Mar {r.randint(1, 28):>2} "
        f"{r.randint(0, 23):02d}:{r.randint(0, 59):02d} {name}"
    )


def _line_log(r: random.Random) -> str:
    x = r.random()
    mod, w1, w2 = r.choice(MODULES), r.choice(WORDS), r.choice(WORDS)
    if x < 0.45:
        status = "PASSED" if r.random() < 0.9 else "SKIPPED"
        return f"tests/test_{mod}.py::test_{w1}_{w2} {status} [{r.randint(1, 100):>3}%]"
    if x < 0.7:
        return f"[INFO] {w1} {w2}: compiled {r.randint(1, 400)} modules in {r.randint(3, 900)}ms ✓"
    if x < 0.85:
        return f"warning: unused variable `{w1}_{w2}` in src/{mod}.rs:{r.randint(1, 900)}"
    return f'{w1}.{w2} — took {r.random() * 3:.3f}s ("{mod}" cache {r.choice(("hit", "miss"))})'


def _line_source(r: random.Random) -> str:
    x = r.random()
    w1, w2, w3 = r.choice(WORDS), r.choice(WORDS), r.choice(WORDS)
    if x < 0.15:
        return f"def {w1}_{w2}(self, {w3}: str | None = None) -> dict[str, int]:"
    if x < 0.3:
        return f'    """Return the {w1} of the {w2}, or raise {w3.title()}Error."""'
    if x < 0.5:
        return f"    if {w1} is None or not self.{w2}:"
    if x < 0.7:
        return f'        raise ValueError(f"bad {w1}: {{{w2}!r}}")'
    if x < 0.85:
        return f"    return {{'{w1}': len({w2}), '{w3}': self._{w1}_{w3}}}"
    return ""


def _line_error(r: random.Random) -> str:
    x = r.random()
    mod = r.choice(MODULES)
    if x < 0.3:
        func = f"{r.choice(WORDS)}_{r.choice(WORDS)}"
        return f'  File "src/{mod}.py", line {r.randint(1, 800)}, in {func}'
    if x < 0.45:
        return f"    return self._{r.choice(WORDS)}[{r.choice(WORDS)}]"
    if x < 0.6:
        return r.choice(_ERRORS)
    if x < 0.8:
        return f"FAILED tests/test_{mod}.py::test_{r.choice(WORDS)} - {r.choice(_ERRORS)}"
    return "Traceback (most recent call last):"


_KINDS = {"listing": _line_listing, "log": _line_log, "source": _line_source, "error": _line_error}
_MASTER_CHARS = 600_000
_BLOCK_POWERS = range(7, 20)  # 128 B .. 512 KiB


def json_body(text: str) -> str:
    """JSON string body (without quotes) of ``text``, as serde_json writes it (UTF-8 kept)."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


@cache
def master_text(kind: str) -> str:
    """About 600,000 characters of one kind of tool output (``listing``, ``log``, ``source``,
    ``error``), generated once per process from a fixed seed; blocks are slices of it."""
    r = random.Random(f"memd-bench-master-{kind}")
    make = _KINDS[kind]
    parts: list[str] = []
    n = 0
    while n < _MASTER_CHARS:
        line = make(r)
        parts.append(line)
        n += len(line) + 1
    return "\n".join(parts) + "\n"


@dataclass(frozen=True, slots=True)
class TextBlock:
    """A slice of :func:`master_text` with its JSON string bodies precomputed (spliced into lines)."""

    text: str
    esc1: bytes  # JSON string body of text
    esc2: bytes  # JSON string body of a JSON string body of text (output nested in a JSON string)


@cache
def text_block(kind: str, power: int) -> TextBlock:
    """A cached block of at most ``2**power`` characters of ``kind``, cut at a line end."""
    master = master_text(kind)
    cut = master.rfind("\n", 0, 1 << power)
    text = master[: cut + 1] if cut > 0 else master[: 1 << power]
    e1 = json_body(text)
    return TextBlock(text=text, esc1=e1.encode(), esc2=json_body(e1).encode())


def exact_text_block(kind: str, n_chars: int) -> TextBlock:
    """A block of about ``n_chars`` characters (escaped on the fly; for the last turn only)."""
    master = master_text(kind)
    n_chars = max(1, min(n_chars, len(master)))
    text = master[:n_chars]
    if not text.endswith("\n"):
        text += "\n"
    e1 = json_body(text)
    return TextBlock(text=text, esc1=e1.encode(), esc2=json_body(e1).encode())


@cache
def _encrypted_pool() -> str:
    r = random.Random("memd-bench-encrypted")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    return "".join(r.choice(alphabet) for _ in range(16_384))


@cache
def _instructions_master() -> str:
    r = random.Random("memd-bench-instructions")
    parts = [
        "You are Codex, a coding agent. You and the user share one workspace, and your job is to "
        "collaborate with them until their goal is handled.\n\n# Personality\n"
    ]
    n = 0
    while n < 30_000:
        heading = f"\n## {r.choice(WORDS).title()} {r.choice(WORDS)}\n\n"
        body = " ".join(r.choice(WORDS) for _ in range(r.randint(30, 90)))
        bullets = "\n".join(
            f"- Prefer {r.choice(WORDS)} over {r.choice(WORDS)} when {r.choice(WORDS)} is {r.choice(WORDS)}."
            for _ in range(r.randint(2, 6))
        )
        part = heading + body + ".\n" + bullets + "\n"
        parts.append(part)
        n += len(part)
    return "".join(parts)


# --- helpers -----------------------------------------------------------------------------------


def iso_ms(t_s: float) -> str:
    """``t_s`` (epoch seconds) as ``YYYY-MM-DDTHH:MM:SS.mmmZ`` in UTC, as both agents write it."""
    ms_total = int(t_s * 1000)
    s, ms = divmod(ms_total, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s)) + f".{ms:03d}Z"


def _uuid7(r: random.Random, t_s: float) -> str:
    ms = int(t_s * 1000) & ((1 << 48) - 1)
    h = f"{ms:012x}"
    ra = r.getrandbits(12)
    rb = r.getrandbits(62)
    return f"{h[:8]}-{h[8:]}-7{ra:03x}-{0x8000 | (rb >> 48):04x}-{rb & ((1 << 48) - 1):012x}"


def rollout_relpath(thread_id: str, start_s: float) -> Path:
    """Codex path of a rollout under a sessions root: ``YYYY/MM/DD/rollout-<time>-<id>.jsonl``.

    Args:
        thread_id: the session id.
        start_s: session start, epoch seconds (formatted in UTC).
    """
    g = time.gmtime(int(start_s))
    stamp = time.strftime("%Y-%m-%dT%H-%M-%S", g)
    return Path(f"{g.tm_year:04d}", f"{g.tm_mon:02d}", f"{g.tm_mday:02d}") / (f"rollout-{stamp}-{thread_id}.jsonl")


def _source_kind(source: Any) -> tuple[str, str | None]:
    if source is None:
        return "unknown", None
    if isinstance(source, dict):
        key = next(iter(source))
        value = source[key]
        return key, value if isinstance(value, str) else next(iter(value), None)
    return str(source), None


def _vkey(variant: str) -> int:
    """Order of variants: legacy 0, then the minor version number."""
    return 0 if variant == "legacy" else int(variant.split(".")[1])


def _default_identity(variant: str, source: Any) -> tuple[str | None, str | None]:
    """``(originator, cli_version)`` for a variant and source."""
    if variant == "legacy":
        return None, None
    if source == "exec":
        return "codex_exec", "0.129.0" if variant == "0.125" else f"{variant}.0"
    if source == "vscode":
        return "Codex Desktop", f"{variant}.0-alpha.1" if variant == "0.104" else f"{variant}.0"
    if variant == "0.125":
        return "codex-tui", "0.125.0"
    return "codex_cli_rs", f"{variant}.0"


class LineWriter:
    """Buffers complete lines and tracks bytes, lines and the clock of one file."""

    def __init__(self, f: BinaryIO, r: random.Random, t_s: float, *, ordinal: bool) -> None:
        self._f = f
        self._r = r
        self._buf: list[bytes] = []
        self._buffered = 0
        self.bytes = 0
        self.lines = 0
        self.t = t_s
        self._ordinal = ordinal
        self._next_ordinal = 0

    def tick(self, lo_s: float = 0.005, hi_s: float = 2.5) -> None:
        self.t += self._r.uniform(lo_s, hi_s)

    def envelope(self, type_: str, payload: dict[str, Any], big: bytes | None = None) -> None:
        """Write ``{"timestamp", ["ordinal",] "type", "payload"}``; ``big`` replaces the
        sentinel string inside ``payload`` (already JSON-escaped)."""
        self.tick()
        obj: dict[str, Any] = {"timestamp": iso_ms(self.t)}
        if self._ordinal:
            obj["ordinal"] = self._next_ordinal
            self._next_ordinal += 1
        obj["type"] = type_
        obj["payload"] = payload
        self._put(obj, big)

    def bare(self, obj: dict[str, Any], big: bytes | None = None) -> None:
        """Write a legacy line (no envelope, no timestamp)."""
        self.tick()
        self._put(obj, big)

    def _put(self, obj: dict[str, Any], big: bytes | None) -> None:
        data = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
        if big is not None:
            pre, post = data.split(SENTINEL_BYTES, 1)
            data = b"".join((pre, big, post, b"\n"))
        else:
            data += b"\n"
        self._buf.append(data)
        self._buffered += len(data)
        self.bytes += len(data)
        self.lines += 1
        if self._buffered >= _FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        if self._buf:
            self._f.write(b"".join(self._buf))
            self._buf.clear()
            self._buffered = 0


class _Session:
    """Writes the turns of one rollout in one variant and records the facts."""

    def __init__(
        self,
        w: LineWriter,
        r: random.Random,
        *,
        variant: str,
        cwd: str,
        package: str,
        target_bytes: int,
        source: Any,
    ) -> None:
        self.w = w
        self.r = r
        self.variant = variant
        self.v = _vkey(variant)
        self.cwd = cwd
        self.package = package
        self.target = target_bytes
        self.source = source
        self.user_messages: list[str] = []
        self.commands: list[CommandFact] = []
        self.patched: dict[str, None] = {}
        self.failed_patches = 0
        self.compactions = 0
        self.turns = 0
        self.turn_id = ""
        self.model = {47: "gpt-5-codex", 77: "gpt-5.1-codex"}.get(self.v, "gpt-5.3-codex")
        self.tokens_total = 0
        self.history: list[tuple[str, str]] = []  # (user text, final answer) for compaction

    # -- small pieces ---------------------------------------------------------------------------

    def call_id(self) -> str:
        return f"call_{self.r.getrandbits(120):030x}"

    def encrypted(self) -> str:
        pool = _encrypted_pool()
        n = self.r.randint(300, max(300, min(2_000, self.target // 8)))
        off = self.r.randint(0, len(pool) - n)
        return "gAAAAAB" + pool[off : off + n]

    def words(self, lo: int, hi: int) -> str:
        return " ".join(self.r.choices(WORDS, k=self.r.randint(lo, hi)))

    def rel_file(self) -> str:
        return f"src/{self.package}/{self.r.choice(MODULES)}.py"

    def user_prompt(self) -> str:
        r = self.r
        mod = r.choice(MODULES)
        templates = (
            f"fix the failing test in tests/test_{mod}.py",
            f"add a --{r.choice(WORDS)} option to the {mod} command and document it",
            f"why does `pytest -q tests/test_{mod}.py` fail with {r.choice(_ERRORS)}?",
            f"refactor {self.rel_file()} so the {r.choice(WORDS)} logic lives in one place",
            f"Please review the {r.choice(WORDS)} changes; keep the public API stable.\n"
            f"Constraints:\n- no new dependencies\n- tests must stay green",
            f"the {r.choice(WORDS)} → {r.choice(WORDS)} conversion is wrong for naïve dates, café orders show 0 €",
            f"run the linters and fix what they report in {mod}",
            f"{self.words(8, 30)}?",
        )
        text = r.choice(templates)
        if self.source == "vscode" and r.random() < 0.3:
            text = (
                f"# Context from my IDE setup:\n\n## Active file: {self.rel_file()}\n\n## My request for Codex:\n{text}"
            )
        return text

    def final_answer(self) -> str:
        n = self.r.randint(1, max(1, min(7, self.target // 3_000)))
        bullets = "\n".join(f"- {self.words(6, 22)} in `{self.rel_file()}:{self.r.randint(1, 400)}`." for _ in range(n))
        return f"**Summary**\n{bullets}\n\nTests: `pytest -q` passes."

    def token_count(self, first: bool = False) -> None:
        if first:
            info = None
        else:
            last = self.r.randint(3_000, 40_000)
            self.tokens_total += last
            usage_last = {
                "input_tokens": last,
                "cached_input_tokens": last // 2,
                "output_tokens": last // 40,
                "reasoning_output_tokens": last // 80,
                "total_tokens": last + last // 40,
            }
            usage_total = {k: v * 3 for k, v in usage_last.items()}
            info = {
                "total_token_usage": usage_total,
                "last_token_usage": usage_last,
                "model_context_window": 272_000,
            }
        if self.v == 47:
            rl: Any = {
                "primary": {
                    "used_percent": 3.0,
                    "window_minutes": 299,
                    "resets_in_seconds": 17_940,
                },
                "secondary": {
                    "used_percent": 28.0,
                    "window_minutes": 10_079,
                    "resets_in_seconds": 319_634,
                },
            }
        elif self.v == 77:
            rl = {
                "primary": {"used_percent": 5.0, "window_minutes": 300, "resets_at": 1_767_400_000},
                "secondary": None,
                "credits": None,
                "plan_type": None,
            }
        elif self.v == 125:
            rl = None
        else:
            rl = {
                "limit_id": "codex",
                "limit_name": None,
                "primary": {
                    "used_percent": 1.0,
                    "window_minutes": 10_080,
                    "resets_at": 1_785_958_530,
                },
                "secondary": None,
                "credits": {"has_credits": False, "unlimited": False, "balance": "0"},
                "plan_type": "pro",
            }
        self.w.envelope("event_msg", {"type": "token_count", "info": info, "rate_limits": rl})

    def turn_context(self) -> None:
        if self.v == 47:
            payload: dict[str, Any] = {
                "cwd": self.cwd,
                "approval_policy": "never",
                "sandbox_policy": {"mode": "danger-full-access"},
                "model": self.model,
                "summary": "auto",
            }
        elif self.v == 77:
            payload = {
                "cwd": self.cwd,
                "approval_policy": "on-request",
                "sandbox_policy": {
                    "type": "workspace-write",
                    "network_access": False,
                    "exclude_tmpdir_env_var": False,
                    "exclude_slash_tmp": False,
                },
                "model": self.model,
                "summary": "auto",
            }
        else:
            payload = {
                "turn_id": self.turn_id,
                "cwd": self.cwd,
                "current_date": iso_ms(self.w.t)[:10],
                "timezone": "UTC",
                "approval_policy": "on-request",
                "sandbox_policy": {
                    "type": "workspace-write",
                    "writable_roots": [self.cwd],
                    "network_access": False,
                    "exclude_tmpdir_env_var": False,
                    "exclude_slash_tmp": False,
                },
                "model": self.model,
                "personality": "pragmatic",
                "collaboration_mode": {
                    "mode": "default",
                    "settings": {
                        "model": self.model,
                        "reasoning_effort": "medium",
                        "developer_instructions": None,
                    },
                },
                "effort": "medium",
                "summary": "auto",
                "truncation_policy": {"mode": "tokens", "limit": 10_000},
            }
            if self.v >= 146:
                payload["workspace_roots"] = [self.cwd]
                payload["multi_agent_mode"] = {"mode": "explicitRequestOnly"}
        self.w.envelope("turn_context", payload)

    def env_context(self) -> str:
        if self.v == 47:
            return (
                f"<environment_context>\n  <cwd>{self.cwd}</cwd>\n"
                "  <approval_policy>never</approval_policy>\n"
                "  <sandbox_mode>danger-full-access</sandbox_mode>\n"
                "  <network_access>enabled</network_access>\n"
                "  <shell>zsh</shell>\n</environment_context>"
            )
        return (
            f"<environment_context>\n  <cwd>{self.cwd}</cwd>\n  <shell>zsh</shell>\n"
            f"  <current_date>{iso_ms(self.w.t)[:10]}</current_date>\n"
            "  <timezone>UTC</timezone>\n</environment_context>"
        )

    def agents_md(self) -> str:
        n = max(150, min(3_000, self.target // 12))
        body = _instructions_master()[:n]
        return f"# AGENTS.md instructions for {self.cwd}\n\n<INSTRUCTIONS>\n{body}\n</INSTRUCTIONS>"

    def permissions(self) -> str:
        n = max(200, min(9_000, self.target // 10))
        return (
            "<permissions instructions>\n"
            "Filesystem sandboxing defines which files can be read or written. "
            "`sandbox_mode` is `workspace-write`.\n" + _instructions_master()[-n:] + "\n</permissions instructions>"
        )

    def user_item(self, text: str) -> dict[str, Any]:
        return {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": text}],
        }

    def reasoning(self) -> None:
        summary_text = f"**{self.words(2, 5).capitalize()}**"
        with_summary = self.v in (0, 47, 77, 104) and self.r.random() < 0.7
        if with_summary and self.v:
            self.w.envelope("event_msg", {"type": "agent_reasoning", "text": summary_text})
        item = {
            "type": "reasoning",
            "summary": [{"type": "summary_text", "text": summary_text}] if with_summary else [],
            "content": None,
            "encrypted_content": self.encrypted(),
        }
        if self.v == 0:
            item["id"] = f"rs_{self.r.getrandbits(64):016x}"
            self.w.bare(item)
        else:
            self.w.envelope("response_item", item)

    # -- tool rounds ----------------------------------------------------------------------------

    def pick_command(self, failing: bool) -> tuple[str, str]:
        """``(command, output kind)``."""
        r = self.r
        mod = r.choice(MODULES)
        if failing:
            return r.choice(
                (
                    (f"pytest -q tests/test_{mod}.py", "error"),
                    (f"python -m {self.package}.{mod} --check", "error"),
                    (f"npm test -- --runInBand {mod}", "error"),
                    (f"mypy src/{self.package}", "error"),
                )
            )
        return r.choice(
            (
                ("ls -la", "listing"),
                ("git status --short", "listing"),
                (f'rg -n "{r.choice(WORDS)}" src/{self.package}', "source"),
                (f"sed -n '1,200p' {self.rel_file()}", "source"),
                (f"cat src/{self.package}/{mod}.py", "source"),
                ("pytest -q", "log"),
                (f"pytest -q tests/test_{mod}.py", "log"),
                ("make lint", "log"),
                ("git diff --stat", "listing"),
                (f"find src/{self.package} -name '*.py' | head -50", "listing"),
            )
        )

    def output_block(self, kind: str, budget_bytes: int, *, exact: bool, factor: float) -> TextBlock:
        """A block whose escaped size is about ``budget_bytes`` (``factor`` = escape growth)."""
        raw = int(max(0, budget_bytes) / factor)
        if exact:
            return exact_text_block(kind, max(raw, 1))
        power = max(7, min(19, int(math.log2(raw)) if raw >= 2 else 7))
        return text_block(kind, power)

    def shell_round(self, out_budget: int, exact: bool) -> None:
        r = self.r
        exit_code = r.choice((1, 1, 1, 2, 127)) if r.random() < 0.15 else 0
        command, kind = self.pick_command(exit_code != 0)
        cid = self.call_id()
        duration = round(r.uniform(0.0, 12.0), 4)
        self.commands.append(CommandFact(command, exit_code))
        w = self.w
        if self.v == 0:  # legacy: bare items, JSON-string output
            block = self.output_block(kind, out_budget, exact=exact, factor=1.35)
            w.bare(
                {
                    "type": "function_call",
                    "name": "shell",
                    "arguments": json.dumps({"command": ["bash", "-lc", command]}),
                    "call_id": cid,
                }
            )
            inner = json.dumps(
                {
                    "output": SENTINEL,
                    "metadata": {"exit_code": exit_code, "duration_seconds": duration},
                },
                separators=(",", ":"),
            )
            w.bare({"type": "function_call_output", "call_id": cid, "output": inner}, block.esc2)
            return
        if self.v in (47, 77):
            shell_command = self.v == 77 and r.random() < 0.3
            args: dict[str, Any]
            if shell_command:
                args = {"command": command, "workdir": self.cwd}
                w.envelope(
                    "response_item",
                    {
                        "type": "function_call",
                        "name": "shell_command",
                        "arguments": json.dumps(args),
                        "call_id": cid,
                    },
                )
                block = self.output_block(kind, out_budget, exact=exact, factor=1.08)
                out = f"Exit code: {exit_code}\nWall time: {duration} seconds\nOutput:\n{SENTINEL}"
                w.envelope(
                    "response_item",
                    {"type": "function_call_output", "call_id": cid, "output": out},
                    block.esc1,
                )
            else:
                shell = "zsh" if self.v == 47 else "bash"
                args = {"command": [shell, "-lc", command], "workdir": self.cwd}
                if self.v == 77:
                    args["timeout_ms"] = 120_000
                w.envelope(
                    "response_item",
                    {
                        "type": "function_call",
                        "name": "shell",
                        "arguments": json.dumps(args),
                        "call_id": cid,
                    },
                )
                block = self.output_block(kind, out_budget, exact=exact, factor=1.35)
                inner = json.dumps(
                    {
                        "output": SENTINEL,
                        "metadata": {"exit_code": exit_code, "duration_seconds": duration},
                    },
                    separators=(",", ":"),
                )
                w.envelope(
                    "response_item",
                    {"type": "function_call_output", "call_id": cid, "output": inner},
                    block.esc2,
                )
            self.token_count()
            return
        # 0.104+: unified exec; full output in exec_command_end, capped copy for the model.
        share = out_budget / 2 if out_budget <= 2 * _MODEL_OUTPUT_CAP else out_budget - _MODEL_OUTPUT_CAP
        block = self.output_block(kind, int(share), exact=exact, factor=1.08)
        model = block if len(block.text) <= _MODEL_OUTPUT_CAP else text_block(kind, _MODEL_OUTPUT_CAP.bit_length() - 1)
        model_text, model_esc = model.text, model.esc1
        args = {
            "cmd": command,
            "workdir": self.cwd,
            "yield_time_ms": 1000,
            "max_output_tokens": 12_000,
        }
        w.envelope(
            "response_item",
            {
                "type": "function_call",
                "name": "exec_command",
                "arguments": json.dumps(args),
                "call_id": cid,
            },
        )
        self.token_count()
        running = r.random() < 0.12
        session = str(r.randint(1_000, 99_999))
        tokens = len(model_text) // 4
        end = {
            "type": "exec_command_end",
            "call_id": cid,
            "process_id": session,
            "turn_id": self.turn_id,
            "command": ["/bin/zsh", "-lc", command],
            "cwd": self.cwd,
            "parsed_cmd": [{"type": "unknown", "cmd": command}],
            "source": "unified_exec_startup",
            "stdout": "",
            "stderr": "",
            "aggregated_output": SENTINEL,
            "exit_code": exit_code,
            "duration": {"secs": int(duration), "nanos": r.randint(0, 999_999_999)},
            "formatted_output": "",
            "status": "completed" if exit_code == 0 else "failed",
        }
        chunk = f"Chunk ID: {r.getrandbits(24):06x}\nWall time: {duration:.4f} seconds\n"
        if running:
            out = f"{chunk}Process running with session ID {session}\nOriginal token count: 0\nOutput:\n"
            w.envelope("response_item", {"type": "function_call_output", "call_id": cid, "output": out})
            w.envelope("event_msg", end, block.esc1)
            cid2 = self.call_id()
            args2 = {
                "session_id": int(session),
                "chars": "",
                "yield_time_ms": 1000,
                "max_output_tokens": 12_000,
            }
            w.envelope(
                "response_item",
                {
                    "type": "function_call",
                    "name": "write_stdin",
                    "arguments": json.dumps(args2),
                    "call_id": cid2,
                },
            )
            out2 = (
                f"Chunk ID: {r.getrandbits(24):06x}\nWall time: 0.0000 seconds\n"
                f"Process exited with code {exit_code}\n"
                f"Original token count: {tokens}\nOutput:\n{SENTINEL}"
            )
            w.envelope(
                "response_item",
                {"type": "function_call_output", "call_id": cid2, "output": out2},
                model_esc,
            )
        else:
            w.envelope("event_msg", end, block.esc1)
            out = f"{chunk}Process exited with code {exit_code}\nOriginal token count: {tokens}\nOutput:\n{SENTINEL}"
            w.envelope(
                "response_item",
                {"type": "function_call_output", "call_id": cid, "output": out},
                model_esc,
            )

    def patch_round(self, budget: int) -> None:
        r = self.r
        rel = self.rel_file()
        add = r.random() < 0.25
        src = master_text("source")
        n = max(80, min(8_000, budget))
        off = r.randint(0, len(src) - n - 1)
        lines = src[off : off + n].split("\n")[1:-1] or ["pass"]
        if add:
            body = f"*** Add File: {rel}\n" + "\n".join("+" + ln for ln in lines)
        else:
            half = max(1, len(lines) // 3)
            body = f"*** Update File: {rel}\n@@ def {r.choice(WORDS)}_{r.choice(WORDS)}\n" + "\n".join(
                ("-" if i < half else "+") + ln for i, ln in enumerate(lines)
            )
        patch = f"*** Begin Patch\n{body}\n*** End Patch"
        failed = r.random() < 0.06
        cid = self.call_id()
        w = self.w
        w.envelope(
            "response_item",
            {
                "type": "custom_tool_call",
                "status": "completed",
                "call_id": cid,
                "name": "apply_patch",
                "input": patch,
            },
        )
        if failed:
            self.failed_patches += 1
            text = f"apply_patch verification failed: Failed to find expected lines in {rel}:\n{lines[0]}"
            exit_code = 1
        else:
            self.patched.setdefault(rel, None)
            text = f"Success. Updated the following files:\n{'A' if add else 'M'} {rel}\n"
            exit_code = 0
        if self.v >= 104:
            change = (
                {"type": "add", "content": "\n".join(lines)}
                if add
                else {"type": "update", "unified_diff": body.split("\n", 1)[1], "move_path": None}
            )
            w.envelope(
                "event_msg",
                {
                    "type": "patch_apply_end",
                    "call_id": cid,
                    "turn_id": self.turn_id,
                    "stdout": "" if failed else text,
                    "stderr": text if failed else "",
                    "success": not failed,
                    "changes": {f"{self.cwd}/{rel}": change},
                    "status": "failed" if failed else "completed",
                },
            )
        out = json.dumps(
            {
                "output": text,
                "metadata": {"exit_code": exit_code, "duration_seconds": round(r.uniform(0, 2), 1)},
            },
            separators=(",", ":"),
        )
        w.envelope("response_item", {"type": "custom_tool_call_output", "call_id": cid, "output": out})
        self.token_count()

    def other_round(self) -> None:
        r = self.r
        w = self.w
        x = r.random()
        if self.v >= 125 and x < 0.3:
            query = self.words(3, 8)
            w.envelope(
                "event_msg",
                {
                    "type": "web_search_end",
                    "call_id": f"ws_{r.getrandbits(96):024x}",
                    "query": query,
                    "action": {"type": "search", "query": query},
                },
            )
            w.envelope(
                "response_item",
                {
                    "type": "web_search_call",
                    "status": "completed",
                    "action": {"type": "search", "query": query},
                },
            )
            return
        cid = self.call_id()
        if self.v >= 104 and x < 0.6:
            w.envelope(
                "response_item",
                {
                    "type": "function_call",
                    "name": "mcp__docs__search",
                    "arguments": json.dumps({"query": self.words(2, 6)}),
                    "call_id": cid,
                },
            )
            w.envelope(
                "response_item",
                {"type": "function_call_output", "call_id": cid, "output": self.words(20, 80)},
            )
        else:
            plan = [{"step": self.words(4, 10), "status": s} for s in ("completed", "in_progress", "pending")]
            w.envelope(
                "response_item",
                {
                    "type": "function_call",
                    "name": "update_plan",
                    "arguments": json.dumps({"plan": plan}),
                    "call_id": cid,
                },
            )
            w.envelope(
                "response_item",
                {"type": "function_call_output", "call_id": cid, "output": "Plan updated"},
            )
        self.token_count()

    # -- turns ----------------------------------------------------------------------------------

    def compaction(self) -> None:
        self.compactions += 1
        summary = f"Summary of the work so far: {self.words(30, 80)}."
        if self.v < 104:
            self.w.envelope("compacted", {"message": summary})
            return
        history: list[dict[str, Any]] = []
        for user, answer in self.history[-20:]:
            history.append(self.user_item(user))
            history.append(
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": answer}],
                    "phase": "final_answer",
                }
            )
        history.append({"type": "compaction", "encrypted_content": self.encrypted()})
        payload: dict[str, Any] = {
            "message": summary if self.r.random() < 0.5 else "",
            "replacement_history": history,
        }
        if self.v >= 146:
            payload.update(
                {
                    "window_id": f"w-{self.compactions + 1}",
                    "window_number": self.compactions + 1,
                    "previous_window_id": f"w-{self.compactions}",
                    "first_window_id": "w-1",
                }
            )
        self.w.envelope("compacted", payload)
        self.w.envelope("event_msg", {"type": "context_compacted"})

    def header(
        self,
        thread_id: str,
        started_at: float,
        *,
        originator: str | None,
        cli_version: str | None,
        thread_source: str | None,
        memory_mode: str | None,
    ) -> None:
        instructions = _instructions_master()[: max(200, min(22_000, self.target // 8))]
        git = {
            "commit_hash": f"{self.r.getrandbits(160):040x}",
            "branch": self.r.choice(("main", "develop", f"feat/{self.r.choice(WORDS)}")),
            "repository_url": f"git@github.com:example/{self.package}.git",
        }
        ts = iso_ms(started_at)
        if self.v == 0:
            header = {
                "id": thread_id,
                "timestamp": ts,
                "instructions": instructions,
                "git": git,
                "cwd": self.cwd,
            }
            self.w.bare(header)
            self.w.bare({"record_type": "state"})
            return
        meta: dict[str, Any] = {"id": thread_id}
        if self.v >= 146:
            meta["session_id"] = thread_id
        meta.update({"timestamp": ts, "cwd": self.cwd, "originator": originator, "cli_version": cli_version})
        if self.v == 47:
            meta["instructions"] = None
        elif self.v == 77:
            meta["instructions"] = instructions
        meta["source"] = self.source
        if self.v >= 146:
            meta.update(
                {
                    "thread_source": thread_source,
                    "history_mode": "default",
                    "memory_mode": memory_mode,
                }
            )
        if self.v >= 77:
            meta["model_provider"] = "openai"
        if self.v >= 104:
            meta["base_instructions"] = {"text": instructions}
        if self.v >= 77:
            meta["git"] = git
        self.w.envelope("session_meta", meta)

    def _open_turn(self, user: str, *, first: bool) -> None:
        """The lines an envelope-format turn starts with: task start, injected context, world
        state, turn context, the user's message (as a response item and an event), a ghost
        snapshot, token counts, and sometimes a commentary message."""
        w, r, v = self.w, self.r, self.v
        self.turn_id = _uuid7(r, w.t)
        if v >= 104:
            w.envelope(
                "event_msg",
                {
                    "type": "task_started",
                    "turn_id": self.turn_id,
                    "started_at": int(w.t),
                    "model_context_window": 258_400,
                    "collaboration_mode_kind": "default",
                },
            )
        if first:
            self._injected_context()
        if v >= 146:
            self._world_state(first=first)
        if v >= 104:
            self.turn_context()
        w.envelope("response_item", self.user_item(user))
        self._user_event(user)
        if v < 104:
            self.turn_context()
        if v == 77 and first:
            self._ghost_snapshot()
        self.token_count(first=first)
        if v >= 104 and self.target > 20_000 and r.random() < 0.6:
            self._commentary()

    def _injected_context(self) -> None:
        """The first turn's injected context (permissions, AGENTS.md, environment), by version."""
        w, v = self.w, self.v
        if v >= 104:
            w.envelope(
                "response_item",
                {
                    "type": "message",
                    "role": "developer",
                    "content": [
                        {"type": "input_text", "text": self.permissions()},
                        {
                            "type": "input_text",
                            "text": "<collaboration_mode># Collaboration Mode: Default\n</collaboration_mode>",
                        },
                    ],
                },
            )
            w.envelope(
                "response_item",
                {
                    "type": "message",
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": self.agents_md()},
                        {"type": "input_text", "text": self.env_context()},
                    ],
                },
            )
        elif v == 77:
            w.envelope("response_item", self.user_item(self.agents_md()))
            w.envelope("response_item", self.user_item(self.env_context()))
        else:
            w.envelope("response_item", self.user_item(self.env_context()))

    def _world_state(self, *, first: bool) -> None:
        """A 0.146 ``world_state`` line (the full state on the first turn)."""
        w = self.w
        state: dict[str, Any] = {
            "environments": {"current_date": iso_ms(w.t)[:10], "timezone": "UTC"},
            "model": self.model,
        }
        if first:
            state.update(
                {
                    "agents_md": {"directory": self.cwd, "text": self.agents_md()},
                    "collaboration_mode": "default",
                    "realtime": {"active": False},
                }
            )
        w.envelope("world_state", {"full": first, "state": state})

    def _user_event(self, user: str) -> None:
        """The ``user_message`` event, in the shape of the version."""
        event: dict[str, Any] = {"type": "user_message", "message": user}
        if self.v == 47:
            event["kind"] = "plain"
        elif self.v == 77:
            event["images"] = []
        else:
            event.update({"images": [], "local_images": [], "text_elements": []})
        self.w.envelope("event_msg", event)

    def _ghost_snapshot(self) -> None:
        """A 0.77 ``ghost_snapshot`` response item."""
        r = self.r
        self.w.envelope(
            "response_item",
            {
                "type": "ghost_snapshot",
                "ghost_commit": {
                    "id": f"{r.getrandbits(160):040x}",
                    "parent": f"{r.getrandbits(160):040x}",
                    "preexisting_untracked_files": [],
                    "preexisting_untracked_dirs": [],
                },
            },
        )

    def _commentary(self) -> None:
        """A commentary message (0.104+), as an event and as a response item."""
        note = f"I'll {self.words(6, 18)}."
        self.w.envelope("event_msg", {"type": "agent_message", "message": note, "phase": "commentary"})
        self.w.envelope(
            "response_item",
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": note}],
                "phase": "commentary",
            },
        )

    def turn(self, budget: int, *, first: bool, last: bool) -> None:
        """One user turn of about ``budget`` bytes; ``last`` sizes the final output exactly."""
        w, r, v = self.w, self.r, self.v
        start = w.bytes
        self.turns += 1
        user = self.user_prompt()
        self.user_messages.append(user)
        answer = self.final_answer()
        if not first:
            w.tick(20.0, 900.0)
        if v == 0:
            w.bare(self.user_item(user))
            w.bare({"record_type": "state"})
        else:
            self._open_turn(user, first=first)

        # Estimated bytes of the closing lines, and of a round's lines besides its output
        # (the reasoning line is written before the output is sized, so it is not included).
        n_answer = len(answer.encode())
        if v == 0:
            tail_est, overhead = n_answer + 150, 350
        elif v < 104:
            tail_est, overhead = 2 * n_answer + (700 if v == 77 else 300), 750
        else:
            tail_est, overhead = 3 * n_answer + 450, 1_500
        rounds = r.randint(1, 4)
        rounds = max(1, min(rounds, (budget - (w.bytes - start) - tail_est) // (overhead + 2_000)))
        for i in range(rounds):
            final_round = i == rounds - 1
            if v == 77:
                self.turn_context()
            self.reasoning()
            x = r.random()
            if final_round or v == 0 or x < 0.72:
                left = budget - (w.bytes - start) - tail_est - overhead
                each = left if final_round else left // (rounds - i)
                self.shell_round(max(0, each), exact=last and final_round)
            elif x < 0.9:
                left = budget - (w.bytes - start) - tail_est - overhead
                self.patch_round(max(0, left // (rounds - i) // 2))
            else:
                self.other_round()

        if v == 77:
            self.turn_context()
        if v == 0:
            w.bare(
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": answer}],
                }
            )
            w.bare({"record_type": "state"})
        else:
            phase = {"phase": "final_answer"} if v >= 104 else {}
            w.envelope("event_msg", {"type": "agent_message", "message": answer, **phase})
            w.envelope(
                "response_item",
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": answer}],
                    **phase,
                },
            )
            if v >= 104:
                w.envelope(
                    "event_msg",
                    {
                        "type": "task_complete",
                        "turn_id": self.turn_id,
                        "last_agent_message": answer,
                    },
                )
        self.history.append((user, answer))


# --- public API ----------------------------------------------------------------------------------


def generate_rollout(
    path: Path,
    *,
    target_bytes: int,
    variant: str = "0.125",
    seed: int = 0,
    source: Any = _UNSET,
    cwd: str | None = None,
    start_s: float | None = None,
    thread_id: str | None = None,
    memory_mode: str | None = None,
) -> RolloutFacts:
    """Write one synthetic rollout of about ``target_bytes`` bytes.

    Codex rollout format, the envelope variant named by ``variant`` (see the module docstring).
    The file ends within a few KB of ``target_bytes``; it is never smaller than one turn
    (about 4–9 KB depending on the variant).

    Args:
        path: the file to write (parents are created; an existing file is replaced).
        target_bytes: wanted size in bytes (5 KB … 200 MB and more).
        variant: one of :data:`VARIANTS`.
        seed: makes the content deterministic.
        source: ``session_meta.source`` (``"cli"``, ``"vscode"``, ``"exec"``,
            ``{"subagent": "review"}``, ...); default by variant (``vscode`` for 0.104, ``None``
            for legacy, else ``cli``).
        cwd: session cwd; default one of :data:`PROJECTS` chosen by ``seed``.
        start_s: session start, epoch seconds; default :data:`DEFAULT_START_S` plus a
            seed-derived offset of up to 14 days.
        thread_id: session id; default a UUIDv7 derived from ``start_s`` and ``seed``.
        memory_mode: 0.146 ``memory_mode`` (default ``enabled``).

    Returns:
        The :class:`RolloutFacts` of the file.

    Raises:
        ValueError: unknown ``variant`` or ``target_bytes`` ≤ 0.
        OSError: the file cannot be written.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    if target_bytes <= 0:
        raise ValueError("target_bytes must be positive")
    r = random.Random(f"memd-bench-rollout:{seed}:{variant}")
    if source is _UNSET:
        source = None if variant == "legacy" else ("vscode" if variant == "0.104" else "cli")
    if variant == "legacy":
        source = None
    project_cwd, _ = r.choice(PROJECTS)
    cwd = cwd or project_cwd
    package = next((pk for c, pk in PROJECTS if c == cwd), Path(cwd).name.replace("-", "_"))
    if start_s is None:
        start_s = DEFAULT_START_S + r.uniform(0, 14 * 86_400)
    thread_id = thread_id or _uuid7(r, start_s)
    originator, cli_version = _default_identity(variant, source)
    v = _vkey(variant)
    thread_source = ("user" if source in ("cli", "vscode") else "subagent") if v >= 146 else None
    memory_mode = (memory_mode or "enabled") if v >= 146 else None

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        w = LineWriter(f, r, start_s, ordinal=v >= 146)
        s = _Session(
            w,
            r,
            variant=variant,
            cwd=cwd,
            package=package,
            target_bytes=target_bytes,
            source=source,
        )
        s.header(
            thread_id,
            start_s,
            originator=originator,
            cli_version=cli_version,
            thread_source=thread_source,
            memory_mode=memory_mode,
        )
        n_nominal = max(1, min(5_000, int(max(math.sqrt(target_bytes / 2_000), target_bytes / 120_000))))
        nominal = max(_MIN_TURN_BYTES, target_bytes // n_nominal)
        # Legacy files have no compaction lines (no envelope to carry them).
        compact_every = max(6, n_nominal // 3) if n_nominal >= 6 and v > 0 else 0
        first = True
        while first or target_bytes - w.bytes > _MIN_TURN_BYTES:
            remaining = target_bytes - w.bytes
            last = remaining <= 1.6 * nominal
            budget = remaining if last else int(nominal * r.uniform(0.6, 1.4))
            if compact_every and not first and s.turns % compact_every == 0:
                s.compaction()
            s.turn(budget, first=first, last=last)
            first = False
        w.flush()
    return RolloutFacts(
        path=path,
        thread_id=thread_id,
        variant=variant,
        cli_version=cli_version,
        originator=originator,
        source_kind=_source_kind(source)[0],
        source_detail=_source_kind(source)[1],
        cwd=cwd,
        thread_source=thread_source,
        memory_mode=memory_mode,
        started_at=start_s,
        updated_at=int(w.t * 1000) / 1000,
        size_bytes=w.bytes,
        lines=w.lines,
        turns=s.turns,
        user_messages=tuple(s.user_messages),
        commands=tuple(s.commands),
        patched_files=tuple(s.patched),
        failed_patches=s.failed_patches,
        compactions=s.compactions,
    )


def generate_corpus(
    root: Path,
    *,
    n_files: int,
    seed: int = 0,
    size_mix: Sequence[tuple[int, int, float]] = DEFAULT_SIZE_MIX,
    start_s: float = DEFAULT_START_S,
    span_s: float = 14 * 86_400.0,
) -> CorpusManifest:
    """Write ``n_files`` synthetic rollouts under ``root`` in the Codex layout.

    The first ``len(PROFILES)`` files take one profile each (every variant and source kind is
    present: ``cli``, ``vscode``, ``exec``, ``{"subagent": "review"}``, legacy); the rest are
    drawn by the weights of :data:`PROFILES`.

    Args:
        root: sessions root (``$CODEX_HOME/sessions`` shape); created if missing.
        n_files: number of rollouts (≥ 0).
        seed: makes the whole corpus deterministic.
        size_mix: buckets ``(min_bytes, max_bytes, weight)``, sizes log-uniform inside a
            bucket (see :data:`DEFAULT_SIZE_MIX`, :data:`SMALL_SIZE_MIX`).
        start_s: earliest session start, epoch seconds.
        span_s: sessions start within ``[start_s, start_s + span_s)``.

    Returns:
        The :class:`CorpusManifest`.

    Raises:
        ValueError: ``n_files`` < 0 or an empty ``size_mix``.
        OSError: a file cannot be written.
    """
    if n_files < 0:
        raise ValueError("n_files must be ≥ 0")
    if not size_mix:
        raise ValueError("size_mix is empty")
    root = Path(root)
    weights = [p[2] for p in PROFILES]
    mix_weights = [m[2] for m in size_mix]
    files: list[RolloutFacts] = []
    for i in range(n_files):
        r = random.Random(f"memd-bench-corpus:{seed}:{i}")
        variant, source, _ = PROFILES[i] if i < len(PROFILES) else r.choices(PROFILES, weights)[0]
        lo, hi, _ = r.choices(size_mix, mix_weights)[0]
        target = int(math.exp(r.uniform(math.log(lo), math.log(max(lo, hi)))))
        started = start_s + r.uniform(0, span_s)
        thread_id = _uuid7(r, started)
        cwd, _ = r.choice(PROJECTS)
        path = root / rollout_relpath(thread_id, started)
        files.append(
            generate_rollout(
                path,
                target_bytes=target,
                variant=variant,
                seed=r.getrandbits(63),
                source=source,
                cwd=cwd,
                start_s=started,
                thread_id=thread_id,
                memory_mode="disabled" if variant == "0.146" and r.random() < 0.2 else None,
            )
        )
    return CorpusManifest(root=root, seed=seed, files=tuple(files), total_bytes=sum(f.size_bytes for f in files))


def _sniff(path: Path) -> tuple[str, str, Any]:
    """``(variant, cwd, source)`` of an existing rollout, from its first line (bounded read)."""
    with open(path, "rb") as f:
        head = f.readline(4 << 20)
    try:
        obj = json.loads(head)
    except ValueError as exc:
        raise ValueError(f"{path}: first line is not JSON") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: first line is not an object")
    if "type" not in obj:
        return "legacy", str(obj.get("cwd") or PROJECTS[0][0]), None
    payload = obj.get("payload")
    p: dict[str, Any] = payload if isinstance(payload, dict) else {}
    try:
        minor = int(str(p.get("cli_version")).split(".")[1])
    except (IndexError, ValueError):
        minor = 125
    variant = (
        "0.47"
        if minor < 60
        else "0.77"
        if minor < 100
        else "0.104"
        if minor < 110
        else "0.125"
        if minor < 140
        else "0.146"
    )
    return variant, str(p.get("cwd") or PROJECTS[0][0]), p.get("source", "cli")


def append_turn(path: Path, *, seed: int = 0, target_bytes: int = 1024, ts_s: float | None = None) -> AppendedTurn:
    """Append one small turn (user message, one shell call with output, answer) to a rollout.

    The variant is taken from the file's first line, so the appended lines match the file.
    The turn is about ``target_bytes`` long (≥ about 700 bytes; 1 KiB by default), written
    with one ``write`` call of complete lines.

    Args:
        path: an existing rollout.
        seed: makes the appended content deterministic.
        target_bytes: wanted size of the appended lines in bytes.
        ts_s: timestamp of the first appended line, epoch seconds (default: now).

    Returns:
        The :class:`AppendedTurn`.

    Raises:
        ValueError: the first line is not a JSON object.
        OSError: the file cannot be read or appended to.
    """
    variant, cwd, source = _sniff(path)
    r = random.Random(f"memd-bench-append:{seed}")
    v = _vkey(variant)
    buf = io.BytesIO()
    w = LineWriter(buf, r, time.time() if ts_s is None else ts_s, ordinal=v >= 146)
    s = _Session(w, r, variant=variant, cwd=cwd, package="atlas", target_bytes=target_bytes, source=source)
    user = f"{s.user_prompt()} ({r.getrandbits(32):08x})"
    answer = "Done: " + s.words(4, 10) + "."
    command, kind = s.pick_command(False)
    cid = s.call_id()
    s.turn_id = _uuid7(r, w.t)
    filler = SENTINEL
    if v == 0:
        w.bare(s.user_item(user))
        w.bare(
            {
                "type": "function_call",
                "name": "shell",
                "arguments": json.dumps({"command": ["bash", "-lc", command]}),
                "call_id": cid,
            }
        )
        out = {
            "type": "function_call_output",
            "call_id": cid,
            "output": json.dumps(
                {"output": filler, "metadata": {"exit_code": 0, "duration_seconds": 0.1}},
                separators=(",", ":"),
            ),
        }
    else:
        w.envelope("response_item", s.user_item(user))
        w.envelope("event_msg", {"type": "user_message", "message": user, "images": []})
        if v >= 104:
            w.envelope(
                "response_item",
                {
                    "type": "function_call",
                    "name": "exec_command",
                    "arguments": json.dumps({"cmd": command, "workdir": cwd}),
                    "call_id": cid,
                },
            )
            out = {
                "type": "function_call_output",
                "call_id": cid,
                "output": "Chunk ID: 0a0b0c\nWall time: 0.0100 seconds\n"
                f"Process exited with code 0\nOriginal token count: 40\nOutput:\n{filler}",
            }
        else:
            w.envelope(
                "response_item",
                {
                    "type": "function_call",
                    "name": "shell",
                    "arguments": json.dumps({"command": ["bash", "-lc", command], "workdir": cwd}),
                    "call_id": cid,
                },
            )
            out = {
                "type": "function_call_output",
                "call_id": cid,
                "output": json.dumps(
                    {"output": filler, "metadata": {"exit_code": 0, "duration_seconds": 0.1}},
                    separators=(",", ":"),
                ),
            }
    # Size the output so that the turn is about target_bytes: measure the rest first.
    tail = io.BytesIO()
    w2 = LineWriter(tail, r, w.t, ordinal=False)
    if v == 0:
        w2.bare(
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": answer}],
            }
        )
    else:
        w2.envelope(
            "response_item",
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": answer}],
            },
        )
    w2.flush()
    w.flush()
    probe = len(json.dumps(out, separators=(",", ":")).encode()) + 40
    room = max(16, target_bytes - w.bytes - w2.bytes - probe)
    block = exact_text_block(kind, int(room / (1.3 if v < 104 else 1.05)))
    big = block.esc1 if v >= 104 else block.esc2
    if v == 0:
        w.bare(out, big)
        w.bare(
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": answer}],
            }
        )
    else:
        w.envelope("response_item", out, big)
        w.envelope(
            "response_item",
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": answer}],
            },
        )
    w.flush()
    data = buf.getvalue()
    with open(path, "ab") as f:
        f.write(data)
    return AppendedTurn(bytes_appended=len(data), user_message=user, command=CommandFact(command, 0), lines=w.lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m memd.bench.corpus ROOT --files N [--seed S] [--small]``: write a corpus.

    Prints one summary line; returns the exit status (0).
    """
    parser = argparse.ArgumentParser(
        prog="python -m memd.bench.corpus", description="Write a synthetic Codex rollout corpus."
    )
    parser.add_argument("root", type=Path)
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="5–20 KB files only")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    manifest = generate_corpus(
        args.root,
        n_files=args.files,
        seed=args.seed,
        size_mix=SMALL_SIZE_MIX if args.small else DEFAULT_SIZE_MIX,
    )
    dt = time.perf_counter() - t0
    print(
        f"{len(manifest.files)} files, {manifest.total_bytes / 1e6:.1f} MB in {dt:.2f} s under {os.fspath(args.root)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
