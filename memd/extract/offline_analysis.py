"""What happened in a session, read off its items without a model (SPEC §6.3, §6.4, §19).

:func:`analyse` turns the filtered items of one session (Codex or Claude Code, the typed records of
:mod:`memd.rollout.records`) into a :class:`SessionDigest`: the tasks the user asked for, each with
its outcome, changes, verification, failures and pivots, plus the user's preferences. Pure and
deterministic: same items, same digest.

Rules (the module docstring of :mod:`memd.extract.offline` lists them for the reader of a trace):

* **Tasks** open with a real user request, unwrapped from Codex Desktop / IDE wrappers. Absent
  text (redacted, trimmed) opens no task; short reactions (approval, rejection, "continue") are
  feedback on the task before them. A task is *trivial* — and left out — when its request is a
  greeting or a meta question, or is at most three words, and nothing was changed, failed or
  answered at length (a lone interrupted command, a spawn with no answer).
* **Failures** are non-zero exits (exit 1 of grep/rg/diff/test is "no match"), failed patches, and
  tool failures without an exit code: ``is_error`` results, outputs that say ``... failed:``,
  "operation not permitted", "permission denied", a rejection by the user or a policy, MCP errors.
  Failed read-only commands count only in a task that did nothing else.
* **Pivots**: a failure followed in its task by a working variant — the same command again
  (after a fix in between), the same program and first argument, or the next successful command
  that shares a word with the failed one or with its error — is resolved, and reported as "X
  fails: error; Y works". A failed patch is resolved by a later patch of the same file.
* **Verification**: test runs; a failing run followed by a passing run of the same tests is red
  then green (verification, not a failure).
* **Outcome** (SPEC §6.3, unchanged): ``success`` needs approval or verification (tests passed with
  nothing left failing, or the work succeeded and the user moved on to a follow-up on it);
  ``fail`` for a rejection, a rejected tool use nothing recovered from, a last test run that
  failed, or unresolved failures with nothing that worked; ``partial`` for progress with a
  failure left; ``uncertain`` otherwise, including the assistant's own claim of success.
"""

from __future__ import annotations

import json
import os
import re
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

from memd.extract.offline_text import (
    Mention,
    Reaction,
    answer_gist,
    first_sentence,
    is_absent,
    is_trivial_text,
    one_line,
    preferences,
    reaction_kind,
    strip_placeholders,
    unwrap_request,
)
from memd.extract.offline_text import (
    command_words as _words,
)
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

#: How many later commands are searched for the working variant of a failed one.
PIVOT_WINDOW = 4


class Outcome(StrEnum):
    """A task's outcome (SPEC §6.3)."""

    SUCCESS = "success"
    PARTIAL = "partial"
    FAIL = "fail"
    UNCERTAIN = "uncertain"


class FailureKind(StrEnum):
    """What failed: a command (exit code), a patch, a tool without exit code, a rejected tool use,
    an error event of the agent, an aborted turn."""

    COMMAND = "command"
    PATCH = "patch"
    TOOL = "tool"
    REJECTED = "rejected"
    ERROR_EVENT = "error_event"
    ABORTED = "aborted"


@dataclass(frozen=True, slots=True)
class Failure:
    """One failure of a task.

    Attributes:
        kind: see :class:`FailureKind`.
        what: the command, the patched files or the tool name (one line).
        detail: the telling line of the error output (``""`` when none).
        exit_code: the exit code, ``None`` without one.
        resolved: a later step in the task recovered from it.
        pivot: the working variant (``npx jest``) or the fix before a retry (``after mix format``);
            ``""`` when none was identified.
        count: how many times the same command failed the same way in a row.
        minor: a helper tool's hiccup (``write_stdin``, a plan update) that did not decide the outcome.
    """

    kind: FailureKind
    what: str
    detail: str
    exit_code: int | None
    resolved: bool
    pivot: str = ""
    count: int = 1
    minor: bool = False


@dataclass(frozen=True, slots=True)
class TestRun:
    """A test command of a task: the command, whether it passed (``None``: no exit code), and
    the result line of its output (``3 passed``, ``Tests 1 failed``)."""

    command: str
    passed: bool | None
    result: str


@dataclass(frozen=True, slots=True)
class TaskDigest:
    """One task of a session.

    Attributes:
        name: a short name: the request's first sentence, or a description of request-less work.
        request: the user's words (unwrapped, placeholders removed), ``""`` without a request.
        mentioned: files a wrapper mentioned.
        outcome / evidence: the outcome and why (one line).
        changed: changed files with the number of patches that changed each, in order.
        deleted: files a successful ``rm`` removed.
        read: files read (inspection compressed to file names).
        searched: search patterns / queries of read-only searches.
        ran: successful non-read-only commands (deduplicated, one line each).
        tests: test runs, in order.
        red_green: a failing test run was followed by a passing one.
        failures: failures, in order.
        web: web searches.
        mcp: MCP tools with the number of calls.
        delegated: sub-agents started (``Explore: explore the repository``).
        keys: environment variables and config keys named by the user, the commands or the answer.
        answer: for a task that changed nothing, the first informative sentence of its final
            answer (``""`` otherwise: an answer is never pasted).
        caveat: the sentence of the final answer that says the work was not verified.
        pointers: files named in the answer or by the tests, with why they matter.
        feedback: the user's reactions (``approve: "thanks"``).
        trivial: the task is left out of the trace (see the module docstring).
    """

    name: str
    request: str
    mentioned: tuple[Mention, ...]
    outcome: Outcome
    evidence: str
    changed: tuple[tuple[str, int], ...]
    deleted: tuple[str, ...]
    read: tuple[str, ...]
    searched: tuple[str, ...]
    ran: tuple[str, ...]
    tests: tuple[TestRun, ...]
    red_green: bool
    failures: tuple[Failure, ...]
    web: tuple[str, ...]
    mcp: tuple[tuple[str, int], ...]
    delegated: tuple[str, ...]
    keys: tuple[str, ...]
    answer: str
    caveat: str
    pointers: tuple[tuple[str, str], ...]
    feedback: tuple[str, ...]
    trivial: bool


