"""Builders of test data shared by the test modules: synthetic Codex rollouts, planted secrets, a
project memory tree, and the environment and runner of a ``memd`` subprocess.

Test modules import these from here (never from one another); fakes of memd's components live in
:mod:`tests.fakes`, fixtures in ``tests/conftest.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from memd.read.context import memory_root_of

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- rollouts


def thread_id(n: int) -> str:
    """A Codex-shaped session id (UUID v7 layout)."""
    return f"019b0000-0000-7000-8000-{n:012d}"


def rollout_lines(tid: str, cwd: Path, turns: list[dict[str, Any]], *, source: str = "cli") -> list[dict[str, Any]]:
    """Codex rollout lines (envelope variant, CLI ≥ 0.36): ``session_meta``, then per turn a
    ``user_message`` event, shell ``function_call`` + ``function_call_output`` pairs for
    ``turn["commands"]`` (``(command, output, exit_code)``) and an ``agent_message`` event."""
    ts = "2026-01-01T10:00:00Z"
    lines: list[dict[str, Any]] = [
        {
            "timestamp": ts,
            "type": "session_meta",
            "payload": {
                "id": tid,
                "timestamp": ts,
                "cwd": str(cwd),
                "originator": "codex_cli_rs",
                "cli_version": "0.77.0",
                "source": source,
            },
        }
    ]
    calls = 0
    for turn in turns:
        if "user" in turn:
            lines.append(
                {
                    "timestamp": ts,
                    "type": "event_msg",
                    "payload": {"type": "user_message", "message": turn["user"], "kind": "plain"},
                }
            )
        for command, output, code in turn.get("commands", ()):
            calls += 1
            call_id = f"call_{calls}"
            lines.append(
                {
                    "timestamp": ts,
                    "type": "response_item",
                    "payload": {
                        "type": "function_call",
                        "name": "shell",
                        "call_id": call_id,
                        "arguments": json.dumps({"command": ["bash", "-lc", command]}),
                    },
                }
            )
            lines.append(
                {
                    "timestamp": ts,
                    "type": "response_item",
                    "payload": {
                        "type": "function_call_output",
                        "call_id": call_id,
                        "output": json.dumps(
                            {"output": output, "metadata": {"exit_code": code, "duration_seconds": 0.1}}
                        ),
                    },
                }
            )
        if "answer" in turn:
            lines.append(
                {"timestamp": ts, "type": "event_msg", "payload": {"type": "agent_message", "message": turn["answer"]}}
            )
    return lines


def write_rollout(sessions: Path, tid: str, cwd: Path, turns: list[dict[str, Any]], *, source: str = "cli") -> Path:
    """Write a rollout file under ``sessions/2026/01/01/`` and return its path."""
    path = sessions / "2026" / "01" / "01" / f"rollout-2026-01-01T10-00-00-{tid}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in rollout_lines(tid, cwd, turns, source=source)))
    return path


def append_turn(path: Path, text: str) -> None:
    """Append one real user message to a rollout (the thread grows)."""
    with path.open("a") as handle:
        handle.write(
            json.dumps(
                {
                    "timestamp": "2026-01-01T11:00:00Z",
                    "type": "event_msg",
                    "payload": {"type": "user_message", "message": text, "kind": "plain"},
                }
            )
            + "\n"
        )


def simple_turns(marker: str) -> list[dict[str, Any]]:
    """One turn for :func:`write_rollout`: a failing then passing ``make test``, tagged ``marker``."""
    return [
        {
            "user": f"Fix the failing build ({marker})",
            "commands": [("make test", "1 failed", 2), ("make test", "all passed", 0)],
            "answer": f"Pinned the toolchain; make test passes ({marker}).",
        }
    ]


# --------------------------------------------------------------------------- secrets

# One planted secret of every kind the SPEC / brief names: (label, text with the secret, secret).
PLANTED: list[tuple[str, str, str]] = [
    (
        "openai",
        "key sk-abcdefghij1234567890ABCDEFGHIJklmnop end",
        "sk-abcdefghij1234567890ABCDEFGHIJklmnop",
    ),
    (
        "openai project",
        "use sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv_wXyZ-12345678 now",
        "sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv_wXyZ-12345678",
    ),
    (
        "anthropic",
        "ANTHROPIC sk-ant-api03-Zx9Yw8Vu7Ts6Rq5Po4Nm3Lk2Jh1Gf0-abcDEF here",
        "sk-ant-api03-Zx9Yw8Vu7Ts6Rq5Po4Nm3Lk2Jh1Gf0-abcDEF",
    ),
    ("aws id", "id AKIAIOSFODNN7EXAMPLE ok", "AKIAIOSFODNN7EXAMPLE"),
    ("aws session id", "temp ASIAY34FZKBOKMUTVV7A ok", "ASIAY34FZKBOKMUTVV7A"),
    (
        "aws secret assignment",
        "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\nnext",
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    ),
    (
        "aws secret after id",
        "AKIAI44QH8DHBEXAMPLE,je7MtGbClwBF/2Zp9Utk/h3yCo8nvbEXAMPLEKEY\n",
        "je7MtGbClwBF/2Zp9Utk/h3yCo8nvbEXAMPLEKEY",
    ),
    (
        "github pat classic",
        "token ghp_A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8 ok",
        "ghp_A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8",
    ),
    (
        "github oauth",
        "gho_16C7e42F292c6912E7710c838347Ae178B4a ok",
        "gho_16C7e42F292c6912E7710c838347Ae178B4a",
    ),
    (
        "github server",
        "ghs_16C7e42F292c6912E7710c838347Ae178B4a ok",
        "ghs_16C7e42F292c6912E7710c838347Ae178B4a",
    ),
    (
        "github user",
        "ghu_16C7e42F292c6912E7710c838347Ae178B4a ok",
        "ghu_16C7e42F292c6912E7710c838347Ae178B4a",
    ),
    (
        "github refresh",
        "ghr_16C7e42F292c6912E7710c838347Ae178B4a ok",
        "ghr_16C7e42F292c6912E7710c838347Ae178B4a",
    ),
    (
        "github fine-grained",
        "github_pat_11ABCDEFG0aBcDeFgHiJkLmN_oPqRsTuVwXyZ0123456789abcdefghijklmnopq ok",
        "github_pat_11ABCDEFG0aBcDeFgHiJkLmN_oPqRsTuVwXyZ0123456789abcdefghijklmnopq",
    ),
    ("gitlab", "CI uses glpat-x9Yz8WvU7tS6rQ5pO4nM ok", "glpat-x9Yz8WvU7tS6rQ5pO4nM"),
    (
        "slack bot",
        "slack xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx ok",
        "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx",
    ),
    ("slack user", "slack xoxp-123456789012-abcdefABCDEF ok", "xoxp-123456789012-abcdefABCDEF"),
    (
        "stripe secret",
        "stripe sk_live_4eC39HqLyjWDarjtT1zdp7dc ok",
        "sk_live_4eC39HqLyjWDarjtT1zdp7dc",
    ),
    ("stripe restricted", "stripe rk_live_51H8abcdEFGHijklMNOP ok", "rk_live_51H8abcdEFGHijklMNOP"),
    (
        "google",
        "maps AIzaSyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY ok",
        "AIzaSyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY",
    ),
    (
        "jwt",
        "jwt eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U ok",
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
    ),
    (
        "pem",
        "before\n-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7bq98\nQ29tcGxldGVseUZha2U=\n-----END RSA PRIVATE KEY-----\nafter",
        "MIIEowIBAAKCAQEA7bq98",
    ),
    (
        "openssh pem",
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmU\n-----END OPENSSH PRIVATE KEY-----",
        "b3BlbnNzaC1rZXktdjEAAAAABG5vbmU",
    ),
    (
        "bearer",
        "curl -H 'Authorization: Bearer a1b2c3d4e5f6g7h8i9j0' https://api",
        "a1b2c3d4e5f6g7h8i9j0",
    ),
    ("basic auth header", "Authorization: Basic dXNlcjpodW50ZXIy", "dXNlcjpodW50ZXIy"),
    (
        "url credentials",
        "DATABASE_URL postgres://admin:S3cretPw@db.example.com:5432/app",
        "admin:S3cretPw",
    ),
    ("env password", "DB_PASSWORD=hunter2\nDB_HOST=localhost", "hunter2"),
    ("env token plain word", "GITHUB_TOKEN=correcthorse\n", "correcthorse"),
    ("export api key", "export MY_SERVICE_API_KEY=Zq81mX0pLw", "Zq81mX0pLw"),
    ("json password", '{"user": "bob", "password": "tr0ub4dor&3"}', "tr0ub4dor&3"),
    ("json api key camel", '{"apiKey": "abc123def456"}', "abc123def456"),
    ("yaml secret", "db:\n  password: Sup3rS3cret!\n  host: db", "Sup3rS3cret!"),
    ("yaml quoted token", "auth_token: 'plainword'\n", "plainword"),
    ("python literal", 'client_secret = "qwerty-uiop"\n', "qwerty-uiop"),
    ("typescript literal", "const env = createEnv({ CODEMIE_API_KEY: 'sk-secret' });", "sk-secret"),
    ("cli flag", "mysql --password S3cr3tPass! -h db", "S3cr3tPass!"),
    ("cli flag equals", "tool --api-key=Zq81mX0pLw9 run", "Zq81mX0pLw9"),
    ("query string", "GET /v1/data?token=9f8e7d6c5b4a&x=1", "9f8e7d6c5b4a"),
    ("header api key", "X-Api-Key: f00dfacecafe1234", "f00dfacecafe1234"),
    ("escaped json in arguments", '{"cmd": "export TOKEN=\\"zz99yy88xx\\""}', "zz99yy88xx"),
    ("passphrase", "passphrase: 'open sesame'", "open sesame"),
    ("pwd", "pwd=Pa55w0rd", "Pa55w0rd"),
]


# --------------------------------------------------------------------------- memory and environment

MEMORY_MD = """# Project memory: {project}

