"""The offline extractor: a deterministic trace memory without a model (SPEC §6.4 ``offline``).

Works only from ``request.built.items`` (already filtered and redacted by the input builder) and
the request's metadata; no network, no clock, same input → same output.

What it derives:

* **tasks**: every real user request opens a ``## Task:`` section. Short acknowledgements
  ("thanks", "ok", "great, works") and short complaints ("still broken", "that's wrong") are not
  tasks: they are feedback on the task before them, and the work after a complaint belongs to
  that task too. Work before any user message (or in a rollout without one) is one task named
  after the commands it ran.
* **commands** with exit codes (:func:`memd.rollout.session.commands`, which folds unified-exec
  polls into the command), split into read-only inspection (``ls``, ``cat``, ``rg``, ``sed -n``,
  ``git status`` ...) and the rest; **tests** (pytest, npm/yarn/pnpm test, vitest, jest,
  cargo/go test, ...) with a result line from their output;
* **errors**: non-zero exits (exit 1 of grep/rg/diff/test is "no match", not an error), failed
  patches, error events, aborted turns; an error is *resolved* when a later run of the same
  command (same program and first argument) exits 0, or a later patch of the same file applies;
* **files changed** (apply_patch headers, failed patches excluded), **web searches**, other
  tools used, the final **plan**, the **final answer** (condensed);
* **user preferences**: sentences of real user messages with an imperative marker (always,
  never, don't, do not, prefer, avoid, make sure, use X instead, instead of, ...), outside code
  fences, not questions.

Outcome rules (SPEC §6.3), per task, from the evidence in order:

* ``success``: the user approved ("thanks, works", "great", "lgtm", "perfect", ...), or
  verification evidence: the last test run passed with no unresolved error, or the work
  succeeded and the user moved on satisfied (the next request continues the same work: it
  shares a changed file name or a content word with this task);
* ``fail``: the user's last word was a rejection not followed by passing tests, or a hard
  failure left unresolved (the last test run failed; a command failed and the task has no
  final answer);
* ``partial``: progress without completion (work done but an error left unresolved, the turn
  was aborted, or a rejection was followed by passing tests but no approval);
* ``uncertain``: anything weaker — including the assistant's own claim of success alone.

A session with nothing durable (only greetings / acknowledgements, or no commands, patches,
tools, searches, preferences or answer of substance) yields the no-op: both texts empty.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from bisect import bisect_left
from dataclasses import dataclass, field

from memd.clock import iso_utc
from memd.extract.base import ExtractionRequest, ExtractionResult
from memd.extract.contract import SUMMARY_MAX_WORDS, TraceContext, cap_words
from memd.rollout.records import (
    AssistantMessage,
    CommandEnd,
    Item,
    PatchApplied,
    ToolCall,
    ToolOutput,
    TurnEvent,
    UserMessage,
)
from memd.rollout.session import CommandRun, commands

#: Words of a final answer that make it "of substance" on its own (a Q&A session).
SUBSTANTIVE_ANSWER_WORDS = 40
#: Most distinct commands listed per category in a task.
MAX_COMMANDS_LISTED = 15
#: Most user preferences kept.
MAX_PREFERENCES = 10

_APPROVAL = re.compile(
    r"^\W*(?:thanks?|thank you|thx|ty|great|perfect|awesome|excellent|nice|cool|lgtm|"
    r"looks good|looks great|works|it works|that works|works now|working now|all good|good job|"
    r"well done|amazing|brilliant|exactly|love it|ship it)\b",
    re.IGNORECASE,
)
_ACK = re.compile(r"^\W*(?:ok|okay|k|yes|yep|yeah|sure|got it|alright|fine|done|noted)\b\W*$", re.I)
_REJECTION = re.compile(
    r"\b(?:doesn'?t work|does not work|didn'?t work|did not work|not working|isn'?t working|"
    r"still (?:fails|failing|broken|not working|wrong|the same|doesn'?t)|broken|wrong|incorrect|"
    r"that'?s not (?:it|right|what)|not what i|revert|undo (?:that|this|it)|you broke|"
    r"same error|fails again|failed again|nope)\b|^\W*no\b",
    re.IGNORECASE,
)
_GREETING = re.compile(
    r"^\W*(?:hi|hello|hey|yo|hiya|good (?:morning|afternoon|evening)|greetings|thanks?|thank you|"
    r"ok|okay|bye)\b",
    re.IGNORECASE,
)
_PREFERENCE = re.compile(
    r"\b(?:always|never|don'?t|do not|doesn'?t need to|prefer|preferably|avoid|make sure|"
    r"must not|mustn'?t|should not|shouldn'?t|no need to|please use|use [^.;,]{1,40} instead|"
    r"instead of|stop (?:using|doing|adding))\b",
    re.IGNORECASE,
)
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")
_FENCE = re.compile(r"```.*?(?:```|$)", re.DOTALL)
_REDACTED_ANYWHERE = re.compile(r"\[REDACTED_[A-Z_]+[^\]]*\]")
_REDACTED_PLACEHOLDER = re.compile(r"^\[REDACTED_[A-Z]+[^\]]*\]$")

_TEST_COMMAND = re.compile(
    r"(?:^|[\s;&|(])(?:pytest|py\.test|python[\d.]* -m (?:pytest|unittest)|tox|nox|"
    r"(?:npm|pnpm|yarn|bun)(?: run)? test(?::\S+)?|npx (?:vitest|jest|mocha|playwright test)|"
    r"vitest|jest|mocha|cargo (?:test|nextest)|go test|mvnw? (?:\S+ )*test|\./gradlew test|"
    r"gradle test|make (?:test|check)|(?:bundle exec )?rspec|phpunit|dotnet test|ctest|"
    r"deno test|mix test)\b"
)
_TEST_RESULT = re.compile(
    r"\d+\s+(?:passed|failed|failing|passing|errors?|skipped|tests?)\b|test result:|"
    r"\bTests?:\s|\bRan \d+ tests?|\bOK\b|\bFAILED\b|\bPASS\b|\bFAIL\b",
)
_ERROR_LINE = re.compile(
    r"error|exception|traceback|fail|no such file|not found|denied|cannot|can't|unable|invalid",
    re.IGNORECASE,
)
_READ_ONLY_PROGRAMS = frozenset(
    {
        "ls",
        "cat",
        "head",
        "tail",
        "less",
        "more",
        "rg",
        "grep",
        "egrep",
        "ag",
        "find",
        "fd",
        "pwd",
        "echo",
        "wc",
        "nl",
        "tree",
        "stat",
        "file",
        "which",
        "type",
        "strings",
        "du",
        "df",
        "env",
        "printenv",
        "date",
        "whoami",
        "uname",
        "sed",
        "awk",
        "jq",
        "sort",
        "uniq",
        "cut",
        "diff",
        "realpath",
        "readlink",
        "basename",
        "dirname",
        "id",
        "hostname",
        "ps",
    }
)
_READ_ONLY_GIT = frozenset(
    {"status", "diff", "log", "show", "branch", "remote", "rev-parse", "ls-files", "blame", "grep"}
)
_NO_MATCH_IS_OK = frozenset({"grep", "egrep", "rg", "ag", "diff", "cmp", "test", "[", "git"})
_UNVERIFIED_NOTE = re.compile(
    r"\bno (?:automated )?tests?\b|\bnot (?:been )?(?:tested|verified|run)\b|"
    r"\b(?:couldn'?t|could not|unable to|didn'?t|did not) (?:run|test|verify)\b|\buntested\b",
    re.IGNORECASE,
)
_PATH_MENTION = re.compile(r"`([A-Za-z0-9_./-]+\.[A-Za-z0-9]{1,8})(?::\d+)?`")
_STOPWORDS = frozenset(
    "the and for with that this from into your you are was were have has had can could would "
    "should will please make also just then than them they their there here what when where "
    "which while about after before again some more most other only same such very does done "
    "using use add update change fix code file files work make sure want need like".split()
)


class OfflineExtractor:
    """The deterministic, network-free extractor (``name = "offline"``).

    Implements :class:`memd.extract.base.Extractor`. Token counts in its results are 0.
    """

    name = "offline"

    async def extract(self, request: ExtractionRequest) -> ExtractionResult:
        """Derive the trace memory and summary of ``request`` (see the module docstring).

        Returns:
            An :class:`ExtractionResult` with ``extractor="offline"``; both texts empty for a
            session with nothing durable. Never raises on well-formed records.
        """
        trace_memory, summary = extract_offline(request)
        return ExtractionResult(trace_memory=trace_memory, summary=summary, extractor=self.name)

    async def aclose(self) -> None:
        """Nothing to release (no network clients). Idempotent."""


def extract_offline(request: ExtractionRequest) -> tuple[str, str]:
    """The offline extraction as a pure function.

    Args:
        request: the job input; only ``built.items`` and the metadata are read.

    Returns:
        ``(trace_memory, summary)``: skeleton-conformant markdown (SPEC §6.3) and a summary of
        at most 120 words, or ``("", "")`` when nothing durable happened.
    """
    session = _analyse(list(request.built.items))
    if not session.durable:
        return "", ""
    context = TraceContext(
        project=request.project,
        date=iso_utc(request.started_at or request.updated_at)[:10]
        if (request.started_at or request.updated_at)
        else "",
        agent=request.agent,
        model=request.model,
    )
    return _render_trace(session, context), _render_summary(session)


# --- analysis -------------------------------------------------------------------------------


@dataclass(slots=True)
class _Run:
    """A command with its global position and classification."""

    run: CommandRun
    pos: int
    key: str
    program: str
    read_only: bool
    test: bool
    failed: bool
    resolved: bool = False


@dataclass(slots=True)
class _Patch:
    files: tuple[str, ...]
    pos: int
    failed: bool = False
    error: str = ""
    resolved: bool = False


@dataclass(slots=True)
class _Task:
    request: str | None
    start: int
    end: int = 0
    feedback: list[tuple[str, str, int]] = field(default_factory=list)  # (kind, text, pos)
    runs: list[_Run] = field(default_factory=list)
    patches: list[_Patch] = field(default_factory=list)
    answers: list[tuple[str, int]] = field(default_factory=list)  # final answers (text, pos)
    web_searches: list[str] = field(default_factory=list)
    tools: list[str] = field(default_factory=list)
    plan: str = ""
    events: list[str] = field(default_factory=list)  # error / abort texts
    aborted: bool = False
    outcome: str = "uncertain"
    evidence: str = ""


@dataclass(slots=True)
class _Session:
    tasks: list[_Task]
    preferences: list[str]
    durable: bool


def _analyse(items: list[Item]) -> _Session:
    tasks = _split_tasks(items)
    runs = _classify_runs(items)
    patches = _collect_patches(items)
    _mark_resolved(runs, patches)
    run_pos = [r.pos for r in runs]
    patch_pos = [p.pos for p in patches]  # patches are collected in item order
    for task in tasks:
        task.runs = runs[bisect_left(run_pos, task.start) : bisect_left(run_pos, task.end)]
        task.patches = patches[bisect_left(patch_pos, task.start) : bisect_left(patch_pos, task.end)]
        _collect_task_items(task, items)
    for n, task in enumerate(tasks):
        following = tasks[n + 1] if n + 1 < len(tasks) else None
        task.outcome, task.evidence = _outcome(task, following)
    preferences = _preferences([it.text for it in items if isinstance(it, UserMessage) and not it.injected])
    durable = bool(preferences) or any(_has_substance(t) for t in tasks)
    return _Session(tasks=tasks, preferences=preferences, durable=durable)


def _split_tasks(items: list[Item]) -> list[_Task]:
    """One task per real user request; acknowledgements and complaints are feedback."""
    tasks: list[_Task] = []
    current = _Task(request=None, start=0)
    for pos, it in enumerate(items):
        if not isinstance(it, UserMessage) or it.injected:
            continue
        text = it.text.strip()
        kind = _feedback_kind(text)
        if kind is not None and (current.request is not None or tasks):
            current.feedback.append((kind, text, pos))
            continue
        current.end = pos
        if current.request is not None or _has_activity(items, current.start, pos):
            tasks.append(current)
        current = _Task(request=text, start=pos)
    current.end = len(items)
    if current.request is not None or _has_activity(items, current.start, len(items)):
        tasks.append(current)
    return tasks


def _feedback_kind(text: str) -> str | None:
    """``approve`` / ``reject`` / ``ack`` for a short reaction, ``None`` for a new request."""
    words = len(text.split())
    if words == 0:
        return "ack"
    if words <= 12 and _REJECTION.search(text):
        return "reject"
    if words <= 8 and _APPROVAL.match(text):
        return "approve"
    if words <= 3 and _ACK.match(text):
        return "ack"
    return None


def _has_activity(items: list[Item], start: int, end: int) -> bool:
    return any(isinstance(it, (ToolCall, CommandEnd, PatchApplied, AssistantMessage)) for it in items[start:end])


def _classify_runs(items: list[Item]) -> list[_Run]:
    positions: dict[str, int] = {}
    end_positions: dict[str, int] = {}
    for pos, it in enumerate(items):
        if isinstance(it, ToolCall) and it.call_id:
            positions.setdefault(it.call_id, pos)
        elif isinstance(it, CommandEnd) and it.call_id:
            end_positions.setdefault(it.call_id, pos)
    out: list[_Run] = []
    for n, run in enumerate(commands(items)):
        pos = positions.get(run.call_id, end_positions.get(run.call_id, n))
        program, key = _command_key(run.command)
        read_only = _is_read_only(run.command, program)
        exit_code = run.exit_code
        failed = exit_code not in (None, 0) and not (exit_code == 1 and program in _NO_MATCH_IS_OK)
        out.append(
            _Run(
                run=run,
                pos=pos,
                key=key,
                program=program,
                read_only=read_only,
                test=bool(_TEST_COMMAND.search(run.command)),
                failed=failed,
            )
        )
    out.sort(key=lambda r: r.pos)
    return out


def _command_key(command: str) -> tuple[str, str]:
    """``(program, key)``: the program's base name and "program first-argument"."""
    text = command.strip()
    if "&&" in text and text.startswith("cd "):
        text = text.split("&&", 1)[1].strip()
    try:
        tokens = shlex.split(text, comments=False)
    except ValueError:
        tokens = text.split()
    while tokens and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", tokens[0]):
        tokens = tokens[1:]
    if not tokens:
        return "", ""
    program = os.path.basename(tokens[0])
    if program in ("sudo", "time", "command", "exec", "uv", "poetry", "pipenv") and len(tokens) > 1:
        if program in ("uv", "poetry", "pipenv") and tokens[1] == "run" and len(tokens) > 2:
            tokens = tokens[2:]
        else:
            tokens = tokens[1:]
        program = os.path.basename(tokens[0])
    arg = next((t for t in tokens[1:] if not t.startswith("-")), "")
    return program, f"{program} {arg}".strip()


