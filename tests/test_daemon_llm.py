"""The LLM path end to end (issue 4): the daemon, the worker pool and the CLI against the fake
OpenAI server on 127.0.0.1 (``tests/fake_openai.py``), driven by the real ``openai`` client.

Every test counts the requests the server received: the number stays bounded under every fault.
In-process tests use :class:`memd.daemon.Daemon` with a :class:`~memd.clock.ManualClock` that jumps to its next timer when idle (backoff
and ``Retry-After`` waits pass instantly); a few run ``memd`` as a subprocess, as a user does.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from memd.cli import main
from memd.clock import ManualClock, iso_utc
from memd.config import Settings, load_settings
from memd.daemon import Daemon
from memd.extract.offline import OfflineExtractor
from memd.extract.openai_extractor import OpenAIExtractor
from memd.extract.prompts import render
from memd.llm.budget import next_utc_midnight
from memd.memory import files as memory_files
from tests import fake_openai as fk
from tests.builders import PLANTED, append_turn, memd_env, simple_turns, thread_id, write_rollout
from tests.fakes import RoutedFake, consolidation_answer, schema_name, trace_answer, user_content

API_KEY = "test-key-for-the-fake-server"
REDACTED = "[REDACTED_SECRET]"


# --------------------------------------------------------------------------- the fake server


def session_text(body: dict[str, Any]) -> str:
    """The session text between ``<session>`` and ``</session>`` of an extraction request."""
    content = user_content(body)
    return content.split("<session>\n", 1)[1].rsplit("\n</session>", 1)[0]


def extraction_bodies(server: fk.FakeOpenAI) -> list[dict[str, Any]]:
    return [b for b in server.bodies("/chat/completions") if schema_name(b) == "trace_memory"]


@pytest.fixture
async def routed_server():
    srv = RoutedFake()
    await srv.start()
    yield srv
    await srv.close()


# --------------------------------------------------------------------------- daemon helpers


def settings_for(tmp_path: Path, base_url: str | None, *, key: str | None = API_KEY,
                 llm: dict[str, Any] | None = None, **top: Any) -> Settings:
    """Settings for an in-process daemon: every finished session eligible at once, a cheap
    consolidation command, the model at ``base_url``."""
    llm_over: dict[str, Any] = {"base_url": base_url, "max_attempts": 3, "timeout_s": 10.0}
    if key:
        llm_over["api_key"] = key
    llm_over.update(llm or {})
    over: dict[str, Any] = {
        "sessions": [tmp_path / "sessions"],
        "state_dir": tmp_path / "state",
        "memory_dir": tmp_path / "memory",
        "min_idle_s": 0,
        "max_age_days": 0,
        "extract_concurrency": 2,
        "llm": llm_over,
        "consolidation": {"command": ["true"]},
    }
    over.update(top)
    return load_settings(None, over, environ={})


@pytest.fixture
async def daemon_clock(jumping_clock) -> ManualClock:
    # Ahead of the rollouts' mtimes, so that the idle gate (min_idle_s = 0) is passed.
    return jumping_clock(time.time() + 60.0)


@pytest.fixture
async def daemons():
    """Opens daemons and closes them at teardown: ``await daemons(settings, clock)``."""
    opened: list[Daemon] = []

    async def factory(settings: Settings, clock: ManualClock) -> Daemon:
        daemon = await Daemon.open(settings, clock=clock)
        opened.append(daemon)
        return daemon

    yield factory
    for daemon in opened:
        await daemon.close()


def db_rows(settings: Settings, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
    conn = sqlite3.connect(settings.db_path)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def jobs_by_key(settings: Settings) -> dict[str, sqlite3.Row]:
    return {r["key"]: r for r in db_rows(settings, "SELECT * FROM jobs WHERE kind = 'extract'")}


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


# --------------------------------------------------------------------------- extractor choice


async def test_auto_uses_openai_when_a_key_is_configured_and_the_first_log_line_says_why(tmp_path, routed_server, daemon_clock, daemons):
    with capture_logs() as logs:
        daemon = await daemons(settings_for(tmp_path, routed_server.base_url), daemon_clock)
    # The first event after the store's own (migration on a new database) says which and why.
    loud = [e for e in logs if e["log_level"] in ("info", "warning", "error") and not e["event"].startswith("store_")]
    assert loud[0]["event"] == "daemon_started"
    assert loud[0]["extractor"] == "openai"
    assert loud[0]["extractor_reason"] == "extractor = auto and memd's configuration holds an API key (llm.api_key)"
    assert isinstance(daemon.components.extractor, OpenAIExtractor)
    assert await daemon.components.store.meta.get("extractor") == "openai: extractor = auto and memd's configuration holds an API key (llm.api_key)"
    assert API_KEY not in json.dumps(logs, default=str)


async def test_auto_without_a_key_is_offline_and_says_why(tmp_path, daemon_clock, daemons):
    with capture_logs() as logs:
        daemon = await daemons(settings_for(tmp_path, None, key=None), daemon_clock)
    started = events(logs, "daemon_started")
    assert started[0]["extractor"] == "offline"
    assert started[0]["extractor_reason"] == "extractor = auto and no API key is configured"
    assert isinstance(daemon.components.extractor, OfflineExtractor)


def status_env(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    monkeypatch.setenv("MEMD_STATE_DIR", str(settings.state_dir))
    monkeypatch.setenv("MEMD_MEMORY_DIR", str(settings.memory_dir))
    monkeypatch.setenv("MEMD_SESSIONS", str(settings.sessions[0]))


async def test_status_reports_the_running_daemons_extractor_even_without_the_key_in_its_environment(
    tmp_path, routed_server, daemon_clock, daemons, monkeypatch, capsys
):
    # systemd gives the daemon its key through EnvironmentFile; a shell running `memd status`
    # does not have it. Status must still say what the daemon uses, and why.
    settings = settings_for(tmp_path, routed_server.base_url)
    await daemons(settings, daemon_clock)
    status_env(monkeypatch, settings)
    capsys.readouterr()
    assert await asyncio.to_thread(main, ["status", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["extractor"] == "openai"
    assert report["extractor_reason"].startswith("extractor = auto and memd's configuration holds an API key (llm.api_key)")


async def test_status_without_a_daemon_reports_what_the_configuration_selects(tmp_path, monkeypatch, capsys):
    settings = settings_for(tmp_path, None, key=None)
    status_env(monkeypatch, settings)
    assert await asyncio.to_thread(main, ["status", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["extractor"], report["extractor_reason"]) == ("offline", "extractor = auto and no API key is configured")
    # A key merely present in the shell does not opt in (SPEC §9); status says so and how to opt in.
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    assert await asyncio.to_thread(main, ["status"]) == 0
    text = capsys.readouterr().out
    assert "extractor: offline (extractor = auto; OPENAI_API_KEY in the environment does not opt in" in text
    monkeypatch.setenv("MEMD_EXTRACTOR", "openai")
    assert await asyncio.to_thread(main, ["status"]) == 0
    text += capsys.readouterr().out
    assert "extractor: openai (extractor = openai in the configuration)" in text
    assert API_KEY not in text


# --------------------------------------------------------------------------- answers and usage


@pytest.mark.parametrize(("api", "stream"), [("chat", False), ("chat", True), ("responses", False), ("responses", True)])
async def test_once_writes_what_the_server_answered_and_records_every_requests_usage(tmp_path, routed_server, daemon_clock, daemons, api, stream):
    cwd = tmp_path / "proj"
    cwd.mkdir()
    for n in range(3):
        write_rollout(tmp_path / "sessions", thread_id(n), cwd, simple_turns(f"marker-{n}"))

    def route(body: dict[str, Any]) -> fk.Behaviour:
        n = next(i for i in range(3) if f"marker-{i}" in user_content(body))
        return fk.ok(trace_answer(f"answer-{n}"), usage=(1000 + n, 70 + n, 300))

    routed_server.route = route
    settings = settings_for(tmp_path, routed_server.base_url, llm={"api": api, "stream": stream})
    daemon = await daemons(settings, daemon_clock)
    summary = await daemon.once()
    assert (summary.extracted, summary.failed) == (3, 0)
    assert len(routed_server.requests) == 3
    assert {r.path for r in routed_server.requests} == {"/v1/chat/completions" if api == "chat" else "/v1/responses"}
    assert {bool(b.get("stream")) for b in routed_server.bodies()} == {stream}

    memories = {r["thread_id"]: r for r in db_rows(settings, "SELECT * FROM memories")}
    assert set(memories) == {thread_id(n) for n in range(3)}
    for n in range(3):
        row = memories[thread_id(n)]
        assert row["trace_memory"].strip() == trace_answer(f"answer-{n}")["trace_memory"].strip()
        assert row["summary"] == trace_answer(f"answer-{n}")["summary"]
        assert (row["tokens_in"], row["tokens_out"], row["extractor"]) == (1000 + n, 70 + n, "gpt-5-mini")
        root = memory_files.project_root(settings.memory_dir, row["project"])
        text = (root / row["path"]).read_text()
        assert text.split("\n\n", 1)[1].strip() == row["trace_memory"].strip()
    usage = sorted((r["phase"], r["model"], r["input_tokens"], r["output_tokens"], r["cached_tokens"])
                   for r in db_rows(settings, "SELECT * FROM usage"))
    assert usage == [("extract", "gpt-5-mini", 1000 + n, 70 + n, 300) for n in range(3)]


def long_session_turns(n_commands: int, marker: str) -> list[dict[str, Any]]:
    """One user request and many commands with ~1 KB outputs: far over a 1000-token budget."""
    commands = [(f"./check.sh step-{i}", f"step {i} output: " + ("lorem ipsum dolor sit amet " * 40), 0)
                for i in range(n_commands)]
    return [{"user": f"Run every check and fix what fails ({marker})", "commands": commands,
             "answer": "All checks pass now."}]


async def test_the_input_budget_uses_the_calibrated_estimate_and_the_calibration_persists(tmp_path, daemon_clock, daemons):
    # The server counts 1 token per 2.5 bytes; memd starts at 4 bytes per token (SPEC §6.2).
    server = RoutedFake(bytes_per_token=2.5)
    await server.start()
    try:
        server.default = fk.ok(trace_answer("long"))
        cwd = tmp_path / "proj"
        cwd.mkdir()
        path = write_rollout(tmp_path / "sessions", thread_id(1), cwd, long_session_turns(40, "long"))
        settings = settings_for(tmp_path, server.base_url, llm={"max_input_tokens": 1000})

        first = await daemons(settings, daemon_clock)
        assert first.components.estimator.bytes_per_token == 4.0
        await first.once()
        await first.close()
        [body] = extraction_bodies(server)
        sent = session_text(body)
        assert "items omitted" in sent
        assert len(sent.encode()) <= 1000 * 4.0 * 1.05
        assert "Run every check and fix what fails (long)" in sent  # user messages are always kept

        meta = json.loads(db_rows(settings, "SELECT value FROM meta WHERE key = 'token_estimator'")[0]["value"])
        assert meta["samples"] == 1
        assert meta["bytes_per_token"] == pytest.approx(2.5, abs=0.02)

        # A restarted daemon starts from the persisted calibration and builds smaller inputs.
        append_turn(path, "One more thing: keep the checks in CI (long)")
        daemon_clock.advance(60)
        os.utime(path, (daemon_clock.now() - 30, daemon_clock.now() - 30))
        second = await daemons(settings, daemon_clock)
        assert second.components.estimator.bytes_per_token == pytest.approx(2.5, abs=0.02)
        await second.once()
        body = extraction_bodies(server)[1]
        sent = session_text(body)
        assert len(sent.encode()) <= 1000 * 2.5 * 1.05
        prompt_tokens = round(len((body["messages"][0]["content"] + user_content(body)).encode()) / 2.5)
        usage = db_rows(settings, "SELECT input_tokens FROM usage ORDER BY at")
        assert [r["input_tokens"] for r in usage][-1] == prompt_tokens
    finally:
        await server.close()


# --------------------------------------------------------------------------- secrets


async def test_planted_secrets_in_a_rollout_never_reach_the_server(tmp_path, routed_server, daemon_clock, daemons):
    """Every kind of SPEC §14 secret, planted in user messages, commands and tool outputs of a
    rollout file, is replaced before the request leaves; and an answer that echoes a secret is
    redacted before it is stored."""
    turns = []
    for i, (_label, text, _secret) in enumerate(PLANTED):
        if i % 3 == 0:
            turns.append({"user": f"Please use this: {text}"})
        elif i % 3 == 1:
            turns.append({"user": f"step {i}", "commands": [(f"echo start; {text}", "done", 0)]})
        else:
            turns.append({"user": f"step {i}", "commands": [(f"cat config-{i}", f"config:\n{text}\n", 0)]})
    turns.append({"answer": "Configured everything."})
    cwd = tmp_path / "proj"
    cwd.mkdir()
    write_rollout(tmp_path / "sessions", thread_id(7), cwd, turns)
    echoed = PLANTED[0][2]
    answer = trace_answer("secrets")
    answer["trace_memory"] += f"Pointers and references: the key {echoed} was used.\n"
    routed_server.default = fk.ok(answer)

    settings = settings_for(tmp_path, routed_server.base_url)
    daemon = await daemons(settings, daemon_clock)
    summary = await daemon.once()
    assert summary.extracted == 1
    [body] = extraction_bodies(routed_server)
    sent = json.dumps(body)
    leaked = [label for label, _text, secret in PLANTED if secret in sent]
    assert leaked == []
    assert sent.count(REDACTED) >= len(PLANTED)
    assert "Please use this" in sent and "echo start" in sent  # the text around them was sent

    [row] = db_rows(settings, "SELECT * FROM memories")
    assert echoed not in row["trace_memory"] and REDACTED in row["trace_memory"]
    stored = (memory_files.project_root(settings.memory_dir, row["project"]) / row["path"]).read_text()
    assert echoed not in stored


# --------------------------------------------------------------------------- faults


def one_thread(tmp_path: Path, marker: str = "solo", turns: list[dict[str, Any]] | None = None) -> Path:
    cwd = tmp_path / "proj"
    cwd.mkdir(exist_ok=True)
    return write_rollout(tmp_path / "sessions", thread_id(1), cwd, turns or simple_turns(marker))


async def test_429_waits_retry_after_then_the_memory_lands(tmp_path, routed_server, daemon_clock, daemons):
    one_thread(tmp_path)
    routed_server.enqueue(fk.rate_limited("7"))
    routed_server.default = fk.ok(trace_answer("after-429"))
    settings = settings_for(tmp_path, routed_server.base_url)
    daemon = await daemons(settings, daemon_clock)
    before = daemon_clock.now()
    with capture_logs() as logs:
        summary = await daemon.once()
    assert summary.extracted == 1
    assert len(routed_server.requests) == 2
    assert daemon_clock.now() - before >= 7.0
    [retry] = events(logs, "llm_retry")
    assert (retry["status"], retry["wait_s"]) == (429, 7.0)
    assert "after-429" in db_rows(settings, "SELECT trace_memory FROM memories")[0]["trace_memory"]
    assert len(db_rows(settings, "SELECT * FROM usage")) == 1  # the 429 reported no usage


async def test_a_persistent_5xx_is_bounded_per_attempt_backs_off_and_ends_dead(tmp_path, routed_server, daemon_clock, daemons):
    one_thread(tmp_path)
    routed_server.default = fk.server_error(503)
    settings = settings_for(tmp_path, routed_server.base_url, llm={"max_attempts": 3}, max_attempts=2, retry_base_s=60)
    daemon = await daemons(settings, daemon_clock)

    summary = await daemon.once()
    assert summary.failed == 1
    assert len(routed_server.requests) == 3  # llm.max_attempts requests, then the job fails
    job = jobs_by_key(settings)[thread_id(1)]
    assert (job["status"], job["attempts"]) == ("error", 1)
    assert job["retry_at"] == pytest.approx(daemon_clock.now() + 60, abs=0.01)

    await daemon.once()  # not due yet: nothing is sent
    assert len(routed_server.requests) == 3

    daemon_clock.advance(61)
    await daemon.once()
    assert len(routed_server.requests) == 6
    job = jobs_by_key(settings)[thread_id(1)]
    assert (job["status"], job["attempts"]) == ("dead", 2)
    assert "503" in job["last_error"]

    daemon_clock.advance(86_400)
    await daemon.once()  # dead stays dead: no request storm
    assert len(routed_server.requests) == 6
    assert db_rows(settings, "SELECT * FROM memories") == []

    # `memd retry` re-queues it; the server has recovered.
    routed_server.default = fk.ok(trace_answer("recovered"))
    assert await daemon.components.store.jobs.retry(thread_id(1)) == 1
    await daemon.once()
    assert len(routed_server.requests) == 7
    assert jobs_by_key(settings)[thread_id(1)]["status"] == "done"


async def test_a_hanging_server_times_out_within_bounded_attempts(tmp_path, routed_server, daemon_clock, daemons):
    one_thread(tmp_path)
    routed_server.default = fk.hang(trace_answer("late"), hang_s=30)
    settings = settings_for(tmp_path, routed_server.base_url, llm={"max_attempts": 2, "timeout_s": 0.3})
    daemon = await daemons(settings, daemon_clock)
    with capture_logs() as logs:
        summary = await daemon.once()
    assert summary.failed == 1
    assert len(routed_server.requests) == 2
    assert [e["kind"] for e in events(logs, "llm_retry")] == ["timeout"]
    job = jobs_by_key(settings)[thread_id(1)]
    assert job["status"] == "error" and "timeout" in job["last_error"]


async def test_a_context_length_error_retries_once_at_half_the_budget(tmp_path, routed_server, daemon_clock, daemons):
    one_thread(tmp_path, turns=long_session_turns(40, "ctx"))
    routed_server.enqueue(fk.context_length_openai())
    routed_server.default = fk.ok(trace_answer("fits"))
    settings = settings_for(tmp_path, routed_server.base_url, llm={"max_input_tokens": 4000})
    daemon = await daemons(settings, daemon_clock)
    with capture_logs() as logs:
        summary = await daemon.once()
    assert summary.extracted == 1
    first, second = extraction_bodies(routed_server)
    assert len(routed_server.requests) == 2
    full, half = len(session_text(first).encode()), len(session_text(second).encode())
    assert half <= full / 2 * 1.05
    [shrunk] = events(logs, "extract_input_shrunk")
    assert shrunk["max_input_tokens"] <= 2000
    assert "fits" in db_rows(settings, "SELECT trace_memory FROM memories")[0]["trace_memory"]


async def test_a_second_context_length_error_fails_the_job_after_two_requests(tmp_path, routed_server, daemon_clock, daemons):
    one_thread(tmp_path, turns=long_session_turns(10, "ctx2"))
    routed_server.default = fk.context_length_llamacpp()
    settings = settings_for(tmp_path, routed_server.base_url)
    daemon = await daemons(settings, daemon_clock)
    summary = await daemon.once()
    assert summary.failed == 1
    assert len(routed_server.requests) == 2
    assert jobs_by_key(settings)[thread_id(1)]["status"] == "error"


@pytest.mark.parametrize(
    ("behaviours", "requests"),
    [([fk.fenced(trace_answer("lenient"))], 1), ([fk.malformed(), fk.ok(trace_answer("lenient"))], 2)],
    ids=["fenced_json", "malformed_then_ok"],
)
async def test_lenient_json_through_the_daemon(tmp_path, routed_server, daemon_clock, daemons, behaviours, requests):
    one_thread(tmp_path)
    routed_server.enqueue(*behaviours)
    settings = settings_for(tmp_path, routed_server.base_url)
    daemon = await daemons(settings, daemon_clock)
    summary = await daemon.once()
    assert summary.extracted == 1
    assert len(routed_server.requests) == requests
    assert "lenient" in db_rows(settings, "SELECT trace_memory FROM memories")[0]["trace_memory"]


async def test_malformed_json_twice_fails_after_two_requests(tmp_path, routed_server, daemon_clock, daemons):
    one_thread(tmp_path)
    routed_server.default = fk.malformed()
    settings = settings_for(tmp_path, routed_server.base_url)
    daemon = await daemons(settings, daemon_clock)
    summary = await daemon.once()
    assert summary.failed == 1 and len(routed_server.requests) == 2


# --------------------------------------------------------------------------- auth failure


async def test_an_auth_failure_pauses_all_model_work_with_one_clear_error_and_burns_no_queue(
    tmp_path, routed_server, daemon_clock, daemons, monkeypatch, capsys
):
    cwd = tmp_path / "proj"
    cwd.mkdir()
    for n in range(5):
        write_rollout(tmp_path / "sessions", thread_id(n), cwd, simple_turns(f"auth-{n}"))
    routed_server.default = fk.unauthorized()
    settings = settings_for(tmp_path, routed_server.base_url, extract_concurrency=2)
    daemon = await daemons(settings, daemon_clock)
    with capture_logs() as logs:
        summary = await daemon.once()

    assert 1 <= len(routed_server.requests) <= 2  # at most the requests already in flight
    assert summary.failed == 0
    jobs = jobs_by_key(settings)
    assert len(jobs) == 5
    assert {(j["status"], j["attempts"]) for j in jobs.values()} == {("pending", 0)}  # released, not failed
    assert "authentication" in (daemon.components.pool.paused_reason or "")
    clear = [e for e in logs if e["log_level"] == "error"]
    assert [e["event"] for e in clear] == ["model_auth_failed"]
    assert API_KEY not in json.dumps(logs, default=str)

    # `memd status` says so.
    status_env(monkeypatch, settings)
    capsys.readouterr()
    assert await asyncio.to_thread(main, ["status", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "authentication failed" in report["usage"]["model_paused"]


async def test_memd_run_pool_stays_paused_after_an_auth_failure(tmp_path, routed_server, daemon_clock, daemons):
    cwd = tmp_path / "proj"
    cwd.mkdir()
    for n in range(4):
        write_rollout(tmp_path / "sessions", thread_id(n), cwd, simple_turns(f"auth-{n}"))
    routed_server.default = fk.unauthorized()
    settings = settings_for(tmp_path, routed_server.base_url, extract_concurrency=1)
    daemon = await daemons(settings, daemon_clock)
    await daemon.components.indexer.scan()
    await daemon.components.scheduler.plan()
    stop = asyncio.Event()
    pool = asyncio.create_task(daemon.components.pool.run(stop))
    try:
        for _ in range(200):
            if daemon.components.pool.paused_reason:
                break
            await asyncio.sleep(0.02)
        assert daemon.components.pool.paused_reason
        for _ in range(20):  # wake the idle workers again and again: still nothing is sent
            daemon.components.pool.wake()
            await asyncio.sleep(0.01)
        assert len(routed_server.requests) == 1
        assert daemon.components.pool.running == 0
    finally:
        stop.set()
        daemon.components.pool.wake()
        await pool


# --------------------------------------------------------------------------- daily budget


async def test_the_daily_budget_pauses_extraction_until_the_next_utc_day(tmp_path, routed_server, daemon_clock, daemons, monkeypatch, capsys):
    cwd = tmp_path / "proj"
    cwd.mkdir()
    for n in range(5):
        write_rollout(tmp_path / "sessions", thread_id(n), cwd, simple_turns(f"budget-{n}"))
    routed_server.default = fk.ok(trace_answer("budget"), usage=(500, 100, 0))
    settings = settings_for(tmp_path, routed_server.base_url, extract_concurrency=1, daily_token_budget=1500)
    daemon = await daemons(settings, daemon_clock)

    with capture_logs() as logs:
        summary = await daemon.once()
    # 0, 600 and 1200 tokens spent before the first three requests; 1800 ≥ 1500 before the 4th.
    assert len(routed_server.requests) == 3
    assert (summary.extracted, summary.failed) == (3, 0)
    midnight = next_utc_midnight(daemon_clock.now())
    [exhausted] = events(logs, "budget_exhausted")
    assert exhausted["resume_at"] == iso_utc(midnight)
    assert f"daily token budget reached; resumes at {iso_utc(midnight)}" == daemon.components.pool.paused_reason
    statuses = sorted(j["status"] for j in jobs_by_key(settings).values())
    assert statuses == ["done", "done", "done", "pending", "pending"]

    status_env(monkeypatch, settings)
    monkeypatch.setenv("MEMD_DAILY_TOKEN_BUDGET", "1500")
    capsys.readouterr()
    assert await asyncio.to_thread(main, ["status", "--json"]) == 0
    usage = json.loads(capsys.readouterr().out)["usage"]
    assert usage["daily_token_budget"] == 1500
    assert usage["model_paused"] == f"daily token budget reached; resumes at {iso_utc(midnight)}"

    await daemon.once()  # the same day: nothing is sent
    assert len(routed_server.requests) == 3

    daemon_clock.advance(midnight - daemon_clock.now() + 1)
    await daemon.once()
    assert len(routed_server.requests) == 5
    assert len(db_rows(settings, "SELECT * FROM memories")) == 5
    assert daemon.components.pool.paused_reason is None
    assert await daemon.components.store.meta.get("model_pause") is None


async def test_memd_run_waits_for_the_budget_day_and_then_resumes(tmp_path, routed_server, daemon_clock, daemons):
    cwd = tmp_path / "proj"
    cwd.mkdir()
    for n in range(3):
        write_rollout(tmp_path / "sessions", thread_id(n), cwd, simple_turns(f"day-{n}"))
    routed_server.default = fk.ok(trace_answer("day"), usage=(900, 200, 0))
    settings = settings_for(tmp_path, routed_server.base_url, extract_concurrency=1, daily_token_budget=1000)
    daemon = await daemons(settings, daemon_clock)
    await daemon.components.indexer.scan()
    await daemon.components.scheduler.plan()
    stop = asyncio.Event()
    pool = asyncio.create_task(daemon.components.pool.run(stop))

    async def until(predicate: Callable[[], bool]) -> None:
        for _ in range(500):
            if predicate():
                return
            await asyncio.sleep(0.02)
        raise AssertionError("condition not reached")

    try:
        await until(lambda: daemon.components.pool.paused_reason is not None)
        assert len(routed_server.requests) == 1
        for _ in range(10):
            daemon.components.pool.wake()
            await asyncio.sleep(0.01)
        assert len(routed_server.requests) == 1  # waiting, not polling the server
        daemon_clock.advance(next_utc_midnight(daemon_clock.now()) - daemon_clock.now() + 1)
        daemon.components.pool.wake()
        await until(lambda: len(routed_server.requests) == 2 and daemon.components.pool.paused_reason is not None)
        daemon_clock.advance(86_400)
        daemon.components.pool.wake()
        await until(lambda: daemon.components.pool.stats.done == 3)
    finally:
        stop.set()
        daemon.components.pool.wake()
        await pool
    assert len(routed_server.requests) == 3


# --------------------------------------------------------------------------- dry run


async def test_once_dry_run_estimates_the_tokens_and_sends_nothing(tmp_path, routed_server, monkeypatch, capsys):
    cwd = tmp_path / "proj"
    cwd.mkdir()
    for n in range(3):
        write_rollout(tmp_path / "sessions", thread_id(n), cwd, simple_turns(f"dry-{n}"))
    settings = settings_for(tmp_path, routed_server.base_url)
    status_env(monkeypatch, settings)
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", routed_server.base_url)
    code = await asyncio.to_thread(main, ["once", "--dry-run", "--min-idle", "0", "--max-age-days", "0"])
    assert code == 0
    out = capsys.readouterr().out
    assert "3 threads would be extracted" in out and "Nothing was sent" in out
    tokens = int(out.split("about ", 1)[1].split(" input tokens", 1)[0])
    system_bytes = len(render("extract_system.md.j2").encode())
    assert tokens >= 3 * system_bytes / 4  # prompts included
    # Again: planning looks only at changed threads, the jobs queued by the first run are estimated too.
    assert await asyncio.to_thread(main, ["once", "--dry-run", "--min-idle", "0", "--max-age-days", "0"]) == 0
    again = capsys.readouterr().out
    assert "3 threads would be extracted" in again and f"about {tokens} input tokens" in again
    assert routed_server.requests == []
    assert db_rows(settings, "SELECT * FROM memories") == []
    assert db_rows(settings, "SELECT * FROM usage") == []
    assert not any(settings.memory_dir.glob("*/memory/MEMORY.md"))


# --------------------------------------------------------------------------- subprocesses


async def run_memd(home: Path, *args: str, env_extra: dict[str, str], timeout_s: float = 120) -> tuple[int, str, str]:
    env = memd_env(home)
    env.update(env_extra)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "memd", *args, env=env, cwd=home,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    return proc.returncode or 0, out.decode(), err.decode()


@pytest.mark.timeout(180)
async def test_memd_once_subprocess_with_the_model_fills_traces_and_memory_from_the_answers(tmp_path, routed_server):
    home = tmp_path / "home"
    home.mkdir()
    cwd = tmp_path / "proj"
    cwd.mkdir()
    for n in range(2):
        write_rollout(tmp_path / "sessions", thread_id(n), cwd, simple_turns(f"sub-{n}"))

    def route(body: dict[str, Any]) -> fk.Behaviour:
        if schema_name(body) == "memory_consolidation":
            return consolidation_answer(body)
        n = next(i for i in range(2) if f"sub-{i}" in user_content(body))
        return fk.ok(trace_answer(f"answer-{n}"), usage=(800, 90, 0))

    routed_server.route = route
    code, out, err = await run_memd(
        home, "once", "--sessions", str(tmp_path / "sessions"), "--min-idle", "0", "--max-age-days", "0",
        env_extra={"OPENAI_API_KEY": API_KEY, "OPENAI_BASE_URL": routed_server.base_url, "MEMD_EXTRACTOR": "openai"},
    )
    assert code == 0, err[-3000:]
    assert "2 extracted" in out and "1 projects consolidated" in out
    names = [schema_name(b) for b in routed_server.bodies()]
    assert sorted(names) == ["memory_consolidation", "trace_memory", "trace_memory"]
    consolidation = next(b for b in routed_server.bodies() if schema_name(b) == "memory_consolidation")
    assert "answer-0" in user_content(consolidation) and "answer-1" in user_content(consolidation)

    [root] = list((home / "data" / "memd" / "projects").glob("*/memory"))
    assert (root / "MEMORY.md").read_text().startswith("# Project handbook")
    skill = (root / "skills" / "fix_the_build" / "SKILL.md").read_text()
    assert "Pin the toolchain" in skill and "name:" in skill
    conn = sqlite3.connect(home / "state" / "memd" / "memd.sqlite3")
    usage = sorted(conn.execute("SELECT phase, input_tokens, output_tokens FROM usage").fetchall())
    conn.close()
    assert usage == [("consolidate", 2000, 300), ("extract", 800, 90), ("extract", 800, 90)]
    assert API_KEY not in out + err


def write_traces(root: Path, project: str, markers: list[str]) -> None:
    for i, marker in enumerate(markers):
        header = memory_files.TraceHeader(thread_id=thread_id(i), project=project, cwd=project,
                                          rollout_path=f"/r/{i}.jsonl", updated_at=1_767_225_600.0 + i)
        relpath = memory_files.trace_relpath(thread_id(i), marker)
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(memory_files.render_trace_file(header, trace_answer(marker)["trace_memory"]))


@pytest.mark.timeout(120)
async def test_memd_consolidate_subprocess_writes_the_models_memory_through_staging(tmp_path, routed_server):
    home = tmp_path / "home"
    home.mkdir()
    root = memory_files.ensure_project_root(home / "data" / "memd" / "projects", "/work/demo")
    write_traces(root, "/work/demo", ["first-trace", "second-trace"])
    env = {"OPENAI_API_KEY": API_KEY, "OPENAI_BASE_URL": routed_server.base_url, "MEMD_EXTRACTOR": "openai"}

    routed_server.route = consolidation_answer
    code, _out, err = await run_memd(home, "consolidate", "--root", str(root), env_extra=env)
    assert code == 0, err[-3000:]
    [body] = routed_server.bodies()
    assert schema_name(body) == "memory_consolidation"
    assert "first-trace" in user_content(body) and "second-trace" in user_content(body)
    memory = (root / "MEMORY.md").read_text()
    assert "Always pin the toolchain" in memory
    assert "Pin the toolchain" in (root / "skills" / "fix_the_build" / "SKILL.md").read_text()
    assert not [p for p in root.iterdir() if p.name.startswith(".staging")]

    # A failing model leaves the previous MEMORY.md and skills untouched; bounded requests.
    routed_server.route = lambda body: fk.server_error(500)
    code, _out, err = await run_memd(home, "consolidate", "--root", str(root),
                                     env_extra={**env, "MEMD_LLM__MAX_ATTEMPTS": "2"})
    assert code == 1
    assert len(routed_server.requests) == 3
    assert (root / "MEMORY.md").read_text() == memory
    assert (root / "skills" / "fix_the_build" / "SKILL.md").is_file()


@pytest.mark.timeout(180)
async def test_memd_run_keeps_serving_other_threads_while_one_fails(tmp_path, routed_server):
    home = tmp_path / "home"
    home.mkdir()
    sessions = tmp_path / "sessions"
    cwd = tmp_path / "proj"
    cwd.mkdir()
    markers = ["FAILTHREAD", "good-1", "good-2"]
    for n, marker in enumerate(markers):
        write_rollout(sessions, thread_id(n), cwd, simple_turns(marker))

    def route(body: dict[str, Any]) -> fk.Behaviour:
        text = user_content(body)
        if "FAILTHREAD" in text:
            return fk.server_error(500)
        return fk.ok(trace_answer(next(m for m in markers if m in text)))

    routed_server.route = route
    env = memd_env(home)
    env.update(OPENAI_API_KEY=API_KEY, OPENAI_BASE_URL=routed_server.base_url, MEMD_EXTRACTOR="openai", MEMD_LLM__MAX_ATTEMPTS="2",
               MEMD_EXTRACT_CONCURRENCY="1")
    log_path = tmp_path / "run.log"
    with log_path.open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "memd", "run", "--sessions", str(sessions), "--min-idle", "0",
            "--max-age-days", "0", env=env, cwd=home, stdout=log_file, stderr=asyncio.subprocess.STDOUT,
        )
        db_path = home / "state" / "memd" / "memd.sqlite3"

        def state() -> tuple[int, str | None]:
            try:
                conn = sqlite3.connect(db_path)
                try:
                    done = conn.execute("SELECT COUNT(*) FROM memories").fetchone()[0]
                    row = conn.execute("SELECT status FROM jobs WHERE key = ?", (thread_id(0),)).fetchone()
                    return done, row[0] if row else None
                finally:
                    conn.close()
            except sqlite3.Error:
                return 0, None

        try:
            for _ in range(600):
                if state() == (2, "error"):
                    break
                await asyncio.sleep(0.1)
            assert state() == (2, "error"), log_path.read_text()[-3000:]
            assert proc.returncode is None  # still serving
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 15) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    failing = [b for b in routed_server.bodies() if "FAILTHREAD" in user_content(b)]
    assert len(failing) == 2  # llm.max_attempts, then the job waits for its backoff
    assert len(routed_server.requests) == 4
    output = log_path.read_text()
    started = json.loads(next(line for line in output.splitlines() if '"daemon_started"' in line))
    assert (started["extractor"], started["extractor_reason"]) == ("openai", "extractor = openai in the configuration")
    assert '"level": "error"' not in output, output[-3000:]
    assert API_KEY not in output


@pytest.mark.parametrize(
    ("command", "key", "passed"),
    [
        ([sys.executable, "-m", "memd", "consolidate", "--root", "{memory_root}"], API_KEY, True),
        (["codex", "exec", "--sandbox", "workspace-write", "--cd", "{memory_root}", "consolidate"], API_KEY, False),
        ([sys.executable, "-m", "memd", "consolidate", "--root", "{memory_root}"], None, False),
    ],
    ids=["memd_with_the_model", "another_command", "memd_offline"],
)
async def test_the_key_reaches_the_consolidation_subprocess_only_when_memd_consolidates_with_the_model(
    tmp_path, routed_server, daemon_clock, daemons, monkeypatch, command, key, passed
):
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "another-provider-key")
    settings = settings_for(tmp_path, routed_server.base_url, key=key, consolidation={"command": command})
    daemon = await daemons(settings, daemon_clock)
    env = daemon.components.runner.env
    assert ("OPENAI_API_KEY" in env) is passed
    assert "ANTHROPIC_API_KEY" not in env
    assert env["HOME"] == os.environ["HOME"]


async def test_memd_consolidate_sends_nothing_when_the_daily_budget_is_spent(tmp_path, routed_server, monkeypatch, capsys):
    from memd.clock import SystemClock
    from memd.store.store import Store

    settings = settings_for(tmp_path, routed_server.base_url)
    root = memory_files.ensure_project_root(settings.memory_dir, "/work/demo")
    write_traces(root, "/work/demo", ["budget-trace"])
    (root / "MEMORY.md").write_text("# previous handbook\n")
    async with await Store.open(settings.db_path, clock=SystemClock()) as store:
        await store.usage.record_usage("extract", "gpt-5-mini", 900, 200, 0)
    status_env(monkeypatch, settings)
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", routed_server.base_url)
    monkeypatch.setenv("MEMD_EXTRACTOR", "openai")
    monkeypatch.setenv("MEMD_DAILY_TOKEN_BUDGET", "1000")
    assert await asyncio.to_thread(main, ["consolidate", "--root", str(root)]) == 1
    assert "daily token budget of 1000 tokens is spent" in capsys.readouterr().err
    assert routed_server.requests == []
    assert (root / "MEMORY.md").read_text() == "# previous handbook\n"
    monkeypatch.setenv("MEMD_DAILY_TOKEN_BUDGET", "0")
    routed_server.route = consolidation_answer
    assert await asyncio.to_thread(main, ["consolidate", "--root", str(root)]) == 0
    assert len(routed_server.requests) == 1 and "Always pin the toolchain" in (root / "MEMORY.md").read_text()