Merged offline by memd from 2 trace memories.

## Start here
- Run the tests with `npx jest`; `npm test` fails (jest not installed globally). [019a085e 2025-10-21]

## User preferences
- Keep it pure HTML, CSS and JS: no frameworks. [019a085e 2025-10-21]

## Pitfalls and pivots
- apply_patch on `script.js` failed once; re-read the file before patching. [019b7f94 2026-01-02]

## Recent tasks
- 2026-01-02 Add a pause button — partial (trace: trace_summaries/019b7f94-51b4-7593-922e-ba12b5b73b52_pause.md)
"""


def make_memory(memory_dir: Path, project: str, *, bullets: int = 0) -> Path:
    """Write a consolidated memory (``MEMORY_MD`` plus ``bullets`` filler lines, a summary, ``PROJECT``)
    for ``project`` under ``memory_dir`` and return its root."""
    root = memory_root_of(memory_dir, project)
    (root / "trace_summaries").mkdir(parents=True)
    text = MEMORY_MD.format(project=project)
    text += "".join(f"- filler fact number {i} about the build system and its many flags\n" for i in range(bullets))
    (root / "MEMORY.md").write_text(text)
    (root / "memory_summary.md").write_text(
        "- Add a pause button: partial (trace: trace_summaries/019b7f94-51b4-7593-922e-ba12b5b73b52_pause.md)\n"
    )
    (root / "PROJECT").write_text(project + "\n")
    return root


def memd_env(home: Path) -> dict[str, str]:
    """The environment of a ``memd`` subprocess whose HOME, CODEX_HOME and XDG directories are under
    ``home``: no ``MEMD_*`` / ``OPENAI_*`` variable of the caller, this checkout on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEMD_", "OPENAI_"))}
    env.update(
        HOME=str(home),
        CODEX_HOME=str(home / ".codex"),
        XDG_STATE_HOME=str(home / "state"),
        XDG_DATA_HOME=str(home / "data"),
        XDG_CONFIG_HOME=str(home / "config"),
        PYTHONPATH=str(REPO),
    )
    env.pop("NOTIFY_SOCKET", None)
    return env


def run_memd(home: Path, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``python -m memd *args`` in ``home`` with :func:`memd_env` (text output captured).

    Raises:
        subprocess.TimeoutExpired: after ``timeout_s`` seconds.
    """
    home.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "memd", *args],
        env=memd_env(home),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=home,
    )