def _is_read_only(command: str, program: str) -> bool:
    if any(op in command for op in (">", "| tee", "rm ", "mv ", "cp ")):
        return False
    if program == "sed":
        return " -i" not in command
    if program == "git":
        parts = command.split()
        sub = next((p for p in parts[1:] if not p.startswith("-")), "")
        return sub in _READ_ONLY_GIT
    return program in _READ_ONLY_PROGRAMS


def _collect_patches(items: list[Item]) -> list[_Patch]:
    by_call: dict[str, _Patch] = {}
    out: list[_Patch] = []
    for pos, it in enumerate(items):
        if isinstance(it, ToolCall) and it.kind == "patch":
            patch = _Patch(files=it.patch_files, pos=pos)
            out.append(patch)
            if it.call_id:
                by_call[it.call_id] = patch
        elif isinstance(it, ToolOutput) and it.call_id in by_call:
            text = it.output.strip()
            if it.exit_code not in (None, 0) or text.lower().startswith(
                ("apply_patch verification failed", "failed to apply patch")
            ):
                patch = by_call[it.call_id]
                patch.failed = True
                patch.error = _first_line(text, 200)
        elif isinstance(it, PatchApplied):
            patch = by_call.get(it.call_id) if it.call_id else None
            if patch is None:
                patch = _Patch(files=it.files, pos=pos)
                out.append(patch)
            if not it.success:
                patch.failed = True
                patch.error = patch.error or "patch_apply_end reported success=false"
            patch.files = patch.files or it.files
    return out


