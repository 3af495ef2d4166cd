"""The offline extractor (SPEC §6.4, §19): useful trace memories from real sessions, outcome rules.

Facts about the real transcripts are read off the files (jq/grep), noted beside each assertion.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from memd.extract.base import ExtractionRequest, Extractor
from memd.extract.contract import TraceContext, has_skeleton, normalise
from memd.extract.input_builder import build_input
from memd.extract.offline import OfflineExtractor, extract_offline, extract_offline_titled
from memd.extract.offline_text import Mention, Reaction, is_absent, reaction_kind, unwrap_request
from memd.rollout.claude import parse_claude_bytes
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
from tests.conftest import SHARED_ROLLOUTS, codex_rollout

POMODORO = "aisessions-codex-pomodor-timer.jsonl"
ERRORS = "rollout-2026-01-02T19-00-00-019b7f95-0000-7000-0000-000000000001.jsonl"
COMPACTION = "rollout-2026-05-11T11-26-55-019e1625-789d-76c0-80ab-3724b5ddb799.jsonl"
SANITIZED = "rollout-2026-02-23T12-54-34-019c8a59-e9dd-71f0-9ae3-4079fe9726a9.jsonl"
SANITIZED_SHORT = "rollout-2026-02-23T13-19-38-019c8a70-dda7-7f33-98ea-f30553347322.jsonl"


def _request(items: list[Item], model: str = "gpt-5", cwd: str = "/src/demo") -> ExtractionRequest:
    parsed = ParsedRollout(items=list(items), item_line_bytes=[100] * len(items))
    return _request_for(parsed, model, cwd)


def _request_for(parsed: ParsedRollout, model: str = "", cwd: str = "/src/demo") -> ExtractionRequest:
    built = build_input(parsed)
    return ExtractionRequest(
        thread_id="t1",
        project="demo",
        cwd=cwd,
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


def _claude(name: str) -> tuple[str, str, str]:
    path = SHARED_ROLLOUTS / "claude" / name
    if not path.is_file():
        pytest.skip(f"real transcripts not available: {path} is absent")
    parsed = parse_claude_bytes(path.read_bytes(), path=name, name_hint=path.stem)
    cwd = parsed.meta.cwd or "" if parsed.meta else ""
    return extract_offline_titled(_request_for(parsed, cwd=cwd))


def _tasks(trace: str) -> dict[str, str]:
    """``{task name: section text}``."""
    sections = re.split(r"^## Task: ", trace, flags=re.MULTILINE)[1:]
    return {s.split("\n", 1)[0]: s for s in sections}


def _outcome(section: str) -> str:
    match = re.search(r"^Outcome: (\w+)", section, re.MULTILINE)
    assert match is not None, section
    return match.group(1)


def _bullets(trace: str) -> list[str]:
    return [line for line in trace.splitlines() if line.startswith("- ")]


# --------------------------------------------------------------------------- text rules


def test_desktop_wrapper_is_unwrapped_with_mentioned_files() -> None:
    text = (
        "# Files mentioned by the user:\n\n## notes.md: /home/me/app/notes.md\n\n"
        "## spec.md: /home/me/app/docs/spec.md\n\n## My request for Codex:\nsummarize the open questions in notes.md\n"
    )
    request = unwrap_request(text)
    assert request.text == "summarize the open questions in notes.md"
    assert request.mentioned == (
        Mention("notes.md", "/home/me/app/notes.md"),
        Mention("spec.md", "/home/me/app/docs/spec.md"),
    )


def test_ide_wrapper_is_unwrapped_with_active_file_and_tabs() -> None:
    text = (
        "# Context from my IDE setup:\n\n## Active file: src/app.ts\n\n## Open tabs:\n- app.ts: src/app.ts\n"
        "- util.ts: src/util.ts\n\n## My request for Codex:\nrename foo to bar\n"
    )
    request = unwrap_request(text)
    assert request.text == "rename foo to bar"
    assert [m.path for m in request.mentioned] == ["src/app.ts", "src/app.ts", "src/util.ts"]
    assert unwrap_request("plain request").text == "plain request"


def test_claude_at_file_mentions_become_pointers() -> None:
    request = unwrap_request("@src/sso/ARCHITECTURE.md review the sync logic")
    assert request.text == "review the sync logic"
    assert request.mentioned == (Mention("file", "src/sso/ARCHITECTURE.md"),)
    assert unwrap_request("@notes.md").text == "@notes.md"  # nothing after it: the mention is the request


@pytest.mark.parametrize(
    "text",
    ["[REDACTED_MESSAGE len=32 sha=821fd802]", "[trimmed for fixture]", " [REDACTED_TEXT len=3 sha=ab] \n", ""],
)
def test_redacted_or_trimmed_text_is_absent(text: str) -> None:
    assert is_absent(text) and unwrap_request(text).text == ""


def test_a_secret_marker_inside_real_text_is_not_absent() -> None:
    assert not is_absent("use the key [REDACTED_SECRET] for staging")
    assert unwrap_request("use the key [REDACTED_SECRET] for staging").text.startswith("use the key")


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("thanks", Reaction.APPROVE),
        ("continue", Reaction.CONTINUE),
        ("what else?", Reaction.CONTINUE),
        ("no, it still fails", Reaction.REJECT),
        ("great, but there is existing logic for scanning history", Reaction.REFINE),
        ("don't produce code, design solution first", Reaction.REFINE),
        ("add a Pause/Resume feature", None),
    ],
)
def test_reactions(text: str, kind: Reaction | None) -> None:
    assert reaction_kind(text) == kind


# --------------------------------------------------------------------------- tasks and outcomes


async def test_extractor_protocol_gives_the_title() -> None:
    extractor: Extractor = OfflineExtractor()
    items: list[Item] = [
        UserMessage("rename foo to bar in util.py", origin="event"),
        *_patch("p1", "util.py"),
        AssistantMessage("Renamed.", phase="final_answer"),
    ]
    result = await extractor.extract(_request(items))
    assert result.extractor == "offline" and result.tokens_in == 0
    assert result.title == "rename foo to bar in util.py"
    assert (await extractor.extract(_request([UserMessage("hi", origin="event")]))).title == ""
    await extractor.aclose()
    await extractor.aclose()


def test_wrapped_request_names_the_task_and_keeps_pointers() -> None:
    items: list[Item] = [
        UserMessage(
            "# Files mentioned by the user:\n\n## notes.md: /src/demo/notes.md\n\n## My request for Codex:\n"
            "summarize the open questions in notes.md and write them to QUESTIONS.md",
            origin="event",
        ),
        *_patch("p1", "QUESTIONS.md"),
        AssistantMessage("Wrote QUESTIONS.md with four open questions.", phase="final_answer"),
    ]
    trace, _, title = extract_offline_titled(_request(items))
    assert title == "summarize the open questions in notes.md and write them to QUESTIONS.md"
    assert trace.startswith("# summarize the open questions")
    assert "Files mentioned" not in trace
    assert "- `notes.md` — mentioned by the user" in trace  # made relative to the cwd


def test_redacted_requests_make_no_tasks() -> None:
    items: list[Item] = [
        UserMessage("[REDACTED_MESSAGE len=32 sha=821fd802]", origin="event"),
        ToolCall("c1", "exec_command", "shell", command="[REDACTED_ARGUMENTS len=83 sha=b4e1e5f7]"),
        ToolOutput("c1", "[REDACTED_OUTPUT len=136 sha=b8890189]", exit_code=None),
        UserMessage("[REDACTED_MESSAGE len=40 sha=01020304]", origin="event"),
        AssistantMessage("[REDACTED_MESSAGE len=7665 sha=49c85161]", phase="final_answer"),
    ]
    assert extract_offline(_request(items)) == ("", "")


@pytest.mark.parametrize(
    "items",
    [
        [UserMessage("hi", origin="event"), AssistantMessage("Hello! How can I help?", phase="final_answer")],
        [UserMessage("show tools", origin="event"), AssistantMessage("Tools: shell, apply_patch.")],
        [UserMessage("ls", origin="event"), ToolCall("c1", "shell", "shell", command="ls")],  # no answer
        [
            UserMessage("spawn a helper", origin="event"),
            ToolCall("s1", "spawn_agent", "other", arguments="{}"),
        ],
    ],
    ids=["greeting", "show_tools", "lone_command", "spawn_without_answer"],
)
def test_trivial_turns_are_not_tasks(items: list[Item]) -> None:
    assert extract_offline(_request(items)) == ("", "")


def test_greeting_session_from_real_rollout_is_the_noop(codex_rollouts: Path) -> None:
    # Read off the file: "Hello, Codex! Please explain what you do." / "What languages can you
    # work with?", one-sentence answers, no tools.
    assert _real("codemie-turn-2.jsonl") == ("", "")


def test_sanitized_rollouts(codex_rollouts: Path) -> None:
    # Read off 019c8a59: every message, command and output is [REDACTED_...]; 38 user messages;
    # unredacted tool names: mcp__supabase_right_aim_ops__execute_sql (22 calls), list_tables,
    # mcp__n8n-mcp__n8n_health_check, mcp__associates-tools__List_Budgets.
    trace, summary = _real(SANITIZED)
    assert has_skeleton(trace)
    assert "REDACTED" not in trace and len(_tasks(trace)) == 1
    assert "`mcp__supabase_right_aim_ops__execute_sql` ×22" in trace
    assert "n8n_health_check" in trace and "List_Budgets" in trace
    assert len(trace) < 2_000
    # Read off 019c8a70: one redacted request, one redacted command without output.
    assert _real(SANITIZED_SHORT) == ("", "")


def test_pomodoro_session(codex_rollouts: Path) -> None:
    trace, summary = _real(POMODORO)
    assert has_skeleton(trace)
    # Read off the file: patches add/update index.html, styles.css, script.js; the first
    # request says "Don’t use any external frameworks"; one apply_patch on script.js failed
    # verification ("Failed to find expected lines"), then `cat script.js` and the patch again.
    assert "- Don't use any external frameworks — keep it pure HTML, CSS, and JS." in trace.split("## Task:")[0]
    tasks = _tasks(trace)
    assert list(tasks) == [
        "Build a simple Pomodoro timer web app using HTML, CSS, and JavaScript",
        "add smooth transitions between states",
        "add a Pause/Resume feature",
    ]
    first, _, last = tasks.values()
    assert "Changed: `index.html`, `styles.css`, `script.js`" in first
    assert _outcome(first) == "success"  # the user moved on to build on it
    assert _outcome(last) == "uncertain"  # only the assistant's own claim
    assert "Failed to find expected lines" in last and "re-read the file (`cat script.js`) and patched again" in last
    assert "No automated tests run" in first  # the final answer's own caveat
    assert trace.startswith("# Build a simple Pomodoro timer web app using HTML, CSS, and JavaScript — success")
    assert "Trace context: demo, 2025-10-21, codex, gpt-5-codex" in trace or "Trace context: demo, 2026-01-02" in trace
    assert "Built the timer layout" not in trace  # the final answer is not pasted
    assert len(summary.split()) <= 120 and "index.html" in summary


def test_red_then_green_and_failures_without_exit_code(codex_rollouts: Path) -> None:
    trace, summary = _real(COMPACTION)
    # Read off the file: "show tools" first (a trivial turn); then the focused vitest run fails
    # (exit 1, "Tests 1 failed"), passes after the patch, the whole file passes ("16 passed");
    # three files patched; `npm run build` exits 0; a write_stdin call answers "write_stdin
    # failed: stdin is closed for this session; rerun exec_command with tty=true".
    tasks = _tasks(trace)
    assert list(tasks) == ["let's update the defailt context compart to 90 in env var"]
    (section,) = tasks.values()
    assert _outcome(section) == "success"
    assert "src/agents/plugins/opencode/opencode.plugin.ts" in section
    assert "Verified red then green:" in section and "Tests 16 passed (16)" in section
    assert "`write_stdin` failed without an exit code: `write_stdin failed: stdin is closed" in section
    assert "`npm run build`" in section
    assert "`OPENCODE_CONFIG_CONTENT`" in section
    assert section.count("sed -n") <= 1  # a dozen sed -n windows are compressed to the files read
    assert "Verified with `npm test" in summary


def test_failed_read_only_commands_without_request_are_not_a_task(codex_rollouts: Path) -> None:
    # Read off the file: no user message; `ls -la`, `cat nonexistent.txt` (exit 1), `pwd`.
    assert _real(ERRORS) == ("", "")


def test_all_real_rollouts_give_conforming_deterministic_output(codex_rollouts: Path) -> None:
    paths = sorted(codex_rollouts.glob("*.jsonl")) + sorted((SHARED_ROLLOUTS / "claude").glob("*.jsonl"))
    for path in paths:
        data = path.read_bytes()
        parsed = parse_claude_bytes(data) if path.parent.name == "claude" else parse_rollout_bytes(data)
        trace, summary = extract_offline(_request_for(parsed))
        assert (trace == "") == (summary == ""), path.name
        if trace:
            assert has_skeleton(trace), path.name
            assert len(summary.split()) <= 120, path.name
            out = normalise(trace, summary, context=TraceContext("demo", "2026-01-02", "codex", ""))
            assert not out.wrapped and out.trace_memory == trace.strip(), path.name
            bullets = _bullets(trace)
            assert len(bullets) == len(set(bullets)), f"{path.name}: a repeated bullet"
            assert all(len(b) <= 420 for b in bullets), path.name
            assert "REDACTED_MESSAGE" not in trace and "trimmed for fixture" not in trace, path.name
        assert extract_offline(_request_for(parsed)) == (trace, summary)


def test_claude_pivots_and_verification() -> None:
    # Read off spotter-4d5611e5: `git add ... priv/static/assets/spotter.css` exits 1 (ignored by
    # .gitignore), `git add -f priv/static/assets/spotter.css` works; three `git commit` runs are
    # refused by the pre-commit validation, `mix format` and fixes follow, the fourth commit works;
    # `git push` exits 128 (no upstream), `git push --set-upstream origin spotter-dov` works;
    # `mix test` passes.
    trace, _, title = _claude("spotter-4d5611e5-241a-462a-8d15-5122611a9569.jsonl")
    assert title == "Work on bead spotter-dov"
    (section,) = _tasks(trace).values()
    assert _outcome(section) == "success"
    assert "`git add -f priv/static/assets/spotter.css` works" in section
    assert "`git push --set-upstream origin spotter-dov` works" in section
    assert "Pre-commit validation failed" in section and "(3 times in a row); works after `mix format`" in section
    assert "Verify with `mix test`: passed" in section
    assert "`lib/spotter_web/live/transcript_computers.ex`" in section  # relative to the cwd


def test_claude_refused_write_is_a_failure_without_exit_code() -> None:
    # Read off ccviewer-1af7fc5e: /init; the Write of CLAUDE.md returns is_error "Claude requested
    # permissions to write to /path/to/Demo/CLAUDE.md, but you haven't granted it yet."; the
    # assistant then says it created the file.
    trace, _, _ = _claude("ccviewer-1af7fc5e-8455-4414-9ccd-011d40f70b2a.jsonl")
    (section,) = _tasks(trace).values()
    assert _outcome(section) == "fail"
    assert "Editing `CLAUDE.md` failed: `Claude requested permissions" in section
    assert "The assistant still answered:" in section


def test_claude_corrections_stay_in_one_task_and_rejections_fail() -> None:
    # Read off codemie-9eda1058: "show tools and store response in file"; the Write of
    # available-tools.md is rejected by the user; then "explore more of current repo".
    trace, _, _ = _claude("codemie-9eda1058-9706-484a-b992-d03f9cfa2546.jsonl")
    tasks = _tasks(trace)
    assert _outcome(tasks["show tools and store response in file"]) == "fail"
    assert "The user rejected `available-tools.md`" in tasks["show tools and store response in file"]
    # Read off codemie-196820da: 13 user messages, most of them corrections ("it's good, but ...",
    # "don't produce code, design solution first", "great, but ..."); the plan is finally
    # written to specs/session-lifecycle-detection.md.
    trace, _, _ = _claude("codemie-196820da-1026-4b6f-a513-a6aae42da1a6.jsonl")
    tasks = _tasks(trace)
    assert len(tasks) <= 4
    assert "specs/session-lifecycle-detection.md" in trace
    assert "- don't produce code, design solution first" in trace.split("## Task:")[0]


def test_preferences_are_sentence_level_imperatives() -> None:
    items: list[Item] = [
        UserMessage(
            "Add a login page. Always use TypeScript strict mode. Don’t add new dependencies!\n"
            "Can you never use tabs?\n"
            "```\n// never do this in production\n```\n"
            "Prefer pnpm over npm. Use vitest instead of jest. The page is blue. We don't ship on Fridays.",
            origin="event",
        ),
        *_patch("c1", "login.ts"),
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
    assert "Fridays" not in prefs  # a statement, not an imperative


def test_no_preferences_is_exactly_none_observed() -> None:
    items: list[Item] = [
        UserMessage("create the config file", origin="event"),
        *_patch("p1", "config.toml"),
    ]
    trace, _ = extract_offline(_request(items))
    assert "\nUser preferences: none observed\n" in trace


def _work(call: str, command: str, exit_code: int | None, output: str = "") -> list[Item]:
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
    assert '- User approved: "thanks, works"' in trace


def test_approval_followed_by_a_new_request_opens_a_task() -> None:
    items = [
        UserMessage("create the todo app", origin="event"),
        *_patch("p1", "app.tsx"),
        AssistantMessage("Created.", phase="final_answer"),
        UserMessage("Thanks! Please update CLAUDE.md for the current changes", origin="event"),
        *_patch("p2", "CLAUDE.md"),
    ]
    trace, _ = extract_offline(_request(items))
    tasks = _tasks(trace)
    assert list(tasks) == ["create the todo app", "Please update CLAUDE.md for the current changes"]
    assert _outcome(tasks["create the todo app"]) == "success"


def test_outcome_success_on_passing_tests() -> None:
    items = [
        UserMessage("fix the parser bug", origin="event"),
        *_patch("p1", "parser.py"),
        *_work("c1", "pytest -q tests/test_parser.py", 0, "3 passed in 0.1s\n"),
        AssistantMessage("Fixed.", phase="final_answer"),
    ]
    assert _only_outcome(items) == "success"
    trace, _ = extract_offline(_request(items))
    assert "- Verify with `pytest -q tests/test_parser.py`: passed (`3 passed in 0.1s`)" in trace


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


def test_outcome_partial_when_a_failure_is_left_unresolved() -> None:
    items = [
        UserMessage("deploy the app", origin="event"),
        *_patch("p1", "deploy.sh"),
        *_work("c1", "./deploy.sh --prod", 2, "error: missing credentials\n"),
        AssistantMessage("Patched the script but deployment failed on credentials.", phase="final_answer"),
    ]
    assert _only_outcome(items) == "partial"
    trace, _ = extract_offline(_request(items))
    assert "- `./deploy.sh --prod` failed (exit 2): `error: missing credentials` — not resolved" in trace


def test_outcome_partial_when_the_turn_was_aborted_after_work() -> None:
    items = [
        UserMessage("migrate the database", origin="event"),
        *_work("c1", "alembic upgrade head", 0),
        TurnEvent("turn_aborted", text="interrupted"),
    ]
    assert _only_outcome(items) == "partial"


def test_outcome_fail_on_unresolved_failure_without_anything_working() -> None:
    items = [
        UserMessage("build it please", origin="event"),
        *_work("c1", "make", 2, "make: *** [all] Error 2\n"),
    ]
    assert _only_outcome(items) == "fail"


def test_pivot_sets_the_outcome_from_the_end_state() -> None:
    items = [
        UserMessage("run the test suite", origin="event"),
        *_work("c1", "npm test", 127, "sh: 1: jest: not found\n"),
        *_work("c2", "npx jest", 0, "Tests: 4 passed, 4 total\n"),
        AssistantMessage("All four tests pass with npx jest.", phase="final_answer"),
    ]
    trace, summary = extract_offline(_request(items))
    assert "- `npm test` failed (exit 127): `sh: 1: jest: not found`; `npx jest` works" in trace
    assert "- Works: `npx jest`" in trace
    assert _only_outcome(items) == "success"
    assert "`npm test` failed; `npx jest` works." in summary


def test_retried_command_names_the_fix_between() -> None:
    items = [
        UserMessage("commit the change", origin="event"),
        *_work("c1", "git commit -m 'x'", 1, "pre-commit: black would reformat app.py\n"),
        *_work("c2", "black app.py", 0),
        *_work("c3", "git commit -m 'x'", 0),
    ]
    trace, _ = extract_offline(_request(items))
    assert (
        "`git commit -m 'x'` failed (exit 1): `pre-commit: black would reformat app.py`; works after `black app.py`"
        in trace
    )


@pytest.mark.parametrize(
    ("call", "output"),
    [
        (ToolCall("m1", "mcp__db__query", "mcp", arguments="{}"), '{"isError": true, "content": "relation missing"}'),
        (ToolCall("m1", "mcp__fs__write", "mcp", arguments="{}"), "Error: operation not permitted"),
        (ToolCall("m1", "shell", "shell", command="touch /etc/x"), "touch: /etc/x: Operation not permitted"),
        (ToolCall("m1", "shell", "shell", command="rm -rf build"), "exec command rejected by the user"),
    ],
    ids=["mcp_error", "not_permitted", "sandbox_denied", "policy_rejection"],
)
def test_failures_without_exit_code(call: ToolCall, output: str) -> None:
    items: list[Item] = [
        UserMessage("clean up the build outputs", origin="event"),
        call,
        ToolOutput("m1", output, exit_code=None),
    ]
    trace, _ = extract_offline(_request(items))
    problems = trace.split("Things that did not work / things that can be improved:")[1].split("Reusable knowledge")[0]
    assert "failed" in problems or "rejected" in problems, trace
    assert _only_outcome(items) == "fail"


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
        ToolOutput("p1", "apply_patch verification failed: Failed to find expected lines", exit_code=1),
        PatchApplied("p1", success=False, files=("app.py",)),
        AssistantMessage("The patch did not apply.", phase="final_answer"),
    ]
    trace, _ = extract_offline(_request(items))
    assert "- Editing `app.py` failed: `apply_patch verification failed" in trace and "— not resolved" in trace
    assert "Changed:" not in trace
    assert _only_outcome(items) == "fail"  # nothing worked


def test_many_reads_of_one_file_are_compressed() -> None:
    items: list[Item] = [UserMessage("refactor the parser module", origin="event")]
    for n in range(12):
        items += _work(f"r{n}", f"sed -n '{n * 50 + 1},{n * 50 + 50}p' src/parser.py", 0, "code\n")
    items += [*_patch("p1", "src/parser.py"), AssistantMessage("Refactored.", phase="final_answer")]
    trace, _ = extract_offline(_request(items))
    assert trace.count("sed -n") == 0 and "- Read: `src/parser.py`\n" in trace


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
    assert list(tasks) == ["add a health endpoint", "now write a test for the health endpoint in test_api.py"]
    assert _outcome(tasks["add a health endpoint"]) == "success"  # moved on to build on it
    assert _outcome(tasks["now write a test for the health endpoint in test_api.py"]) == "success"
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
