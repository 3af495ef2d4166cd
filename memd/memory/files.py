"""Memory files on disk: layout, slugs, trace files and crash-safe writes (SPEC §5, §8).

Layout of one project (SPEC §8)::

    <memory_dir>/<sha256(project key)>/memory/
        PROJECT                                  the project key
        trace_summaries/<thread id>_<main task slug>.md
        memory_summary.md                        routing map (SPEC §7)
        MEMORY.md                                consolidated handbook
        skills/<name>/SKILL.md                   optional procedures

Directories are 0700 and files 0600, set explicitly (never left to the umask).

Write protocol (the SPEC §5 invariant: a trace file and its ``memories`` row change together):

1. :func:`stage_file` writes the new content to ``<final>.tmp-memd-<random>`` and fsyncs it;
2. the caller commits the ``memories`` row in the database;
3. :meth:`StagedFile.commit` renames the temp file over the final name (then fsyncs the
   directory) — or, when the database transaction was rolled back, :meth:`StagedFile.abort`
   removes the temp file.

Crash analysis:

* crash before step 2 commits: the old row and the old file are intact; a temp file may remain.
  :func:`recover` removes it at the next start-up.
* crash between step 2 and step 3: the database holds the new row but the disk still holds the
  old file (or none). :func:`recover` removes the temp file; the caller then checks every row
  with :func:`trace_exists` (passing the row's ``trace_memory``) and, when the file is missing or
  holds another body, rewrites the file from the row (or re-runs extraction for that thread).
  The database row is the truth; the file is always derivable from it.
* crash after step 3: the new pair is in place; a leftover trace file of the same thread under
  an older title slug is superseded (its thread's row names the new file): :func:`recover` removes
  it at start-up. A trace whose thread has no row at all is kept (it is the only copy).
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from memd.clock import iso_utc, parse_iso
from memd.errors import MemoryWriteError
from memd.extract.redact import redact
from memd.rollout.records import Agent

log = structlog.get_logger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600
TRACE_DIR = "trace_summaries"
TEMP_MARKER = ".tmp-memd-"
STAGING_PREFIX = ".staging-"
SLUG_MAX_CHARS = 64

_SLUG_RUN = re.compile(r"[^a-z0-9]+")
_HEADER_KEYS = (
    "thread_id",
    "agent",
    "project",
    "cwd",
    "rollout_path",
    "session_date",
    "updated_at",
    "source_watermark",
)
#: A thread id kept verbatim in a trace file name (Codex and Claude ids match it).
SAFE_ID = re.compile(r"[A-Za-z0-9-]{1,64}")
_HEADER_READ_BYTES = 16 * 1024


# --------------------------------------------------------------------------- layout and slugs


def project_root(memory_dir: Path, project_key: str) -> Path:
    """Return the memory root of a project: ``<memory_dir>/<sha256(project key)>/memory``.

    Args:
        memory_dir: the configured ``memory_dir``.
        project_key: the project key (SPEC §4); hashed as UTF-8 (hex digest, 64 chars).
    """
    digest = hashlib.sha256(project_key.encode("utf-8", "surrogatepass")).hexdigest()
    return Path(memory_dir) / digest / "memory"


def not_a_memory_root(root: Path) -> str | None:
    """Why ``root`` is not a memory root that memd made, or ``None`` when it is (SPEC §14).

    A memd memory root holds a regular ``PROJECT`` file (not a symlink) of one line, the project
    key, as :func:`ensure_project_root` writes it: a folder a user points ``memd consolidate
    --root`` at by mistake (a repository, a home directory) has none.

    Returns:
        A sentence for the error message, or ``None``.
    """
    marker = Path(root) / "PROJECT"
    try:
        if marker.is_symlink() or not marker.is_file():
            return f"{root} has no PROJECT marker written by memd (not a memd memory root)"
        key = marker.read_text("utf-8", "surrogateescape")
    except OSError as exc:
        return f"{root}/PROJECT cannot be read: {exc.strerror}"
    if not key.endswith("\n") or "\n" in key[:-1] or not key[:-1].strip():
        return f"{root}/PROJECT is not the one-line project key memd writes (not a memd memory root)"
    return None


#: ``<memory_dir>/FORGOTTEN``: ids of sessions removed by ``memd forget``, one per line. It lives with
#: the memories, not in the database, so a rebuilt or recovered database never brings them back.
TOMBSTONE_FILE = "FORGOTTEN"


def read_tombstones(memory_dir: Path) -> frozenset[str]:
    """The thread ids ``memd forget`` removed (empty when there is no tombstone file)."""
    try:
        text = (Path(memory_dir) / TOMBSTONE_FILE).read_text("utf-8", "replace")
    except OSError:
        return frozenset()
    return frozenset(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))


class TombstoneReader:
    """``memd forget``'s tombstones (``<memory_dir>/FORGOTTEN``), re-read only when the file changes.

    Calling it costs one ``stat`` (the indexer asks for every new thread); the ids are re-read when
    the file's mtime or size changed, and are empty while the file does not exist.

    Args:
        memory_dir: the memory directory that holds ``FORGOTTEN``.
    """

    def __init__(self, memory_dir: Path) -> None:
        self._memory_dir = Path(memory_dir)
        self._path = self._memory_dir / TOMBSTONE_FILE
        self._seen: tuple[int, int] | None = None
        self._ids: frozenset[str] = frozenset()

    def __call__(self) -> frozenset[str]:
        """The forgotten thread ids as of now."""
        try:
            st = self._path.stat()
            key: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except OSError:
            key = None
        if key != self._seen:
            self._seen = key
            self._ids = read_tombstones(self._memory_dir) if key else frozenset()
        return self._ids


def add_tombstone(memory_dir: Path, thread_id: str) -> None:
    """Record ``thread_id`` in ``<memory_dir>/FORGOTTEN`` (0600, atomic).

    Raises:
        MemoryWriteError: the file cannot be written.
    """
    ids = sorted(read_tombstones(memory_dir) | {thread_id})
    header = "# sessions removed by `memd forget`; memd never extracts them again\n"
    _make_dir(Path(memory_dir))
    write_file_atomic(Path(memory_dir), TOMBSTONE_FILE, header + "".join(f"{i}\n" for i in ids))


def ensure_project_root(memory_dir: Path, project_key: str) -> Path:
    """Create a project's memory root (0700) and write its ``PROJECT`` file (0600).

    ``memory_dir`` itself is created 0700 when missing (an existing one keeps its mode). The
    ``PROJECT`` file holds the project key followed by a newline and is rewritten (atomically)
    only when its content differs.

    Returns:
        The memory root (see :func:`project_root`).

    Raises:
        MemoryWriteError: a directory or the ``PROJECT`` file cannot be written.
    """
    root = project_root(memory_dir, project_key)
    try:
        _make_dir(Path(memory_dir))
        _make_dir(root.parent, force_mode=True)
        _make_dir(root, force_mode=True)
    except OSError as exc:
        raise MemoryWriteError(f"cannot create the memory directory {root}: {exc}") from exc
    write_file_atomic(root, "PROJECT", project_key + "\n")
    return root


def slugify(text: str) -> str:
    """Turn untrusted text into a safe file-name component (SPEC §8).

    Lowercase ASCII alphanumerics are kept; every run of anything else (``/``, ``.``, NUL,
    spaces, non-ASCII letters) becomes one ``_``; leading and trailing ``_`` are trimmed; the
    result is cut to 64 characters; ``trace`` is returned when nothing is left. The result
    never contains a path separator or a dot, so it can never name a parent directory.
    """
    lowered = text.lower()
    slug = _SLUG_RUN.sub("_", lowered).strip("_")
    slug = slug[:SLUG_MAX_CHARS].rstrip("_")
    return slug or "trace"


def file_id(thread_id: str) -> str:
    """The thread id as it appears in a trace file name: verbatim when it matches
    :data:`SAFE_ID` (hyphens kept, as Codex and Claude ids are), else slugged (an id comes from
    an untrusted rollout and could name a path)."""
    return thread_id if SAFE_ID.fullmatch(thread_id) else slugify(thread_id)


def trace_relpath(thread_id: str, title: str) -> str:
    """Return the path of a thread's trace file relative to the memory root (SPEC §8).

    ``trace_summaries/<thread id>_<slugify(title)>.md``, the id as :func:`file_id` gives it;
    ``title`` is the name of the trace's main task.
    """
    return f"{TRACE_DIR}/{file_id(thread_id)}_{slugify(title)}.md"


def legacy_trace_prefix(thread_id: str) -> str:
    """The file-name prefix trace files had before ids were kept verbatim (the slugged id and
    ``_``): such files are renamed once at start-up (:mod:`memd.memory.recover`)."""
    return slugify(thread_id) + "_"


# --------------------------------------------------------------------------- trace file format


@dataclass(frozen=True, slots=True)
class TraceHeader:
    """The header lines of a trace file (SPEC §8): enough to rebuild the state from the files.

    Attributes:
        thread_id: the session id.
        project: the project key.
        cwd: the session's working directory as recorded.
        rollout_path: the rollout file the trace was built from.
        updated_at: the thread's last activity, epoch seconds (0.0 when unknown).
        agent: the agent that wrote the session.
        started_at: when the session started (its session date), epoch seconds (0.0 when unknown).
        source_watermark: the bytes of the rollout the trace was built from.
    """

    thread_id: str
    project: str
    cwd: str
    rollout_path: str
    updated_at: float
    agent: Agent = Agent.CODEX
    started_at: float = 0.0
    source_watermark: int = 0


def _one_line(value: str) -> str:
    return " ".join(str(value).split())


def render_trace_file(header: TraceHeader, trace_memory: str) -> str:
    """Render a trace file: the ``key: value`` header lines, a blank line, the trace memory.

    Keys, in order: ``thread_id``, ``agent``, ``project``, ``cwd``, ``rollout_path``,
    ``session_date``, ``updated_at``, ``source_watermark``. Values are folded to one line (a
    crafted cwd cannot inject header lines); times are ISO-8601 UTC (``2026-01-02T17:00:00Z``).
    The text ends with a newline.
    """
    lines = [
        f"thread_id: {_one_line(header.thread_id)}",
        f"agent: {header.agent.value}",
        f"project: {_one_line(header.project)}",
        f"cwd: {_one_line(header.cwd)}",
        f"rollout_path: {_one_line(header.rollout_path)}",
        f"session_date: {iso_utc(header.started_at)}",
        f"updated_at: {iso_utc(header.updated_at)}",
        f"source_watermark: {int(header.source_watermark)}",
    ]
    body = trace_memory.rstrip("\n")
    return "\n".join(lines) + "\n\n" + body + "\n"


def _agent(value: str) -> Agent:
    """The header's agent; Codex when missing or unknown (files written before the key existed)."""
    try:
        return Agent(value)
    except ValueError:
        return Agent.CODEX


