"""The offline extractor: a deterministic trace memory without a model (SPEC §6.4 ``offline``, §19).

Works only from ``request.built.items`` (already filtered and redacted by the input builder) and
the request's metadata; no network, no clock, same input → same output. Codex and Claude Code
sessions alike (both arrive as the typed records of :mod:`memd.rollout.records`).

:mod:`memd.extract.offline_analysis` reads the session (tasks, outcomes, failures, pivots,
verification, preferences; its docstring has the rules); this module writes the SPEC §6.3
skeleton from it:

* the title is the main task's name (the request in the user's words, Codex Desktop / IDE
  wrappers unwrapped) — :class:`ExtractionResult` ``title`` carries it, the trace file's slug is
  made from it;
* per task: ``Outcome:`` with its evidence; compressed key steps (files changed, commands that
  worked, files read and searches as one line each, never a dozen ``sed -n`` windows); failures
  with their pivots ("`npm test` failed (exit 1): jest: not found; `npx jest` works"), failures
  without exit codes included; reusable knowledge as durable facts (how it was verified, red then
  green, commands that worked, environment variables and config keys, an error and its fix) —
  never the pasted final answer (only its first sentence is kept as a key step); pointers to the
  files the user mentioned, the tests, and paths the answer named;
* an empty section is one line (``Reusable knowledge: none beyond the steps above``), not a
  placeholder bullet; no line repeats another.

A session whose tasks were all trivial and that stated no preference is the no-op (both texts
empty): greetings, "show tools", a lone command, a message whose text was redacted.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from memd.clock import iso_utc
from memd.extract.base import ExtractionRequest, ExtractionResult
from memd.extract.contract import SUMMARY_MAX_WORDS, TraceContext, cap_words
from memd.extract.offline_analysis import (
    Failure,
    FailureKind,
    Outcome,
    SessionDigest,
    TaskDigest,
    TestRun,
    analyse,
)
from memd.extract.offline_text import one_line

#: Most files / commands / searches shown per key-step line.
MAX_LISTED = 6
#: Most user reactions (approval, rejection, corrections) quoted per task.
MAX_FEEDBACK = 3
#: Longest quote of a request kept as a key step.
REQUEST_QUOTE_CHARS = 300


class OfflineExtractor:
    """The deterministic, network-free extractor (``name = "offline"``).

    Implements :class:`memd.extract.base.Extractor`. Token counts in its results are 0.
    """

    name = "offline"

    async def extract(self, request: ExtractionRequest) -> ExtractionResult:
        """Derive the trace memory, summary and title of ``request`` (see the module docstring).

        Returns:
            An :class:`ExtractionResult` with ``extractor="offline"``; both texts empty for a
            session with nothing durable. Never raises on well-formed records.
        """
        trace_memory, summary, title = extract_offline_titled(request)
        return ExtractionResult(trace_memory=trace_memory, summary=summary, extractor=self.name, title=title)

    async def aclose(self) -> None:
        """Nothing to release (no network clients). Idempotent."""


def extract_offline(request: ExtractionRequest) -> tuple[str, str]:
    """The offline extraction as a pure function: ``(trace_memory, summary)``.

    Returns:
        Skeleton-conformant markdown (SPEC §6.3) and a summary of at most 120 words, or
        ``("", "")`` when nothing durable happened.
    """
    trace_memory, summary, _ = extract_offline_titled(request)
    return trace_memory, summary


def extract_offline_titled(request: ExtractionRequest) -> tuple[str, str, str]:
    """``(trace_memory, summary, title)``; the title is the main task's name (``""`` for a no-op)."""
    digest = analyse(request.built.items, cwd=request.cwd)
    if not digest.durable:
        return "", "", ""
    started = request.started_at or request.updated_at
    context = TraceContext(
        project=request.project,
        date=iso_utc(started)[:10] if started else "",
        agent=request.agent,
        model=request.model,
    )
    return render_trace(digest, context), render_summary(digest), title_of(digest)


# --------------------------------------------------------------------------- trace


def title_of(digest: SessionDigest) -> str:
    """The main task's name (what the trace file's slug is made from)."""
    if digest.main >= 0:
        return digest.tasks[digest.main].name
    return "User preferences"


