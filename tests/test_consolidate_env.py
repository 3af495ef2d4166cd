"""The consolidation command's environment is an allow-list (SPEC §14)."""

from __future__ import annotations

import sys

from memd.consolidate.env import consolidation_env, is_own_consolidator

OWN = [sys.executable, "-m", "memd", "consolidate", "--root", "{memory_root}"]
CODEX = ["codex", "exec", "--cd", "{memory_root}", "consolidate"]
DAEMON_ENV = {
    "PATH": "/usr/bin",
    "HOME": "/home/me",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "XDG_DATA_HOME": "/home/me/.local/share",
    "CODEX_HOME": "/home/me/.codex",
    "CLAUDE_CONFIG_DIR": "/home/me/.claude",
    "TZ": "UTC",
    "MEMD_MIN_IDLE_S": "0",
    "MEMD_LLM__MODEL": "gpt-5-mini",
    "MEMD_LLM__API_KEY": "sk-memd-own-key",
    "OPENAI_API_KEY": "sk-openai-key",
    "OPENAI_BASE_URL": "http://127.0.0.1:9/v1",
    "GITHUB_TOKEN": "ghp_secret",
    "AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE",
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "AWS_SESSION_TOKEN": "token",
    "ANTHROPIC_API_KEY": "sk-ant-key",
    "SSH_AUTH_SOCK": "/tmp/ssh-agent.sock",
}


def test_tokens_of_the_daemon_never_reach_the_command() -> None:
    for argv in (OWN, CODEX):
        for uses_model in (True, False):
            env = consolidation_env(argv, uses_model=uses_model, source=DAEMON_ENV)
            for name in ("GITHUB_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
                assert name not in env, (argv[0], uses_model, name)
            assert "ANTHROPIC_API_KEY" not in env and "SSH_AUTH_SOCK" not in env


def test_the_allow_list_and_memds_own_settings_pass() -> None:
    env = consolidation_env(CODEX, uses_model=False, source=DAEMON_ENV)
    assert env == {
        "PATH": "/usr/bin",
        "HOME": "/home/me",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "XDG_DATA_HOME": "/home/me/.local/share",
        "CODEX_HOME": "/home/me/.codex",
        "CLAUDE_CONFIG_DIR": "/home/me/.claude",
        "TZ": "UTC",
        "MEMD_MIN_IDLE_S": "0",
        "MEMD_LLM__MODEL": "gpt-5-mini",
    }


def test_the_model_key_reaches_only_memds_own_consolidator_with_a_model() -> None:
    with_model = consolidation_env(OWN, uses_model=True, source=DAEMON_ENV)
    assert with_model["OPENAI_API_KEY"] == "sk-openai-key"
    assert with_model["MEMD_LLM__API_KEY"] == "sk-memd-own-key"
    assert with_model["OPENAI_BASE_URL"] == "http://127.0.0.1:9/v1"
    offline = consolidation_env(OWN, uses_model=False, source=DAEMON_ENV)
    assert "OPENAI_API_KEY" not in offline and "MEMD_LLM__API_KEY" not in offline
    other = consolidation_env(CODEX, uses_model=True, source=DAEMON_ENV)
    assert "OPENAI_API_KEY" not in other and "OPENAI_BASE_URL" not in other


def test_names_the_user_lists_are_passed() -> None:
    env = consolidation_env(CODEX, uses_model=False, extra_names=["GITHUB_TOKEN", "NOT_SET"], source=DAEMON_ENV)
    assert env["GITHUB_TOKEN"] == "ghp_secret" and "NOT_SET" not in env


def test_own_consolidator_is_recognised() -> None:
    assert is_own_consolidator(OWN)
    assert is_own_consolidator(["/home/me/.venv/bin/memd", "consolidate", "--root", "x"])
    assert not is_own_consolidator(CODEX)
    assert not is_own_consolidator([])


def test_the_key_under_any_spelling_pydantic_settings_reads_stays_out() -> None:
    # pydantic-settings reads MEMD_* names case-insensitively, and MEMD_LLM as the whole [llm] table in JSON.
    spellings = {
        "MEMD_llm__api_key": "sk-lower",
        "memd_LLM__API_KEY": "sk-prefix",
        "MEMD_LLM": '{"api_key": "sk-table"}',
        "memd_min_idle_s": "0",
    }
    source = {**DAEMON_ENV, **spellings}
    for argv, uses_model in ((CODEX, True), (CODEX, False), (OWN, False)):
        env = consolidation_env(argv, uses_model=uses_model, source=source)
        assert not {"MEMD_llm__api_key", "memd_LLM__API_KEY", "MEMD_LLM"} & set(env), (argv[0], uses_model)
        assert env["memd_min_idle_s"] == "0"
    own = consolidation_env(OWN, uses_model=True, source=source)
    assert {name: own[name] for name in spellings} == spellings  # memd's own consolidator reads its key
