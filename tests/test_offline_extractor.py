"""The offline extractor (SPEC §6.4): useful trace memories from real sessions, outcome rules."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from memd.extract.base import ExtractionRequest, Extractor
from memd.extract.contract import TraceContext, has_skeleton, normalise
from memd.extract.input_builder import build_input
from memd.extract.offline import OfflineExtractor, extract_offline
from memd.rollout.records import (
    AssistantMessage,
    Item,
    ParsedRollout,
    PatchApplied,
    ToolCall,
    ToolOutput,
    TurnContext,
    TurnEvent,
    UserMessage,
)
from memd.rollout.session import parse_rollout_bytes
from tests.conftest import codex_rollout

POMODORO = "aisessions-codex-pomodor-timer.jsonl"
ERRORS = "rollout-2026-01-02T19-00-00-019b7f95-0000-7000-0000-000000000001.jsonl"
COMPACTION = "rollout-2026-05-11T11-26-55-019e1625-789d-76c0-80ab-3724b5ddb799.jsonl"


def _request(items: list[Item], model: str = "gpt-5") -> ExtractionRequest:
    parsed = ParsedRollout(items=list(items), item_line_bytes=[100] * len(items))
    return _request_for(parsed, model)


def _request_for(parsed: ParsedRollout, model: str = "") -> ExtractionRequest:
    built = build_input(parsed)
    return ExtractionRequest(
        thread_id="t1",
        project="demo",
        cwd="/src/demo",
        rollout_path="/x.jsonl",
        updated_at=1767376800.0,  # 2026-01-02T18:00:00Z
        agent="codex",
        model=model,
        built=built,
    )


def _real(name: str) -> tuple[str, str]:
    parsed = parse_rollout_bytes(codex_rollout(name).read_bytes())
    model = next((it.model for it in parsed.items if isinstance(it, TurnContext) and it.model), "")
    return extract_offline(_request_for(parsed, model))


def _tasks(trace: str) -> dict[str, str]:
    """``{task name: section text}``."""
    sections = re.split(r"^## Task: ", trace, flags=re.MULTILINE)[1:]
    return {s.split("\n", 1)[0]: s for s in sections}


def _outcome(section: str) -> str:
    return re.search(r"^Outcome: (\w+)$", section, re.MULTILINE).group(1)


async def test_extractor_protocol() -> None:
    extractor: Extractor = OfflineExtractor()
    assert extractor.name == "offline"
    result = await extractor.extract(_request([UserMessage("hi", origin="event")]))
    assert result.extractor == "offline" and result.tokens_in == 0
    await extractor.aclose()
    await extractor.aclose()


def test_pomodoro_session_names_files_commands_and_preference(codex_rollouts: Path) -> None:
    trace, summary = _real(POMODORO)
    assert has_skeleton(trace)
    # Read off the file: patches add/update index.html, styles.css, script.js; shell commands
    # `ls`, `cat script.js`, `cat styles.css`; the first request says "Don’t use any external
    # frameworks"; one apply_patch on script.js failed verification and was redone.
    for name in ("index.html", "styles.css", "script.js"):
        assert f"`{name}`" in trace
    for command in ("`ls`", "`cat script.js`", "`cat styles.css`"):
        assert command in trace
    assert "Don't use any external frameworks" in trace.split("## Task:")[0]
    assert "apply_patch verification failed" in trace
    tasks = _tasks(trace)
    assert list(tasks) == [
        "Build a simple Pomodoro timer web app using HTML, CSS, and JavaScript",
        "add smooth transitions between states",
        "add a Pause/Resume feature",
    ]
    # Task 1 built files the user then kept extending: moved on satisfied.
    assert (
        _outcome(tasks["Build a simple Pomodoro timer web app using HTML, CSS, and JavaScript"])
        == "success"
    )
    # The last task only has the assistant's own claim.
    assert _outcome(tasks["add a Pause/Resume feature"]) == "uncertain"
    assert "No automated tests run" in trace  # the final answer's own caveat is reported
    assert trace.startswith("# Build a simple Pomodoro timer web app")
    assert "Trace context: demo, 2026-01-02, codex, gpt-5-codex" in trace
    assert len(summary.split()) <= 120 and "index.html" in summary


def test_failed_command_is_reported_with_exit_code(codex_rollouts: Path) -> None:
    trace, summary = _real(ERRORS)
    assert has_skeleton(trace)
    # Read off the file: no user message; `cat nonexistent.txt` exits 1, `ls -la` and `pwd` exit 0.
    assert "`cat nonexistent.txt` failed with exit 1" in trace
    assert "No such file or directory" in trace
    assert "`ls -la` (exit 0)" in trace and "`pwd` (exit 0)" in trace
    assert "not resolved" in trace
    (section,) = _tasks(trace).values()
    assert _outcome(section) == "fail"
    assert "cat nonexistent.txt" in summary and "exit 1" in summary


def test_tests_that_pass_after_a_red_run_verify_the_task(codex_rollouts: Path) -> None:
    trace, summary = _real(COMPACTION)
    # Read off the file: the focused vitest run fails (exit 1), passes after the patch, then the
    # whole file passes; three files are patched; `npm run build` exits 0.
    tasks = _tasks(trace)
    section = tasks["let's update the defailt context compart to 90 in env var"]
    assert _outcome(section) == "success"
    assert "src/agents/plugins/opencode/opencode.plugin.ts" in section
    assert (
        "Test command: `npm test -- --run src/agents/plugins/__tests__/codemie-code-reasoning.test.ts` passed (exit 0)"
        in section
    )
    assert "resolved later by a successful run of the same command" in section
    assert "`npm run build`" in section
    assert "Verified with `npm test" in summary


def test_all_real_rollouts_give_conforming_output(codex_rollouts: Path) -> None:
    for path in sorted(codex_rollouts.glob("*.jsonl")):
        parsed = parse_rollout_bytes(path.read_bytes())
        trace, summary = extract_offline(_request_for(parsed))
        assert (trace == "") == (summary == ""), path.name
        if trace:
            assert has_skeleton(trace), path.name
            assert len(summary.split()) <= 120, path.name
            out = normalise(trace, summary, context=TraceContext("demo", "2026-01-02", "codex", ""))
            assert not out.wrapped and out.trace_memory == trace.strip(), path.name
        # Deterministic: the same input gives the same output.
        assert extract_offline(_request_for(parsed)) == (trace, summary)


def test_greeting_only_session_is_the_noop() -> None:
    items: list[Item] = [
        UserMessage("hello!", origin="event"),
        AssistantMessage("Hi! How can I help you today?", phase="final_answer"),
        UserMessage("thanks", origin="event"),
        AssistantMessage("You're welcome."),
    ]
    assert extract_offline(_request(items)) == ("", "")
    assert normalise("", "", context=TraceContext("demo", "2026-01-02", "codex", "gpt-5")).noop


def test_greeting_session_from_real_rollout_is_the_noop(codex_rollouts: Path) -> None:
    # Read off the file: "Hello, Codex! Please explain what you do." / "What languages can you
    # work with?", one-sentence answers, no tools.
    assert _real("codemie-turn-2.jsonl") == ("", "")


def test_preferences_are_sentence_level_imperatives() -> None:
    items: list[Item] = [
        UserMessage(
            "Add a login page. Always use TypeScript strict mode. Don’t add new dependencies!\n"
            "Can you never use tabs?\n"
            "```\n// never do this in production\n```\n"
            "Prefer pnpm over npm. Use vitest instead of jest. The page is blue.",
            origin="event",
        ),
        ToolCall(
            "c1",
            "apply_patch",
            "patch",
            arguments="*** Begin Patch\n*** Add File: login.ts\n+x\n*** End Patch",
            patch_files=("login.ts",),
        ),
        ToolOutput("c1", "Success.", exit_code=0),
        UserMessage("Avoid default exports in new files.", origin="event"),
    ]
    trace, _ = extract_offline(_request(items))
    prefs = trace.split("User preferences:")[1].split("## Task:")[0]
    for expected in (
        "- Always use TypeScript strict mode.",
        "- Don't add new dependencies!",
        "- Prefer pnpm over npm.",
        "- Use vitest instead of jest.",
        "- Avoid default exports in new files.",
    ):
        assert expected in prefs
    assert "tabs" not in prefs  # a question
    assert "production" not in prefs  # inside a code fence
    assert "The page is blue" not in prefs and "Add a login page" not in prefs


def test_no_preferences_is_exactly_none_observed() -> None:
    items: list[Item] = [
        UserMessage("list the files", origin="event"),
        ToolCall("c1", "shell", "shell", command="ls"),
        ToolOutput("c1", "a\n", exit_code=0),
    ]
    trace, _ = extract_offline(_request(items))
    assert "\nUser preferences: none observed\n" in trace


def _work(call: str, command: str, exit_code: int, output: str = "") -> list[Item]:
    return [
        ToolCall(call, "shell", "shell", command=command),
        ToolOutput(call, output, exit_code=exit_code),
    ]


def _patch(call: str, path: str) -> list[Item]:
    return [
        ToolCall(
            call,
            "apply_patch",
            "patch",
            arguments=f"*** Begin Patch\n*** Update File: {path}\n+x\n*** End Patch",
            patch_files=(path,),
        ),
        ToolOutput(call, f"Success. Updated the following files:\nM {path}\n", exit_code=0),
    ]


def _only_outcome(items: list[Item]) -> str:
    trace, _ = extract_offline(_request(items))
    assert has_skeleton(trace)
    first = next(iter(_tasks(trace).values()))
    return _outcome(first)


def test_outcome_success_on_explicit_approval() -> None:
    items = [
        UserMessage("rename foo to bar in util.py", origin="event"),
        *_patch("p1", "util.py"),
        AssistantMessage("Renamed.", phase="final_answer"),
        UserMessage("thanks, works", origin="event"),
    ]
    trace, _ = extract_offline(_request(items))
    assert list(_tasks(trace)) == ["rename foo to bar in util.py"]  # "thanks" is not a task
    assert _only_outcome(items) == "success"
    assert 'User feedback (approval): "thanks, works"' in trace


def test_outcome_success_on_passing_tests() -> None:
    items = [
        UserMessage("fix the parser bug", origin="event"),
        *_patch("p1", "parser.py"),
        *_work("c1", "pytest -q tests/test_parser.py", 0, "3 passed in 0.1s\n"),
        AssistantMessage("Fixed.", phase="final_answer"),
    ]
    assert _only_outcome(items) == "success"
    trace, _ = extract_offline(_request(items))
    assert "`pytest -q tests/test_parser.py` passed (exit 0): `3 passed in 0.1s`" in trace


def test_outcome_fail_on_rejection() -> None:
    items = [
        UserMessage("fix the parser bug", origin="event"),
        *_patch("p1", "parser.py"),
        AssistantMessage("Fixed.", phase="final_answer"),
        UserMessage("no, it still fails", origin="event"),
    ]
    assert _only_outcome(items) == "fail"


def test_outcome_fail_when_last_test_run_fails() -> None:
    items = [
        UserMessage("fix the parser bug", origin="event"),
        *_patch("p1", "parser.py"),
        *_work("c1", "pytest -q", 1, "FAILED tests/test_parser.py::test_x\n1 failed\n"),
        AssistantMessage("I could not make the test pass.", phase="final_answer"),
    ]
    assert _only_outcome(items) == "fail"


def test_outcome_uncertain_on_assistant_claim_alone() -> None:
    items = [
        UserMessage("update the docs", origin="event"),
        *_patch("p1", "README.md"),
        AssistantMessage("Done, everything works perfectly.", phase="final_answer"),
    ]
    assert _only_outcome(items) == "uncertain"


def test_outcome_partial_when_an_error_is_left_unresolved() -> None:
    items = [
        UserMessage("deploy the app", origin="event"),
        *_patch("p1", "deploy.sh"),
        *_work("c1", "./deploy.sh --prod", 2, "error: missing credentials\n"),
        AssistantMessage(
            "Patched the script but deployment failed on credentials.", phase="final_answer"
        ),
    ]
    assert _only_outcome(items) == "partial"
    trace, _ = extract_offline(_request(items))
    assert (
        "`./deploy.sh --prod` failed with exit 2: `error: missing credentials` — not resolved"
        in trace
    )


def test_outcome_partial_when_the_turn_was_aborted_after_work() -> None:
    items = [
        UserMessage("migrate the database", origin="event"),
        *_work("c1", "alembic upgrade head", 0),
        TurnEvent("turn_aborted", text="interrupted"),
    ]
    assert _only_outcome(items) == "partial"


def test_outcome_fail_on_unresolved_failure_without_answer() -> None:
    items = [
        UserMessage("build it", origin="event"),
        *_work("c1", "make", 2, "make: *** [all] Error 2\n"),
    ]
    assert _only_outcome(items) == "fail"


def test_resolved_error_names_the_fix() -> None:
    items = [
        UserMessage("install deps", origin="event"),
        *_work("c1", "npm ci", 1, "npm ERR! lockfile out of date\n"),
        *_work("c2", "npm ci --legacy-peer-deps", 0),
        *_work("c3", "npm test", 0, "Tests: 4 passed, 4 total\n"),
        AssistantMessage("Installed with --legacy-peer-deps.", phase="final_answer"),
    ]
    trace, _ = extract_offline(_request(items))
    assert "`npm ci` failed with exit 1: `npm ERR! lockfile out of date` — resolved later" in trace
    assert "`npm ci` failed; `npm ci --legacy-peer-deps` worked" in trace
    assert _only_outcome(items) == "success"


def test_failed_patch_and_patch_events() -> None:
    items = [
        UserMessage("edit app.py", origin="event"),
        ToolCall(
            "p1",
            "apply_patch",
            "patch",
            arguments="*** Begin Patch\n*** Update File: app.py\n+x\n*** End Patch",
            patch_files=("app.py",),
        ),
        ToolOutput(
            "p1", "apply_patch verification failed: Failed to find expected lines", exit_code=1
        ),
        PatchApplied("p1", success=False, files=("app.py",)),
        AssistantMessage("The patch did not apply.", phase="final_answer"),
    ]
    trace, _ = extract_offline(_request(items))
    assert "apply_patch on `app.py` failed" in trace and "— not resolved" in trace
    assert "Changed files" not in trace
    assert _only_outcome(items) == "partial"


def test_several_requests_become_several_tasks() -> None:
    items = [
        UserMessage("add a health endpoint", origin="event"),
        *_patch("p1", "api.py"),
        AssistantMessage("Added /health.", phase="final_answer"),
        UserMessage("ok", origin="event"),
        UserMessage("now write a test for the health endpoint in test_api.py", origin="event"),
        *_patch("p2", "test_api.py"),
        *_work("c1", "pytest test_api.py", 0, "1 passed\n"),
        AssistantMessage("Test added.", phase="final_answer"),
    ]
    trace, summary = extract_offline(_request(items))
    tasks = _tasks(trace)
    assert list(tasks) == [
        "add a health endpoint",
        "now write a test for the health endpoint in test_api.py",
    ]
    assert _outcome(tasks["add a health endpoint"]) == "success"  # moved on to build on it
    assert _outcome(tasks["now write a test for the health endpoint in test_api.py"]) == "success"
    assert "`api.py`" in tasks["add a health endpoint"]
    assert len(summary.split()) <= 120


def test_summary_is_capped_at_120_words() -> None:
    items: list[Item] = []
    for n in range(10):
        items += [
            UserMessage(f"task {n} " + "with a fairly long description " * 5, origin="event"),
            *_work(f"c{n}", f"make target{n} " + "--flag " * 10, 2, "error: broken " * 10),
        ]
    _, summary = extract_offline(_request(items))
    assert len(summary.split()) <= 121 and summary.endswith("…")


@pytest.mark.parametrize("text", ["thanks", "Great, works!", "lgtm", "perfect"])
def test_approvals_are_feedback_not_tasks(text: str) -> None:
    items = [
        UserMessage("rename the module", origin="event"),
        *_patch("p1", "mod.py"),
        AssistantMessage("Renamed.", phase="final_answer"),
        UserMessage(text, origin="event"),
    ]
    trace, _ = extract_offline(_request(items))
    assert list(_tasks(trace)) == ["rename the module"]
    assert _only_outcome(items) == "success"