def _heading(digest: SessionDigest) -> str:
    if digest.main < 0:
        return "User preferences stated in this session."
    main = digest.tasks[digest.main]
    heading = f"{main.name} — {main.outcome.value}"
    others = len(digest.tasks) - 1
    if others:
        heading += f" (+{others} other task{'s' if others > 1 else ''})"
    return heading.rstrip(".") + "."


def render_trace(digest: SessionDigest, context: TraceContext) -> str:
    """The SPEC §6.3 trace memory of ``digest``."""
    lines = [f"# {_heading(digest)}", context.line()]
    if digest.preferences:
        lines.append("User preferences:")
        lines.extend(f"- {p}" for p in digest.preferences)
    else:
        lines.append("User preferences: none observed")
    for task in digest.tasks:
        lines.extend(_render_task(task))
    return _dedupe_lines(lines)


def _dedupe_lines(lines: Iterable[str]) -> str:
    """Drop a bullet that repeats an earlier bullet word for word (headings and labels stay)."""
    seen: set[str] = set()
    out = []
    for line in lines:
        if line.startswith("- "):
            key = " ".join(line.lower().split())
            if key in seen:
                continue
            seen.add(key)
        out.append(line)
    return "\n".join(out)


def _section(label: str, bullets: Sequence[str], empty: str) -> list[str]:
    if not bullets:
        return [f"{label}: {empty}"]
    return [f"{label}:", *(f"- {b}" for b in bullets)]


def _render_task(task: TaskDigest) -> list[str]:
    out = [f"## Task: {task.name}", f"Outcome: {task.outcome.value} — {task.evidence}"]
    out += _section("Key steps", _key_steps(task), "none recorded")
    out += _section("Things that did not work / things that can be improved", _problems(task), "none observed")
    out += _section("Reusable knowledge", _knowledge(task), "none beyond the steps above")
    pointers = [f"`{path}` — {why}" for path, why in task.pointers]
    out += _section("Pointers and references (annotate why each item matters)", pointers, "none")
    return out


def _ticks(values: Sequence[str], limit: int = MAX_LISTED) -> str:
    shown = ", ".join("`" + one_line(v.replace("`", "'"), 120) + "`" for v in values[:limit])
    more = len(values) - limit
    return shown + (f" (+{more} more)" if more > 0 else "")


def _key_steps(task: TaskDigest) -> list[str]:
    steps = []
    if task.request and one_line(task.request, 1000) != task.name:
        steps.append(f'Asked: "{one_line(task.request, REQUEST_QUOTE_CHARS)}"')
    if task.changed:
        files = [f"`{_path(f)}`" + (f" (×{n})" if n > 1 else "") for f, n in task.changed[:MAX_LISTED]]
        more = len(task.changed) - MAX_LISTED
        steps.append("Changed: " + ", ".join(files) + (f" (+{more} more)" if more > 0 else ""))
    if task.deleted:
        steps.append("Deleted: " + _ticks([_path(f) for f in task.deleted]))
    if task.ran:
        steps.append("Ran: " + _ticks([one_line(c, 80) for c in task.ran], 5))
    if task.read:
        read = list(dict.fromkeys(os.path.basename(f) if len(f) > 60 else f for f in task.read))
        steps.append("Read: " + _ticks(read))
    if task.searched:
        steps.append(f"Searched the code {len(task.searched)} time{'s' if len(task.searched) > 1 else ''}, "
                     "e.g. " + _ticks(task.searched, 2))  # fmt: skip
    if task.web:
        steps.append("Searched the web: " + "; ".join(f'"{q}"' for q in task.web[:3]))
    if task.mcp:
        steps.append("MCP tools: " + ", ".join(f"`{n}`" + (f" ×{c}" if c > 1 else "") for n, c in task.mcp))
    if task.delegated:
        steps.append("Delegated: " + "; ".join(_delegation(d) for d in task.delegated[:3]))
    if task.answer:
        label = "The assistant still answered" if task.outcome == Outcome.FAIL else "Answer"
        steps.append(f"{label}: {task.answer}")
    steps.extend(f"User {f}" for f in task.feedback[:MAX_FEEDBACK])
    return steps