def parse_trace_file(text: str) -> tuple[TraceHeader, str]:
    """Split a trace file into its header and its trace memory (inverse of render).

    Leniently: header lines are the leading ``key: value`` lines with a known key; the header
    ends at the first blank line (consumed) or at the first other line (kept in the body).
    Missing keys are ``""`` (times 0.0, the watermark 0, the agent ``codex``: files written
    before those keys existed are Codex traces).

    Returns:
        ``(header, body)`` where ``body`` is the trace memory without its final newline.
    """
    values: dict[str, str] = {}
    lines = text.split("\n")
    index = 0
    while index < len(lines):
        line = lines[index]
        if not line.strip():
            index += 1
            break
        key, sep, value = line.partition(":")
        if not sep or key.strip() not in _HEADER_KEYS:
            break
        values[key.strip()] = value.strip()
        index += 1
    body = "\n".join(lines[index:]).rstrip("\n")
    watermark = values.get("source_watermark", "")
    header = TraceHeader(
        thread_id=values.get("thread_id", ""),
        project=values.get("project", ""),
        cwd=values.get("cwd", ""),
        rollout_path=values.get("rollout_path", ""),
        updated_at=parse_iso(values.get("updated_at")) or 0.0,
        agent=_agent(values.get("agent", "")),
        started_at=parse_iso(values.get("session_date")) or 0.0,
        source_watermark=int(watermark) if watermark.isdigit() else 0,
    )
    return header, body


