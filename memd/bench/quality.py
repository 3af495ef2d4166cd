"""Memory quality against hand-read facts (``quality_fact_recall``, ``quality_filler_ratio``).

The measurement behind SPEC §19: ``memd once`` runs offline (``extractor = offline``, no network,
isolated ``HOME`` / ``XDG_*``) over the real transcripts in ``../shared/rollouts/{codex,claude}``,
then what it wrote is compared with :data:`FACTS_FILE`, facts about every one of those files read
off the transcripts by a person (never copied from memd's output).

Figures:

* ``quality_fact_recall``: recalled facts / facts, over the sessions whose memory is ``expected``
  (see the facts file) and whose agent memd reads (an agent none of whose files became a thread
  is "not read yet" and left out, with a note). A fact is recalled when one of its alternative
  substrings occurs in the session's trace memory or in its project's ``MEMORY.md`` (both
  normalised by :func:`normalise`: lower case, backticks and ``*`` removed, white space runs
  folded to one space).
* ``quality_filler_ratio``: filler bullets / bullets, over the same trace memories and their
  projects' ``MEMORY.md``. A *bullet* is a markdown list line (``-``, ``*``, ``+`` or ``1.``)
  outside code fences. A bullet is *filler* when

  - it repeats an earlier bullet of the same file (same text after :func:`normalise`), or
  - it is longer than :data:`MAX_BULLET_CHARS` characters (a bullet holds one fact; a longer
    one is pasted text), or
  - after removing placeholders (``[REDACTED_...]``, ``[trimmed for fixture]``) and provenance
    tags (``[019a085e 2025-10-21]``, ``(trace: ...)``), it contains neither an alternative of a
    hand-read fact of its session (of any session of the project, for ``MEMORY.md``) nor a
    concrete anchor: a backticked span, a path or file name (``a/b``, ``name.ext``), an
    environment variable or config key (``UPPER_CASE``, ``key = value``), a URL, or an exit
    code (``exit 1``).

  So "none observed", "nothing beyond the steps above", "No test run or user confirmation
  verified the change", a task titled with a redaction hash, and a 700-character pasted answer
  are filler; "`npm test` fails: `jest` not found; `npx jest` works" is not.

Sessions whose memory is ``none`` are checked too: a trace for such a thread is reported as
``unexpected trace``, a memory folder for a project none of whose sessions left a trace as
``memory folder`` in the per-rollout table (neither is part of the figures).

Run alone (prints the per-rollout table)::

    python -m memd.bench.quality [--rollouts DIR] [--keep DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The hand-read facts shipped with the package.
FACTS_FILE = Path(__file__).with_name("data") / "rollout_facts.toml"
#: memd's own goals for the figures (issue 12; SPEC §19 sets no number): key -> (comparison, threshold).
QUALITY_TARGETS: dict[str, tuple[str, float]] = {
    "quality_fact_recall": (">=", 0.8),
    "quality_filler_ratio": ("<=", 0.1),
}
#: The figure keys this module reports.
QUALITY_KEYS: tuple[str, ...] = tuple(QUALITY_TARGETS)
#: A bullet longer than this is pasted text, not one fact.
MAX_BULLET_CHARS = 400
#: Seconds ``memd once`` may take over the shared rollouts before the figure is given up.
ONCE_TIMEOUT_S = 600.0

_MEMORY_KINDS = ("expected", "none", "parent")
_BULLET = re.compile(r"^\s*(?:[-*+]|\d{1,3}[.)])\s+(?P<text>.*)$")
_PLACEHOLDER = re.compile(r"\[(?:REDACTED_[A-Z_]+[^\]]*|trimmed for fixture)\]", re.IGNORECASE)
_PROVENANCE = re.compile(r"\[[0-9a-zA-Z_-]{4,16} \d{4}-\d{2}-\d{2}\]|\((?:trace|traces|seen in)[^()]*\)")
_ANCHORS = (
    re.compile(r"`[^`\s][^`]*`"),  # a backticked span
    re.compile(r"[\w.~-]+/[\w./-]*\w"),  # a path
    re.compile(r"\b[\w-]{2,}\.[A-Za-z][A-Za-z0-9]{0,5}\b"),  # a file name with an extension
    re.compile(r"\b[A-Z][A-Z0-9]*_[A-Z0-9_]+\b"),  # an environment variable / constant
    re.compile(r"\b[a-z_][\w.-]*\s*=\s*\S"),  # key = value
    re.compile(r"\bhttps?://\S+"),  # a URL
    re.compile(r"\bexit(?: code)? -?\d+\b", re.IGNORECASE),  # an exit code
)


# --------------------------------------------------------------------------- the facts file


@dataclass(frozen=True, slots=True)
class Fact:
    """One hand-read fact.

    Attributes:
        kind: ``request``, ``changed_file``, ``failure``, ``pivot``, ``verification``,
            ``preference``, ``knowledge`` or ``outcome``.
        text: the fact as a sentence.
        alternatives: short substrings; any of them in the memory counts the fact as recalled
            (compared after :func:`normalise`).
    """

    kind: str
    text: str
    alternatives: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SessionFacts:
    """The facts of one rollout file.

    Attributes:
        file: path relative to the rollouts folder (``codex/<name>.jsonl``).
        agent: ``codex`` or ``claude``.
        thread: the session id the file belongs to (``""``: not a thread).
        memory: ``expected``, ``none`` or ``parent`` (see the facts file header).
        why: the reason for ``none`` / ``parent``.
        facts: the facts, in file order.
    """

    file: str
    agent: str
    thread: str
    memory: str
    why: str
    facts: tuple[Fact, ...]


def load_facts(path: Path = FACTS_FILE) -> list[SessionFacts]:
    """Read the facts file (TOML, format in its header comment).

    Raises:
        ValueError: the file is not valid TOML, or a session or fact lacks a required key or
            has an unknown ``memory`` value (the message names the file entry).
        OSError: the file cannot be read.
    """
    with open(path, "rb") as handle:
        try:
            data = tomllib.load(handle)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: invalid TOML: {exc}") from exc
    sessions = []
    for n, raw in enumerate(data.get("session", [])):
        where = f"{path}: session {n + 1} ({raw.get('file', '?')})"
        try:
            memory = str(raw["memory"])
            if memory not in _MEMORY_KINDS:
                raise ValueError(f"{where}: memory must be one of {_MEMORY_KINDS}, not {memory!r}")
            facts = tuple(
                Fact(str(f["kind"]), str(f["text"]), tuple(str(a) for a in f["any"])) for f in raw.get("fact", [])
            )
            sessions.append(
                SessionFacts(
                    str(raw["file"]), str(raw["agent"]), str(raw["thread"]), memory, str(raw.get("why", "")), facts
                )
            )
        except KeyError as exc:
            raise ValueError(f"{where}: missing key {exc}") from None
    return sessions


# --------------------------------------------------------------------------- running memd once


@dataclass(frozen=True, slots=True)
class MemoryView:
    """What ``memd once`` produced, read back from disk.

    Attributes:
        traces: thread id -> trace memory (the body after the header).
        trace_projects: thread id -> project key (from the trace header).
        memory_md: project key -> ``MEMORY.md`` text (only projects that have one).
        memory_roots: project key -> memory root (every folder memd created).
        threads: thread id -> agent, for every thread memd indexed (``memd status --json``).
        thread_projects: thread id -> project key, for the same threads.
    """

    traces: dict[str, str]
    trace_projects: dict[str, str]
    memory_md: dict[str, str]
    memory_roots: dict[str, Path]
    threads: dict[str, str]
    thread_projects: dict[str, str]


def _isolated_env(home: Path) -> dict[str, str]:
    """An environment for a child ``memd`` that sees nothing of the caller's configuration."""
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TZ", "TMPDIR", "PYTHONPATH")}
    env.update(
        HOME=str(home),
        CODEX_HOME=str(home / ".codex"),
        CLAUDE_CONFIG_DIR=str(home / ".claude"),
        XDG_CONFIG_HOME=str(home / "config"),
        XDG_DATA_HOME=str(home / "data"),
        XDG_STATE_HOME=str(home / "state"),
        XDG_CACHE_HOME=str(home / "cache"),
        XDG_RUNTIME_DIR=str(home / "run"),
        MEMD_EXTRACTOR="offline",
    )
    return env


