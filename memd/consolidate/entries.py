"""The entries of ``MEMORY.md``: records, reading the previous handbook back, rendering (SPEC §19).

``MEMORY.md`` is incremental: each consolidation reads the previous handbook's entries (with their
dates and provenance) and merges the new trace memories into them, so knowledge outlives the
pruning of old trace files. This module is the handbook's format, both ways:

* :class:`Entry` — one bullet: its :class:`Section`, its text, the newest session that stated it
  (:class:`Provenance`, rendered ``[019a085e 2025-10-21]``), how many sessions stated it, and a note
  (a preference conflict). Usage counters (``[consolidation] max_unused_days``, issue 10) are meant
  to become further fields of this record; :func:`parse_memory` and :func:`render_memory` are the
  only places that know the text form.
* :func:`parse_memory` — the entries of a previous ``MEMORY.md`` (also the older memd formats:
  ``Reusable knowledge`` / ``Failures to avoid`` sections and ``(trace: <file>)`` suffixes) and the
  set of trace files already merged into it (a trailing ``<!-- memd merged: ... -->`` comment).
* :func:`render_memory` — the handbook: title, the six sections in order, one line per entry, no
  line repeated, capped per section and as a whole under :data:`MAX_MEMORY_BYTES`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

#: ``MEMORY.md`` stays under this size (Claude Code loads the first 25 KB of its own memory).
MAX_MEMORY_BYTES = 24_000
#: Longest entry text kept (characters, before provenance).
MAX_ENTRY_CHARS = 300
#: Characters of a thread id shown in provenance.
SHORT_ID_CHARS = 8


class Section(StrEnum):
    """The sections of ``MEMORY.md``, in order (SPEC §19)."""

    START_HERE = "Start here"
    PREFERENCES = "User preferences"
    PITFALLS = "Pitfalls and pivots"
    VERIFICATION = "Verification"
    FOLLOW_UPS = "Open follow-ups"
    RECENT_TASKS = "Recent tasks"


#: Most entries kept per section (newest and best-supported first).
SECTION_CAPS: dict[Section, int] = {
    Section.START_HERE: 25,
    Section.PREFERENCES: 20,
    Section.PITFALLS: 25,
    Section.VERIFICATION: 10,
    Section.FOLLOW_UPS: 10,
    Section.RECENT_TASKS: 30,
}

#: What each section holds (printed under its heading when empty, and in the model's template).
SECTION_HINTS: dict[Section, str] = {
    Section.START_HERE: "key paths, and how to build, test and run",
    Section.PREFERENCES: "how the developer wants work done; newer guidance wins",
    Section.PITFALLS: "what failed, and what worked instead",
    Section.VERIFICATION: "how changes were checked",
    Section.FOLLOW_UPS: "work left partial or failed",
    Section.RECENT_TASKS: "newest first, dated by the session",
}

_OLD_SECTIONS = {
    "reusable knowledge": Section.START_HERE,
    "failures to avoid": Section.PITFALLS,
    "pitfalls": Section.PITFALLS,
    "follow-ups": Section.FOLLOW_UPS,
}


@dataclass(frozen=True, slots=True)
class Provenance:
    """Where an entry comes from: the newest session that stated it.

    Attributes:
        thread: the session id, shortened to :data:`SHORT_ID_CHARS` characters (``""``: unknown).
        date: the session's date, ``YYYY-MM-DD`` (``""``: unknown).
    """

    thread: str
    date: str

    @classmethod
    def of(cls, thread_id: str, date: str) -> Provenance:
        """Provenance of a session: its id shortened, its date."""
        return cls(short_id(thread_id), date)

    def render(self, sessions: int = 1) -> str:
        """``[019a085e 2025-10-21]``, with ``; 3 sessions`` when more than one stated it."""
        body = " ".join(p for p in (self.thread, self.date or "undated") if p)
        return f"[{body}{f'; {sessions} sessions' if sessions > 1 else ''}]"


@dataclass(frozen=True, slots=True)
class Entry:
    """One bullet of ``MEMORY.md``.

    Attributes:
        section: where it goes.
        text: the bullet's text on one line, without provenance or note.
        source: the newest session that stated it.
        sessions: how many sessions stated it (evidence for conflicts and skills).
        note: a short note (a preference conflict), ``""`` when none.
    """

    section: Section
    text: str
    source: Provenance
    sessions: int = 1
    note: str = ""

    @property
    def key(self) -> str:
        """The text the deduplication compares (see :func:`entry_key`)."""
        return entry_key(self.text)

    def render(self) -> str:
        """The bullet: ``- text _(note)_ [thread date; N sessions]``."""
        note = f" _({self.note})_" if self.note else ""
        return f"- {self.text}{note} {self.source.render(self.sessions)}"


def short_id(thread_id: str) -> str:
    """The first :data:`SHORT_ID_CHARS` characters of a session id (enough to find its trace)."""
    return thread_id.strip()[:SHORT_ID_CHARS]


def entry_key(text: str) -> str:
    """Normalised text: case, spacing, backticks / emphasis and trailing punctuation ignored."""
    text = text.replace("\u2019", "'").lower()
    text = re.sub(r"[`*_]", "", text)
    return " ".join(text.split()).rstrip(".;:!,")


def one_line(text: str, max_chars: int = MAX_ENTRY_CHARS) -> str:
    """``text`` on one line, cut to ``max_chars`` with ``…``."""
    line = " ".join(text.split())
    return line if len(line) <= max_chars else line[: max_chars - 1].rstrip() + "…"


# --------------------------------------------------------------------------- reading

_PROVENANCE = re.compile(
    r"\s*\[(?P<thread>[0-9A-Za-z_.-]{1,64})?\s*(?P<date>\d{4}-\d{2}-\d{2}|undated)?"
    r"(?:;\s*(?P<n>\d+) sessions)?\]\s*$"
)
_OLD_SUFFIX = re.compile(
    r"\s*\((?:(?P<note>(?!seen in)[^()]*?);\s*)?(?:seen in (?P<n>\d+) sessions;\s*)?trace:\s*[^()]*\)\s*$"
)
_OLD_TRACE = re.compile(r"trace:\s*([^()]+?)\)\s*$")
_NOTE = re.compile(r"\s*_\((?P<note>[^)]*)\)_\s*$")
_OLD_TASK_DATE = re.compile(r"^(?P<date>\d{4}-\d{2}-\d{2}|undated)\s+(?P<rest>.+)$")
_MERGED = re.compile(r"<!--\s*memd merged:(?P<items>[^>]*)-->")
_EMPTY = {"none yet", "none", "none observed", "nothing yet", "n/a"}


@dataclass(frozen=True, slots=True)
class ParsedMemory:
    """A previous ``MEMORY.md`` read back.

    Attributes:
        entries: its entries, in file order.
        merged: trace markers (``<short id>:<body hash>``) already merged into it.
    """

    entries: tuple[Entry, ...]
    merged: frozenset[str]


def parse_memory(text: str, *, live: frozenset[str] = frozenset()) -> ParsedMemory:
    """Read the entries of a ``MEMORY.md`` (any memd format, or one a model or a person wrote).

    Bullets under a known section heading become entries; indented continuation lines join the
    bullet before them; unknown sections, prose and "none yet" placeholders are ignored. A bullet
    without provenance gets an unknown one (``Provenance("", "")``). A bullet of memd's older
    format (``(trace: <file>)``) whose trace file is in ``live`` is left out: that trace is merged
    again, in full. Never raises.
    """
    entries: list[Entry] = []
    section: Section | None = None
    for raw in text.splitlines():
        line = raw.rstrip()
        heading = re.match(r"^#{2,3}\s+(.+?)\s*$", line)
        if heading:
            section = _section_named(heading.group(1))
        elif section is None or not line.strip():
            continue
        elif re.match(r"^[-*+]\s+", line):
            bullet = re.sub(r"^[-*+]\s+", "", line)
            trace = _OLD_TRACE.search(bullet)
            entry = None if trace and trace.group(1).strip() in live else _parse_bullet(section, bullet)
            if entry is not None:
                entries.append(entry)
        elif line.startswith((" ", "\t")) and entries and entries[-1].section == section:
            last = entries[-1]
            entries[-1] = replace(last, text=one_line(f"{last.text} {line.strip()}"))
    merged = frozenset(m for match in _MERGED.finditer(text) for m in match.group("items").split())
    return ParsedMemory(tuple(entries), merged)


def _section_named(title: str) -> Section | None:
    title = title.strip().rstrip(":").lower()
    for section in Section:
        if title == section.value.lower():
            return section
    return _OLD_SECTIONS.get(title)


def _parse_bullet(section: Section, text: str) -> Entry | None:
    sessions, thread, date = 1, "", ""
    prov = _PROVENANCE.search(text)
    if prov and (prov.group("thread") or prov.group("date")):
        thread, date = prov.group("thread") or "", prov.group("date") or ""
        sessions = int(prov.group("n") or 1)
        text = text[: prov.start()]
    old = _OLD_SUFFIX.search(text)
    note = ""
    if old:
        sessions = int(old.group("n") or sessions)
        note = old.group("note") or ""
        text = text[: old.start()]
    marked = _NOTE.search(text)
    if marked:
        note, text = marked.group("note"), text[: marked.start()]
    if section == Section.RECENT_TASKS:
        dated = _OLD_TASK_DATE.match(text.strip())
        if dated:
            date = date or dated.group("date").replace("undated", "")
            text = dated.group("rest")
    text = one_line(text)
    if not text or entry_key(text) in _EMPTY:
        return None
    return Entry(section, text, Provenance(thread, "" if date == "undated" else date), sessions, note)


# --------------------------------------------------------------------------- rendering


def _rank(entry: Entry, order: int) -> tuple[int, str, int]:
    """Sort key: recent tasks and follow-ups newest first; other sections best-supported first,
    then newest; ties keep the order the entries came in (a trace's own order)."""
    if entry.section in (Section.RECENT_TASKS, Section.FOLLOW_UPS):
        return (0, _desc(entry.source.date), order)
    return (-entry.sessions, _desc(entry.source.date), order)


def _desc(date: str) -> str:
    """A string that sorts dates newest first (undated last)."""
    if not date:
        return "~"
    return "".join(chr(ord("9") - ord(c) + ord("0")) if c.isdigit() else c for c in date)


def arrange(entries: Iterable[Entry]) -> dict[Section, list[Entry]]:
    """Entries per section, ranked, without repeats (across sections too), capped per section."""
    seen: set[str] = set()
    out: dict[Section, list[Entry]] = {section: [] for section in Section}
    ranked = sorted(enumerate(entries), key=lambda ne: (list(Section).index(ne[1].section), _rank(ne[1], ne[0])))
    for _, entry in ranked:
        key = entry.key
        if key in seen or len(out[entry.section]) >= SECTION_CAPS[entry.section]:
            continue
        seen.add(key)
        out[entry.section].append(entry)
    return out


def render_memory(
    project: str, entries: Iterable[Entry], *, header: Sequence[str] = (), merged: Iterable[str] = ()
) -> str:
    """The ``MEMORY.md`` text: ``# Project memory: <project>``, ``header`` lines, the six sections,
    and the merged-traces marker. Entries beyond :data:`MAX_MEMORY_BYTES` are dropped, the
    least-supported of the longest section first."""
    sections = arrange(entries)
    text = _render(project, sections, header, merged)
    while len(text.encode()) > MAX_MEMORY_BYTES:
        longest = max(sections, key=lambda s: sum(len(e.render()) for e in sections[s]))
        if not sections[longest]:
            break
        sections[longest].pop()
        text = _render(project, sections, header, merged)
    return text


def _render(project: str, sections: dict[Section, list[Entry]], header: Sequence[str], merged: Iterable[str]) -> str:
    lines = [f"# Project memory: {' '.join(project.split())}", ""]
    if header:
        lines += [*header, ""]
    for section in Section:
        lines.append(f"## {section.value}")
        rendered = [e.render() for e in sections[section]]
        lines += rendered or [f"none yet ({SECTION_HINTS[section]})"]
        lines.append("")
    markers = sorted(set(merged))
    if markers:
        lines.append(f"<!-- memd merged: {' '.join(markers)} -->")
    return "\n".join(lines).rstrip("\n") + "\n"


def with_marker(text: str, markers: Iterable[str]) -> str:
    """``text`` (any previous marker removed) ending with the merged-traces comment for ``markers``."""
    body = strip_marker(text).rstrip("\n") + "\n"
    items = sorted(set(markers))
    return body + (f"\n<!-- memd merged: {' '.join(items)} -->\n" if items else "")


def strip_marker(text: str) -> str:
    """``text`` without memd's merged-traces comment (for a model's input and output)."""
    return _MERGED.sub("", text).rstrip() + "\n" if _MERGED.search(text) else text
