"""What a trace memory contributes to ``MEMORY.md`` (SPEC §6.3 skeleton in, :class:`Entry` out).

:func:`read_trace` reads a trace body leniently — the offline extractor's output and a model's
alike: title, session date (``Trace context:`` line), user preferences, and per ``## Task:``
section its outcome, key steps, problems, reusable knowledge and pointers (labels matched loosely:
``Label: value``, ``**Label:**``, ``## Label``). :func:`harvest` turns that into candidate
entries, one session's worth:

* **Start here**: commands that worked (``Works: ...``) and build / run / install / lint commands
  the session ran; environment variables and keys; files changed (key paths) and files the user
  mentioned; other reusable knowledge of a trace that does not use the offline labels;
* **User preferences**: each preference;
* **Pitfalls and pivots**: each failure, with the variant or fix that worked — not the task-bound
  notes (an unverified claim, a rejected tool use, an interrupted turn);
* **Verification**: per task, the checks in the order they ran (``Verify: `make`, then `pytest` ``);
* **Open follow-ups**: tasks left ``partial`` or ``fail``, with what was left failing;
* **Recent tasks**: every task with its outcome.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from memd.consolidate.entries import Entry, Provenance, Section, one_line

OUTCOMES = ("success", "partial", "fail", "uncertain")

_BULLET = re.compile(r"^\s*(?:[-*+]|\d{1,3}[.)])\s+")
_LABEL = re.compile(
    r"^\s{0,3}(?:#{1,6}\s+)?(?:\*\*|__)?(?P<label>[A-Za-z][A-Za-z /&()'-]{0,80}?)"
    r"\s*(?:\*\*|__)?\s*:\s*(?:\*\*|__)?\s*(?P<rest>.*)$"
)
_HEADING = re.compile(r"^\s{0,3}(?P<hashes>#{1,6})\s+(?P<text>.*?)\s*#*\s*$")
_CONTEXT_DATE = re.compile(r"^Trace context:.*?\b(\d{4}-\d{2}-\d{2})\b", re.MULTILINE)
_EMPTY = re.compile(r"^(?:none|nothing|n/?a|-)\b", re.IGNORECASE)
_TICKED = re.compile(r"`([^`]+)`")
_BUILD_RUN = re.compile(
    r"^(?:npm|pnpm|yarn|bun) (?:run |install|ci|i\b)|^npx \S|^make\b|^cargo (?:build|run|fmt|clippy)|"
    r"^go (?:build|run|vet)|^mix (?:compile|format|credo|dialyzer|deps|phx|ecto|setup)|^(?:uv|pip|pip3|poetry) |"
    r"^python[\d.]* -m (?:pip|build|ruff|mypy|black)|^(?:ruff|mypy|black|eslint|prettier|tsc)\b|"
    r"^docker(?: compose|-compose)? (?:build|up|run)|^\./(?:gradlew|mvnw)|^gradle |^mvn |^bundle |^rake |^dotnet "
)
_TASK_BOUND = re.compile(r"^(?:Not verified|The user rejected|The turn was interrupted|The agent reported)")


@dataclass(slots=True)
class TaskFacts:
    """One ``## Task:`` section read back: name, outcome and evidence, and its bullets."""

    name: str
    outcome: str = "uncertain"
    evidence: str = ""
    steps: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    knowledge: list[str] = field(default_factory=list)
    pointers: list[str] = field(default_factory=list)


@dataclass(slots=True)
class TraceFacts:
    """A trace body read back (see :func:`read_trace`)."""

    title: str = ""
    date: str = ""
    preferences: list[str] = field(default_factory=list)
    tasks: list[TaskFacts] = field(default_factory=list)
    raw: str = ""


def _kind(label: str) -> str | None:
    label = " ".join(label.lower().split())
    kinds = (
        (("user preference", "preferences"), "preferences"),
        (("things that did not work", "what did not work", "did not work", "failures", "things that can be"),
         "problems"),
        (("reusable knowledge", "knowledge"), "knowledge"),
        (("key steps", "steps"), "steps"),
        (("pointers", "references"), "pointers"),
        (("outcome",), "outcome"),
        (("trace context", "raw notes", "summary"), "other"),
    )  # fmt: skip
    return next((kind for prefixes, kind in kinds if label.startswith(prefixes)), None)