def _mark_resolved(runs: list[_Run], patches: list[_Patch]) -> None:
    """A failure is resolved by a later success of the same command key / the same file."""
    succeeded_later: set[str] = set()
    for run in reversed(runs):
        if run.failed:
            run.resolved = run.key in succeeded_later
        elif run.run.exit_code == 0:
            succeeded_later.add(run.key)
    patched_later: set[str] = set()
    for patch in reversed(patches):
        if patch.failed:
            patch.resolved = any(f in patched_later for f in patch.files)
        else:
            patched_later.update(patch.files)


def _collect_task_items(task: _Task, items: list[Item]) -> None:
    last_assistant: tuple[str, int] | None = None
    for pos in range(task.start, task.end):
        it = items[pos]
        if isinstance(it, AssistantMessage):
            if it.phase == "final_answer":
                task.answers.append((it.text, pos))
                last_assistant = None
            elif it.phase != "commentary":
                last_assistant = (it.text, pos)
        elif isinstance(it, UserMessage):
            if last_assistant is not None:
                task.answers.append(last_assistant)
                last_assistant = None
        elif isinstance(it, ToolCall):
            if it.kind == "web_search" and it.arguments.strip():
                task.web_searches.append(_one_line(it.arguments, 160))
            elif it.name == "update_plan":
                task.plan = _plan_text(it.arguments)
            elif it.kind in ("mcp", "other") and it.name not in ("write_stdin", "tool_search"):
                if it.name not in task.tools:
                    task.tools.append(it.name)
        elif isinstance(it, TurnEvent):
            if it.type == "error":
                task.events.append(f"error event: {_one_line(it.text or '', 200)}")
            elif it.type == "turn_aborted":
                task.aborted = True
                task.events.append(f"turn aborted ({it.text or 'no reason given'})")
    if last_assistant is not None:
        task.answers.append(last_assistant)


