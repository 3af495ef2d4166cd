"""Offline skills: procedures repeated across sessions become ``skills/<name>/SKILL.md`` (SPEC §19).

A procedure qualifies when the handbook counts it in at least :data:`MIN_SESSIONS` sessions:

* the same verification sequence (a ``Verification`` entry with two or more checks, e.g. ``npm test``
  then ``npm run build``) → ``verify_<commands>``;
* the same fix for the same failure (a ``Pitfalls and pivots`` entry whose failing command was
  followed by a working variant or fix) → ``fix_<command>``.

Each skill has YAML front matter (``name``, ``description``), when to use it, the steps with the
exact commands, and the sessions it came from (those whose trace is still on disk, by provenance,
and how many older ones). Skills derived here carry :data:`OFFLINE_MARK` in their body, so a later
run replaces them and leaves skills written by a model or a person alone.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from memd.consolidate.entries import Entry, Provenance, Section
from memd.memory.files import slugify

#: Sessions that must share a procedure before it becomes a skill.
MIN_SESSIONS = 2
#: The line that marks a skill as derived offline by memd.
OFFLINE_MARK = "_Derived by memd offline from the project's sessions; regenerated at each consolidation._"

_TICKED = re.compile(r"`([^`]+)`")


def _program_words(command: str, words: int = 2) -> str:
    parts = [w for w in re.split(r"\s+", command.strip()) if w and not w.startswith("-")]
    return " ".join(parts[:words])


def _sources(entry: Entry, seen: Mapping[str, Sequence[Provenance]]) -> str:
    present = sorted(set(seen.get(entry.key, ())), key=lambda p: (p.date, p.thread), reverse=True)
    shown = [p.render() for p in present] or [entry.source.render()]
    older = entry.sessions - len(shown)
    return ", ".join(shown) + (f" and {older} earlier session{'s' if older > 1 else ''}" if older > 0 else "")


def verification_skill(entry: Entry, seen: Mapping[str, Sequence[Provenance]]) -> tuple[str, str, str] | None:
    """``(name, description, body)`` for a repeated verification sequence, else ``None``."""
    commands = _TICKED.findall(entry.text)
    if entry.section != Section.VERIFICATION or entry.sessions < MIN_SESSIONS or len(commands) < 2:
        return None
    name = slugify("verify " + " ".join(_program_words(c) for c in commands))[:64]
    steps = "\n".join(f"{n}. Run `{c}`." for n, c in enumerate(commands, 1))
    checks = ", then ".join(f"`{_program_words(c, 3)}`" for c in commands)
    description = f"Verify a change in this project the way it was done in {entry.sessions} sessions: {checks}"
    body = (
        "# Verify a change\n\n"
        "When to use: after changing code here, before calling the work done.\n\n"
        f"Steps:\n{steps}\n\n"
        "Every step must pass; a test written before its fix fails first, which is expected.\n\n"
        f"Sessions it came from: {_sources(entry, seen)}.\n\n{OFFLINE_MARK}"
    )
    return name, description, body


def fix_skill(entry: Entry, seen: Mapping[str, Sequence[Provenance]]) -> tuple[str, str, str] | None:
    """``(name, description, body)`` for a repeated fix of the same failure, else ``None``."""
    if entry.section != Section.PITFALLS or entry.sessions < MIN_SESSIONS:
        return None
    match = re.match(r"^`(?P<cmd>[^`]+)` failed[^;]*;\s*(?P<fix>.+)$", entry.text)
    if match is None or "works" not in match.group("fix"):
        return None
    failing = match.group("cmd")
    name = slugify("fix " + _program_words(failing))[:64]
    description = f"When `{_program_words(failing, 3)}` fails as it did in {entry.sessions} sessions, do what worked."
    body = (
        f"# Fix: `{failing}` fails\n\n"
        f"When to use: `{failing}` fails the way it did before.\n\n"
        f"What happened and what worked: {entry.text}\n\n"
        "Steps:\n"
        f"1. Check that the failure is the same one (the error above).\n"
        f"2. Do what worked: {match.group('fix')}.\n\n"
        f"Sessions it came from: {_sources(entry, seen)}.\n\n{OFFLINE_MARK}"
    )
    return name, description, body


def offline_skills(entries: Iterable[Entry], seen: Mapping[str, Sequence[Provenance]]) -> list[tuple[str, str, str]]:
    """Every ``(name, description, body)`` the entries qualify for, one per name, in name order.

    Args:
        entries: the merged handbook entries.
        seen: entry key -> provenance of every trace on disk that stated it.
    """
    found: dict[str, tuple[str, str, str]] = {}
    for entry in entries:
        skill = verification_skill(entry, seen) or fix_skill(entry, seen)
        if skill is not None:
            found.setdefault(skill[0], skill)
    return [found[name] for name in sorted(found)]