def _outcome(text: str) -> tuple[str, str]:
    """``(outcome, evidence)`` of an ``Outcome:`` value such as ``success — verified: ...``."""
    word = next((w for w in re.findall(r"[a-z]+", text.lower()[:40]) if w in OUTCOMES), "")
    if not word:
        word = "fail" if re.search(r"\bfail(?:ed|ure)\b", text.lower()) else "uncertain"
    evidence = re.sub(r"^\W*\w+\W*", "", text.strip(), count=1) if word in text.lower()[:12] else ""
    return word, one_line(evidence, 200)


class _Reader:
    """The line-by-line state of :func:`read_trace`."""

    def __init__(self) -> None:
        self.facts = TraceFacts()
        self.section = "other"
        self.task: TaskFacts | None = None

    def target(self) -> list[str] | None:
        if self.section == "preferences":
            return self.facts.preferences
        if self.section in ("steps", "problems", "knowledge", "pointers"):
            if self.task is None:
                self.task = TaskFacts(self.facts.title or "session")
                self.facts.tasks.append(self.task)
            bucket: list[str] = getattr(self.task, self.section)
            return bucket
        return None

    def add(self, text: str, *, new_item: bool) -> None:
        bucket = self.target()
        if bucket is None or not text.strip():
            return
        if new_item or not bucket:
            bucket.append(one_line(text))
        else:
            bucket[-1] = one_line(f"{bucket[-1]} {text.strip()}")

    def heading(self, hashes: str, text: str) -> bool:
        """Handle a heading line; ``False`` when it is a label heading (``## Reusable knowledge``)."""
        text = text.strip().strip("*_").strip()
        if len(hashes) == 1 and not self.facts.title and self.task is None:
            self.facts.title = text
            return True
        name, sep, rest = text.partition(":")
        if sep and name.strip().lower() == "task":
            self.task = TaskFacts(" ".join(rest.split()) or "unnamed task")
            self.facts.tasks.append(self.task)
            self.section = "other"
            return True
        kind = _kind(text.rstrip(":"))
        if kind and kind != "outcome" and not sep:
            self.section = kind
            return True
        return False

    def label(self, label: str, rest: str) -> bool:
        kind = _kind(label)
        if kind is None:
            return False
        if kind == "outcome":
            if self.task is None:
                self.task = TaskFacts(self.facts.title or "session")
                self.facts.tasks.append(self.task)
            self.task.outcome, self.task.evidence = _outcome(rest)
            self.section = "other"
            return True
        self.section = kind
        if rest.strip() and not _EMPTY.match(rest.strip()):
            self.add(rest, new_item=True)
        return True


def read_trace(body: str) -> TraceFacts:
    """Read a trace memory's skeleton back (lenient; see the module docstring). Never raises."""
    reader = _Reader()
    reader.facts.raw = body[:2000]
    date = _CONTEXT_DATE.search(body)
    reader.facts.date = date.group(1) if date else ""
    fenced = False
    for line in body.splitlines():
        stripped = line.strip()
        if stripped.startswith(("```", "~~~")):
            fenced = not fenced
            continue
        if fenced or not stripped:
            continue
        heading = _HEADING.match(line)
        if heading and reader.heading(heading.group("hashes"), heading.group("text")):
            continue
        bullet = _BULLET.match(line)
        if not bullet:
            label = _LABEL.match(line)
            if label and reader.label(label.group("label"), label.group("rest")):
                continue
            if heading:
                reader.section = "other"
                continue
        if bullet and len(line) - len(line.lstrip()) < 2:
            reader.add(line[bullet.end() :], new_item=True)
        else:
            reader.add(stripped, new_item=False)
    return reader.facts


# --------------------------------------------------------------------------- entries


def harvest(facts: TraceFacts, source: Provenance) -> list[Entry]:
    """The candidate entries of one session (see the module docstring), in a stable order."""
    out = [Entry(Section.PREFERENCES, one_line(p), source) for p in facts.preferences if not _EMPTY.match(p)]
    deleted = {f for t in facts.tasks for step in t.steps if step.startswith("Deleted:") for f in _TICKED.findall(step)}
    for task in facts.tasks:
        out += [e for e in _start_here(task, source) if not any(f"`{f}`" in e.text for f in deleted)]
        out += [Entry(Section.PITFALLS, one_line(_strip_status(p)), source) for p in task.problems if _pitfall(p)]
        out += _verification(task, source)
        out += _follow_up(task, source)
    for task in reversed(facts.tasks):  # recent tasks newest first: the session's last task first
        out.append(Entry(Section.RECENT_TASKS, one_line(f"{task.name} — {task.outcome}{_touched(task)}"), source))
    if not facts.tasks:  # a trace without the skeleton still shows up as a task
        name = facts.title or next((ln.strip("# ") for ln in facts.raw.splitlines() if ln.strip()), "session")
        out.append(Entry(Section.RECENT_TASKS, one_line(f"{name} — uncertain", 200), source))
    return out