def _path(path: str) -> str:
    """A path short enough to read: as is up to 60 characters, else ``…/parent/name``."""
    if len(path) <= 60:
        return path
    parent, name = os.path.split(path)
    return f"…/{os.path.basename(parent)}/{name}" if parent else name


def _delegation(text: str) -> str:
    who, sep, what = text.partition(": ")
    return f"`{who}` ({what})" if sep else f"`{who}`"


def _problems(task: TaskDigest) -> list[str]:
    out = [_failure_line(f) for f in task.failures]
    if task.caveat:
        out.append(f'Not verified, the final answer says: "{task.caveat}"')
    return out


def _failure_line(f: Failure) -> str:
    detail = f": `{f.detail}`" if f.detail else ""
    if f.kind == FailureKind.PATCH:
        head = f"Editing `{f.what}` failed{detail}"
    elif f.kind == FailureKind.REJECTED:
        return f"The user rejected `{f.what}`" + (f"; {f.pivot}" if f.pivot else "")
    elif f.kind == FailureKind.TOOL:
        head = f"`{f.what}` failed without an exit code{detail}"
    elif f.kind == FailureKind.ERROR_EVENT:
        head = f"The agent reported an error: `{f.detail}`"
    elif f.kind == FailureKind.ABORTED:
        head = "The turn was interrupted before an answer"
    else:
        head = f"`{f.what}` failed (exit {f.exit_code}){detail}"
    if f.count > 1:
        head += f" ({f.count} times in a row)"
    if f.pivot:
        return f"{head}; {f.pivot}"
    if f.resolved:
        return f"{head}; resolved later in the task"
    if f.minor:
        return f"{head} (a helper tool; the task went on)"
    return f"{head} — not resolved"


def _knowledge(task: TaskDigest) -> list[str]:
    out = []
    tests = [t for t in task.tests if t.passed is not None]
    if tests:
        out.append(_verification(tests, task.red_green))
    works = [f.pivot.removesuffix(" works").strip("`") for f in task.failures if f.pivot.endswith(" works")]
    if works:
        out.append("Works: " + _ticks(works, 4))
    if task.keys:
        out.append("Environment variables / keys named: " + _ticks(list(task.keys)))
    return out


def _verification(tests: Sequence[TestRun], red_green: bool) -> str:
    last = tests[-1]
    result = f" (`{last.result}`)" if last.result else ""
    verdict = "passed" if last.passed else "failed"
    if red_green:
        first_red = next(t for t in tests if not t.passed and t.result)
        red = f" (`{first_red.result}`)" if first_red.result else ""
        return f"Verified red then green: `{first_red.command}` failed first{red}, then `{last.command}` passed{result}"
    return f"Verify with `{last.command}`: {verdict}{result}"


# --------------------------------------------------------------------------- summary


def render_summary(digest: SessionDigest) -> str:
    """≤ 120 words: per task (the main one first) name, outcome, changed files, verification and
    what is left failing; then the first preference."""
    order = sorted(range(len(digest.tasks)), key=lambda n: (n != digest.main, n))
    parts = [_task_sentence(digest.tasks[n]) for n in order[:4]]
    if len(digest.tasks) > 4:
        parts.append(f"{len(digest.tasks) - 4} more tasks.")
    if digest.preferences:
        parts.append(f"User preference: {digest.preferences[0]}")
    return cap_words(" ".join(parts), SUMMARY_MAX_WORDS)


def _task_sentence(task: TaskDigest) -> str:
    sentence = f"{one_line(task.name, 90)}: {task.outcome.value}."
    if task.changed:
        sentence += " Changed " + ", ".join(f"`{f}`" for f, _ in task.changed[:4]) + "."
    tests = [t for t in task.tests if t.passed is not None]
    if tests:
        sentence += (
            f" Verified with `{one_line(tests[-1].command, 100)}`: {'passed' if tests[-1].passed else 'failed'}."
        )
    for f in task.failures[:2]:
        if f.pivot:
            what = f"Editing `{one_line(f.what, 60)}`" if f.kind == FailureKind.PATCH else f"`{one_line(f.what, 60)}`"
            sentence += f" {what} failed; {f.pivot}."
        elif not f.resolved and not f.minor:
            sentence += f" Left failing: `{one_line(f.what, 60)}`" + (f" ({f.detail[:80]})." if f.detail else ".")
    return sentence
