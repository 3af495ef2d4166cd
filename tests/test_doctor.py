"""``memd doctor`` (SPEC §10): configuration, paths, inotify limits and the model endpoint, each
with a clear verdict; the endpoint checks run against the fake OpenAI server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import io
import socket
from pathlib import Path

import pytest

from memd import doctor
from memd.cli import main
from memd.config import Settings, load_settings
from tests import fake_openai as fk

KEY = "doctor-test-key-0123456789"


@pytest.fixture
async def gpt5_mini_server():
    srv = fk.FakeOpenAI(model="gpt-5-mini")
    await srv.start()
    yield srv
    await srv.close()


def settings_for(tmp_path: Path, **over) -> Settings:  # type: ignore[no-untyped-def]
    sessions = tmp_path / "sessions"
    sessions.mkdir(exist_ok=True)
    values = {"sessions": [sessions], "state_dir": tmp_path / "state", "memory_dir": tmp_path / "memory",
              "extractor": "offline", "force_polling": True}
    values.update(over)
    return load_settings(None, values, environ={})


async def doctor_report(settings: Settings, config_path: Path | None = None) -> tuple[int, dict[str, tuple[str, str]], str]:
    """Exit code, ``{check name: (verdict, detail)}`` and the printed text of one doctor run."""
    checks = await doctor.collect_checks(settings, config_path=config_path)
    out = io.StringIO()
    code = doctor.print_checks(checks, out=out)
    return code, {c.name: (c.verdict, c.detail) for c in checks}, out.getvalue()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_a_healthy_setup_passes_every_check(tmp_path):
    code, checks, text = await doctor_report(settings_for(tmp_path))
    assert code == 0, text
    assert checks["configuration"] == ("ok", "valid; no config file (defaults and environment)")
    assert checks["extractor"][0] == "ok" and "offline" in checks["extractor"][1]
    assert "model endpoint" not in checks  # no endpoint to check offline
    assert text.rstrip().endswith("0 failed, 0 warnings")


async def test_the_model_endpoint_answering_is_ok(tmp_path, gpt5_mini_server):
    settings = settings_for(tmp_path, extractor="auto", llm={"base_url": gpt5_mini_server.base_url, "api_key": KEY})
    code, checks, text = await doctor_report(settings)
    assert code == 0, text
    verdict, detail = checks["model endpoint"]
    assert verdict == "ok" and "reachable" in detail and "'gpt-5-mini' listed" in detail
    assert checks["extractor"][1] == "openai (extractor = auto and memd's configuration holds an API key (llm.api_key))"
    assert [r.path for r in gpt5_mini_server.requests] == ["/v1/models"]
    assert gpt5_mini_server.requests[0].headers["Authorization"] == f"Bearer {KEY}"
    assert KEY not in text


async def test_a_model_the_server_does_not_list_is_a_warning(tmp_path, gpt5_mini_server):
    settings = settings_for(tmp_path, extractor="openai", llm={"base_url": gpt5_mini_server.base_url, "api_key": KEY, "model": "gpt-9"})
    code, checks, text = await doctor_report(settings)
    assert code == 0
    verdict, detail = checks["model endpoint"]
    assert verdict == "warn" and "'gpt-9' not listed" in detail and "llm.model" in detail


async def test_rejected_credentials_fail_without_printing_the_key(tmp_path, gpt5_mini_server):
    gpt5_mini_server.default = fk.unauthorized()
    settings = settings_for(tmp_path, extractor="openai", llm={"base_url": gpt5_mini_server.base_url, "api_key": KEY})
    code, checks, text = await doctor_report(settings)
    assert code == 1
    verdict, detail = checks["model endpoint"]
    assert verdict == "fail" and "credentials rejected" in detail
    assert len(gpt5_mini_server.requests) == 1  # no retries
    assert KEY not in text
    assert text.rstrip().endswith("1 failed, 0 warnings")


async def test_an_unreachable_endpoint_fails_clearly(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"
    settings = settings_for(tmp_path, extractor="openai", llm={"base_url": url, "api_key": KEY})
    code, checks, _text = await doctor_report(settings)
    assert code == 1
    verdict, detail = checks["model endpoint"]
    assert verdict == "fail" and "unreachable" in detail and url in detail


async def test_a_hanging_endpoint_fails_within_the_timeout(tmp_path, gpt5_mini_server):
    gpt5_mini_server.default = fk.hang(hang_s=30)
    settings = settings_for(tmp_path, extractor="openai", llm={"base_url": gpt5_mini_server.base_url, "api_key": KEY, "timeout_s": 0.3})
    code, checks, _ = await doctor_report(settings)
    assert code == 1
    assert checks["model endpoint"] == ("fail", f"{gpt5_mini_server.base_url}: no answer within 0.3 s")


async def test_paths_missing_roots_warn_and_unwritable_state_fails(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    settings = settings_for(tmp_path, sessions=[tmp_path / "absent"], state_dir=blocker / "state")
    code, checks, text = await doctor_report(settings)
    assert code == 1
    assert checks[f"sessions {tmp_path / 'absent'}"][0] == "warn"
    assert checks["state_dir"] == ("fail", f"{blocker / 'state'}: not writable")
    assert checks["memory_dir"][0] == "ok"


async def test_a_corrupt_database_fails(tmp_path):
    settings = settings_for(tmp_path)
    settings.state_dir.mkdir()
    settings.db_path.write_bytes(b"this is not sqlite" * 100)
    code, checks, _ = await doctor_report(settings)
    assert code == 1
    verdict, detail = checks["database"]
    assert verdict == "fail" and str(settings.db_path) in detail


async def test_a_healthy_database_reports_its_schema(tmp_path):
    from memd.clock import SystemClock
    from memd.store.store import Store

    settings = settings_for(tmp_path)
    store = await Store.open(settings.db_path, clock=SystemClock())
    await store.close()
    _, checks, _ = await doctor_report(settings)
    verdict, detail = checks["database"]
    assert verdict == "ok" and "quick_check ok, schema v" in detail


@pytest.mark.parametrize(
    ("watches", "verdict"), [(None, "warn"), (1_000_000, "ok"), (8, "warn"), (5, "fail")],
    ids=["no_proc", "plenty", "tight", "too_few"],
)
async def test_inotify_limits_against_the_directories_to_watch(tmp_path, monkeypatch, watches, verdict):
    settings = settings_for(tmp_path, force_polling=False)
    for day in ("01", "02"):
        (settings.sessions[0] / "2026" / "01" / day).mkdir(parents=True)
    assert doctor.count_dirs(settings.sessions) == 5  # sessions, 2026, 01 and two days
    monkeypatch.setattr(doctor, "_read_int", lambda path: watches if path.endswith("max_user_watches") else 128)
    [check] = doctor.check_inotify(settings)
    assert check.verdict == verdict
    if verdict in ("warn", "fail") and watches is not None:
        assert "max_user_watches" in check.detail and "force_polling" in check.detail


async def test_polling_needs_no_inotify_watches(tmp_path):
    [check] = doctor.check_inotify(settings_for(tmp_path, force_polling=True))
    assert check.verdict == "ok" and "polling" in check.detail


async def test_a_missing_consolidation_command_fails(tmp_path):
    settings = settings_for(tmp_path, consolidation={"command": ["no-such-memd-command", "{memory_root}"]})
    code, checks, _ = await doctor_report(settings)
    assert code == 1
    assert checks["consolidation.command"] == ("fail", "no-such-memd-command: not found or not executable")


async def test_a_config_file_holding_the_key_must_be_private(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(f'[llm]\napi_key = "{KEY}"\n')
    config.chmod(0o644)
    settings = settings_for(tmp_path)
    code, checks, text = await doctor_report(settings, config_path=config)
    assert code == 0
    assert checks["configuration"] == ("ok", f"valid; {config}")
    assert checks["config secrets"][0] == "warn" and "chmod 600" in checks["config secrets"][1]
    assert KEY not in text
    config.chmod(0o600)
    _, checks, _ = await doctor_report(settings, config_path=config)
    assert "config secrets" not in checks


async def test_memd_doctor_command_line(tmp_path, gpt5_mini_server, monkeypatch, capsys):
    config = tmp_path / "config.toml"
    sessions = tmp_path / "sessions"
    sessions.mkdir()
    config.write_text(
        f'sessions = ["{sessions}"]\nstate_dir = "{tmp_path / "state"}"\nforce_polling = true\n'
        f'[llm]\nbase_url = "{gpt5_mini_server.base_url}"\n'
    )
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("MEMD_EXTRACTOR", "openai")  # a bare key does not opt in (SPEC §9)
    assert await asyncio.to_thread(main, ["--config", str(config), "doctor"]) == 0
    out = capsys.readouterr().out
    assert f"valid; {config}" in out and "OK    model endpoint" in out
    gpt5_mini_server.default = fk.unauthorized()
    assert await asyncio.to_thread(main, ["--config", str(config), "doctor"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  model endpoint" in out and KEY not in out
    # An invalid configuration never reaches the checks: exit 78, the key named.
    config.write_text("min_idle_s = -5\n")
    assert await asyncio.to_thread(main, ["--config", str(config), "doctor"]) == 78
    assert "min_idle_s" in capsys.readouterr().err