def _touched(task: TaskFacts) -> str:
    """``" (changed `a`, `b`)"`` / ``" (deleted `c`)"``: the files a task changed, for its index line."""
    parts = []
    for label in ("Changed", "Deleted"):
        files = [f for step in task.steps if step.startswith(f"{label}:") for f in _TICKED.findall(step)]
        if files:
            more = f" +{len(files) - 2}" if len(files) > 2 else ""
            parts.append(f"{label.lower()} " + ", ".join(f"`{os.path.basename(f) or f}`" for f in files[:2]) + more)
    return f" ({'; '.join(parts)})" if parts else ""


def task_names(facts: TraceFacts) -> list[tuple[str, str]]:
    """``(task name, outcome)`` of every task."""
    return [(t.name, t.outcome) for t in facts.tasks]


def _pitfall(problem: str) -> bool:
    return not _TASK_BOUND.match(problem)


def _strip_status(problem: str) -> str:
    return re.sub(r"\s+—\s+not resolved$|;\s+resolved later in the task$", "", problem)


def _start_here(task: TaskFacts, source: Provenance) -> list[Entry]:
    out: list[Entry] = []
    for item in task.knowledge:
        if _EMPTY.match(item):
            continue
        if item.startswith("Works:"):
            out += [Entry(Section.START_HERE, f"Works: `{cmd}`", source) for cmd in _TICKED.findall(item)]
        elif item.startswith("Environment variables"):
            out += [
                Entry(Section.START_HERE, f"Environment variable / key: `{k}`", source) for k in _TICKED.findall(item)
            ]
        elif not item.startswith(("Verify", "Verified")):
            out.append(Entry(Section.START_HERE, one_line(item), source))
    for step in task.steps:
        if step.startswith("Ran:"):
            for cmd in _TICKED.findall(step):
                if _BUILD_RUN.match(cmd):
                    out.append(Entry(Section.START_HERE, f"Build / run: `{cmd}`", source))
        elif step.startswith("Changed:"):
            out += [Entry(Section.START_HERE, f"Key path: `{p}`", source) for p in _TICKED.findall(step)]
    for pointer in task.pointers:
        if "mentioned by the user" in pointer or "active file" in pointer or "tests of this work" in pointer:
            out.append(Entry(Section.START_HERE, one_line(pointer), source))
    return out


def _verification(task: TaskFacts, source: Provenance) -> list[Entry]:
    checks: list[str] = []
    red_green = False
    for item in task.knowledge:
        if item.startswith("Verified red then green"):
            red_green = True
            checks += re.findall(r"then `([^`]+)` passed", item)[:1]
        elif item.startswith("Verify with"):
            checks += _TICKED.findall(item)[:1]
    if not checks:
        return []
    for step in task.steps:  # build / lint commands of the same task run beside the tests
        if step.startswith("Ran:"):
            checks += [c for c in _TICKED.findall(step) if _BUILD_RUN.match(c) and _is_check(c)]
    ordered = list(dict.fromkeys(checks))
    text = "Verify: " + ", then ".join(f"`{c}`" for c in ordered)
    if red_green:
        text += " (a failing run came first, then green)"
    return [Entry(Section.VERIFICATION, one_line(text), source)]


def _is_check(command: str) -> bool:
    return bool(re.search(r"\b(?:build|compile|lint|format|credo|dialyzer|mypy|ruff|tsc|eslint|vet|clippy)\b", command))


def _follow_up(task: TaskFacts, source: Provenance) -> list[Entry]:
    if task.outcome not in ("partial", "fail"):
        return []
    left = next((_strip_status(p) for p in task.problems if p.endswith("not resolved")), "") or task.evidence
    text = f"{task.name} — {'left partial' if task.outcome == 'partial' else 'failed'}" + (f": {left}" if left else "")
    return [Entry(Section.FOLLOW_UPS, one_line(text), source)]
