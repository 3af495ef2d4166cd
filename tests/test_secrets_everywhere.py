"""SPEC §14 end to end: a secret planted in a session reaches no stored or printed text — not the
database (titles included), not the memory files (traces, memory_summary.md, MEMORY.md), not the
logs, not ``memd status`` (issue 13)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from tests.builders import run_memd

THREAD = "019c0000-0000-7000-8000-00000000beef"
# Generated shapes, not real secrets (see memd.bench.redaction).
GITHUB = "ghp_Zq8mX0pLw4Tn2Vb6Yc1Rd5Sf9Gh3Jk7Lm0Np"
HF = "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"
MYSQL_PW = "Kettle42xPw"
CURL_PW = "Orion77aZ!9"
PLANTED = (GITHUB, HF, MYSQL_PW, CURL_PW)


def _line(kind: str, payload: dict[str, object], ts: str = "2026-03-02T10:00:00.000Z") -> str:
    return json.dumps({"timestamp": ts, "type": kind, "payload": payload}) + "\n"


def _user(text: str) -> list[str]:
    return [
        _line("response_item", {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}),
        _line("event_msg", {"type": "user_message", "message": text}),
    ]


def _shell(call_id: str, command: str, output: str, exit_code: int) -> list[str]:
    args = json.dumps({"command": ["bash", "-lc", command]})
    out = json.dumps({"output": output, "metadata": {"exit_code": exit_code, "duration_seconds": 0.2}})
    return [
        _line("response_item", {"type": "function_call", "name": "shell", "arguments": args, "call_id": call_id}),
        _line("response_item", {"type": "function_call_output", "call_id": call_id, "output": out}),
    ]


def write_rollout(sessions: Path, cwd: Path) -> Path:
    path = sessions / "2026" / "03" / "02" / f"rollout-2026-03-02T10-00-00-{THREAD}.jsonl"
    path.parent.mkdir(parents=True)
    meta = {
        "id": THREAD,
        "timestamp": "2026-03-02T10:00:00.000Z",
        "cwd": str(cwd),
        "originator": "codex_cli_rs",
        "cli_version": "0.77.0",
        "source": "cli",
    }
    lines = [_line("session_meta", meta)]
    # The first user message becomes the thread's title.
    lines += _user(f"load the dump with mysql -u root -p{MYSQL_PW} shop, my token is {GITHUB}")
    lines += _shell("c1", f"mysql -u root -p{MYSQL_PW} shop < dump.sql", "ERROR 1045 (28000): Access denied", 1)
    lines += _shell("c2", f"curl -fsS -u admin:{CURL_PW} https://ci.example.com/api", "curl: (22) 401", 22)
    lines += _user(f"use HF_TOKEN={HF} and never paste tokens into the repo")
    lines += _shell("c3", "pytest -q", "3 passed in 0.2s", 0)
    lines.append(
        _line(
            "response_item",
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Loaded; tests pass."}],
            },
        )
    )
    path.write_text("".join(lines))
    return path


def _leaks(text: str) -> list[str]:
    return [secret for secret in PLANTED if secret in text]


@pytest.mark.timeout(300)
def test_planted_secrets_reach_no_stored_or_printed_text(tmp_path: Path) -> None:
    home, sessions, project = tmp_path / "home", tmp_path / "sessions", tmp_path / "project"
    project.mkdir()
    write_rollout(sessions, project)

    once = run_memd(home, "once", "--sessions", str(sessions), "--min-idle", "0", "--max-age-days", "0")
    assert once.returncode == 0, once.stderr[-3000:]
    assert _leaks(once.stdout + once.stderr) == []

    conn = sqlite3.connect(home / "state" / "memd" / "memd.sqlite3")
    try:
        (title,) = conn.execute("SELECT title FROM threads WHERE id = ?", (THREAD,)).fetchone()
        dump = "\n".join(conn.iterdump())
    finally:
        conn.close()
    assert title.startswith("load the dump with mysql -u root -p[REDACTED_SECRET]")
    assert _leaks(dump) == []

    memory_files = [
        p for p in (home / "data" / "memd" / "projects").rglob("*") if p.is_file() and ".git" not in p.parts
    ]
    names = {p.name for p in memory_files}
    assert {"MEMORY.md", "memory_summary.md"} <= names, names
    for path in memory_files:
        assert _leaks(path.read_text("utf-8", "replace")) == [], path
    # The failing command is remembered, without its password.
    memory = next(p for p in memory_files if p.name == "MEMORY.md").read_text()
    assert "mysql -u root -p[REDACTED_SECRET]" in memory or "curl -fsS -u admin:[REDACTED_SECRET]" in memory

    for args in (("status", "--json"), ("status",)):
        status = run_memd(home, *args)
        assert status.returncode == 0, status.stderr[-2000:]
        assert _leaks(status.stdout + status.stderr) == []
    report = json.loads(run_memd(home, "status", "--json").stdout)
    [row] = [t for t in report["threads"] if t["id"] == THREAD]
    assert "[REDACTED_SECRET]" in row["title"]


def test_status_redacts_titles_stored_before_the_rule(tmp_path: Path) -> None:
    # A database written by an older memd may hold an unredacted title: status still hides it.
    home, sessions, project = tmp_path / "home", tmp_path / "sessions", tmp_path / "project"
    project.mkdir()
    write_rollout(sessions, project)
    assert run_memd(home, "scan", "--sessions", str(sessions)).returncode == 0
    conn = sqlite3.connect(home / "state" / "memd" / "memd.sqlite3")
    with conn:
        conn.execute("UPDATE threads SET title = ? WHERE id = ?", (f"old title with {GITHUB}", THREAD))
        conn.execute(
            "INSERT OR REPLACE INTO jobs (kind, key, status, attempts, last_error, created_at, updated_at)"
            " VALUES ('extract', ?, 'error', 1, ?, 0, 0)",
            (THREAD, f"command failed: curl -u admin:{CURL_PW} https://x"),
        )
    conn.close()
    status = run_memd(home, "status", "--json")
    assert status.returncode == 0, status.stderr[-2000:]
    assert _leaks(status.stdout) == []
    report = json.loads(status.stdout)
    [row] = [t for t in report["threads"] if t["id"] == THREAD]
    assert row["title"] == "old title with [REDACTED_SECRET]"
    assert row["last_error"] == "command failed: curl -u admin:[REDACTED_SECRET] https://x"


@pytest.mark.parametrize("json_lines", [True, False])
def test_log_lines_are_redacted(json_lines: bool) -> None:
    import io
    import logging

    import structlog

    from memd.extract.redact import redact
    from memd.logging import configure_logging

    stream = io.StringIO()
    configure_logging("info", stream=stream, json=json_lines, redact=redact)
    try:
        structlog.get_logger("t").error("extract_failed", error=f"mysql -u root -p{MYSQL_PW} failed", token=GITHUB)
        try:
            raise RuntimeError(f"curl -u admin:{CURL_PW} returned 401")
        except RuntimeError:
            structlog.get_logger("t").exception("job_crashed")
        logging.getLogger("openai").warning("retrying with %s", HF)
    finally:
        logging.getLogger().handlers.clear()
    text = stream.getvalue()
    assert "extract_failed" in text and "job_crashed" in text and "[REDACTED_SECRET]" in text
    assert _leaks(text) == []