@dataclass(frozen=True, slots=True)
class SessionDigest:
    """What :func:`analyse` found.

    Attributes:
        tasks: the non-trivial tasks, in session order.
        preferences: the user's imperative sentences and answered choices.
        main: index into ``tasks`` of the main task (the one that did most), ``-1`` when none.
    """

    tasks: tuple[TaskDigest, ...]
    preferences: tuple[str, ...]
    main: int

    @property
    def durable(self) -> bool:
        """Anything worth a trace: a non-trivial task or a preference."""
        return bool(self.tasks or self.preferences)


# --------------------------------------------------------------------------- classification

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
    r"error|exception|traceback|fail|no such file|not found|denied|cannot|can't|unable|invalid|"
    r"not permitted|refused|rejected|fatal|ignored|not allowed|conflict|abort|missing|no upstream",
    re.IGNORECASE,
)
_TOOL_FAILURE = re.compile(
    r"^\s*(?:<tool_use_error>|error\b|\w[\w ]{0,40} failed:|failed to\b|fatal:)|"
    r"\boperation not permitted\b|\bpermission denied\b|\bhaven'?t granted\b|"
    r"\b(?:rejected|denied|blocked) by (?:the )?(?:user|policy|sandbox)\b|\"isError\":\s*true",
    re.IGNORECASE,
)
_REJECTED = re.compile(
    r"doesn'?t want to proceed|tool use was rejected|rejected by (?:the )?user|user (?:denied|declined)",
    re.IGNORECASE,
)
_NOISE_OUTPUT = re.compile(r"^(?:Chunk ID|Wall time|Original token count|Output:|Process exited|Exit code)")
_UNVERIFIED_NOTE = re.compile(
    r"\bno (?:automated )?tests?\b|\bnot (?:been )?(?:tested|verified|run)\b|"
    r"\b(?:couldn'?t|could not|unable to|didn'?t|did not) (?:run|test|verify)\b|\buntested\b",
    re.IGNORECASE,
)
_REDIRECT = re.compile(r"\s*(?:2>&1|2>\s*/dev/null|>\s*/dev/null|&>\s*/dev/null)")
_FILTER_TAIL = re.compile(r"\s*\|\s*(?:head|tail|grep|egrep|sed|cut|sort|uniq|wc|cat|less|jq|tee)\b.*$")
_BACKGROUND = re.compile(r"running in (?:the )?background|Process running with session ID", re.IGNORECASE)
_KEY_TOKEN = re.compile(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b")
_ANSWER_PATH = re.compile(r"`([\w./-]*[\w-]\.[A-Za-z0-9]{1,8})(?::\d+)?`|\]\(([^)\s]+?\.[A-Za-z0-9]{1,8})(?::\d+)?\)")
_CHOICES = re.compile(r'"([^"\n]{1,200})"="([^"\n]{1,200})"')
_READ_ONLY_PROGRAMS = frozenset(
    "ls cat head tail less more rg grep egrep ag find fd pwd echo wc nl tree stat file which type strings du df "
    "env printenv date whoami uname sed awk jq sort uniq cut diff realpath readlink basename dirname id hostname "
    "ps".split()
)
_READ_ONLY_GIT = frozenset("status diff log show branch remote rev-parse ls-files blame grep".split())
_NO_MATCH_IS_OK = frozenset({"grep", "egrep", "rg", "ag", "diff", "cmp", "test", "[", "git grep", "git diff"})
_READ_TOOLS = frozenset({"Read", "read_file", "view_image", "NotebookRead"})
_SEARCH_TOOLS = frozenset({"Grep", "Glob", "grep", "glob", "LS", "list_dir"})
_SILENT_TOOLS = frozenset(
    {"update_plan", "TodoWrite", "write_stdin", "tool_search", "ExitPlanMode", "BashOutput", "TaskOutput", "KillBash"}
)
_DELEGATE_TOOLS = frozenset({"Task", "Agent", "spawn_agent"})
_READ_ONLY_TOOLS = _READ_TOOLS | _SEARCH_TOOLS | _DELEGATE_TOOLS | {"WebFetch", "AskUserQuestion"}
_WRITE_TOOLS = frozenset({"Write", "Edit", "MultiEdit", "NotebookEdit", "write_file", "create_file"})
_WRAPPERS = frozenset({"sudo", "time", "command", "exec", "nohup", "env"})
_RUNNERS = frozenset({"uv", "poetry", "pipenv", "bundle", "pdm", "hatch"})
_STOPWORDS = frozenset(
    "the and for with that this from into your you are was were have has had can could would should will please "
    "make also just then than them they their there here what when where which while about after before again "
    "some more most other only same such very does done using use add update change fix code file files work "
    "sure want need like dev null head tail grep true false".split()
)


def _short(command: str, max_chars: int = 160) -> str:
    """A command on one line: its first line only (heredoc bodies, long scripts), backticks made
    quotes, ``2>&1`` / ``2>/dev/null`` and a trailing ``| head``-style filter dropped."""
    lines = command.strip().splitlines() or [""]
    text = lines[0] + (" …" if len(lines) > 1 else "")
    text = _REDIRECT.sub("", text)
    text = _FILTER_TAIL.sub("", text)
    return one_line(text.replace("`", "'"), max_chars)


def _program_key(command: str) -> tuple[str, str]:
    """``(program, key)`` of the last segment of a ``&&`` / ``;`` chain (see :func:`_segment_keys`)."""
    keys = _segment_keys(command)
    return keys[-1] if keys else ("", "")


def _segment_keys(command: str) -> list[tuple[str, str]]:
    """``(program, "program first-argument")`` of each segment of a ``&&`` / ``;`` chain (first
    line only; ``cd`` segments, wrappers such as ``sudo`` and runners such as ``uv run`` skipped)."""
    first = command.strip().splitlines()[0] if command.strip() else ""
    out = []
    for segment in re.split(r"&&|;|\|\|", first):
        words = _words(segment)
        while words and os.path.basename(words[0]) in _WRAPPERS and len(words) > 1:
            words = words[1:]
        if len(words) > 2 and os.path.basename(words[0]) in _RUNNERS and words[1] in ("run", "exec"):
            words = words[2:]
        if not words or words[0] == "cd":
            continue
        program = os.path.basename(words[0])
        arg = next((w for w in words[1:] if not w.startswith("-")), "")
        if program.startswith("python") and len(words) > 2 and words[1] == "-m":
            arg = f"-m {words[2]}"
        out.append((program, f"{program} {arg}".strip()))
    return out


def _flags(command: str) -> set[str]:
    first = command.strip().splitlines()[0] if command.strip() else ""
    return {w for w in _words(first) if w.startswith("-")}


def _is_read_only(command: str, program: str) -> bool:
    command = _REDIRECT.sub("", command)
    if any(op in command for op in (">", "| tee", "rm ", "mv ", "cp ", "mkdir ")):
        return False
    if program == "sed":
        return " -i" not in command
    if program == "git":
        words = command.split()
        sub = next((p for p in words[1:] if not p.startswith("-")), "")
        return sub in _READ_ONLY_GIT
    return program in _READ_ONLY_PROGRAMS


def _content_words(text: str) -> set[str]:
    text = strip_placeholders(text).lower()
    return {w for w in re.findall(r"[a-z][a-z0-9_.-]{2,}", text) if w not in _STOPWORDS}


def _error_line(output: str) -> str:
    """The most telling line of a failure's output: an error-looking line among the first three
    (``fatal: ...``, ``Pre-commit validation failed``), else the last error-looking line (a
    traceback's last line), else the last line."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip() and not _NOISE_OUTPUT.match(ln.strip())]
    pick = next((ln for ln in lines[:3] if _ERROR_LINE.search(ln)), None)
    if pick is None:
        pick = next((ln for ln in reversed(lines[-60:]) if _ERROR_LINE.search(ln)), lines[-1] if lines else "")
    return one_line(pick.replace("`", "'").replace("\\n", " "), 160)


def _test_result(output: str) -> str:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for line in reversed(lines[-80:]):
        if _TEST_RESULT.search(line):
            return one_line(line.replace("`", "'"), 120)
    return ""


def _json_args(arguments: str) -> dict[str, object]:
    try:
        value = json.loads(arguments)
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


# --------------------------------------------------------------------------- steps


@dataclass(slots=True)
class _Step:
    """One thing the agent did, at a position in the items."""

    pos: int
    kind: str  # run | patch | tool
    text: str  # command / file list / tool name
    program: str = ""
    key: str = ""
    read_only: bool = False
    test: bool = False
    failed: bool = False
    exit_code: int | None = None
    output: str = ""
    files: tuple[str, ...] = ()
    rejected: bool = False
    resolved: bool = False
    pivot: str = ""
    path: str = ""  # the file a Read-style tool read
    minor: bool = False  # a hiccup of a helper tool: listed, never decides the outcome
    keys: frozenset[str] = frozenset()  # "program first-arg" of each segment of a command chain


def _outputs(items: Sequence[Item]) -> dict[str, ToolOutput]:
    out: dict[str, ToolOutput] = {}
    for it in items:
        if isinstance(it, ToolOutput) and it.call_id and it.call_id not in out:
            out[it.call_id] = it
    return out


def _run_steps(items: Sequence[Item], outputs: dict[str, ToolOutput]) -> list[_Step]:
    positions: dict[str, int] = {}
    for pos, it in enumerate(items):
        if isinstance(it, (ToolCall, CommandEnd)) and it.call_id:
            positions.setdefault(it.call_id, pos)
    steps = []
    for n, run in enumerate(commands(items)):
        if is_absent(run.command):
            continue
        steps.append(_run_step(run, positions.get(run.call_id, n), outputs.get(run.call_id)))
    return steps


def _run_step(run: CommandRun, pos: int, output: ToolOutput | None) -> _Step:
    program, key = _program_key(run.command)
    no_match = program in _NO_MATCH_IS_OK or key in _NO_MATCH_IS_OK
    failed = run.exit_code not in (None, 0) and not (run.exit_code == 1 and no_match)
    rejected = bool(output is not None and output.is_error and _REJECTED.search(output.output[:300]))
    if run.exit_code is None and output is not None:
        failed = output.is_error or bool(_TOOL_FAILURE.search(output.output[:400]))
    return _Step(
        pos=pos,
        kind="run",
        text=run.command,
        program=program,
        key=key,
        read_only=_is_read_only(run.command, program),
        test=bool(_TEST_COMMAND.search(run.command)),
        failed=failed,
        exit_code=run.exit_code,
        output=run.output,
        rejected=rejected,
        keys=frozenset(key for _, key in _segment_keys(run.command)),
    )


def _write_files(call: ToolCall) -> tuple[str, ...]:
    """Files a call changes: apply_patch headers, or a Write/Edit-style tool's ``file_path``."""
    if call.kind == "patch":
        return tuple(f for f in call.patch_files if not is_absent(f))
    if call.name in _WRITE_TOOLS:
        path = _json_args(call.arguments).get("file_path")
        return (path,) if isinstance(path, str) and path else ()
    return ()


def _patch_steps(items: Sequence[Item], outputs: dict[str, ToolOutput]) -> list[_Step]:
    steps: list[_Step] = []
    by_call: dict[str, _Step] = {}
    for pos, it in enumerate(items):
        if isinstance(it, ToolCall) and (it.kind == "patch" or it.name in _WRITE_TOOLS):
            step = _Step(pos=pos, kind="patch", text="", files=_write_files(it))
            out = outputs.get(it.call_id)
            if out is not None:
                _mark_patch_output(step, out)
            steps.append(step)
            if it.call_id:
                by_call[it.call_id] = step
        elif isinstance(it, PatchApplied):
            known = by_call.get(it.call_id) if it.call_id else None
            if known is None:
                known = _Step(pos=pos, kind="patch", text="", files=it.files)
                steps.append(known)
            known.failed = known.failed or not it.success
            known.files = known.files or it.files
    for step in steps:
        step.text = ", ".join(step.files) or "(unnamed files)"
    return steps


def _mark_patch_output(step: _Step, out: ToolOutput) -> None:
    text = out.output.strip()
    lowered = text.lower()
    failed = out.is_error or out.exit_code not in (None, 0)
    failed = failed or lowered.startswith(("apply_patch verification failed", "failed to apply patch"))
    if failed:
        step.failed = True
        step.rejected = bool(_REJECTED.search(text[:300]))
        step.output = text


def _tool_steps(items: Sequence[Item], outputs: dict[str, ToolOutput]) -> list[_Step]:
    """Tool calls other than shell commands and patches, with failures without exit code.
    Helper tools (plans, todo lists, ``write_stdin``) appear only when they failed."""
    steps = []
    for pos, it in enumerate(items):
        if not isinstance(it, ToolCall) or it.kind in ("shell", "patch") or it.name in _WRITE_TOOLS:
            continue
        if is_absent(it.name):
            continue
        out = outputs.get(it.call_id)
        text = out.output if out is not None else ""
        failed = out is not None and (out.is_error or bool(_TOOL_FAILURE.search(text[:400])))
        silent = it.name in _SILENT_TOOLS
        if silent and not failed:
            continue
        path = _json_args(it.arguments).get("file_path") if it.name in _READ_TOOLS else None
        steps.append(
            _Step(
                pos=pos,
                kind="tool",
                text=it.name,
                program=it.name,
                path=path if isinstance(path, str) else "",
                read_only=silent or it.name in _READ_ONLY_TOOLS or it.kind == "web_search",
                failed=failed,
                output=text,
                rejected=failed and bool(_REJECTED.search(text[:300])),
                minor=silent,
            )
        )
    return steps


# --------------------------------------------------------------------------- pivots


def _resolve(steps: list[_Step]) -> None:
    """Mark failures that a later step of the same list recovered from (see the module docstring)."""
    for n, step in enumerate(steps):
        if not step.failed:
            continue
        if step.kind == "patch":
            _resolve_patch(step, steps[n + 1 :])
        elif step.kind == "run":
            _resolve_run(step, steps[n + 1 :])
        else:
            later = [s for s in steps[n + 1 :] if s.kind == "tool" and s.text == step.text and not s.failed]
            step.resolved = bool(later)


def _resolve_patch(step: _Step, later: list[_Step]) -> None:
    names = {os.path.basename(f) for f in step.files}
    for n, other in enumerate(later):
        if other.kind == "patch" and not other.failed and names & {os.path.basename(f) for f in other.files}:
            step.resolved = True
            reads = [s for s in later[:n] if s.kind in ("run", "tool") and s.read_only and _names_file(s, names)]
            if reads:
                step.pivot = f"re-read the file (`{_short(reads[0].text, 80)}`) and patched again"
            return


def _names_file(step: _Step, names: set[str]) -> bool:
    text = step.text if step.kind == "run" else step.path
    return any(name and name in text for name in names)


def _resolve_run(step: _Step, later: list[_Step]) -> None:
    runs = [s for s in later if s.kind == "run" and not s.failed and s.exit_code == 0]
    shared = [s for s in runs if s.keys & step.keys]
    if shared:
        best = max(shared, key=lambda s: (len(_error_words(step) & _content_words(_short(s.text))), -s.pos))
        step.resolved = True
        variant = (_flags(best.text) - _flags(step.text)) or best.program != step.program
        step.pivot = f"`{_short(best.text, 120)}` works" if variant else _fix_between(step, best, later)
        return
    if step.read_only:
        return
    hints = _content_words(_short(step.text)) | _error_words(step)
    for other in [s for s in later if s.kind == "run" and not s.read_only][:PIVOT_WINDOW]:
        if other.exit_code == 0 and not other.failed and hints & _content_words(_short(other.text)):
            step.resolved = True
            step.pivot = f"`{_short(other.text, 120)}` works"
            return


def _error_words(step: _Step) -> set[str]:
    head = "\n".join(step.output.splitlines()[:8])
    return _content_words(head)


def _fix_between(step: _Step, retry: _Step, later: list[_Step]) -> str:
    """What made a retried command work: the non-read-only commands and changes between."""
    fixes = [
        s
        for s in later
        if step.pos < s.pos < retry.pos
        and not s.read_only
        and not s.failed
        and not s.test
        and s.kind in ("run", "patch")
    ]
    if not fixes:
        return "a retry works"
    shown: dict[str, None] = {}
    for s in fixes:
        shown.setdefault(f"`{_short(s.text, 60)}`" if s.kind == "run" else f"a change to `{os.path.basename(s.text)}`")
    return "works after " + ", ".join(list(shown)[:3])


# --------------------------------------------------------------------------- tasks


@dataclass(slots=True)
class _Task:
    request: str
    mentioned: tuple[Mention, ...]
    start: int
    end: int = 0
    feedback: list[tuple[Reaction, str, int]] = field(default_factory=list)
    steps: list[_Step] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    aborted: bool = False
    errors: list[str] = field(default_factory=list)
    web: list[str] = field(default_factory=list)
    delegated: list[str] = field(default_factory=list)


def _split_tasks(items: Sequence[Item]) -> list[_Task]:
    """One task per real request; absent messages and reactions open none."""
    tasks: list[_Task] = []
    current = _Task("", (), 0)
    for pos, it in enumerate(items):
        if not isinstance(it, UserMessage) or it.injected:
            continue
        request = unwrap_request(it.text)
        if not request.text:
            continue
        kind = reaction_kind(request.text)
        rest = _after_reaction(request.text) if kind in (Reaction.APPROVE, Reaction.ACK) else ""
        if kind is not None and (current.request or tasks):
            current.feedback.append((kind, request.text, pos))
            if not rest:
                continue
        current.end = pos
        tasks.append(current)
        current = _Task(rest or request.text, request.mentioned, pos)
    current.end = len(items)
    tasks.append(current)
    return [t for t in tasks if t.request or t.end > t.start]


def _after_reaction(text: str) -> str:
    """The request after an approval's first sentence ("Thanks! Now add tests" → "Now add tests"),
    ``""`` when the rest is shorter than three words."""
    parts = re.split(r"(?<=[.!?,])\s+", text.strip(), maxsplit=1)
    rest = parts[1].strip() if len(parts) > 1 else ""
    return rest if len(rest.split()) >= 3 and reaction_kind(rest) is None else ""


def _collect(task: _Task, items: Sequence[Item]) -> None:
    """Answers, error events, aborts, web searches and delegations of the task's items."""
    pending: str | None = None
    for it in items[task.start : task.end]:
        if isinstance(it, AssistantMessage):
            pending = _answer(task, it, pending)
        elif isinstance(it, UserMessage) and pending is not None:
            task.answers.append(pending)
            pending = None
        elif isinstance(it, ToolCall):
            _note_call(task, it)
        elif isinstance(it, TurnEvent):
            _note_event(task, it)
    if pending is not None:
        task.answers.append(pending)


def _answer(task: _Task, message: AssistantMessage, pending: str | None) -> str | None:
    if is_absent(message.text):
        return pending
    if message.phase == "final_answer":
        task.answers.append(message.text)
        return None
    return pending if message.phase == "commentary" else message.text


def _note_call(task: _Task, call: ToolCall) -> None:
    if call.kind == "web_search" and not is_absent(call.arguments):
        task.web.append(one_line(strip_placeholders(call.arguments), 120))
    elif call.name in _DELEGATE_TOOLS:
        who = _arg(call.arguments, "subagent_type") or _arg(call.arguments, "agent_type") or "sub-agent"
        what = _arg(call.arguments, "description")
        task.delegated.append(one_line(f"{who}: {what}" if what else who, 100))


def _arg(arguments: str, name: str) -> str:
    """A string argument of a tool call, also out of JSON the input builder cut short."""
    value = _json_args(arguments).get(name)
    if isinstance(value, str):
        return value
    match = re.search(rf'"{name}"\s*:\s*"([^"\\]{{1,200}})"', arguments)
    return match.group(1) if match else ""


def _note_event(task: _Task, event: TurnEvent) -> None:
    if event.type == "error" and event.text and not is_absent(event.text):
        task.errors.append(one_line(event.text, 160))
    elif event.type == "turn_aborted":
        task.aborted = True


# --------------------------------------------------------------------------- outcome


@dataclass(frozen=True, slots=True)
class _Evidence:
    """The facts the outcome rules read."""

    unresolved: tuple[_Step, ...]
    rejected: tuple[_Step, ...]
    tests: tuple[_Step, ...]
    worked: bool
    answered: bool


def _evidence(task: _Task) -> _Evidence:
    acting = [s for s in task.steps if not s.read_only]
    unresolved = tuple(s for s in task.steps if s.failed and not s.resolved and not s.minor and _counts(task, s))
    worked = any(not s.failed and (s.kind == "patch" or s.exit_code == 0) for s in acting)
    tests = tuple(s for s in task.steps if s.test and s.exit_code is not None)
    rejected = tuple(s for s in unresolved if s.rejected)
    return _Evidence(unresolved, rejected, tests, worked, bool(task.answers))


def _counts(task: _Task, step: _Step) -> bool:
    """A failed read-only step (a search in a missing path, a ``stat`` of a wrong file) counts
    only in a task that neither acted nor answered: otherwise it is exploration noise."""
    return not step.read_only or not (task.answers or any(not s.read_only for s in task.steps))


def _outcome(task: _Task, following: _Task | None) -> tuple[Outcome, str]:
    """``(outcome, evidence)`` by the SPEC §6.3 rules (see the module docstring)."""
    ev = _evidence(task)
    verdict = _from_feedback(task, ev) or _from_tests(ev) or _from_failures(task, ev)
    if verdict is not None:
        return verdict
    if ev.worked and following is not None and _continues(following, task):
        return Outcome.SUCCESS, "the work succeeded and the user moved on to a follow-up on it"
    if ev.answered:
        return Outcome.UNCERTAIN, "only the assistant's own report"
    return Outcome.UNCERTAIN, "no final answer and no verification"


def _from_feedback(task: _Task, ev: _Evidence) -> tuple[Outcome, str] | None:
    """The user's last word decides: approval, rejection; a later correction supersedes both."""
    said = [(k, t, p) for k, t, p in task.feedback if k in (Reaction.APPROVE, Reaction.REJECT, Reaction.REFINE)]
    if not said or said[-1][0] == Reaction.REFINE:
        return None
    kind, text, pos = said[-1]
    quote = one_line(text, 80)
    if kind == Reaction.APPROVE:
        return Outcome.SUCCESS, f'the user approved: "{quote}"'
    later = [s for s in ev.tests if s.pos > pos]
    if later and later[-1].exit_code == 0:
        return Outcome.PARTIAL, f'the user objected ("{quote}"); tests passed afterwards, no approval followed'
    return Outcome.FAIL, f'the user rejected the result: "{quote}"'


def _from_tests(ev: _Evidence) -> tuple[Outcome, str] | None:
    if not ev.tests:
        return None
    last = ev.tests[-1]
    if last.exit_code == 0 and not ev.unresolved:
        return Outcome.SUCCESS, f"verified: `{_short(last.text, 100)}` passed"
    if last.exit_code != 0:
        return Outcome.FAIL, f"the last test run `{_short(last.text, 100)}` failed (exit {last.exit_code})"
    return None


def _from_failures(task: _Task, ev: _Evidence) -> tuple[Outcome, str] | None:
    if ev.rejected and not ev.worked:
        return Outcome.FAIL, f"the user rejected `{_short(ev.rejected[-1].text, 80)}`"
    if ev.unresolved and not ev.worked:
        last = ev.unresolved[-1]
        code = f" (exit {last.exit_code})" if last.exit_code is not None else ""
        return Outcome.FAIL, f"`{_short(last.text, 80)}` failed{code} and nothing worked"
    if ev.unresolved:
        return Outcome.PARTIAL, "work was done but a failure was left unresolved"
    if task.aborted and not ev.answered:
        if ev.worked:
            return Outcome.PARTIAL, "the turn was aborted after some work"
        return Outcome.UNCERTAIN, "the turn was aborted"
    return None


def _continues(following: _Task, task: _Task) -> bool:
    """The next task builds on this one: it names or changes a file this one changed, or shares
    a content word with its request."""
    files = {os.path.basename(f).lower() for s in task.steps if s.kind == "patch" and not s.failed for f in s.files}
    text = following.request.lower()
    if any(f and f in text for f in files):
        return True
    following_files = {os.path.basename(f).lower() for s in following.steps if s.kind == "patch" for f in s.files}
    return bool(files & following_files) or bool(_content_words(following.request) & _content_words(task.request))


# --------------------------------------------------------------------------- digest


def analyse(items: Sequence[Item], *, cwd: str = "") -> SessionDigest:
    """The :class:`SessionDigest` of one session's filtered items.

    Args:
        items: the session's items (already filtered and redacted).
        cwd: the session's working directory; paths below it are shown relative to it.

    Never raises on well-formed records.
    """
    items = list(items)
    outputs = _outputs(items)
    steps = sorted(
        _run_steps(items, outputs) + _patch_steps(items, outputs) + _tool_steps(items, outputs), key=lambda s: s.pos
    )
    tasks = _split_tasks(items)
    starts = [s.pos for s in steps]
    for task in tasks:
        task.steps = steps[bisect_left(starts, task.start) : bisect_left(starts, task.end)]
        _resolve(task.steps)
        _collect(task, items)
    changed_anywhere = {os.path.basename(f) for t in tasks for f, _ in _changed(t.steps)}
    place = _Place(cwd.rstrip("/"), frozenset(changed_anywhere))
    digests = [_digest(task, tasks[n + 1] if n + 1 < len(tasks) else None, place) for n, task in enumerate(tasks)]
    kept = tuple(d for d in digests if not d.trivial)
    prefs = preferences(
        [unwrap_request(it.text).text for it in items if isinstance(it, UserMessage) and not it.injected]
    )
    prefs += _choices(outputs.values())
    return SessionDigest(kept, tuple(dict.fromkeys(prefs)), _main(kept))


def _choices(outputs: Iterable[ToolOutput]) -> list[str]:
    """Answers the user gave to the agent's questions (Claude Code ``AskUserQuestion``)."""
    found = []
    for out in outputs:
        if out.output.startswith("User has answered your questions"):
            for question, answer in _CHOICES.findall(out.output):
                found.append(f'chose "{one_line(answer, 80)}" for "{one_line(question, 100)}"')
    return found


def _main(tasks: Sequence[TaskDigest]) -> int:
    """The task that did most: files changed, tests run, commands that worked; the earliest wins a tie."""
    if not tasks:
        return -1
    weights = [len(t.changed) * 3 + len(t.tests) * 2 + len(t.delegated) * 2 + len(t.ran) for t in tasks]
    return max(range(len(tasks)), key=lambda n: (weights[n], -n))


@dataclass(frozen=True, slots=True)
class _Place:
    """Session-wide facts a task's digest needs: the cwd, files changed by any task."""

    cwd: str
    changed_anywhere: frozenset[str]

    def rel(self, path: str) -> str:
        """``path`` relative to the cwd when below it."""
        if self.cwd and path.startswith(self.cwd + "/"):
            return path[len(self.cwd) + 1 :]
        return path


_FEEDBACK_LABELS = {
    Reaction.APPROVE: "approved",
    Reaction.REJECT: "rejected",
    Reaction.ACK: "acknowledged",
    Reaction.REFINE: "corrected",
}


def _digest(task: _Task, following: _Task | None, place: _Place) -> TaskDigest:
    outcome, evidence = _outcome(task, following)
    evidence = evidence.replace(place.cwd + "/", "") if place.cwd else evidence
    answer = task.answers[-1] if task.answers else ""
    caveat = _UNVERIFIED_NOTE.search(answer)
    changed = tuple((place.rel(f), n) for f, n in _changed(task.steps))
    deleted = tuple(place.rel(f) for f in _deleted(task.steps))
    failures = _failures(task)
    return TaskDigest(
        name=_name(task, changed),
        request=task.request,
        mentioned=task.mentioned,
        outcome=outcome,
        evidence=evidence,
        changed=changed,
        deleted=deleted,
        read=tuple(dict.fromkeys(place.rel(f) for f in _read_files(task.steps))),
        searched=_searched(task.steps),
        ran=_ran(task.steps),
        tests=tuple(_test_run(s) for s in task.steps if s.test),
        red_green=_red_green(task.steps),
        failures=tuple(replace(f, what=place.rel(f.what)) if f.kind != FailureKind.COMMAND else f for f in failures),
        web=tuple(dict.fromkeys(task.web)),
        mcp=_mcp(task.steps),
        delegated=tuple(dict.fromkeys(task.delegated)),
        keys=_keys(task, answer),
        answer="" if changed or is_absent(answer) else answer_gist(strip_placeholders(answer), 200),
        caveat=_sentence_around(answer, caveat.start()) if caveat else "",
        pointers=tuple((place.rel(p), why) for p, why in _pointers(task, answer, place.changed_anywhere)),
        feedback=tuple(
            f'{_FEEDBACK_LABELS[k]}: "{one_line(t, 160)}"' for k, t, _ in task.feedback if k in _FEEDBACK_LABELS
        ),
        trivial=_is_trivial(task, changed, failures),
    )


def _is_trivial(task: _Task, changed: Sequence[tuple[str, int]], failures: Sequence[Failure]) -> bool:
    """A task with nothing to remember (see the module docstring)."""
    acted = bool(changed) or any(not s.read_only for s in task.steps)  # an ``rm`` is not read-only
    delegated = bool(task.delegated) and (bool(task.answers) or any(_delegate_result(s) for s in task.steps))
    if acted or _mcp(task.steps) or task.web or delegated:
        return False
    if not task.request:
        return True
    if any(f.kind in (FailureKind.REJECTED, FailureKind.PATCH) for f in failures):
        return False
    if is_trivial_text(task.request) or len(task.request.split()) <= 3:
        return True
    return not task.answers  # a question that was answered is kept; reads without an answer are not


def _delegate_result(step: _Step) -> bool:
    return step.text in _DELEGATE_TOOLS and bool(step.output.strip())


def _name(task: _Task, changed: Sequence[tuple[str, int]]) -> str:
    if task.request:
        text = re.sub(r'^(?:@"[^"]{1,80}"|@[\w.-]+)\s+', "", task.request)  # "@agent do X" → "do X"
        return first_sentence(text, 100).rstrip(" .:;,") or "User request"
    tools = [name.split("__")[1] for name, _ in _mcp(task.steps) if name.count("__") >= 2]
    if changed:
        return "Work without a recorded request: changed " + ", ".join(os.path.basename(f) for f, _ in changed[:3])
    if tools:
        return "Work without a recorded request: MCP " + ", ".join(dict.fromkeys(tools))
    return "Work without a recorded request"


def _changed(steps: Sequence[_Step]) -> tuple[tuple[str, int], ...]:
    counts: dict[str, int] = {}
    for s in steps:
        if s.kind == "patch" and not s.failed:
            for f in s.files:
                counts[f] = counts.get(f, 0) + 1
    return tuple(counts.items())


def _deleted(steps: Sequence[_Step]) -> tuple[str, ...]:
    """Files a successful ``rm`` removed."""
    found: dict[str, None] = {}
    for s in steps:
        if s.kind == "run" and s.program == "rm" and s.exit_code == 0:
            for word in _words(s.text.splitlines()[0] if s.text else "")[1:]:
                if not word.startswith("-") and "*" not in word:
                    found.setdefault(word, None)
    return tuple(found)


def _read_files(steps: Sequence[_Step]) -> tuple[str, ...]:
    files: dict[str, None] = {}
    for s in steps:
        if s.kind == "tool" and s.path and not s.failed:
            files.setdefault(s.path, None)
        elif s.kind == "run" and s.read_only and s.program in ("cat", "sed", "nl", "head", "tail", "less", "more"):
            for word in _words(s.text.split("|")[0])[1:]:
                if not word.startswith("-") and ("/" in word or "." in word) and not re.match(r"^\d+,\d+p$", word):
                    files.setdefault(word, None)
    return tuple(files)


def _searched(steps: Sequence[_Step]) -> tuple[str, ...]:
    found: dict[str, None] = {}
    for s in steps:
        if s.kind == "run" and s.read_only and s.program in ("rg", "grep", "egrep", "ag", "find", "fd"):
            found.setdefault(_short(s.text, 80), None)
    return tuple(found)


def _ran(steps: Sequence[_Step]) -> tuple[str, ...]:
    """Non-read-only commands that worked (exit 0) or went on in the background, one per key."""
    seen: dict[str, str] = {}
    for s in steps:
        if s.kind != "run" or s.read_only or s.test or s.failed:
            continue
        if s.exit_code == 0:
            seen.setdefault(s.key, _short(s.text, 120))
        elif s.exit_code is None and _BACKGROUND.search(s.output[:300]):
            seen.setdefault(s.key, _short(s.text, 100) + " (in the background)")
    return tuple(seen.values())


def _test_run(step: _Step) -> TestRun:
    passed = None if step.exit_code is None else step.exit_code == 0
    return TestRun(_short(step.text, 160), passed, _test_result(step.output))


def _is_red(step: _Step) -> bool:
    """A test run that ran tests and saw some fail (not a test command that could not start)."""
    return step.test and step.exit_code not in (None, 0, 126, 127) and bool(_test_result(step.output))


def _red_green(steps: Sequence[_Step]) -> bool:
    tests = [s for s in steps if s.test and s.exit_code is not None]
    return any(_is_red(a) and any(b.exit_code == 0 for b in tests[n + 1 :]) for n, a in enumerate(tests))


def _failures(task: _Task) -> tuple[Failure, ...]:
    tests = [s for s in task.steps if s.test and s.exit_code is not None]
    out: list[Failure] = []
    last_key: tuple[str, str] | None = None  # (kind, command key): repeats fold into one failure
    for s in task.steps:
        if not s.failed or not (s.minor or _counts(task, s)):
            continue
        if _is_red(s) and any(t.pos > s.pos and t.exit_code == 0 for t in tests):
            continue  # red before green: verification, not a failure
        failure = _failure(s)
        key = (s.kind, s.key or s.text)
        if out and key == last_key:
            out[-1] = replace(out[-1], count=out[-1].count + 1)
            continue
        out.append(failure)
        last_key = key
    out += [Failure(FailureKind.ERROR_EVENT, "agent error", e, None, False) for e in task.errors]
    return tuple(out)


def _failure(s: _Step) -> Failure:
    if s.rejected:
        kind = FailureKind.REJECTED
    elif s.kind == "patch":
        kind = FailureKind.PATCH
    elif s.exit_code is None:
        kind = FailureKind.TOOL
    else:
        kind = FailureKind.COMMAND
    return Failure(kind, _short(s.text, 160), _error_line(s.output), s.exit_code, s.resolved, s.pivot, minor=s.minor)


def _mcp(steps: Sequence[_Step]) -> tuple[tuple[str, int], ...]:
    counts: dict[str, int] = {}
    for s in steps:
        if (
            s.kind == "tool"
            and (s.text.startswith("mcp__") or s.text.startswith("list_mcp_"))
            and not is_absent(s.text)
        ):
            counts[s.text] = counts.get(s.text, 0) + 1
    return tuple(counts.items())


def _keys(task: _Task, answer: str) -> tuple[str, ...]:
    """``UPPER_SNAKE`` names from the request, the commands, the web searches, and the answer of a
    task that changed files (a design discussion's answer proposes names that do not exist)."""
    changed = any(s.kind == "patch" and not s.failed for s in task.steps)
    texts = [task.request, answer if changed else ""] + [s.text for s in task.steps if s.kind == "run"] + task.web
    found: dict[str, None] = {}
    for text in texts:
        for key in _KEY_TOKEN.findall(strip_placeholders(text)):
            if len(key) >= 6 and not key.startswith("REDACTED_"):
                found.setdefault(key, None)
    return tuple(found)[:8]


def _pointers(task: _Task, answer: str, known: frozenset[str]) -> tuple[tuple[str, str], ...]:
    """Files the user mentioned, the tests ran, the answer named (not files changed in the session)."""
    out: dict[str, str] = {}
    for m in task.mentioned:
        out.setdefault(m.path, "mentioned by the user" if m.name != "active file" else "the user's active file")
    for s in task.steps:
        if s.test:
            for word in _words(s.text):
                if re.search(r"(?:test|spec)[\w.-]*\.\w+$|_test\.\w+$", word) and os.path.basename(word) not in known:
                    out.setdefault(word, "the tests of this work")
    found = [(answer, "named in the final answer")]
    found += [(s.output, "reported by a sub-agent") for s in task.steps if s.text in _DELEGATE_TOOLS]
    for text, why in found:
        for match in _ANSWER_PATH.finditer(strip_placeholders(text)):
            path = match.group(1) or match.group(2) or ""
            if path and os.path.basename(path) not in known and "://" not in path:
                out.setdefault(path, why)
    return tuple(list(out.items())[:8])


def _sentence_around(text: str, pos: int, max_chars: int = 200) -> str:
    start = max(text.rfind(". ", 0, pos), text.rfind("\n", 0, pos)) + 1
    ends = [e for e in (text.find(". ", pos), text.find("\n", pos)) if e != -1]
    end = min(ends) + 1 if ends else len(text)
    return one_line(text[start:end].strip(), max_chars)