def read_trace_header(path: Path) -> TraceHeader | None:
    """The header of the trace file ``path`` (its first 16 KiB read), or ``None`` when unreadable."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(_HEADER_READ_BYTES)
    except OSError:
        return None
    return parse_trace_file(head.decode("utf-8", "replace"))[0]


def trace_headers(root: Path) -> dict[str, TraceHeader]:
    """``{relpath: header}`` of every ``trace_summaries/*.md`` file of ``root`` (symlinks and
    unreadable files left out; empty when there is no such directory)."""
    directory = Path(root) / TRACE_DIR
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return {}
    headers: dict[str, TraceHeader] = {}
    for name in names:
        path = directory / name
        if not name.endswith(".md") or path.is_symlink():
            continue
        header = read_trace_header(path)
        if header is not None:
            headers[f"{TRACE_DIR}/{name}"] = header
    return headers


# --------------------------------------------------------------------------- low-level helpers


def _make_dir(path: Path, *, force_mode: bool = False) -> None:
    """Create ``path`` (and missing parents, 0700). Existing dirs get 0700 only if forced."""
    if path.is_dir():
        if force_mode and (path.stat().st_mode & 0o777) != DIR_MODE:
            os.chmod(path, DIR_MODE)
        return
    if not path.parent.is_dir():
        _make_dir(path.parent)
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        if not path.is_dir():
            raise
        return
    os.chmod(path, DIR_MODE)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def safe_target(root: Path, relpath: str) -> Path:
    """Resolve ``relpath`` under ``root``, refusing absolute paths and ``..`` components."""
    rel = Path(relpath)
    if rel.is_absolute() or not rel.parts or any(p in ("..", ".", "") for p in rel.parts):
        raise MemoryWriteError(f"refusing to write outside the memory root: {relpath!r}")
    if "\x00" in relpath:
        raise MemoryWriteError(f"refusing a path with a NUL byte: {relpath!r}")
    return Path(root) / rel


def _write_error(path: Path, exc: OSError) -> MemoryWriteError:
    if exc.errno == errno.ENOSPC:
        why = "disk full (ENOSPC)"
    elif exc.errno == errno.EDQUOT:
        why = "disk quota exceeded (EDQUOT)"
    elif isinstance(exc, PermissionError):
        why = "permission denied"
    else:
        why = exc.strerror or str(exc)
    return MemoryWriteError(f"cannot write memory file {path}: {why}; nothing was changed")


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("memory_temp_remove_failed", path=str(path), error=str(exc))


# --------------------------------------------------------------------------- staged writes


@dataclass(slots=True)
class StagedFile:
    """A fully written, fsynced temp file waiting to be renamed over its final name.

    Made by :func:`stage_file`. Call :meth:`commit` after the database row committed, or
    :meth:`abort` after a rollback. Used as a context manager, leaving the block without
    committing aborts.

    Attributes:
        root: the memory root.
        relpath: the final path relative to ``root``.
        final: ``root / relpath``.
        temp: the temp file (``<final>.tmp-memd-<random>``).
        thread_id: for a trace file, its thread id: committing removes the thread's other trace
            files (its title, hence its slug, may have changed). ``None`` otherwise.
    """

    root: Path
    relpath: str
    final: Path
    temp: Path
    thread_id: str | None = None
    state: str = field(default="staged")

    def commit(self) -> list[str]:
        """Rename the temp file to the final name, fsync the directory, drop stale siblings.

        Idempotent once committed.

        Returns:
            The relpaths of other trace files of the same thread that were removed.

        Raises:
            MemoryWriteError: the rename failed (the temp file is removed) or the file was
                already aborted.
        """
        if self.state == "committed":
            return []
        if self.state != "staged":
            raise MemoryWriteError(f"staged file {self.relpath} was aborted; cannot commit")
        try:
            os.replace(self.temp, self.final)
        except OSError as exc:
            _unlink_quietly(self.temp)
            self.state = "aborted"
            raise _write_error(self.final, exc) from exc
        self.state = "committed"
        _fsync_dir(self.final.parent)
        removed: list[str] = []
        if self.thread_id is not None:
            removed = _remove_thread_files(self.root, self.thread_id, keep=self.final.name)
        return removed

    def abort(self) -> None:
        """Remove the temp file (the final file is untouched). Idempotent; no-op after commit."""
        if self.state != "staged":
            return
        _unlink_quietly(self.temp)
        self.state = "aborted"

    def __enter__(self) -> StagedFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.abort()


def stage_file(root: Path, relpath: str, content: str, *, thread_id: str | None = None) -> StagedFile:
    """Write ``content``, redacted (SPEC §14), to a temp file beside ``root / relpath`` (0600, fsynced).

    Missing parent directories are created 0700. Nothing visible under the final name changes
    until :meth:`StagedFile.commit`.

    Args:
        root: the memory root.
        relpath: the final path relative to ``root`` (no absolute path, no ``..``).
        content: the text, written as UTF-8.
        thread_id: for a trace file, the thread whose other trace files commit removes; when
            ``None`` and ``relpath`` is under ``trace_summaries/``, it is read from the
            content's header.

    Raises:
        MemoryWriteError: ``relpath`` escapes the root, or the write failed (disk full,
            permissions): no temp file is left behind.
    """
    final = safe_target(root, relpath)
    temp = final.with_name(f"{final.name}{TEMP_MARKER}{secrets.token_hex(8)}")
    content = redact(content)[0]  # every memory file is redacted as it is written (SPEC §14)
    if thread_id is None and Path(relpath).parts[0] == TRACE_DIR:
        thread_id = parse_trace_file(content[:_HEADER_READ_BYTES])[0].thread_id or None
    data = content.encode("utf-8", "surrogatepass")
    fd = -1
    try:
        _make_dir(final.parent)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
        os.fchmod(fd, FILE_MODE)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except OSError as exc:
        if fd >= 0:
            os.close(fd)
            fd = -1
        _unlink_quietly(temp)
        error = _write_error(final, exc)
        log.error("memory_write_failed", path=str(final), error=str(error))
        raise error from exc
    finally:
        if fd >= 0:
            os.close(fd)
    return StagedFile(root=Path(root), relpath=relpath, final=final, temp=temp, thread_id=thread_id)


def write_file_atomic(root: Path, relpath: str, content: str) -> bool:
    """Write ``root / relpath`` atomically (stage + commit), skipping identical content.

    For files without a database row (``PROJECT``, ``memory_summary.md``).

    Returns:
        ``True`` when the file was (re)written, ``False`` when it already held ``content``.

    Raises:
        MemoryWriteError: the write failed; the previous file is intact.
    """
    final = safe_target(root, relpath)
    content = redact(content)[0]
    try:
        if final.read_bytes() == content.encode("utf-8", "surrogatepass"):
            return False
    except OSError:
        pass
    stage_file(root, relpath, content, thread_id=None).commit()
    return True


# --------------------------------------------------------------------------- trace files


def _thread_files(root: Path, thread_id: str) -> list[Path]:
    """Trace files whose header names ``thread_id`` (the name's prefix narrows — the current
    one or the legacy slugged one — and the header decides)."""
    directory = Path(root) / TRACE_DIR
    prefixes = (file_id(thread_id) + "_", legacy_trace_prefix(thread_id))
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    found = []
    for name in names:
        if not name.startswith(prefixes) or not name.endswith(".md"):
            continue
        path = directory / name
        if path.is_symlink() or not path.is_file():
            continue
        header = read_trace_header(path)
        if header is not None and header.thread_id == thread_id:
            found.append(path)
    return found


def _remove_thread_files(root: Path, thread_id: str, *, keep: str | None) -> list[str]:
    removed = []
    for path in _thread_files(root, thread_id):
        if path.name == keep:
            continue
        try:
            os.unlink(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("trace_remove_failed", path=str(path), error=str(exc))
            continue
        removed.append(f"{TRACE_DIR}/{path.name}")
    if removed:
        _fsync_dir(Path(root) / TRACE_DIR)
        log.info("trace_files_removed", thread_id=thread_id, files=removed)
    return removed


def remove_trace(root: Path, thread_id: str) -> list[str]:
    """Remove every trace file of ``thread_id`` (a no-op memory, or ``memd forget``).

    Returns:
        The removed relpaths (empty when there was none). Never raises for a missing file.
    """
    return _remove_thread_files(root, thread_id, keep=None)


def trace_exists(root: Path, relpath: str, trace_memory: str | None = None) -> bool:
    """Return whether the trace file ``relpath`` exists (and holds ``trace_memory``, if given).

    The start-up check for a crash between the database commit and the rename: a ``memories``
    row whose file is missing, or (with ``trace_memory``) whose file body differs from the row,
    must be rewritten from the row or re-extracted.
    """
    try:
        path = safe_target(root, relpath)
    except MemoryWriteError:
        return False
    if path.is_symlink() or not path.is_file():
        return False
    if trace_memory is None:
        return True
    try:
        text = path.read_text("utf-8", "replace")
    except OSError:
        return False
    return parse_trace_file(text)[1] == trace_memory.rstrip("\n")


#: The skills folder of a memory root, and where a consolidation's swap keeps the previous one
#: (inside its staging directory) until the new one is in place.
SKILLS_DIR = "skills"
OLD_SKILLS = "skills.old"


def _restore_skills(root: Path, staging: Path) -> None:
    """A crash between the two renames of the skills swap left no ``skills/``: put the previous one
    (``<staging>/skills.old``) back before the staging directory goes."""
    skills, old = Path(root) / SKILLS_DIR, staging / OLD_SKILLS
    if os.path.lexists(skills) or old.is_symlink() or not old.is_dir():
        return
    os.rename(old, skills)
    log.warning("skills_restored", root=str(root), source=str(old))


def remove_stale_staging(root: Path, *, min_age_s: float = 0.0) -> list[str]:
    """Remove ``<root>/.staging-*`` directories (left by a crashed consolidation).

    A crash in the middle of the skills swap (the old ``skills/`` moved into the staging directory,
    the new one not yet in place) leaves no ``skills/``: the old one is moved back first.

    Args:
        root: the memory root.
        min_age_s: only directories whose mtime is at least this old are removed.

    Returns:
        The removed directory names.
    """
    removed = []
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return []
    now = time.time()
    for name in names:
        if not name.startswith(STAGING_PREFIX):
            continue
        path = Path(root) / name
        try:
            if path.is_symlink() or not path.is_dir():
                continue
            if now - path.stat().st_mtime < min_age_s:
                continue
            _restore_skills(Path(root), path)
            shutil.rmtree(path)
        except OSError as exc:
            log.warning("staging_remove_failed", path=str(path), error=str(exc))
            continue
        removed.append(name)
    return removed