def _plan_text(arguments: str) -> str:
    try:
        args = json.loads(arguments)
    except (ValueError, RecursionError):
        return ""
    plan = args.get("plan") if isinstance(args, dict) else None
    if not isinstance(plan, list):
        return ""
    marks = {"completed": "[x]", "in_progress": "[>]", "pending": "[ ]"}
    steps = [
        f"{marks.get(str(s.get('status')), '[?]')} {_one_line(str(s.get('step', '')), 120)}"
        for s in plan
        if isinstance(s, dict)
    ]
    return "; ".join(steps)


# --- outcome --------------------------------------------------------------------------------


def _outcome(task: _Task, following: _Task | None) -> tuple[str, str]:
    """``(outcome, evidence)`` by the SPEC §6.3 rules (see the module docstring)."""
    # Failed read-only commands (a search in a missing path, a cat of a wrong file) are noise
    # when the task did real work; they count only in a task that did nothing else.
    exploring_only = not task.patches and all(r.read_only for r in task.runs)
    unresolved = [r for r in task.runs if r.failed and not r.resolved and (exploring_only or not r.read_only)]
    unresolved_patches = [p for p in task.patches if p.failed and not p.resolved]
    tests = [r for r in task.runs if r.test and r.run.exit_code is not None]
    worked = any(not p.failed for p in task.patches) or any(not r.read_only and r.run.exit_code == 0 for r in task.runs)
    has_answer = bool(task.answers)

    if task.feedback:
        kind, text, pos = task.feedback[-1]
        quote = _one_line(text, 80)
        if kind == "approve":
            return "success", f'the user approved: "{quote}"'
        if kind == "reject":
            later_tests = [r for r in tests if r.pos > pos]
            if later_tests and later_tests[-1].run.exit_code == 0:
                return (
                    "partial",
                    f'the user objected ("{quote}"); tests passed afterwards but no approval followed',
                )
            return "fail", f'the user rejected the result: "{quote}"'
    if tests:
        last = tests[-1]
        if last.run.exit_code == 0 and not unresolved and not unresolved_patches:
            return "success", f"verification: `{_short(last.run.command)}` passed (exit 0)"
        if last.run.exit_code != 0 and not any(r.pos > last.pos and r.run.exit_code == 0 for r in tests):
            return (
                "fail",
                f"the last test run `{_short(last.run.command)}` failed (exit {last.run.exit_code})",
            )
    if (unresolved or unresolved_patches) and not has_answer:
        what = (
            f"`{_short(unresolved[-1].run.command)}` exit {unresolved[-1].run.exit_code}" if unresolved else "a patch"
        )
        return "fail", f"{what} failed and was not resolved"
    if task.aborted and not has_answer:
        return ("partial", "the turn was aborted after some work") if worked else ("uncertain", "the turn was aborted")
    if unresolved or unresolved_patches:
        return "partial", "work was done but an error was left unresolved"
    if worked and following is not None and following.request and _continues(following, task):
        return "success", "the work succeeded and the user moved on to a follow-up request"
    if has_answer:
        return "uncertain", "only the assistant's own report; no test run or user confirmation"
    return "uncertain", "no final answer and no verification"


