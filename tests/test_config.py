"""Configuration (SPEC §9): sources in priority order, exit 78 with the key named, no secret printed."""

from __future__ import annotations

from pathlib import Path

import pytest

from memd.cli import main
from memd.config import load_settings
from memd.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_follow_codex_home_and_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CODEX_HOME", str(tmp_path / "cx"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    s = load_settings()
    home = Path("~").expanduser()
    assert s.sessions == [
        tmp_path / "cx" / "sessions",
        tmp_path / "cx" / "archived_sessions",
        home / ".claude" / "projects",
        home / ".config" / "claude" / "projects",
    ]
    assert s.db_path == tmp_path / "state" / "memd" / "memd.sqlite3"
    assert s.memory_dir == tmp_path / "data" / "memd" / "projects"
    assert s.min_idle_s == 3600 and s.max_age_days == 30 and s.extract_concurrency == 4
    assert s.resolved_extractor()[0] == "offline"


def test_claude_roots_follow_claude_config_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CODEX_HOME", str(tmp_path / "cx"))
    monkeypatch.setenv("CLAUDE_CONFIG_DIR", f"{tmp_path}/work-claude, ~/personal-claude,")
    s = load_settings()
    assert s.sessions[2:] == [tmp_path / "work-claude" / "projects", Path("~/personal-claude/projects").expanduser()]
    # --sessions (and MEMD_SESSIONS) replace every default root, Codex's and Claude's alike.
    assert load_settings(None, {"sessions": [tmp_path / "only"]}).sessions == [tmp_path / "only"]


def test_priority_flags_over_env_over_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('min_idle_s = 5\nmax_age_days = 3\nextract_concurrency = 2\n[llm]\nmodel = "file-model"\n')
    monkeypatch.setenv("MEMD_MIN_IDLE_S", "7")
    monkeypatch.setenv("MEMD_LLM__MODEL", "env-model")
    monkeypatch.setenv("MEMD_SESSIONS", "~/a:/b")
    s = load_settings(cfg, {"max_age_days": 0})
    assert s.max_age_days == 0  # flag beats file
    assert s.min_idle_s == 7  # env beats file
    assert s.extract_concurrency == 2  # file beats default
    assert s.llm.model == "env-model"
    assert s.sessions == [Path("~/a").expanduser(), Path("/b")]


def test_memd_config_env_names_the_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("min_idle_s = 11\n")
    monkeypatch.setenv("MEMD_CONFIG", str(cfg))
    assert load_settings().min_idle_s == 11


def test_a_bare_openai_api_key_does_not_opt_in(monkeypatch: pytest.MonkeyPatch) -> None:
    # SPEC §9: a key merely present in the shell never sends transcripts to a model by itself.
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-0123456789abcdef")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    s = load_settings()
    assert s.llm.api_key is not None and s.llm.api_key.get_secret_value().startswith("sk-test")
    assert s.llm.base_url == "http://127.0.0.1:9/v1"
    assert s.api_key_source == "OPENAI_API_KEY"
    name, reason = s.resolved_extractor()
    assert name == "offline"
    assert "OPENAI_API_KEY in the environment does not opt in" in reason and "MEMD_EXTRACTOR=openai" in reason
    assert "sk-test" not in repr(s) and "sk-test" not in reason


def test_extractor_openai_uses_the_environment_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-0123456789abcdef")
    monkeypatch.setenv("MEMD_EXTRACTOR", "openai")
    s = load_settings()
    assert s.resolved_extractor() == ("openai", "extractor = openai in the configuration")
    assert s.llm.api_key is not None and s.llm.api_key.get_secret_value() == "sk-test-0123456789abcdef"


@pytest.mark.parametrize("where", ["env", "file"])
def test_a_key_given_to_memd_opts_in(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, where: str) -> None:
    if where == "env":
        monkeypatch.setenv("MEMD_LLM__API_KEY", "sk-test-memd-0123456789")
        s = load_settings()
    else:
        cfg = tmp_path / "c.toml"
        cfg.write_text('[llm]\napi_key = "sk-test-memd-0123456789"\n')
        s = load_settings(cfg)
    assert s.api_key_source == "memd"
    assert s.resolved_extractor() == (
        "openai",
        "extractor = auto and memd's configuration holds an API key (llm.api_key)",
    )


def test_no_key_and_offline_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().resolved_extractor() == ("offline", "extractor = auto and no API key is configured")
    monkeypatch.setenv("MEMD_LLM__API_KEY", "sk-test-memd-0123456789")
    monkeypatch.setenv("MEMD_EXTRACTOR", "offline")
    assert load_settings().resolved_extractor() == ("offline", "extractor = offline in the configuration")


def test_missing_named_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "nope.toml")


def test_invalid_values_name_the_key_and_hide_the_secret(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('min_idle_s = -4\nbogus_key = 1\n[llm]\napi_key = "sk-proj-SECRETSECRETSECRET"\napi = "grpc"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    text = str(info.value)
    assert "min_idle_s" in text and "bogus_key" in text and "llm.api" in text
    assert "SECRETSECRET" not in text


def test_cli_exit_78_for_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[llm]\napi_key = "sk-proj-SECRETSECRETSECRET"\ntimeout_s = "soon"\n')
    assert main(["--config", str(cfg), "status"]) == 78
    err = capsys.readouterr().err
    assert "llm.timeout_s" in err and "SECRETSECRET" not in err
    assert main(["--config", str(tmp_path / "missing.toml"), "status"]) == 78


def test_cli_exit_78_for_invalid_toml(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("min_idle_s = = 3\n")
    assert main(["--config", str(cfg), "status"]) == 78


def test_cli_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["frobnicate"]) == 2
    assert main([]) == 2
    assert main(["scan", "--min-idle", "soon"]) == 2
    assert "usage" in capsys.readouterr().err


def test_example_config_lists_every_key_and_loads() -> None:
    example = (REPO / "config.example.toml").read_text()
    s = load_settings(REPO / "config.example.toml")
    for key in s.model_dump(exclude={"llm", "consolidation"}):
        assert key in example, key
    for key in s.llm.model_dump():
        assert key in example, f"llm.{key}"
    for key in s.consolidation.model_dump():
        assert key in example, f"consolidation.{key}"