def run_memd_once(rollouts: Path, home: Path, *, timeout_s: float = ONCE_TIMEOUT_S) -> MemoryView:
    """Run ``memd once`` offline over ``rollouts/codex`` and ``rollouts/claude`` in an isolated
    home, then read back its memory folders and thread list.

    Raises:
        RuntimeError: ``memd once`` or ``memd status`` failed (the message carries the tail of
            its output).
        subprocess.TimeoutExpired: it ran longer than ``timeout_s``.
    """
    home.mkdir(parents=True, exist_ok=True)
    env = _isolated_env(home)
    roots = [rollouts / name for name in ("codex", "claude") if (rollouts / name).is_dir()]
    argv = [sys.executable, "-m", "memd", "once", "--min-idle", "0", "--max-age-days", "0"]
    for root in roots:
        argv += ["--sessions", str(root)]
    done = subprocess.run(argv, env=env, capture_output=True, timeout=timeout_s, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memd once exited {done.returncode}: {done.stderr.decode('utf-8', 'replace')[-600:]}")
    status = subprocess.run(
        [sys.executable, "-m", "memd", "status", "--json"], env=env, capture_output=True, timeout=120, check=False
    )
    if status.returncode != 0:
        raise RuntimeError(f"memd status exited {status.returncode}: {status.stderr.decode('utf-8', 'replace')[-600:]}")
    return read_memory(home / "data" / "memd" / "projects", json.loads(status.stdout))


def _read_trace(path: Path) -> tuple[dict[str, str], str]:
    """``(header, body)`` of a trace file: ``key: value`` lines up to the first blank line."""
    text = path.read_text("utf-8", "replace")
    head, _, body = text.partition("\n\n")
    header = {}
    for line in head.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            header[key.strip()] = value.strip()
    return header, body


def read_memory(memory_dir: Path, status: dict[str, Any]) -> MemoryView:
    """Read every memory root under ``memory_dir`` (``<sha>/memory``) and the thread list of a
    ``memd status --json`` answer into a :class:`MemoryView`."""
    traces: dict[str, str] = {}
    trace_projects: dict[str, str] = {}
    memory_md: dict[str, str] = {}
    roots: dict[str, Path] = {}
    for root in sorted(memory_dir.glob("*/memory")):
        marker = root / "PROJECT"
        project = marker.read_text("utf-8").strip() if marker.is_file() else root.parent.name
        roots[project] = root
        if (root / "MEMORY.md").is_file():
            memory_md[project] = (root / "MEMORY.md").read_text("utf-8", "replace")
        for path in sorted((root / "trace_summaries").glob("*.md")):
            header, body = _read_trace(path)
            thread = header.get("thread_id", "")
            traces[thread] = body
            trace_projects[thread] = header.get("project", project)
    listed = [t for t in status.get("threads", []) if isinstance(t, dict)]
    threads = {str(t.get("id", "")): str(t.get("agent") or _agent_of(t)) for t in listed}
    thread_projects = {str(t.get("id", "")): str(t.get("project", "")) for t in listed}
    return MemoryView(traces, trace_projects, memory_md, roots, threads, thread_projects)


def _agent_of(thread: dict[str, Any]) -> str:
    """A thread's agent when ``memd status`` does not say (Codex was the only source)."""
    return "claude" if "claude" in str(thread.get("rollout_path", "")) else "codex"


# --------------------------------------------------------------------------- scoring


def normalise(text: str) -> str:
    """Lower case, typographic quotes made plain, backticks and ``*`` removed, white space
    runs folded to one space: the form facts and memories are compared in."""
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"').replace("\u201d", '"')
    text = text.replace("`", "").replace("*", "")
    return " ".join(text.lower().split())


def _recalled(fact: Fact, haystack: str) -> bool:
    return any(normalise(alt) in haystack for alt in fact.alternatives)


def bullets(text: str) -> list[str]:
    """The markdown list items of ``text`` (their text after the marker), outside code fences."""
    out = []
    fenced = False
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            continue
        match = None if fenced else _BULLET.match(line)
        if match:
            out.append(match.group("text").strip())
    return out


def is_anchored(text: str) -> bool:
    """Whether ``text`` holds a concrete anchor (see the module docstring)."""
    return any(pattern.search(text) for pattern in _ANCHORS)


def filler_flags(text: str, facts: Iterable[Fact]) -> list[bool]:
    """For each bullet of ``text``: ``True`` when it is filler (definition in the module docstring)."""
    facts = list(facts)
    seen: set[str] = set()
    flags = []
    for bullet in bullets(text):
        key = normalise(bullet)
        repeat = key in seen
        seen.add(key)
        content = _PROVENANCE.sub(" ", _PLACEHOLDER.sub(" ", bullet))
        carries = is_anchored(content) or any(_recalled(f, normalise(content)) for f in facts)
        flags.append(repeat or len(bullet) > MAX_BULLET_CHARS or not carries)
    return flags


@dataclass(slots=True)
class SessionScore:
    """One row of the per-rollout table.

    Attributes:
        session: the facts of the file.
        status: ``scored``, ``no trace``, ``not read`` (the agent is not read by memd yet),
            ``ok`` / ``unexpected trace`` / ``memory folder`` (memory ``none``), ``parent``.
        recalled: facts recalled (memory ``expected``).
        missed: the facts not recalled.
        bullets / filler: bullets of the trace memory and how many are filler.
    """

    session: SessionFacts
    status: str
    recalled: int = 0
    missed: list[Fact] = field(default_factory=list)
    bullets: int = 0
    filler: int = 0


@dataclass(slots=True)
class QualityReport:
    """Scores of one run: per-rollout rows, ``MEMORY.md`` filler, agents not read yet."""

    rows: list[SessionScore]
    memory_bullets: int = 0
    memory_filler: int = 0
    unread_agents: tuple[str, ...] = ()

    @property
    def fact_recall(self) -> float | None:
        """Recalled / facts over the scored sessions, ``None`` when none was scored."""
        scored = [r for r in self.rows if r.status in ("scored", "no trace")]
        total = sum(len(r.session.facts) for r in scored)
        return sum(r.recalled for r in scored) / total if total else None

    @property
    def filler_ratio(self) -> float | None:
        """Filler / bullets over the scored traces and their projects' ``MEMORY.md``."""
        total = sum(r.bullets for r in self.rows) + self.memory_bullets
        return (sum(r.filler for r in self.rows) + self.memory_filler) / total if total else None


def score(sessions: Sequence[SessionFacts], view: MemoryView) -> QualityReport:
    """Score ``view`` (what memd wrote) against the hand-read ``sessions``."""
    # An agent is read when memd indexed any of its sessions as a thread.
    read_agents = {s.agent for s in sessions if s.thread and s.thread in view.threads}
    unread = tuple(sorted({s.agent for s in sessions} - read_agents))
    rows: list[SessionScore] = []
    project_facts: dict[str, list[Fact]] = {}
    for s in sessions:
        if s.memory == "parent":
            rows.append(SessionScore(s, "parent"))
        elif s.agent in unread:
            rows.append(SessionScore(s, "not read"))
        elif s.memory == "none":
            rows.append(SessionScore(s, _none_status(s, view)))
        else:
            rows.append(_score_expected(s, view))
            project = view.trace_projects.get(s.thread)
            if project is not None:
                project_facts.setdefault(project, []).extend(s.facts)
    report = QualityReport(rows, unread_agents=unread)
    for project, facts in project_facts.items():
        flags = filler_flags(view.memory_md.get(project, ""), facts)
        report.memory_bullets += len(flags)
        report.memory_filler += sum(flags)
    return report


def _none_status(s: SessionFacts, view: MemoryView) -> str:
    """``ok``, ``unexpected trace``, or ``memory folder`` (a folder for a project none of whose
    sessions left a trace: SPEC §19 says a no-op-only project gets none)."""
    if s.thread and s.thread in view.traces:
        return "unexpected trace"
    project = view.thread_projects.get(s.thread)
    if project and project in view.memory_roots and project not in view.trace_projects.values():
        return "memory folder"
    return "ok"


def _score_expected(s: SessionFacts, view: MemoryView) -> SessionScore:
    trace = view.traces.get(s.thread)
    if trace is None:
        return SessionScore(s, "no trace", missed=list(s.facts))
    project = view.trace_projects.get(s.thread, "")
    haystack = normalise(trace + "\n" + view.memory_md.get(project, ""))
    missed = [f for f in s.facts if not _recalled(f, haystack)]
    flags = filler_flags(trace, s.facts)
    return SessionScore(s, "scored", len(s.facts) - len(missed), missed, len(flags), sum(flags))


# --------------------------------------------------------------------------- output


def format_rows(report: QualityReport) -> str:
    """The per-rollout table: file, agent, memory, status, recall, filler."""
    lines = ["| rollout | agent | memory | status | facts recalled | bullets filler |", "|---|---|---|---|---|---|"]
    for r in report.rows:
        facts = f"{r.recalled}/{len(r.session.facts)}" if r.status in ("scored", "no trace") else "—"
        filler = f"{r.filler}/{r.bullets}" if r.bullets else "—"
        name = r.session.file.split("/", 1)[-1]
        lines.append(f"| {name} | {r.session.agent} | {r.session.memory} | {r.status} | {facts} | {filler} |")
    lines.append(f"| MEMORY.md (scored projects) | | | | | {report.memory_filler}/{report.memory_bullets} |")
    return "\n".join(lines)


def format_missed(report: QualityReport) -> str:
    """The facts not recalled, one line each (``file: kind: text``)."""
    out = []
    for r in report.rows:
        for f in r.missed:
            out.append(f"- {r.session.file}: {f.kind}: {f.text}")
    return "\n".join(out)


def default_rollouts_dir() -> Path:
    """``../shared/rollouts`` beside the checkout (``MEMD_SHARED_ROLLOUTS`` overrides)."""
    env = os.environ.get("MEMD_SHARED_ROLLOUTS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "rollouts"


def measure(rollouts: Path, workdir: Path, *, facts_file: Path = FACTS_FILE) -> QualityReport:
    """Run ``memd once`` over ``rollouts`` in ``workdir`` and score it (see :func:`score`)."""
    return score(load_facts(facts_file), run_memd_once(rollouts, workdir / "quality-home"))


def bench_quality(rollouts: Path | None, workdir: Path, *, out: Callable[[str], Any] = print) -> list[Any]:
    """The ``memd bench`` step: figures ``quality_fact_recall`` and ``quality_filler_ratio``.

    Skipped (both figures ``None`` with a note) when ``rollouts`` is absent. Prints the
    per-rollout table through ``out``.

    Returns:
        Two :class:`memd.bench.harness.Figure` records.
    """
    from memd.bench.harness import Figure

    if rollouts is None or not rollouts.is_dir():
        return [Figure(key, None, None, f"real rollouts not available ({rollouts})") for key in QUALITY_KEYS]
    report = measure(rollouts, workdir)
    out(format_rows(report))
    scored = [r for r in report.rows if r.status in ("scored", "no trace")]
    note = f"{len(scored)} sessions, {sum(len(r.session.facts) for r in scored)} hand-read facts"
    if report.unread_agents:
        note += f"; not read by memd yet: {', '.join(report.unread_agents)}"
    return [
        Figure("quality_fact_recall", report.fact_recall, None, note),
        Figure(
            "quality_filler_ratio",
            report.filler_ratio,
            None,
            f"bullets over {MAX_BULLET_CHARS} chars, repeated or without an anchor or fact",
        ),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m memd.bench.quality``: measure, print the per-rollout table and the misses.

    Returns:
        0, or 2 when the rollouts folder is absent.
    """
    parser = argparse.ArgumentParser(prog="python -m memd.bench.quality", description=__doc__.split("\n")[0])
    parser.add_argument("--rollouts", type=Path, default=default_rollouts_dir(), help="folder with codex/ and claude/")
    parser.add_argument("--keep", type=Path, help="keep memd's state and memory here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the figures and rows as JSON")
    args = parser.parse_args(argv)
    if not args.rollouts.is_dir():
        print(f"rollouts folder not found: {args.rollouts}", file=sys.stderr)
        return 2
    tmp = None if args.keep else tempfile.mkdtemp(prefix="memd-quality-")
    workdir = args.keep or Path(str(tmp))
    try:
        report = measure(args.rollouts, workdir)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(format_rows(report))
    print()
    print(f"quality_fact_recall  {report.fact_recall}")
    print(f"quality_filler_ratio {report.filler_ratio}")
    if report.unread_agents:
        print(f"not read by memd yet: {', '.join(report.unread_agents)}")
    missed = format_missed(report)
    if missed:
        print("\nfacts not recalled:\n" + missed)
    if args.json:
        doc = {
            "quality_fact_recall": report.fact_recall,
            "quality_filler_ratio": report.filler_ratio,
            "unread_agents": list(report.unread_agents),
            "rows": [
                {"file": r.session.file, "status": r.status, "facts": len(r.session.facts), "recalled": r.recalled,
                 "bullets": r.bullets, "filler": r.filler}
                for r in report.rows
            ],
        }  # fmt: skip
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