def _continues(following: _Task, task: _Task) -> bool:
    """Whether the next task builds on this one: it names or changes a file this task changed,
    or its request shares a content word with this task's request."""
    text = (following.request or "").lower()
    files = {os.path.basename(f).lower() for p in task.patches if not p.failed for f in p.files}
    if any(f and f in text for f in files):
        return True
    next_files = {os.path.basename(f).lower() for p in following.patches for f in p.files}
    if files & next_files:
        return True
    words = _content_words(following.request or "")
    return bool(words & _content_words(task.request or ""))


def _content_words(text: str) -> set[str]:
    text = _REDACTED_ANYWHERE.sub(" ", text)
    return {w for w in re.findall(r"[a-z][a-z0-9_-]{3,}", text.lower()) if w not in _STOPWORDS}


def _has_substance(task: _Task) -> bool:
    if task.runs or task.patches or task.web_searches or task.tools:
        return True
    if task.request is not None and _GREETING.match(task.request) and len(task.request.split()) <= 8:
        return False
    return any(len(text.split()) >= SUBSTANTIVE_ANSWER_WORDS for text, _ in task.answers)


# --- preferences ----------------------------------------------------------------------------


def _preferences(messages: list[str]) -> list[str]:
    """Sentence-level imperative preferences from real user messages, de-duplicated."""
    seen: dict[str, None] = {}
    for message in messages:
        text = _FENCE.sub(" ", message.replace("\u2019", "'").replace("\u2018", "'"))
        for sentence in _SENTENCE_SPLIT.split(text):
            s = sentence.strip().lstrip("-*•\t >").strip()
            if not s or s.endswith("?") or _REDACTED_PLACEHOLDER.match(s):
                continue
            if s.startswith(("//", "#", "$ ", "```")) or len(s.split()) < 3:
                continue
            if _PREFERENCE.search(s):
                seen.setdefault(_one_line(s, 200), None)
            if len(seen) >= MAX_PREFERENCES:
                return list(seen)
    return list(seen)


