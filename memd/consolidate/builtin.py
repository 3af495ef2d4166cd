"""The built-in consolidator behind ``memd consolidate --root DIR`` (SPEC §7, §19).

:func:`consolidate_root` reads a memory root's trace files and its previous ``MEMORY.md``, asks a
*writer* for the new ``MEMORY.md`` (and optionally ``skills/``), stages the outputs in
``<root>/.staging-<random>/`` and swaps them in only when everything was written; on any failure
the previous ``MEMORY.md`` and ``skills/`` stay untouched. Unchanged outputs are not rewritten.
Each successful run is committed to the memory root's git history when git is available. A root
with no trace memory and no previous ``MEMORY.md`` gets no ``MEMORY.md``.

The default writer, :func:`offline_writer`, is deterministic (no network, no clock) and
**incremental**: its input is the previous handbook's entries — each with its date and provenance
(:mod:`memd.consolidate.entries`) — plus the trace memories not merged yet, so what a session
taught outlives the pruning of its trace file. A trailing ``<!-- memd merged: <id>:<hash> ... -->``
comment names the trace files already merged (those still on disk), so a trace is counted once.

* each new trace is read as the SPEC §6.3 skeleton and turned into candidate entries
  (:mod:`memd.consolidate.harvest`) for the sections *Start here*, *User preferences*, *Pitfalls
  and pivots*, *Verification*, *Open follow-ups* and *Recent tasks*;
* they are merged into the previous entries oldest session first (:mod:`memd.consolidate.merge`):
  the same entry from another session counts one more session and takes the newer provenance;
  conflicting preferences resolve newer-wins, or both stay with a note when the older one has
  stronger evidence (more sessions); a successful task closes its open follow-up;
* provenance is short: ``[019a085e 2025-10-21]`` (the newest session that said it; ``; 3 sessions``
  when more did); no line repeats another; each section is capped and the file stays under
  24 KB;
* a procedure repeated across two or more sessions becomes ``skills/<name>/SKILL.md``
  (:mod:`memd.consolidate.skills`); skills written by a model or a person are kept.

A model-backed writer plugs in through the :class:`MemoryWriter` seam and gets the same input
(the previous ``MEMORY.md`` included); :func:`consolidate_root` keeps the merged-traces comment
whatever the writer returns.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import structlog

from memd.clock import iso_utc
from memd.consolidate.entries import (
    Provenance,
    parse_memory,
    render_memory,
    short_id,
    with_marker,
)
from memd.consolidate.gitlog import commit_memory_root
from memd.consolidate.harvest import harvest, read_trace, task_names
from memd.consolidate.merge import SessionEntries, merge
from memd.consolidate.skills import OFFLINE_MARK, offline_skills
from memd.errors import ConsolidationError, MemoryWriteError
from memd.extract.redact import redact
from memd.memory.files import (
    DIR_MODE,
    FILE_MODE,
    OLD_SKILLS,
    STAGING_PREFIX,
    TRACE_DIR,
    TraceHeader,
    not_a_memory_root,
    parse_trace_file,
    remove_stale_staging,
    slugify,
)

log = structlog.get_logger(__name__)

MEMORY_FILE = "MEMORY.md"
SKILLS_DIR = "skills"
SKILL_FILE = "SKILL.md"
TRACE_READ_MAX_BYTES = 1024 * 1024
#: Bytes read of one existing ``SKILL.md``.
SKILL_READ_MAX_BYTES = 64 * 1024


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
        skills: the existing skills read from ``skills/<name>/SKILL.md`` (name = directory).
    """

    project: str
    traces: tuple[TraceDoc, ...]
    previous_memory_md: str
    existing_skills: tuple[str, ...]
    now_s: float | None = None
    skills: tuple[Skill, ...] = ()

    def is_new(self, doc: TraceDoc) -> bool:
        """Whether ``doc`` was not merged into the previous ``MEMORY.md`` yet (or changed since)."""
        return trace_marker(doc) not in parse_memory(self.previous_memory_md).merged


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


#: Prefix of the line ``memd consolidate`` prints on stdout after each memory root it was given,
#: followed by the :class:`RootOutcome` as JSON. The consolidation runner reads these lines to
#: settle each project of a batch under its own lease.
RESULT_PREFIX = "memd-consolidate-result "


@dataclass(frozen=True, slots=True)
class RootOutcome:
    """The outcome of one memory root in a ``memd consolidate --root A --root B ...`` run.

    Attributes:
        root: the memory root as it was given on the command line.
        ok: it was consolidated.
        error: why not (one line), ``None`` when ``ok``.
    """

    root: str
    ok: bool
    error: str | None = None

    def line(self) -> str:
        """The result line (``RESULT_PREFIX`` + JSON, no newline)."""
        return RESULT_PREFIX + json.dumps({"root": self.root, "ok": self.ok, "error": self.error})

    @classmethod
    def parse(cls, line: str) -> RootOutcome | None:
        """The outcome a result line carries; ``None`` for any other line (or a malformed one)."""
        if not line.startswith(RESULT_PREFIX):
            return None
        try:
            obj = json.loads(line[len(RESULT_PREFIX) :])
        except ValueError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("root"), str) or not isinstance(obj.get("ok"), bool):
            return None
        error = obj.get("error")
        return cls(obj["root"], obj["ok"], error if isinstance(error, str) else None)


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


