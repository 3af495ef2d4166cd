"""The built-in consolidator behind ``memd consolidate --root DIR`` (SPEC §7).

:func:`consolidate_root` reads a memory root's trace files, asks a *writer* for the new
``MEMORY.md`` (and optionally ``skills/``), stages the outputs in ``<root>/.staging-<random>/``
and swaps them in only when everything was written; on any failure the previous ``MEMORY.md``
and ``skills/`` stay untouched. Unchanged outputs are not rewritten. Each successful run is
committed to the memory root's git history when git is available.

The default writer, :func:`offline_writer`, is a deterministic merge (no network, no clock): the
same traces give a byte-identical ``MEMORY.md``. A model-backed writer plugs in through the
:class:`MemoryWriter` seam.

Offline merge rules (documented here because ``MEMORY.md`` readers rely on them):

* traces are ordered newest first by their header's ``updated_at`` (ties: thread id, file);
* each trace body is read as the SPEC §6.3 skeleton: ``User preferences``, and per
  ``## Task:`` section ``Outcome``, ``Things that did not work ...`` and ``Reusable knowledge``
  (labels are matched leniently: ``Label: value``, ``**Label:**``, ``## Label``);
* items are deduplicated on normalised text (case, spacing, markdown emphasis, trailing
  punctuation and a trailing parenthesised evidence note are ignored); the newest wording and
  trace are kept and ``seen in N sessions`` counts the traces that stated it;
* conflicting preferences — ``always X`` against ``never X`` / ``don't X`` / ``do not X`` — are
  resolved for the newer statement, annotated with the older one it supersedes; except when the
  older statement has stronger evidence (stated in more sessions), then both are kept and the
  older one carries a note asking to confirm with the user;
* ``Recent tasks`` lists every task, newest trace first: date, name, outcome, trace file.

The offline writer leaves ``skills/`` alone (it returns ``skills=None``).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from memd.clock import iso_utc
from memd.consolidate.gitlog import commit_memory_root
from memd.errors import ConsolidationError, MemoryWriteError
from memd.memory.files import DIR_MODE, FILE_MODE, STAGING_PREFIX, TRACE_DIR, TraceHeader, parse_trace_file, slugify
from memd.memory.recover import remove_stale_staging

log = structlog.get_logger(__name__)

MEMORY_FILE = "MEMORY.md"
SKILLS_DIR = "skills"
SKILL_FILE = "SKILL.md"
TRACE_READ_MAX_BYTES = 1024 * 1024
MAX_ITEMS_PER_SECTION = 40
MAX_TASK_LINES = 30
MAX_ITEM_CHARS = 2_000
OUTCOMES = ("success", "partial", "fail", "uncertain")


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class TraceDoc:
    """One trace file of a memory root.

    Attributes:
        relpath: path relative to the memory root (``trace_summaries/<file>.md``).
        header: its header lines (SPEC §8).
        body: the trace memory (markdown, SPEC §6.3 skeleton).
    """

    relpath: str
    header: TraceHeader
    body: str


@dataclass(frozen=True, slots=True)
class Skill:
    """A procedure written to ``skills/<slugify(name)>/SKILL.md`` with YAML front matter."""

    name: str
    description: str
    body: str


@dataclass(frozen=True, slots=True)
class ConsolidationInput:
    """What a writer gets.

    Attributes:
        project: the project key (from ``PROJECT``, else the newest trace header).
        traces: the trace files, newest first.
        previous_memory_md: the current ``MEMORY.md`` (``""`` when there is none).
        existing_skills: names of the directories under ``skills/``, sorted.
        now_s: the time to print in the output, or ``None`` (deterministic output).
    """

    project: str
    traces: tuple[TraceDoc, ...]
    previous_memory_md: str
    existing_skills: tuple[str, ...]
    now_s: float | None = None


@dataclass(frozen=True, slots=True)
class Consolidated:
    """A writer's answer.

    ``skills=None`` leaves ``skills/`` untouched; a sequence (even empty) replaces ``skills/``
    with exactly those skills.
    """

    memory_md: str
    skills: tuple[Skill, ...] | None = None


#: The writer seam: turns the traces into the new handbook. May raise a ``MemdError``.
MemoryWriter = Callable[[ConsolidationInput], Consolidated]


@dataclass(frozen=True, slots=True)
class BuiltinResult:
    """What :func:`consolidate_root` did.

    Attributes:
        root: the memory root.
        traces: trace files merged.
        memory_changed: ``MEMORY.md`` was (re)written.
        skills_changed: ``skills/`` was replaced.
        committed: a git commit was made.
    """

    root: Path
    traces: int
    memory_changed: bool
    skills_changed: bool
    committed: bool


# --------------------------------------------------------------------------- reading traces


def read_traces(root: Path, *, max_traces: int | None = None) -> list[TraceDoc]:
    """Read ``<root>/trace_summaries/*.md``, newest first (by header ``updated_at``).

    Symlinks and unreadable files are skipped (event ``trace_unreadable``); at most
    ``TRACE_READ_MAX_BYTES`` of a file are read. ``max_traces`` keeps only the newest N.
    """
    directory = Path(root) / TRACE_DIR
    try:
        names = sorted(n for n in os.listdir(directory) if n.endswith(".md"))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ConsolidationError(f"cannot list {directory}: {exc}") from exc
    docs = []
    for name in names:
        path = directory / name
        try:
            if path.is_symlink() or not path.is_file():
                continue
            with open(path, "rb") as handle:
                raw = handle.read(TRACE_READ_MAX_BYTES)
        except OSError as exc:
            log.warning("trace_unreadable", path=str(path), error=str(exc), next="skipped")
            continue
        header, body = parse_trace_file(raw.decode("utf-8", "replace"))
        docs.append(TraceDoc(f"{TRACE_DIR}/{name}", header, body))
    docs.sort(key=lambda d: (-d.header.updated_at, d.header.thread_id, d.relpath))
    return docs[:max_traces] if max_traces is not None else docs


# --------------------------------------------------------------------------- parsing a trace


@dataclass(slots=True)
class TaskDigest:
    """One ``## Task:`` section: name, outcome, and its items (each item a list of lines)."""

    name: str
    outcome: str = "uncertain"
    failures: list[list[str]] = field(default_factory=list)
    knowledge: list[list[str]] = field(default_factory=list)


@dataclass(slots=True)
class TraceDigest:
    """What the offline merge reads from one trace body (see :func:`parse_trace`)."""

    title: str = ""
    preferences: list[list[str]] = field(default_factory=list)
    tasks: list[TaskDigest] = field(default_factory=list)


_BULLET = re.compile(r"^\s*(?:[-*+]|\d{1,3}[.)])\s+")
_LABEL = re.compile(
    r"^\s{0,3}(?:#{1,6}\s+)?(?:\*\*|__)?(?P<label>[A-Za-z][A-Za-z /&()'-]{0,80}?)"
    r"\s*(?:\*\*|__)?\s*:\s*(?:\*\*|__)?\s*(?P<rest>.*)$"
)
_HEADING = re.compile(r"^\s{0,3}(?P<hashes>#{1,6})\s+(?P<text>.*?)\s*#*\s*$")
_EMPTY_VALUES = {"", "none", "none observed", "none yet", "n/a", "na", "-", "nothing", "unknown"}


def _section_of(label: str) -> str | None:
    label = " ".join(label.lower().split())
    if label.startswith(("user preference", "preferences")):
        return "preferences"
    if label.startswith(("things that did not work", "what did not work", "did not work",
                         "things that can be improved", "failures")):  # fmt: skip
        return "failures"
    if label.startswith("reusable knowledge"):
        return "knowledge"
    if label.startswith("outcome"):
        return "outcome"
    if label.startswith(("trace context", "key steps", "pointers", "raw notes", "summary")):
        return "other"
    return None


def _outcome(text: str) -> str:
    for word in re.findall(r"[a-z]+", text.lower()):
        if word in OUTCOMES:
            return word
        if word in ("failed", "failure"):
            return "fail"
        if word in ("succeeded", "successful"):
            return "success"
    return "uncertain"


def parse_trace(body: str) -> TraceDigest:
    """Read a trace body (SPEC §6.3 skeleton) into title, preferences and tasks.

    Failures or knowledge found before any ``## Task:`` heading go to one task named after the
    title (a trace without the skeleton still contributes). Unknown labels and headings end the
    current section; lines inside fenced code blocks are kept verbatim in the current item.
    """
    digest = TraceDigest()
    section = "other"
    task: TaskDigest | None = None
    in_fence = False

    def ensure_task() -> TaskDigest:
        nonlocal task
        if task is None:  # failures or knowledge before any "## Task:": a task-less trace
            task = TaskDigest(name=digest.title or "session")
            digest.tasks.append(task)
        return task

    def target() -> list[list[str]] | None:
        if section == "preferences":
            return digest.preferences
        if section == "failures":
            return ensure_task().failures
        if section == "knowledge":
            return ensure_task().knowledge
        return None

    def add(text: str, *, new_item: bool) -> None:
        items = target()
        if items is None:
            return
        if new_item or not items:
            items.append([text])
        else:
            items[-1].append(text)

    for line in body.splitlines():
        stripped = line.strip()
        if stripped.startswith(("```", "~~~")):
            in_fence = not in_fence
            add(line.rstrip(), new_item=False)
            continue
        if in_fence:
            add(line.rstrip(), new_item=False)
            continue
        if not stripped:
            continue
        heading = _HEADING.match(line)
        if heading:
            text = heading.group("text").strip().strip("*_").strip()
            if len(heading.group("hashes")) == 1 and not digest.title and task is None:
                digest.title = text
                section = "other"
                continue
            name, sep, rest = text.partition(":")
            if sep and name.strip().lower() == "task":
                task = TaskDigest(name=" ".join(rest.split()) or "unnamed task")
                digest.tasks.append(task)
                section = "other"
                continue
            kind = _section_of(text.rstrip(":"))
            if kind and kind != "outcome" and not sep:  # "## Reusable knowledge"
                section = kind
                continue
        if not _BULLET.match(line):
            label = _LABEL.match(line)
            kind = _section_of(label.group("label")) if label else None
            if label and kind:
                rest = label.group("rest").strip()
                if kind == "outcome":
                    ensure_task().outcome = _outcome(rest)
                    section = "other"
                    continue
                section = kind
                if rest and rest.lower().rstrip(".") not in _EMPTY_VALUES:
                    add(rest, new_item=True)
                continue
            if heading:  # an unknown heading ends the current section
                section = "other"
                continue
        bullet = _BULLET.match(line)
        if bullet and len(line) - len(line.lstrip()) < 2:
            add(line[bullet.end() :].strip(), new_item=True)
        else:
            add(stripped if not bullet else "  " + stripped, new_item=False)
    return digest


# --------------------------------------------------------------------------- merging


def _normalise(text: str) -> str:
    text = text.replace("\u2019", "'").lower()
    text = re.sub(r"[`*_]", "", text)
    while True:
        shorter = re.sub(r"\s*\([^()]*\)\s*$", "", text)
        if shorter == text:
            break
        text = shorter
    return " ".join(text.split()).rstrip(".;:!,")


_POLARITY = re.compile(r"^(?:please\s+)?(always|never|do not|don't|dont)\s+(?P<subject>.+)$")


def _polarity(key: str) -> tuple[str, str]:
    """Return ``("+"|"-", subject)`` for ``always X`` / ``never X``, else ``("", key)``."""
    match = _POLARITY.match(key)
    if not match:
        return "", key
    return ("+" if match.group(1) == "always" else "-"), match.group("subject")


@dataclass(slots=True)
class _Entry:
    lines: list[str]
    relpath: str
    traces: set[str] = field(default_factory=set)
    note: str = ""
    polarity: str = ""
    subject: str = ""


_FILLER = re.compile(r"^(?:none|nothing)\b")


def _is_empty(lines: list[str]) -> bool:
    """Placeholders carry no knowledge: ``none``, ``n/a``, short ``nothing beyond ...``."""
    text = _normalise(" ".join(lines))
    return text in _EMPTY_VALUES or (len(text) < 60 and bool(_FILLER.match(text)))


def _collect(items: Sequence[tuple[list[str], str]]) -> list[_Entry]:
    """Deduplicate ``(item lines, trace relpath)`` pairs given newest first."""
    entries: dict[tuple[str, str], _Entry] = {}
    for lines, relpath in items:
        if _is_empty(lines):
            continue
        polarity, subject = _polarity(_normalise(" ".join(lines)))
        key = (polarity, subject)
        entry = entries.get(key)
        if entry is None:
            entry = entries[key] = _Entry(lines, relpath, polarity=polarity, subject=subject)
        entry.traces.add(relpath)
    return list(entries.values())


def _resolve_conflicts(entries: list[_Entry]) -> list[_Entry]:
    """Apply the preference conflict rule (see the module docstring); keeps the order."""
    by_subject: dict[str, list[_Entry]] = {}
    for entry in entries:
        if entry.polarity:
            by_subject.setdefault(entry.subject, []).append(entry)
    dropped: set[int] = set()
    for group in by_subject.values():
        if len(group) < 2:
            continue
        newer, older = group[0], group[1]  # entries are newest first
        older_text = " ".join(older.lines)
        if len(older.traces) > len(newer.traces):
            older.note = (
                f"older guidance, stated in {len(older.traces)} sessions; contradicted by newer "
                f"guidance stated in {len(newer.traces)} — confirm with the user"
            )
            newer.note = "newer guidance; contradicts an older, better-supported preference below"
        else:
            newer.note = f'supersedes older guidance: "{older_text}"'
            dropped.add(id(older))
    return [e for e in entries if id(e) not in dropped]


def _cap(text: str) -> str:
    return text if len(text) <= MAX_ITEM_CHARS else text[: MAX_ITEM_CHARS - 1] + "…"


def _render_entries(entries: list[_Entry]) -> list[str]:
    if not entries:
        return ["none yet"]
    out = []
    for entry in entries[:MAX_ITEMS_PER_SECTION]:
        notes = [entry.note] if entry.note else []
        if len(entry.traces) > 1:
            notes.append(f"seen in {len(entry.traces)} sessions")
        notes.append(f"trace: {entry.relpath}")
        first, *rest = [_cap(line) for line in entry.lines]
        out.append(f"- {first}")
        out.extend(line if line.startswith("  ") else "  " + line for line in rest)
        out[-1] += f" ({'; '.join(notes)})"
    if len(entries) > MAX_ITEMS_PER_SECTION:
        out.append(f"- … {len(entries) - MAX_ITEMS_PER_SECTION} more in the trace files")
    return out


def _date(ts_s: float) -> str:
    return iso_utc(ts_s)[:10] if ts_s > 0 else "undated"


def offline_writer(data: ConsolidationInput) -> Consolidated:
    """The deterministic offline merge (rules in the module docstring). Leaves skills alone."""
    prefs: list[tuple[list[str], str]] = []
    knowledge: list[tuple[list[str], str]] = []
    failures: list[tuple[list[str], str]] = []
    tasks: list[str] = []
    for doc in data.traces:
        digest = parse_trace(doc.body)
        prefs.extend((item, doc.relpath) for item in digest.preferences)
        date = _date(doc.header.updated_at)
        for task in digest.tasks:
            knowledge.extend((item, doc.relpath) for item in task.knowledge)
            failures.extend((item, doc.relpath) for item in task.failures)
            tasks.append(f"- {date} {task.name} — {task.outcome} (trace: {doc.relpath})")
        if not digest.tasks:
            name = digest.title or doc.header.thread_id or "session"
            tasks.append(f"- {date} {' '.join(name.split())} — uncertain (trace: {doc.relpath})")

    project = " ".join(data.project.split())
    lines = [f"# Project memory: {project}", ""]
    if data.traces:
        dates = [d.header.updated_at for d in data.traces]
        lines.append(
            f"Merged offline by memd from {len(data.traces)} trace memories "
            f"({_date(min(dates))} to {_date(max(dates))}); newer guidance wins."
        )
    else:
        lines.append("No trace memories yet.")
    if data.now_s is not None:
        lines.append(f"Generated: {iso_utc(data.now_s)}")
    lines += ["", "## User preferences", *_render_entries(_resolve_conflicts(_collect(prefs)))]
    lines += ["", "## Reusable knowledge", *_render_entries(_collect(knowledge))]
    lines += ["", "## Failures to avoid", *_render_entries(_collect(failures))]
    lines += ["", "## Recent tasks", *(tasks[:MAX_TASK_LINES] or ["none yet"])]
    if len(tasks) > MAX_TASK_LINES:
        lines.append(f"- … {len(tasks) - MAX_TASK_LINES} older tasks in the trace files")
    return Consolidated(memory_md="\n".join(lines) + "\n", skills=None)


# --------------------------------------------------------------------------- staging and swap


def render_skill(skill: Skill) -> str:
    """Render ``SKILL.md``: YAML front matter (``name``, ``description``) then the body.

    The values are folded to one line and written as YAML double-quoted scalars.
    """
    name = json.dumps(" ".join(skill.name.split()), ensure_ascii=False)
    description = json.dumps(" ".join(skill.description.split()), ensure_ascii=False)
    return f"---\nname: {name}\ndescription: {description}\n---\n\n{skill.body.strip()}\n"


def _skill_files(skills: Sequence[Skill]) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for skill in skills:
        base = slugify(skill.name)
        slug, n = base, 2
        while f"{slug}/{SKILL_FILE}" in files:
            slug, n = f"{base}_{n}", n + 1
        files[f"{slug}/{SKILL_FILE}"] = render_skill(skill).encode("utf-8", "surrogatepass")
    return files


def _tree(directory: Path) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    if not directory.is_dir():
        return files
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            files[path.relative_to(directory).as_posix()] = path.read_bytes()
    return files


def _write_file(path: Path, data: bytes) -> None:
    """Create ``path`` (0600, fsynced), creating missing parents (0700)."""
    for parent in reversed(path.parents):
        if not parent.exists():
            os.mkdir(parent, DIR_MODE)
            os.chmod(parent, DIR_MODE)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_memory(staged: Path, final: Path) -> None:
    """Atomically rename the staged ``MEMORY.md`` over the current one."""
    os.replace(staged, final)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap(root: Path, staging: Path, result: Consolidated) -> tuple[bool, bool]:
    """Stage the outputs, move the changed ones into place; return (memory, skills) changed."""
    memory_bytes = result.memory_md.encode("utf-8", "surrogatepass")
    _write_file(staging / MEMORY_FILE, memory_bytes)
    skills_changed = False
    if result.skills is not None:
        wanted = _skill_files(result.skills)
        for relpath, data in wanted.items():
            _write_file(staging / SKILLS_DIR / relpath, data)
        skills_changed = wanted != _tree(root / SKILLS_DIR)
    try:
        memory_changed = (root / MEMORY_FILE).read_bytes() != memory_bytes
    except FileNotFoundError:
        memory_changed = True
    # Every output is fully written: only renames from here on, undone on failure.
    skills_dir, old_skills = root / SKILLS_DIR, staging / "skills.old"
    if skills_changed:
        staged_skills = staging / SKILLS_DIR
        if not staged_skills.exists():
            os.mkdir(staged_skills, DIR_MODE)
        had_skills = skills_dir.exists()
        if had_skills:
            os.rename(skills_dir, old_skills)
        try:
            os.rename(staged_skills, skills_dir)
        except OSError:
            if had_skills:
                os.rename(old_skills, skills_dir)
            raise
    if memory_changed:
        try:
            _replace_memory(staging / MEMORY_FILE, root / MEMORY_FILE)
        except OSError:
            if skills_changed:
                os.rename(skills_dir, staging / "skills.new")
                if old_skills.exists():
                    os.rename(old_skills, skills_dir)
            raise
    if memory_changed or skills_changed:
        _fsync_dir(root)
    return memory_changed, skills_changed


def _project_of(root: Path, traces: Sequence[TraceDoc]) -> str:
    try:
        key = (root / "PROJECT").read_text("utf-8").strip()
    except OSError:
        key = ""
    if key:
        return key
    for doc in traces:
        if doc.header.project:
            return doc.header.project
    return root.parent.name or str(root)


def consolidate_root(
    root: Path,
    *,
    max_traces: int | None = None,
    now_s: float | None = None,
    writer: MemoryWriter | None = None,
    git: bool = True,
) -> BuiltinResult:
    """Consolidate one memory root: traces → ``MEMORY.md`` (+ ``skills/``), staged and swapped.

    Args:
        root: the memory root (``<memory_dir>/<sha256>/memory``).
        max_traces: merge only the newest N trace files (``None``: all of them).
        now_s: a time to print as ``Generated:`` (``None``: no timestamp, byte-identical output
            for identical traces).
        writer: produces the outputs; :func:`offline_writer` when ``None``.
        git: commit the memory root to its git history after a successful run.

    Returns:
        What changed. A second run over the same traces rewrites nothing.

    Raises:
        ConsolidationError: ``root`` is not a directory or the trace directory is unreadable.
        MemoryWriteError: staging or swapping failed (disk full, permissions); the previous
            ``MEMORY.md`` and ``skills/`` are untouched and the staging directory is removed.
        MemdError: whatever the writer raises (same guarantees).
    """
    root = Path(root)
    if not root.is_dir():
        raise ConsolidationError(f"memory root {root} is not a directory")
    stale = remove_stale_staging(root)
    if stale:
        log.info("staging_removed", root=str(root), dirs=stale)
    traces = read_traces(root, max_traces=max_traces)
    try:
        previous = (root / MEMORY_FILE).read_text("utf-8", "replace")
    except FileNotFoundError:
        previous = ""
    except OSError as exc:
        raise ConsolidationError(f"cannot read {root / MEMORY_FILE}: {exc}") from exc
    skills_dir = root / SKILLS_DIR
    existing: tuple[str, ...] = ()
    if skills_dir.is_dir():
        existing = tuple(sorted(p.name for p in skills_dir.iterdir() if p.is_dir()))
    data = ConsolidationInput(_project_of(root, traces), tuple(traces), previous, existing, now_s)
    result = (writer or offline_writer)(data)

    staging = root / f"{STAGING_PREFIX}{secrets.token_hex(8)}"
    try:
        os.mkdir(staging, DIR_MODE)
        os.chmod(staging, DIR_MODE)
        memory_changed, skills_changed = _swap(root, staging, result)
    except OSError as exc:
        log.error("consolidate_write_failed", root=str(root), error=str(exc))
        raise MemoryWriteError(
            f"cannot write the consolidated memory in {root}: {exc.strerror or exc}; "
            "the previous MEMORY.md and skills/ are unchanged"
        ) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    committed = False
    if git:
        committed = commit_memory_root(root, f"memd: consolidate {len(traces)} trace memories")
    log.info(
        "consolidate_root_done",
        root=str(root),
        traces=len(traces),
        memory_changed=memory_changed,
        skills_changed=skills_changed,
        committed=committed,
    )
    return BuiltinResult(root, len(traces), memory_changed, skills_changed, committed)