# --- rendering ------------------------------------------------------------------------------


def _render_trace(session: _Session, context: TraceContext) -> str:
    lines = [f"# {_title(session)}", context.line()]
    if session.preferences:
        lines.append("User preferences:")
        lines.extend(f"- {p}" for p in session.preferences)
    else:
        lines.append("User preferences: none observed")
    for task in session.tasks:
        lines.extend(_render_task(task))
    return "\n".join(lines)


def _task_name(task: _Task) -> str:
    if task.request:
        first = " ".join(next((ln for ln in task.request.splitlines() if ln.strip()), "").split())
        if len(first) > 100:  # a long first line: its first sentence
            first = re.split(r"(?<=[.!?])\s", first, maxsplit=1)[0]
        name = _one_line(first, 100).rstrip(" .:;,")
        return name or "User request"
    shown = [f"`{_short(r.run.command, 40)}`" for r in task.runs[:3]]
    if shown:
        return "Commands run without a recorded user request: " + ", ".join(shown)
    return "Work without a recorded user request"


def _render_task(task: _Task) -> list[str]:
    out = [f"## Task: {_task_name(task)}", f"Outcome: {task.outcome}", "Key steps:"]
    if task.request:
        out.append(f'- User asked: "{_one_line(task.request, 400)}"')
    inspected = [r for r in task.runs if r.read_only]
    acted = [r for r in task.runs if not r.read_only]
    if inspected:
        out.append("- Inspected: " + _list_commands(inspected))
    if acted:
        out.append("- Ran: " + _list_commands(acted))
    changed = _changed_files(task)
    if changed:
        out.append("- Changed files: " + ", ".join(changed))
    if task.web_searches:
        out.append("- Searched the web: " + "; ".join(f'"{q}"' for q in _dedupe(task.web_searches)[:6]))
    if task.tools:
        out.append("- Other tools used: " + ", ".join(f"`{t}`" for t in task.tools[:10]))
    if task.plan:
        out.append(f"- Final plan state: {task.plan}")
    if task.answers:
        out.append(f"- Final answer: {_condense(task.answers[-1][0], 500)}")
    for kind, text, _ in task.feedback:
        label = {"approve": "approval", "reject": "rejection", "ack": "acknowledgement"}[kind]
        out.append(f'- User feedback ({label}): "{_one_line(text, 160)}"')
    out.append(f"- Outcome evidence: {task.evidence}")

    out.append("Things that did not work / things that can be improved:")
    problems = _problems(task)
    out.extend(problems or ["- none observed"])

    out.append("Reusable knowledge:")
    knowledge = _knowledge(task)
    out.extend(knowledge or ["- nothing beyond the steps above"])

    out.append("Pointers and references (annotate why each item matters):")
    pointers = _pointers(task)
    out.extend(pointers or ["- none"])
    return out


def _list_commands(runs: list[_Run]) -> str:
    seen: dict[str, int | None] = {}
    for r in runs:
        cmd = _short(r.run.command, 160)
        if cmd not in seen or r.run.exit_code is not None:
            seen[cmd] = r.run.exit_code
    parts = [
        f"`{cmd}`" + (f" (exit {code})" if code is not None else "")
        for cmd, code in list(seen.items())[:MAX_COMMANDS_LISTED]
    ]
    more = len(seen) - MAX_COMMANDS_LISTED
    if more > 0:
        parts.append(f"+{more} more")
    return "; ".join(parts)


