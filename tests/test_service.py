"""Tests for memd.service: sd_notify, watchdog loop, shutdown signals, unit files and install."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from memd.clock import FakeClock
from memd.errors import UsageError
from memd.service import unit
from memd.service.notify import Notifier, daemon_status_line, watchdog_interval_s, watchdog_loop
from memd.service.signals import ShutdownSignals
from memd.service.unit import (
    HARDENING_DROPIN,
    InstallResult,
    default_exec_start,
    install_unit,
    render_unit,
    shipped_unit_text,
    user_config_home,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed"
)


# ------------------------------------------------------------------------------------------
# helpers


@pytest.fixture
def receiver(tmp_path: Path):
    """A real AF_UNIX datagram socket bound in a tmp dir; yields (socket, NOTIFY_SOCKET value)."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(10)
    yield sock, str(path)
    sock.close()


def recv_all(sock: socket.socket) -> list[bytes]:
    """Every datagram queued on ``sock`` right now, in order."""
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096))
    except BlockingIOError:
        return out
    finally:
        sock.settimeout(10)


def unit_keys(text: str) -> dict[str, dict[str, list[str]]]:
    """Parse unit text into {section: {key: [values]}} (keys may repeat in systemd units)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        assert current is not None, line
        current.setdefault(key, []).append(value)
    return sections


def analyze_verify(unit_path: Path, home: Path) -> subprocess.CompletedProcess[str]:
    """Run ``systemd-analyze --user verify`` on ``unit_path`` with an isolated user environment.

    ``--user`` needs an existing ``XDG_RUNTIME_DIR`` (without one it fails with "Failed to
    initialize manager"), so a private one is created. ``%h`` resolves to ``HOME`` and ``%E``
    to ``XDG_CONFIG_HOME``. Drop-ins in ``<unit>.d/`` beside the unit file are loaded too.
    """
    assert SYSTEMD_ANALYZE is not None
    runtime = home / "run"
    runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "XDG_RUNTIME_DIR": str(runtime),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "LANG": "C.UTF-8",
    }
    return subprocess.run(
        [SYSTEMD_ANALYZE, "--user", "verify", str(unit_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def verify_ok(proc: subprocess.CompletedProcess[str]) -> bool:
    """The check: exit 0 and nothing at all on stderr (warnings count as failures)."""
    return proc.returncode == 0 and proc.stderr == ""


def make_executable(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


def unit_tree(root: Path, unit_text: str, dropin_text: str | None = None) -> Path:
    """Write memd.service (and memd.service.d/hardening.conf) under ``root``; return the unit."""
    unit = root / "memd.service"
    unit.parent.mkdir(parents=True, exist_ok=True)
    unit.write_text(unit_text)
    if dropin_text is not None:
        (root / "memd.service.d").mkdir()
        (root / "memd.service.d" / "hardening.conf").write_text(dropin_text)
    return unit


# ------------------------------------------------------------------------------------------
# sd_notify


def test_notifier_sends_exact_datagrams_to_path_socket(receiver) -> None:
    sock, path = receiver
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready()
    assert notifier.status("2 queued, 1 running; last: extract_done")
    assert notifier.watchdog()
    assert notifier.stopping()
    assert notifier.notify(STATUS="a", EXTEND_TIMEOUT_USEC=5_000_000)
    notifier.close()
    assert [sock.recv(4096) for _ in range(5)] == [
        b"READY=1",
        b"STATUS=2 queued, 1 running; last: extract_done",
        b"WATCHDOG=1",
        b"STOPPING=1",
        b"STATUS=a\nEXTEND_TIMEOUT_USEC=5000000",
    ]


def test_notifier_abstract_socket() -> None:
    name = f"memd-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(10)
    try:
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready()
        assert notifier.watchdog()
        notifier.close()
        assert sock.recv(4096) == b"READY=1"
        assert sock.recv(4096) == b"WATCHDOG=1"
    finally:
        sock.close()


def test_notifier_status_newlines_become_spaces(receiver) -> None:
    sock, path = receiver
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert notifier.status("line one\nline two\r\nthree")
    assert notifier.notify(READY=True)
    notifier.close()
    assert sock.recv(4096) == b"STATUS=line one line two three"
    assert sock.recv(4096) == b"READY=1"


def test_notifier_disabled_without_notify_socket() -> None:
    notifier = Notifier.from_env({})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog() is False
    assert Notifier.from_env({"NOTIFY_SOCKET": ""}).enabled is False


def test_notifier_default_environ_is_os_environ(receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    sock, path = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    notifier = Notifier.from_env()
    assert notifier.ready()
    notifier.close()
    assert sock.recv(4096) == b"READY=1"


def test_notifier_unsupported_address_logs_once_and_is_disabled() -> None:
    with capture_logs() as logs:
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"})
        assert notifier.ready() is False
    assert not notifier.enabled
    assert [e["event"] for e in logs] == ["sd_notify_unsupported_socket"]
    assert logs[0]["notify_socket"] == "vsock:2:1234"


def test_notifier_send_failure_logged_once_never_raised(tmp_path: Path) -> None:
    missing = tmp_path / "no-such.sock"
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(missing)})
    with capture_logs() as logs:
        assert notifier.ready() is False
        assert notifier.watchdog() is False
        assert notifier.stopping() is False
    notifier.close()
    events = [e for e in logs if e["event"] == "sd_notify_failed"]
    assert len(events) == 1, logs
    assert events[0]["notify_socket"] == str(missing)
    assert "FileNotFoundError" in events[0]["error"] or "ConnectionRefused" in events[0]["error"]


def test_notifier_never_blocks_on_a_full_socket(receiver) -> None:
    """A manager that does not read: sends fail fast (EAGAIN) instead of hanging the loop."""
    sock, path = receiver
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
    with capture_logs() as logs:
        sent = 0
        while notifier.watchdog():
            sent += 1
            assert sent < 1_000_000, "datagrams never stopped being accepted"
        assert notifier.watchdog() is False
    notifier.close()
    assert sent > 0
    assert [e["event"] for e in logs] == ["sd_notify_failed"]
    assert "BlockingIOError" in logs[0]["error"]
    # nothing sent before the failure was lost
    assert recv_all(sock) == [b"WATCHDOG=1"] * sent


# ------------------------------------------------------------------------------------------
# watchdog interval


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "60000000"}, 30.0),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}, 1.5),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": ""}, None),
    ],
)
def test_watchdog_interval_s(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval_s(env) == expected


@pytest.mark.parametrize(
    "env", [{"WATCHDOG_USEC": "sixty"}, {"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "me"}]
)
def test_watchdog_interval_invalid_env_logged(env: dict[str, str]) -> None:
    with capture_logs() as logs:
        assert watchdog_interval_s(env) is None
    assert [e["event"] for e in logs] == ["watchdog_env_invalid"]


def test_watchdog_interval_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    assert watchdog_interval_s() == 5.0


# ------------------------------------------------------------------------------------------
# watchdog loop


async def test_watchdog_loop_pings_and_sends_changed_status(receiver) -> None:
    sock, path = receiver
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
    clock = FakeClock()
    start_s = clock.now()
    stop = asyncio.Event()
    statuses = ["1 queued", "1 queued", "0 queued", "0 queued"]
    calls = 0

    def status_fn() -> str:
        nonlocal calls
        text = statuses[calls]
        calls += 1
        if calls == len(statuses):
            stop.set()
        return text

    await asyncio.wait_for(watchdog_loop(notifier, 30.0, stop, status_fn, clock=clock), 10)
    notifier.close()
    assert recv_all(sock) == [
        b"WATCHDOG=1\nSTATUS=1 queued",
        b"WATCHDOG=1",
        b"WATCHDOG=1\nSTATUS=0 queued",
        b"WATCHDOG=1",
    ]
    # three waits of interval_s between the four pings, none after stop
    assert clock.now() - start_s == pytest.approx(90.0)


async def test_watchdog_loop_without_status_fn(receiver) -> None:
    sock, path = receiver
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
    stop = asyncio.Event()
    task = asyncio.ensure_future(watchdog_loop(notifier, 5.0, stop, clock=FakeClock()))
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    got = [await asyncio.wait_for(loop.sock_recv(sock, 4096), 10) for _ in range(3)]
    stop.set()
    await asyncio.wait_for(task, 10)
    notifier.close()
    assert got == [b"WATCHDOG=1"] * 3


async def test_watchdog_loop_stop_interrupts_long_wait(receiver) -> None:
    """With the real clock and a one-hour interval, setting stop_event ends the loop at once."""
    sock, path = receiver
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
    stop = asyncio.Event()
    task = asyncio.ensure_future(watchdog_loop(notifier, 3600.0, stop))
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    assert await asyncio.wait_for(loop.sock_recv(sock, 4096), 10) == b"WATCHDOG=1"
    stop.set()
    await asyncio.wait_for(task, 10)
    notifier.close()
    assert recv_all(sock) == []


async def test_watchdog_loop_status_error_logged_once_and_pings_continue(receiver) -> None:
    sock, path = receiver
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
    stop = asyncio.Event()
    calls = 0

    def broken() -> str:
        nonlocal calls
        calls += 1
        if calls == 3:
            stop.set()
        raise RuntimeError("status source broke")

    with capture_logs() as logs:
        await asyncio.wait_for(watchdog_loop(notifier, 1.0, stop, broken, clock=FakeClock()), 10)
    notifier.close()
    assert recv_all(sock) == [b"WATCHDOG=1"] * 3
    assert [e["event"] for e in logs] == ["watchdog_status_failed"]
    assert "status source broke" in logs[0]["error"]


async def test_watchdog_loop_rejects_non_positive_interval() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        await watchdog_loop(Notifier(None), 0, asyncio.Event())


# ------------------------------------------------------------------------------------------
# shutdown signals


async def test_shutdown_signals_first_stops_second_forces() -> None:
    signals = ShutdownSignals()
    signals.install(asyncio.get_running_loop())
    try:
        with capture_logs() as logs:
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.wait_for(signals.stop_event.wait(), 10)
            assert not signals.force_event.is_set()
            os.kill(os.getpid(), signal.SIGINT)
            await asyncio.wait_for(signals.force_event.wait(), 10)
    finally:
        signals.uninstall()
    assert [(e["event"], e["signal"]) for e in logs] == [
        ("shutdown_requested", "SIGTERM"),
        ("shutdown_forced", "SIGINT"),
    ]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) == signal.default_int_handler


async def test_shutdown_signals_sigint_first() -> None:
    signals = ShutdownSignals()
    signals.install(asyncio.get_running_loop())
    try:
        with capture_logs() as logs:
            os.kill(os.getpid(), signal.SIGINT)
            await asyncio.wait_for(signals.stop_event.wait(), 10)
    finally:
        signals.uninstall()
    assert not signals.force_event.is_set()
    assert [(e["event"], e["signal"]) for e in logs] == [("shutdown_requested", "SIGINT")]


async def test_shutdown_signals_install_twice_refused_uninstall_idempotent() -> None:
    signals = ShutdownSignals()
    loop = asyncio.get_running_loop()
    signals.install(loop)
    try:
        with pytest.raises(RuntimeError, match="already installed"):
            signals.install(loop)
    finally:
        signals.uninstall()
    signals.uninstall()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


# ------------------------------------------------------------------------------------------
# status line


def test_daemon_status_line() -> None:
    assert daemon_status_line(3, 1, "extract_done") == "3 queued, 1 running; last: extract_done"


def test_daemon_status_line_one_short_line() -> None:
    line = daemon_status_line(0, 0, "consolidate_failed\nproject x\t" + "y" * 500)
    assert "\n" not in line and "\t" not in line
    assert line.startswith("0 queued, 0 running; last: consolidate_failed project x y")
    assert len(line) <= 120
    assert daemon_status_line(0, 0, "  ") == "0 queued, 0 running; last: none"


# ------------------------------------------------------------------------------------------
# unit text


def test_shipped_files_equal_the_code() -> None:
    """systemd/ in the source tree and the constants in the wheel cannot drift apart."""
    assert (REPO_ROOT / "systemd" / "memd.service").read_text() == shipped_unit_text()
    assert (REPO_ROOT / "systemd" / "memd-hardening.conf").read_text() == HARDENING_DROPIN
    assert shipped_unit_text() == render_unit(["/PLACEHOLDER", "run"]).replace(
        "ExecStart=/PLACEHOLDER run", "ExecStart=%h/.local/bin/memd run"
    )


def test_unit_has_the_spec_directives() -> None:
    keys = unit_keys(render_unit(["/usr/bin/memd", "run"]))
    svc = keys["Service"]
    expected = {
        "Type": ["notify"],
        "ExecStart": ["/usr/bin/memd run"],
        "Restart": ["on-failure"],
        "RestartPreventExitStatus": ["78"],
        "TimeoutStopSec": ["30"],
        "KillMode": ["mixed"],
        "EnvironmentFile": ["-%E/memd/env"],
        "UMask": ["0077"],
        "NoNewPrivileges": ["yes"],
    }
    for key, value in expected.items():
        assert svc.get(key) == value, key
    assert int(svc["WatchdogSec"][0]) > 0
    assert keys["Install"]["WantedBy"] == ["default.target"]


def test_hardening_dropin_directives() -> None:
    svc = unit_keys(HARDENING_DROPIN)["Service"]
    assert svc["ProtectSystem"] == ["strict"]
    assert svc["ReadWritePaths"] == ["%h/.local/share/memd %h/.local/state/memd"]
    assert svc["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    for key in (
        "PrivateUsers",
        "PrivateTmp",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "LockPersonality",
        "MemoryDenyWriteExecute",
    ):
        assert svc[key] == ["yes"], key
    assert svc["SystemCallArchitectures"] == ["native"]
    # not supported in user units (systemd.exec(5)): must not be there
    for key in ("ProtectControlGroups", "ProtectProc", "RemoveIPC", "PrivateDevices"):
        assert key not in svc


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["/opt/memd/bin/memd", "run"], "/opt/memd/bin/memd run"),
        (["/usr/bin/python3", "-m", "memd", "run"], "/usr/bin/python3 -m memd run"),
        (["/a b/memd", "run"], '"/a b/memd" run'),
        (["/x/100%/memd", "$HOME"], "/x/100%%/memd $$HOME"),
        (["/x/$d/memd", "${A}"], "/x/$d/memd $${A}"),  # no variable expansion in the command
        (["/x/memd", 'say "hi"', "a\\b", ";", ""], '/x/memd "say \\"hi\\"" "a\\\\b" \\; ""'),
    ],
)
def test_exec_start_quoting(argv: list[str], line: str) -> None:
    assert unit.exec_start_line(argv) == line
    assert f"\nExecStart={line}\n" in render_unit(argv)


@pytest.mark.parametrize(
    "argv", [[], ["memd", "run"], ["/x/memd", "a\nb"], ['/x"y/memd'], ["/x'y/memd"], ["/x\\y/memd"]]
)
def test_exec_start_rejects_bad_argv(argv: list[str]) -> None:
    with pytest.raises(ValueError):
        render_unit(argv)


# ------------------------------------------------------------------------------------------
# systemd-analyze --user verify


@needs_analyze
def test_shipped_unit_and_dropin_verify_clean(tmp_path: Path) -> None:
    """The files from systemd/ as they are, with ~/.local/bin/memd present (%h = HOME)."""
    home = tmp_path / "home"
    make_executable(home / ".local" / "bin" / "memd")
    unit = unit_tree(
        tmp_path / "units",
        (REPO_ROOT / "systemd" / "memd.service").read_text(),
        (REPO_ROOT / "systemd" / "memd-hardening.conf").read_text(),
    )
    proc = analyze_verify(unit, home)
    assert verify_ok(proc), proc.stderr
    assert proc.stdout == ""


@needs_analyze
def test_installed_unit_verifies_clean(tmp_path: Path) -> None:
    """install_unit with this interpreter's ExecStart, drop-in included, verified in place."""
    home = tmp_path / "home"
    result = install_unit(
        config_home=home / ".config", exec_start=default_exec_start(), hardening=True, force=False
    )
    proc = analyze_verify(result.unit_path, home)
    assert verify_ok(proc), proc.stderr


@needs_analyze
def test_verify_check_follows_exec_start_quoting(tmp_path: Path) -> None:
    """A path with a space, % and $ verifies only if ExecStart is escaped right; arguments
    with quotes and backslashes must parse without a warning."""
    home = tmp_path / "home"
    exe = make_executable(tmp_path / "odd dir 100% $HOME" / "memd")
    argv = [str(exe), "run", 'say "hi"', "it's", "a\\b", ";", "", "%h", "$HOME"]
    unit = unit_tree(tmp_path / "units", render_unit(argv))
    proc = analyze_verify(unit, home)
    assert verify_ok(proc), proc.stderr
    naive = render_unit(["/PLACEHOLDER", "run"]).replace("/PLACEHOLDER", str(exe))
    bad = unit_tree(tmp_path / "naive", naive)
    assert not verify_ok(analyze_verify(bad, home))


@needs_analyze
@pytest.mark.parametrize("where", ["unit", "dropin"])
def test_verify_check_fails_on_unknown_directive(tmp_path: Path, where: str) -> None:
    """systemd-analyze exits 0 on an unknown key but warns on stderr: the check must fail."""
    home = tmp_path / "home"
    exe = make_executable(tmp_path / "bin" / "memd")
    unit_text = render_unit([str(exe), "run"])
    dropin_text = HARDENING_DROPIN
    if where == "unit":
        unit_text = unit_text.replace("UMask=0077\n", "UMask=0077\nBogusDirective=yes\n")
    else:
        dropin_text += "ProtectEverything=yes\n"
    unit = unit_tree(tmp_path / "units", unit_text, dropin_text)
    proc = analyze_verify(unit, home)
    assert not verify_ok(proc)
    assert "Unknown key" in proc.stderr


@needs_analyze
def test_verify_check_fails_on_missing_executable(tmp_path: Path) -> None:
    home = tmp_path / "home"
    unit = unit_tree(tmp_path / "units", render_unit([str(tmp_path / "absent" / "memd"), "run"]))
    proc = analyze_verify(unit, home)
    assert not verify_ok(proc)
    assert "is not executable" in proc.stderr


# ------------------------------------------------------------------------------------------
# install


def test_install_unit_writes_unit_and_dropin(tmp_path: Path) -> None:
    config_home = tmp_path / "config"
    argv = ["/opt/venv/bin/memd", "run"]
    with capture_logs() as logs:
        result = install_unit(config_home=config_home, exec_start=argv, hardening=True, force=False)
    unit_path = config_home / "systemd" / "user" / "memd.service"
    dropin = config_home / "systemd" / "user" / "memd.service.d" / "hardening.conf"
    assert result == InstallResult(
        unit_path=unit_path,
        dropin_path=dropin,
        changed=(unit_path, dropin),
        env_file=config_home / "memd" / "env",
        commands=(
            "systemctl --user daemon-reload",
            "systemctl --user enable --now memd",
            "loginctl enable-linger $USER",
        ),
    )
    assert unit_path.read_text() == render_unit(argv)
    assert dropin.read_text() == HARDENING_DROPIN
    assert result.message.splitlines() == [
        f"wrote {unit_path}",
        f"wrote {dropin}",
        f"model API key (optional): MEMD_LLM__API_KEY=... in {config_home / 'memd' / 'env'} (chmod 600)",
        "then run:",
        "  systemctl --user daemon-reload",
        "  systemctl --user enable --now memd",
        "  loginctl enable-linger $USER",
    ]
    assert unit_path.stat().st_mode & 0o777 == 0o644
    assert [e["event"] for e in logs] == ["service_file_written"] * 2
    assert sorted(p.name for p in unit_path.parent.iterdir()) == ["memd.service", "memd.service.d"]


def test_install_unit_is_idempotent(tmp_path: Path) -> None:
    kwargs = dict(config_home=tmp_path, exec_start=["/x/memd", "run"], hardening=False)
    first = install_unit(**kwargs, force=False)
    second = install_unit(**kwargs, force=False)
    assert first.changed == (first.unit_path,)
    assert first.dropin_path is None
    assert second.changed == ()
    assert second.message.splitlines()[0] == f"{second.unit_path} is up to date"
    assert not (tmp_path / "systemd" / "user" / "memd.service.d").exists()


def test_install_unit_refuses_to_overwrite_edited_unit(tmp_path: Path) -> None:
    first = install_unit(
        config_home=tmp_path, exec_start=["/x/memd", "run"], hardening=False, force=False
    )
    first.unit_path.write_text(first.unit_path.read_text() + "# my edit\n")
    edited = first.unit_path.read_text()
    with pytest.raises(UsageError, match="--force") as err:
        install_unit(
            config_home=tmp_path, exec_start=["/y/memd", "run"], hardening=True, force=False
        )
    assert str(first.unit_path) in str(err.value)
    assert first.unit_path.read_text() == edited
    assert not (tmp_path / "systemd" / "user" / "memd.service.d").exists()  # nothing changed
    forced = install_unit(
        config_home=tmp_path, exec_start=["/y/memd", "run"], hardening=False, force=True
    )
    assert forced.unit_path.read_text() == render_unit(["/y/memd", "run"])


def test_install_unit_unwanted_dropin_needs_force(tmp_path: Path) -> None:
    argv = ["/x/memd", "run"]
    hardened = install_unit(config_home=tmp_path, exec_start=argv, hardening=True, force=False)
    assert hardened.dropin_path is not None
    with pytest.raises(UsageError, match="hardening.conf"):
        install_unit(config_home=tmp_path, exec_start=argv, hardening=False, force=False)
    assert hardened.dropin_path.exists()
    with capture_logs() as logs:
        plain = install_unit(config_home=tmp_path, exec_start=argv, hardening=False, force=True)
    assert plain.changed == (hardened.dropin_path,)
    assert not hardened.dropin_path.exists()
    assert plain.message.splitlines()[0] == f"removed {hardened.dropin_path}"
    assert [e["event"] for e in logs] == ["service_dropin_removed"]


def test_default_exec_start_prefers_script_beside_python(tmp_path: Path) -> None:
    python = make_executable(tmp_path / "venv" / "bin" / "python")
    assert default_exec_start(str(python)) == [str(python), "-m", "memd", "run"]
    script = make_executable(tmp_path / "venv" / "bin" / "memd")
    assert default_exec_start(str(python)) == [str(script), "run"]
    script.chmod(0o644)  # not executable: not usable
    assert default_exec_start(str(python)) == [str(python), "-m", "memd", "run"]


def test_default_exec_start_keeps_venv_symlink(tmp_path: Path) -> None:
    real = make_executable(tmp_path / "base" / "python3")
    link = tmp_path / "venv" / "bin" / "python"
    link.parent.mkdir(parents=True)
    link.symlink_to(real)
    make_executable(tmp_path / "venv" / "bin" / "memd")
    assert default_exec_start(str(link)) == [str(tmp_path / "venv" / "bin" / "memd"), "run"]


def test_default_exec_start_for_this_interpreter() -> None:
    argv = default_exec_start()
    assert os.path.isabs(argv[0]) and argv[-1] == "run"
    assert argv[0] == os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "memd") or (
        argv[:3] == [os.path.abspath(sys.executable), "-m", "memd"]
    )


