"""Merging new sessions into the previous handbook's entries (SPEC §7 conflicts, §19 incremental).

:func:`merge` takes the previous ``MEMORY.md`` entries and, oldest first, the candidate entries of
each new session (:func:`memd.consolidate.harvest.harvest`), and returns the new entries:

* the same entry again (same section, same normalised text; for recent tasks and follow-ups the
  same task name) from *another* session counts one more session, keeps the newer wording and the
  newer provenance; from the same session (a trace rewritten because its thread grew) it only
  takes the new wording;
* a task that succeeded closes the open follow-up of the same name;
* conflicting preferences — ``always X`` / ``use X`` / ``prefer X`` against ``never X`` /
  ``don't X`` / ``avoid X`` — keep the newer statement, noting the older one it supersedes; when
  the older one was stated in more sessions (stronger evidence), both stay, each with a note.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from memd.consolidate.entries import Entry, Provenance, Section, entry_key, one_line

_POLARITY = re.compile(
    r"^(?:please\s+)?(?P<word>always|never|do not|don't|dont|avoid|prefer|use|stop)\s+(?P<subject>.+)$"
)
_NEGATIVE = {"never", "do not", "don't", "dont", "avoid", "stop"}
_NAMED = (Section.RECENT_TASKS, Section.FOLLOW_UPS)


@dataclass(frozen=True, slots=True)
class SessionEntries:
    """One new session's contribution: its provenance, its candidate entries, and its tasks
    (name, outcome) — a successful task closes the follow-up of the same name."""

    source: Provenance
    entries: tuple[Entry, ...]
    tasks: tuple[tuple[str, str], ...]


def task_key(text: str) -> str:
    """The task name of a recent-task or follow-up text (``name — outcome...``), normalised."""
    return entry_key(text.split(" — ", 1)[0])


def _ident(entry: Entry) -> tuple[Section, str]:
    """What makes two entries the same: the task name for tasks, the direction and subject for
    a preference ("Don't run git push" = "Never run git push."), else the normalised text."""
    if entry.section in _NAMED:
        return entry.section, task_key(entry.text)
    if entry.section == Section.PREFERENCES:
        sign, subject = polarity(entry.text)
        if sign:
            return entry.section, sign + subject
    return entry.section, entry.key


def newer(a: Provenance, b: Provenance) -> bool:
    """Whether ``a`` is at least as new as ``b`` (undated counts as oldest)."""
    return (a.date or "") >= (b.date or "")


def _merge_one(index: dict[tuple[Section, str], Entry], entry: Entry) -> None:
    ident = _ident(entry)
    old = index.get(ident)
    if old is None:
        index[ident] = entry
        return
    if old.source.thread and old.source.thread == entry.source.thread:
        index[ident] = replace(entry, sessions=old.sessions, note=old.note)
        return
    if newer(entry.source, old.source):
        index[ident] = replace(entry, sessions=old.sessions + 1)
    else:
        index[ident] = replace(old, sessions=old.sessions + 1)


def merge(previous: Iterable[Entry], sessions: Sequence[SessionEntries]) -> list[Entry]:
    """The merged entries (rules in the module docstring); ``sessions`` oldest first."""
    index: dict[tuple[Section, str], Entry] = {}
    for entry in previous:
        _merge_one(index, entry)
    for session in sessions:
        for entry in session.entries:
            _merge_one(index, entry)
        for name, outcome in session.tasks:
            if outcome == "success":
                index.pop((Section.FOLLOW_UPS, entry_key(name)), None)
    return resolve_preferences(list(index.values()))


def polarity(text: str) -> tuple[str, str]:
    """``("+" | "-", subject)`` of a preference, ``("", key)`` when it states no direction.

    ``always use tabs`` and ``use tabs`` are ``+ use tabs``-like; ``never use tabs`` and ``don't use
    tabs`` are ``- use tabs``; ``prefer pnpm`` / ``avoid pnpm`` are ``+``/``- pnpm``.
    """
    key = entry_key(text)
    match = _POLARITY.match(key)
    if not match:
        return "", key
    word, subject = match.group("word"), match.group("subject")
    if word == "use":
        subject = f"use {subject}"
    elif word == "stop" and subject.startswith("using "):
        subject = "use " + subject.removeprefix("using ")
    return ("-" if word in _NEGATIVE else "+"), subject


def resolve_preferences(entries: list[Entry]) -> list[Entry]:
    """Apply the conflict rule to the preference entries (see the module docstring)."""
    prefs = [replace(e, note="") if e.section == Section.PREFERENCES else e for e in entries]
    groups: dict[str, list[int]] = {}
    for n, entry in enumerate(prefs):
        if entry.section == Section.PREFERENCES:
            sign, subject = polarity(entry.text)
            if sign:
                groups.setdefault(subject, []).append(n)
    dropped: set[int] = set()
    for members in groups.values():
        signs = {polarity(prefs[n].text)[0] for n in members}
        if len(signs) < 2:
            continue
        ordered = sorted(members, key=lambda n: (prefs[n].source.date or "", n), reverse=True)
        winner = ordered[0]
        for loser in (n for n in ordered[1:] if polarity(prefs[n].text)[0] != polarity(prefs[winner].text)[0]):
            _settle(prefs, winner, loser, dropped)
    return [e for n, e in enumerate(prefs) if n not in dropped]


def _settle(prefs: list[Entry], winner: int, loser: int, dropped: set[int]) -> None:
    new, old = prefs[winner], prefs[loser]
    if old.sessions > new.sessions:
        prefs[loser] = replace(
            old,
            note=f"older, stated in {old.sessions} sessions; contradicted by the newer guidance "
            f"{new.source.render()}: confirm with the user",
        )
        prefs[winner] = replace(new, note="newer; contradicts an older, better-supported preference")
    else:
        prefs[winner] = replace(new, note=one_line(f'supersedes "{old.text}" {old.source.render()}', 200))
        dropped.add(loser)