def _changed_files(task: _Task) -> list[str]:
    counts: dict[str, int] = {}
    for p in task.patches:
        if not p.failed:
            for f in p.files:
                counts[f] = counts.get(f, 0) + 1
    return [f"`{f}`" + (f" (×{n})" if n > 1 else "") for f, n in counts.items()]


def _problems(task: _Task) -> list[str]:
    out: list[str] = []
    for r in task.runs:
        if r.failed:
            detail = _error_line(r.run.output)
            status = (
                "resolved later by a successful run of the same command"
                if r.resolved
                else "not resolved in this session"
            )
            line = f"- `{_short(r.run.command, 200)}` failed with exit {r.run.exit_code}"
            if detail:
                line += f": `{detail}`"
            out.append(f"{line} — {status}")
    for p in task.patches:
        if p.failed:
            files = ", ".join(f"`{f}`" for f in p.files) or "(unknown files)"
            status = "resolved by a later patch of the same file" if p.resolved else "not resolved"
            out.append(f"- apply_patch on {files} failed: `{p.error}` — {status}")
    for event in task.events:
        out.append(f"- {event}")
    if task.answers:
        caveat = _UNVERIFIED_NOTE.search(task.answers[-1][0])
        if caveat:
            said = _sentence_around(task.answers[-1][0], caveat.start())
            out.append(f'- The final answer says: "{said}"')
    changed = task.patches or any(not r.read_only for r in task.runs)
    if task.outcome == "uncertain" and changed and not any(r.test for r in task.runs):
        out.append("- No test run or user confirmation verified the change.")
    return out


def _knowledge(task: _Task) -> list[str]:
    out: list[str] = []
    tests = [r for r in task.runs if r.test]
    for r in tests[-5:]:
        code = r.run.exit_code
        result = "passed" if code == 0 else ("result not recorded" if code is None else "failed")
        line = f"- Test command: `{_short(r.run.command, 200)}` {result}"
        if code is not None:
            line += f" (exit {code})"
        snippet = _test_result_line(r.run.output)
        if snippet:
            line += f": `{snippet}`"
        out.append(line)
    worked = _dedupe(
        _short(r.run.command, 160) for r in task.runs if not r.read_only and not r.test and r.run.exit_code == 0
    )
    if worked:
        out.append("- Commands that worked: " + "; ".join(f"`{c}`" for c in worked[:8]))
    for r in [r for r in task.runs if r.failed and r.resolved][:5]:
        fix = next(
            (x for x in task.runs if x.pos > r.pos and x.key == r.key and x.run.exit_code == 0),
            None,
        )
        if fix is not None and fix.run.command != r.run.command:
            out.append(f"- `{_short(r.run.command, 120)}` failed; `{_short(fix.run.command, 120)}` worked")
    if task.answers and not task.patches and task.request:
        answer = task.answers[-1][0]
        if len(answer.split()) >= SUBSTANTIVE_ANSWER_WORDS:
            out.append(f"- Answer: {_condense(answer, 800)}")
    return out


def _pointers(task: _Task) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    for p in task.patches:
        if p.failed:
            continue
        for f in p.files:
            if f not in seen:
                seen.add(f)
                out.append(f"- `{f}` — changed by this task")
    for r in [r for r in task.runs if r.test][-3:]:
        cmd = _short(r.run.command, 160)
        if cmd not in seen:
            seen.add(cmd)
            out.append(f"- `{cmd}` — the command that verifies this work")
    for text, _ in task.answers[-1:]:
        for m in _PATH_MENTION.finditer(text):
            path = m.group(1)
            if path not in seen and not any(path.endswith(os.path.basename(s)) for s in seen):
                seen.add(path)
                out.append(f"- `{path}` — named in the final answer")
            if len(out) >= 20:
                break
    for q in _dedupe(task.web_searches)[:3]:
        out.append(f'- web search "{q}" — where outside information came from')
    return out


def _ranked(tasks: list[_Task]) -> list[_Task]:
    """Tasks that changed files or ran tests first, otherwise in session order."""
    order = sorted(
        range(len(tasks)),
        key=lambda n: (not (tasks[n].patches or any(r.test for r in tasks[n].runs)), n),
    )
    return [tasks[n] for n in order]