def test_user_config_home(tmp_path: Path) -> None:
    assert user_config_home({"XDG_CONFIG_HOME": "/cfg", "HOME": "/h"}) == Path("/cfg")
    assert user_config_home({"XDG_CONFIG_HOME": "relative", "HOME": "/h"}) == Path("/h/.config")
    assert user_config_home({"HOME": "/h"}) == Path("/h/.config")
    assert user_config_home() == Path(os.environ["XDG_CONFIG_HOME"])


def test_install_unit_that_cannot_write_is_a_service_install_error(tmp_path: Path) -> None:
    (tmp_path / "systemd").write_text("a file where the folder belongs")
    with pytest.raises(unit.ServiceInstallError, match="Not a directory"):
        install_unit(config_home=tmp_path, exec_start=["/x/memd", "run"], hardening=False, force=False)
    assert (tmp_path / "systemd").read_text() == "a file where the folder belongs"
    with pytest.raises(unit.ServiceInstallError, match="cannot be run by systemd: .*quotes"):
        install_unit(config_home=tmp_path / "c", exec_start=["/x/me'md", "run"], hardening=False, force=False)
    assert not (tmp_path / "c").exists()


def test_memd_service_install_failure_is_one_line_and_exit_1(tmp_path: Path) -> None:
    config_home = tmp_path / "config"
    config_home.mkdir()
    (config_home / "systemd").write_text("a file where the folder belongs")
    env = {
        **os.environ,
        "XDG_CONFIG_HOME": str(config_home),
        "MEMD_STATE_DIR": str(tmp_path / "state"),
        "PYTHONPATH": str(REPO_ROOT),
    }
    done = subprocess.run(
        [sys.executable, "-m", "memd", "service", "install"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert "memd service: cannot read the installed unit (Not a directory: " in done.stderr
    assert (config_home / "systemd").read_text() == "a file where the folder belongs"


async def test_the_daemons_shutdown_fits_in_systemds_stop_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from memd.config import load_settings
    from memd.daemon import STOP_MARGIN_S, Daemon

    assert f"\nTimeoutStopSec={unit.STOP_TIMEOUT_S}\n" in shipped_unit_text()
    monkeypatch.setenv("MEMD_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("MEMD_MEMORY_DIR", str(tmp_path / "memory"))
    monkeypatch.setenv("MEMD_SESSIONS", str(tmp_path / "sessions"))
    (tmp_path / "sessions").mkdir()
    daemon = await Daemon.open(load_settings(None, {}))
    deadlines: list[float] = []
    monkeypatch.setattr(daemon.components.runner, "stop_by", deadlines.append)
    try:
        daemon.stop()
        before = asyncio.get_running_loop().time()
        assert await daemon.serve() == 0
        after = asyncio.get_running_loop().time()
    finally:
        await daemon.close()
    [deadline] = deadlines  # set when stopping began, between `before` and `after`
    budget_s = unit.STOP_TIMEOUT_S - STOP_MARGIN_S
    assert before + budget_s <= deadline <= after + budget_s