def trace_marker(doc: TraceDoc) -> str:
    """``<thread id>:<hash of the body>``: names a trace in the merged-traces comment (the full id:
    the short ids of provenance can repeat for sessions started within the same minute)."""
    digest = hashlib.sha256(doc.body.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    thread = "".join((doc.header.thread_id or doc.relpath).split()).replace(":", "_")
    return f"{thread}:{digest}"


def session_date(doc: TraceDoc) -> str:
    """The session's date: the header's ``session_date``, else the ``Trace context`` line's, else the
    header's ``updated_at`` date (a file time: the last resort)."""
    if doc.header.started_at > 0:
        return iso_utc(doc.header.started_at)[:10]
    return read_trace(doc.body).date or (iso_utc(doc.header.updated_at)[:10] if doc.header.updated_at > 0 else "")


# --------------------------------------------------------------------------- reading skills


def parse_skill_file(name: str, text: str) -> Skill:
    """Read a ``SKILL.md`` written by :func:`render_skill` (YAML front matter with double-quoted
    ``name`` and ``description``, then the body). A file without front matter becomes a skill named
    ``name`` whose body is the whole text."""
    lines = text.split("\n")
    if lines and lines[0].strip() == "---":
        end = next((i for i in range(1, len(lines)) if lines[i].strip() == "---"), -1)
        if end > 0:
            meta: dict[str, str] = {}
            for line in lines[1:end]:
                key, sep, value = line.partition(":")
                if not sep:
                    continue
                value = value.strip()
                try:
                    parsed = json.loads(value) if value.startswith('"') else value
                except ValueError:
                    parsed = value.strip('"')
                meta[key.strip()] = str(parsed)
            body = "\n".join(lines[end + 1 :]).strip()
            return Skill(meta.get("name") or name, meta.get("description", ""), body)
    return Skill(name, "", text.strip())


def read_skills(root: Path) -> tuple[Skill, ...]:
    """The skills under ``<root>/skills/`` (unreadable ones skipped with ``skill_unreadable``)."""
    directory = Path(root) / SKILLS_DIR
    if not directory.is_dir():
        return ()
    skills = []
    for sub in sorted(p for p in directory.iterdir() if p.is_dir()):
        try:
            with open(sub / SKILL_FILE, "rb") as handle:
                text = handle.read(SKILL_READ_MAX_BYTES).decode("utf-8", "replace")
        except OSError as exc:
            log.warning("skill_unreadable", path=str(sub / SKILL_FILE), error=type(exc).__name__)
            continue
        skills.append(parse_skill_file(sub.name, text))
    return tuple(skills)


# --------------------------------------------------------------------------- the offline writer


def _oldest_first(traces: Sequence[TraceDoc]) -> list[tuple[TraceDoc, str]]:
    dated = [(doc, session_date(doc)) for doc in traces]
    return sorted(dated, key=lambda d: (d[1], d[0].header.updated_at, d[0].header.thread_id, d[0].relpath))


#: The lines under the title of an offline ``MEMORY.md``.
HEADER = (
    "Kept by memd, merged incrementally: newer guidance wins; `[019a085e 2025-10-21]` names the newest",
    "session that said it. Guidance, not truth: the repository and the user win.",
)


def offline_writer(data: ConsolidationInput) -> Consolidated:
    """The deterministic, incremental merge (rules in the module docstring)."""
    previous = parse_memory(data.previous_memory_md, live=frozenset(d.relpath for d in data.traces))
    sessions: list[SessionEntries] = []
    seen: dict[str, list[Provenance]] = {}
    for doc, date in _oldest_first(data.traces):
        facts = read_trace(doc.body)
        source = Provenance.of(doc.header.thread_id or doc.relpath, date)
        entries = harvest(facts, source)
        for entry in entries:
            seen.setdefault(entry.key, []).append(source)
        if trace_marker(doc) not in previous.merged:
            sessions.append(SessionEntries(source, tuple(entries), tuple(task_names(facts))))
    merged = merge(previous.entries, sessions)
    header = list(HEADER)
    if data.now_s is not None:
        header.append(f"Generated: {iso_utc(data.now_s)}")
    memory_md = render_memory(data.project, merged, header=header)
    derived = [Skill(n, d, b) for n, d, b in offline_skills(merged, seen)]
    kept = [s for s in data.skills if OFFLINE_MARK not in s.body]
    if not derived and len(kept) == len(data.skills):
        return Consolidated(memory_md=memory_md, skills=None)
    names = {slugify(s.name) for s in derived}
    return Consolidated(memory_md=memory_md, skills=tuple(kept + [s for s in derived if slugify(s.name) in names]))


def forget_thread(root: Path, thread_id: str) -> bool:
    """Take a forgotten session out of ``<root>/MEMORY.md`` (``memd forget``).

    Entries only that session stated are dropped; entries more sessions stated count one session
    less; its trace leaves the merged-traces comment. Written atomically (temp file + rename).

    Returns:
        Whether ``MEMORY.md`` changed.

    Raises:
        MemoryWriteError: the file cannot be written (the previous one stays).
    """
    path = Path(root) / MEMORY_FILE
    try:
        text = path.read_text("utf-8", "replace")
    except FileNotFoundError:
        return False
    short = short_id(thread_id)
    parsed = parse_memory(text)
    kept = [
        e if e.source.thread != short else replace(e, sessions=e.sessions - 1)
        for e in parsed.entries
        if not (e.source.thread == short and e.sessions <= 1)
    ]
    header = [line for line in text.split("## ", 1)[0].splitlines()[1:] if line.strip()]
    project = text.splitlines()[0].removeprefix("# Project memory:").strip() if text else ""
    merged = [m for m in parsed.merged if not m.startswith((f"{thread_id}:", f"{short}:"))]
    new = render_memory(project, kept, header=header, merged=merged)
    if new == text:
        return False
    staging = Path(root) / f"{STAGING_PREFIX}{secrets.token_hex(8)}"
    try:
        os.mkdir(staging, DIR_MODE)
        _write_file(staging / MEMORY_FILE, new.encode("utf-8", "surrogatepass"))
        _replace_memory(staging / MEMORY_FILE, path)
    except OSError as exc:
        raise MemoryWriteError(f"cannot rewrite {path}: {exc.strerror or exc}; it is unchanged") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return True


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


def _stage_skills(root: Path, staging: Path, result: Consolidated) -> bool:
    """Write the wanted ``skills/`` into the staging directory; whether it differs from the current one."""
    if result.skills is None:
        return False
    wanted = {  # redacted as written, like MEMORY.md (SPEC §14)
        relpath: redact(data.decode("utf-8", "surrogatepass"))[0].encode("utf-8", "surrogatepass")
        for relpath, data in _skill_files(result.skills).items()
    }
    for relpath, data in wanted.items():
        _write_file(staging / SKILLS_DIR / relpath, data)
    return wanted != _tree(root / SKILLS_DIR)


def _swap_skills(root: Path, staging: Path) -> None:
    """Rename the staged ``skills/`` into place, keeping the old one in the staging directory (a crash
    between the two renames leaves no ``skills/``: :func:`~memd.memory.files.remove_stale_staging`
    puts the old one back)."""
    skills_dir, old_skills = root / SKILLS_DIR, staging / OLD_SKILLS
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


def _swap(root: Path, staging: Path, result: Consolidated) -> tuple[bool, bool]:
    """Stage the outputs, move the changed ones into place; return (memory, skills) changed."""
    # Every memory file is redacted as it is written (SPEC §14), whatever produced its text: a
    # secret that an older trace quoted (written before a redaction rule existed) stops here.
    memory_bytes = redact(result.memory_md)[0].encode("utf-8", "surrogatepass")
    _write_file(staging / MEMORY_FILE, memory_bytes)
    skills_changed = _stage_skills(root, staging, result)
    try:
        memory_changed = (root / MEMORY_FILE).read_bytes() != memory_bytes
    except FileNotFoundError:
        memory_changed = True
    # Every output is fully written: only renames from here on, undone on failure.
    if skills_changed:
        _swap_skills(root, staging)
    if memory_changed:
        try:
            _replace_memory(staging / MEMORY_FILE, root / MEMORY_FILE)
        except OSError:
            if skills_changed:
                os.rename(root / SKILLS_DIR, staging / "skills.new")
                if (staging / OLD_SKILLS).exists():
                    os.rename(staging / OLD_SKILLS, root / SKILLS_DIR)
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
        ConsolidationError: ``root`` is not a directory, not a memory root memd made (no
            ``PROJECT`` marker, :func:`~memd.memory.files.not_a_memory_root`), or the trace
            directory is unreadable.
        MemoryWriteError: staging or swapping failed (disk full, permissions); the previous
            ``MEMORY.md`` and ``skills/`` are untouched and the staging directory is removed.
        MemdError: whatever the writer raises (same guarantees).

    A root without trace memories and without a ``MEMORY.md`` is left as it is (nothing written).
    """
    root = Path(root)
    if not root.is_dir():
        raise ConsolidationError(f"memory root {root} is not a directory")
    refused = not_a_memory_root(root)
    if refused is not None:
        raise ConsolidationError(f"refused: {refused}")
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
    if not traces and not previous.strip():
        log.info("consolidate_root_nothing", root=str(root), reason="no trace memory and no MEMORY.md")
        return BuiltinResult(root, 0, False, False, False)
    skills_dir = root / SKILLS_DIR
    existing: tuple[str, ...] = ()
    if skills_dir.is_dir():
        existing = tuple(sorted(p.name for p in skills_dir.iterdir() if p.is_dir()))
    data = ConsolidationInput(
        _project_of(root, traces), tuple(traces), previous, existing, now_s, skills=read_skills(root)
    )
    result = (writer or offline_writer)(data)
    result = replace(result, memory_md=with_marker(result.memory_md, [trace_marker(d) for d in traces]))

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