def _title(session: _Session) -> str:
    tasks = session.tasks
    requested = [t for t in _ranked(tasks) if t.request]
    files = _dedupe(f for t in tasks for p in t.patches if not p.failed for f in p.files)
    failures = [r for t in tasks for r in t.runs if r.failed and not r.resolved and not r.read_only]
    if not failures and not files:
        failures = [r for t in tasks for r in t.runs if r.failed and not r.resolved]
    if requested:
        title = _one_line(_task_name(requested[0]), 120)
        if len(requested) > 1:
            title += f" (+{len(requested) - 1} other task{'s' if len(requested) > 2 else ''})"
    else:
        runs = [r for t in tasks for r in t.runs]
        plural = "s" if len(runs) != 1 else ""
        title = f"Ran {len(runs)} shell command{plural} without a recorded user request"
    if files:
        shown = ", ".join(os.path.basename(f) for f in files[:4])
        title += f"; changed {shown}" + (f" and {len(files) - 4} more" if len(files) > 4 else "")
    if failures:
        f = failures[0]
        title += f"; `{_short(f.run.command, 60)}` failed with exit {f.run.exit_code}"
    return title.rstrip(".") + "."


def _render_summary(session: _Session) -> str:
    """≤ 120 words: per task (those with changes or tests first) the outcome, changed files,
    the last test command and unresolved failures, then the first preference."""
    ranked = _ranked(session.tasks)
    parts: list[str] = []
    for task in ranked[:4]:
        sentence = f"{_one_line(_task_name(task), 90)}: {task.outcome}."
        files = _dedupe(f for p in task.patches if not p.failed for f in p.files)
        if files:
            sentence += " Changed " + ", ".join(f"`{f}`" for f in files[:4])
            sentence += f" and {len(files) - 4} more." if len(files) > 4 else "."
        tests = [r for r in task.runs if r.test and r.run.exit_code is not None]
        if tests:
            last = tests[-1]
            verdict = "passed" if last.run.exit_code == 0 else f"failed (exit {last.run.exit_code})"
            sentence += f" Verified with `{_short(last.run.command, 100)}`: {verdict}."
        exploring_only = not task.patches and all(r.read_only for r in task.runs)
        failures = [r for r in task.runs if r.failed and not r.resolved and (exploring_only or not r.read_only)]
        for r in failures[:2]:
            detail = _error_line(r.run.output)
            sentence += f" `{_short(r.run.command, 80)}` failed with exit {r.run.exit_code}"
            sentence += f" ({detail[:100]})." if detail else "."
        parts.append(sentence)
    if len(session.tasks) > 4:
        parts.append(f"{len(session.tasks) - 4} more tasks.")
    if session.preferences:
        parts.append(f"User preference: {session.preferences[0]}")
    return cap_words(" ".join(parts), SUMMARY_MAX_WORDS)


# --- small text helpers ---------------------------------------------------------------------


def _one_line(text: str, max_chars: int) -> str:
    line = " ".join(text.split())
    return line if len(line) <= max_chars else line[: max_chars - 1].rstrip() + "…"


def _short(command: str, max_chars: int = 120) -> str:
    return _one_line(command.replace("`", "'"), max_chars)


def _first_line(text: str, max_chars: int) -> str:
    for line in text.splitlines():
        if line.strip():
            return _one_line(line, max_chars)
    return ""


def _error_line(output: str) -> str:
    """The most telling line of a failed command's output (last error-looking line)."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    lines = [
        ln for ln in lines if not re.match(r"^(Chunk ID|Wall time|Original token count|Output:|Process exited)", ln)
    ]
    for line in reversed(lines[-60:]):
        if _ERROR_LINE.search(line):
            return _one_line(line.replace("`", "'"), 200)
    return _one_line(lines[-1].replace("`", "'"), 200) if lines else ""


def _test_result_line(output: str) -> str:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for line in reversed(lines[-80:]):
        if _TEST_RESULT.search(line):
            return _one_line(line.replace("`", "'"), 160)
    return ""


def _condense(text: str, max_chars: int) -> str:
    """A markdown answer as one line: emphasis and headings stripped, whitespace collapsed."""
    text = re.sub(r"\*\*|__|^#+\s*", "", text, flags=re.MULTILINE)
    return _one_line(text, max_chars)


def _sentence_around(text: str, pos: int, max_chars: int = 200) -> str:
    """The sentence of ``text`` that contains ``pos``, on one line."""
    start = max(text.rfind(". ", 0, pos), text.rfind("\n", 0, pos)) + 1
    ends = [e for e in (text.find(". ", pos), text.find("\n", pos)) if e != -1]
    end = min(ends) + 1 if ends else len(text)
    return _one_line(text[start:end].strip(), max_chars)


def _dedupe(values) -> list[str]:
    return list(dict.fromkeys(values))
