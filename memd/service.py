"""systemd integration: sd_notify, the watchdog loop, shutdown signals, unit install (SPEC §12).

The notify protocol (systemd ``sd_notify(3)``) is a few lines over a socket, no C dependency: the
service manager passes ``NOTIFY_SOCKET`` (a filesystem path, or ``@name`` for an abstract socket)
and the daemon sends newline-separated ``KEY=VALUE`` assignments in one ``AF_UNIX``/``SOCK_DGRAM``
datagram each (``READY=1``, ``STATUS=...``, ``WATCHDOG=1``, ``STOPPING=1``). ``WATCHDOG_USEC`` (and
optionally ``WATCHDOG_PID``) tell the daemon how often to ping.

The user unit and its optional hardening drop-in live here as string constants so that they ship
inside the wheel; ``systemd/memd.service`` and ``systemd/memd-hardening.conf`` in the source tree
are the same text (a test keeps them equal).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from memd.clock import Clock, SystemClock
from memd.errors import UsageError

log = structlog.get_logger("memd.service")

UNIT_NAME = "memd.service"
DROPIN_NAME = "hardening.conf"
EXIT_CONFIG = 78

_EXEC_START_MARK = "@EXEC_START@"

UNIT_TEMPLATE = f"""\
# memd: per-project memory from coding-agent sessions, as a systemd user service (SPEC §12).
# `memd service install` writes this file to ~/.config/systemd/user/memd.service with the
# ExecStart of the installation that ran it; the copy in the source tree assumes
# ~/.local/bin/memd (pipx, pip --user). Then:
#   systemctl --user daemon-reload
#   systemctl --user enable --now memd
#   loginctl enable-linger "$USER"    # keep it running while you are logged out
# The API key goes into ~/.config/memd/env (mode 0600) as OPENAI_API_KEY=...
# Logs: journalctl --user -u memd. State: memd status.

[Unit]
Description=memd: per-project memory from coding-agent sessions
StartLimitIntervalSec=300
StartLimitBurst=5

[Service]
Type=notify
NotifyAccess=main
ExecStart={_EXEC_START_MARK}
EnvironmentFile=-%E/memd/env
Environment=PYTHONUNBUFFERED=1
# READY=1 follows the start-up scan; WATCHDOG=1 comes from the event loop every WatchdogSec/2.
TimeoutStartSec=300
WatchdogSec=60
# SIGTERM goes to memd only; it finishes running jobs, stops its subprocesses and exits 0.
# Processes still left when it exits, or after TimeoutStopSec, get SIGKILL.
KillMode=mixed
TimeoutStopSec=30
Restart=on-failure
RestartSec=10
# Exit status 78 is a configuration error: restarting cannot fix it.
RestartPreventExitStatus={EXIT_CONFIG}
UMask=0077
NoNewPrivileges=yes
Nice=10
IOSchedulingClass=best-effort
IOSchedulingPriority=7
SyslogIdentifier=memd

[Install]
WantedBy=default.target
"""

SHIPPED_EXEC_START = "%h/.local/bin/memd run"
"""The ExecStart line of ``systemd/memd.service`` in the source tree (systemd syntax)."""

HARDENING_DROPIN = """\
# memd: optional sandboxing for the user unit, installed as
# ~/.config/systemd/user/memd.service.d/hardening.conf by `memd service install --hardening`.
#
# Only directives that work in a user unit. File system namespacing in a user unit needs an
# unprivileged user namespace, hence PrivateUsers=yes (systemd >= 253 implies it, 252 needs it).
# Where the kernel forbids unprivileged user namespaces the service fails to start (status
# 218/CAPABILITIES or 226/NAMESPACE): remove this file and run systemctl --user daemon-reload.
# Left out on purpose, not supported in user units: ProtectControlGroups, ProtectProc,
# ProcSubset, RemoveIPC; PrivateDevices and ProtectClock (device access policy needs a
# privileged service manager).
#
# The whole file system is read-only except memd's own directories. If state_dir or memory_dir
# (or the consolidation command) write elsewhere, add those paths to ReadWritePaths=.
# A consolidation command that sandboxes itself (codex exec) needs RestrictNamespaces= lifted.

[Service]
# Create the writable directories first ("+": runs outside the sandbox), so that
# ReadWritePaths= finds them on the first start.
ExecStartPre=+/bin/mkdir -p %h/.local/share/memd %h/.local/state/memd
PrivateUsers=yes
ProtectSystem=strict
ReadWritePaths=%h/.local/share/memd %h/.local/state/memd
PrivateTmp=yes
ProtectHostname=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
# CPython needs no writable and executable memory: no JIT, and memd's compiled dependencies
# (pydantic-core, watchfiles, jiter) are Rust without libffi closures.
MemoryDenyWriteExecute=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallErrorNumber=EPERM
"""


# --------------------------------------------------------------------------------------------
# sd_notify


def _notify_address(value: str) -> str | None:
    """Return the ``sendto`` address for a ``NOTIFY_SOCKET`` value, or ``None`` if unsupported.

    ``/path`` is a filesystem socket, ``@name`` an abstract one (leading NUL byte). Other forms
    (``vsock:``, relative paths) are not supported.
    """
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    return None


class Notifier:
    """Sends sd_notify datagrams to the service manager (systemd ``sd_notify(3)`` protocol).

    Build it with :meth:`from_env`. When ``NOTIFY_SOCKET`` is unset (not started by systemd, or
    ``Type=`` is not ``notify``) every method is a no-op returning ``False``. Sending never blocks
    and never raises: the socket is non-blocking, and the first failure is logged once as
    ``sd_notify_failed`` (later failures are silent).

    Args:
        address: the ``sendto`` address (a path, or ``"\\0name"`` for an abstract socket), or
            ``None`` for a disabled notifier.
        label: the ``NOTIFY_SOCKET`` value as given, used in log events.
    """

    def __init__(self, address: str | None, *, label: str = "") -> None:
        self._address = address
        self._label = label
        self._sock: socket.socket | None = None
        self._failure_logged = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        """Return a notifier for ``environ["NOTIFY_SOCKET"]`` (disabled when unset or empty).

        An unsupported address (``vsock:``, a relative path) gives a disabled notifier and one
        ``sd_notify_unsupported_socket`` warning.
        """
        value = environ.get("NOTIFY_SOCKET", "")
        if not value:
            return cls(None)
        address = _notify_address(value)
        if address is None:
            log.warning("sd_notify_unsupported_socket", notify_socket=value)
        return cls(address, label=value)

    @property
    def enabled(self) -> bool:
        """Whether a notify socket is configured."""
        return self._address is not None

    def notify(self, **fields: object) -> bool:
        """Send one datagram with ``KEY=value`` lines, in argument order.

        Args:
            **fields: assignments such as ``READY=1, STATUS="3 queued"``. Values are converted
                with ``str()`` (``True``/``False`` become ``1``/``0``); newlines in a value are
                replaced by spaces, since the protocol is line-based.

        Returns:
            ``True`` if the datagram was handed to the socket, ``False`` when disabled, empty, or
            sending failed (logged once).
        """
        if self._address is None or not fields:
            return False
        lines = []
        for key, value in fields.items():
            text = str(int(value)) if isinstance(value, bool) else str(value)
            lines.append(f"{key}={' '.join(text.splitlines())}")
        payload = "\n".join(lines).encode("utf-8")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.setblocking(False)
            self._sock.sendto(payload, self._address)
        except OSError as exc:
            if not self._failure_logged:
                self._failure_logged = True
                log.warning(
                    "sd_notify_failed",
                    notify_socket=self._label,
                    error=f"{type(exc).__name__}: {exc}",
                    next="further notify failures are not logged",
                )
            return False
        return True

    def ready(self) -> bool:
        """Send ``READY=1`` (start-up finished). Returns whether it was sent."""
        return self.notify(READY=1)

    def status(self, text: str) -> bool:
        """Send ``STATUS=<text>`` (one line shown by ``systemctl status``)."""
        return self.notify(STATUS=text)

    def watchdog(self) -> bool:
        """Send ``WATCHDOG=1`` (keep-alive ping)."""
        return self.notify(WATCHDOG=1)

    def stopping(self) -> bool:
        """Send ``STOPPING=1`` (shutdown has begun)."""
        return self.notify(STOPPING=1)

    def close(self) -> None:
        """Close the socket (a later notify opens a new one)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval_s(environ: Mapping[str, str] = os.environ) -> float | None:
    """Return how often to send ``WATCHDOG=1``: half of ``WATCHDOG_USEC``, in seconds.

    Returns ``None`` when no watchdog is requested: ``WATCHDOG_USEC`` unset, zero or invalid
    (invalid logs ``watchdog_env_invalid``), or ``WATCHDOG_PID`` set to a pid that is not ours
    (the variables were inherited from a parent).
    """
    usec_text = environ.get("WATCHDOG_USEC", "")
    if not usec_text:
        return None
    pid_text = environ.get("WATCHDOG_PID", "")
    try:
        usec = int(usec_text)
        pid = int(pid_text) if pid_text else None
    except ValueError:
        log.warning("watchdog_env_invalid", watchdog_usec=usec_text, watchdog_pid=pid_text)
        return None
    if usec <= 0 or (pid is not None and pid != os.getpid()):
        return None
    return usec / 2 / 1_000_000


async def _wait_stop(stop_event: asyncio.Event, delay_s: float, clock: Clock) -> None:
    """Wait until ``stop_event`` is set or ``clock.sleep(delay_s)`` returns, whichever is first."""
    stop = asyncio.ensure_future(stop_event.wait())
    pause = asyncio.ensure_future(clock.sleep(delay_s))
    try:
        await asyncio.wait({stop, pause}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (stop, pause):
            task.cancel()
        await asyncio.gather(stop, pause, return_exceptions=True)


async def watchdog_loop(
    notifier: Notifier,
    interval_s: float,
    stop_event: asyncio.Event,
    status_fn: Callable[[], str] | None = None,
    *,
    clock: Clock | None = None,
) -> None:
    """Ping the watchdog from the event loop until ``stop_event`` is set.

    Every ``interval_s`` seconds it sends ``WATCHDOG=1``; when ``status_fn`` is given and its
    text differs from the last one sent, the same datagram carries ``STATUS=<text>``. The pings
    come from the event loop on purpose: a blocked loop stops them and systemd restarts memd.
    An exception from ``status_fn`` is logged once (``watchdog_status_failed``) and the ping is
    sent anyway.

    Args:
        notifier: where to send.
        interval_s: seconds between pings, usually :func:`watchdog_interval_s`.
        stop_event: set to end the loop; a wait in progress ends at once.
        status_fn: returns the current one-line status (e.g. :func:`daemon_status_line`).
        clock: the clock to sleep on (default :class:`memd.clock.SystemClock`).

    Raises:
        ValueError: if ``interval_s`` is not positive.
    """
    if interval_s <= 0:
        raise ValueError(f"interval_s must be positive, got {interval_s!r}")
    clock = clock or SystemClock()
    last_status: str | None = None
    status_failure_logged = False
    while not stop_event.is_set():
        fields: dict[str, object] = {"WATCHDOG": 1}
        if status_fn is not None:
            try:
                text = status_fn()
            except Exception as exc:  # a status bug must not stop the keep-alive
                if not status_failure_logged:
                    status_failure_logged = True
                    log.warning("watchdog_status_failed", error=f"{type(exc).__name__}: {exc}")
            else:
                if text != last_status:
                    fields["STATUS"] = text
                    last_status = text
        notifier.notify(**fields)
        if stop_event.is_set():
            break
        await _wait_stop(stop_event, interval_s, clock)


def daemon_status_line(queue_depth: int, running: int, last_activity: str) -> str:
    """Return the one-line ``STATUS=`` text, e.g. ``"3 queued, 1 running; last: extract_done"``.

    Args:
        queue_depth: jobs waiting.
        running: jobs in progress.
        last_activity: a short description of the latest event; whitespace runs (newlines
            included) collapse to one space and it is cut to 80 characters.
    """
    activity = " ".join(last_activity.split()) or "none"
    if len(activity) > 80:
        activity = activity[:79] + "…"
    return f"{queue_depth} queued, {running} running; last: {activity}"


# --------------------------------------------------------------------------------------------
# Shutdown signals


class ShutdownSignals:
    """SIGTERM/SIGINT handling for the daemon (after uvicorn's ``Server`` signal handling).

    The first signal sets :attr:`stop_event` and logs ``shutdown_requested``: stop claiming work,
    let running jobs finish within the grace period. Any further signal sets :attr:`force_event`
    and logs ``shutdown_forced``: stop without waiting for the grace period.

    Attributes:
        stop_event: set by the first signal.
        force_event: set by the second (and any later) signal.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.stop_event = asyncio.Event()
        self.force_event = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Register the handlers on ``loop`` (``loop.add_signal_handler``; main thread only).

        Raises:
            RuntimeError: if already installed, or ``loop`` cannot handle signals here.
        """
        if self._loop is not None:
            raise RuntimeError("shutdown signal handlers are already installed")
        for sig in self.SIGNALS:
            loop.add_signal_handler(sig, self._handle, sig)
        self._loop = loop

    def uninstall(self) -> None:
        """Remove the handlers, restoring the default dispositions. A no-op if not installed."""
        if self._loop is None:
            return
        for sig in self.SIGNALS:
            self._loop.remove_signal_handler(sig)
        self._loop = None

    def _handle(self, sig: int) -> None:
        name = signal.Signals(sig).name
        if not self.stop_event.is_set():
            self.stop_event.set()
            log.info("shutdown_requested", signal=name)
        else:
            self.force_event.set()
            log.warning("shutdown_forced", signal=name)


# --------------------------------------------------------------------------------------------
# Unit install


def _exec_arg(arg: str, *, command: bool) -> str:
    """Quote one argument for an ``ExecStart=`` line (systemd.service(5) "Command lines").

    ``%`` is always doubled (specifiers). ``$`` is doubled in arguments only: systemd expands
    variables in arguments but never in the command itself, where ``$$`` would stay ``$$``.
    """
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in arg):
        raise ValueError(f"control character in ExecStart argument {arg!r}")
    if command and any(ch in "\"'\\" for ch in arg):
        raise ValueError(f"systemd refuses quotes and backslashes in an executable path: {arg!r}")
    if arg == ";":
        return "\\;"
    escaped = arg.replace("%", "%%")
    if not command:
        escaped = escaped.replace("$", "$$")
    if arg and not any(ch.isspace() or ch in "\"'\\" for ch in arg):
        return escaped
    escaped = escaped.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def exec_start_line(exec_start: Sequence[str]) -> str:
    """Return the ``ExecStart=`` value for a literal argv.

    Each item is taken literally: ``%`` is doubled (no specifier expansion), and so is ``$`` in
    the arguments (no variable expansion); items with whitespace, quotes or backslashes are
    double-quoted with C escapes.

    Raises:
        ValueError: if ``exec_start`` is empty, its first item is not an absolute path or holds
            a quote or backslash (systemd rejects those), or an item holds a control character.
    """
    if not exec_start or not os.path.isabs(exec_start[0]):
        raise ValueError(f"ExecStart needs an absolute executable path, got {list(exec_start)!r}")
    return " ".join(_exec_arg(arg, command=i == 0) for i, arg in enumerate(exec_start))


def render_unit(exec_start: Sequence[str]) -> str:
    """Return the text of ``memd.service`` with ``ExecStart=`` running ``exec_start``.

    Args:
        exec_start: literal argv, e.g. ``["/home/u/.venv/bin/memd", "run"]``.

    Raises:
        ValueError: see :func:`exec_start_line`.
    """
    return UNIT_TEMPLATE.replace(_EXEC_START_MARK, exec_start_line(exec_start))


def shipped_unit_text() -> str:
    """Return the text of ``systemd/memd.service`` as shipped (ExecStart ``%h/.local/bin/memd``)."""
    return UNIT_TEMPLATE.replace(_EXEC_START_MARK, SHIPPED_EXEC_START)


def default_exec_start(python: str = sys.executable) -> list[str]:
    """Return the argv that runs the daemon of this installation.

    The ``memd`` console script beside the interpreter when it exists and is executable (a
    virtualenv's ``bin/``), else ``[python, "-m", "memd", "run"]``. The interpreter path is made
    absolute but symlinks are kept, so a virtualenv's ``bin/python`` stays inside the venv.
    """
    interpreter = os.path.abspath(python)
    script = os.path.join(os.path.dirname(interpreter), "memd")
    if os.path.isfile(script) and os.access(script, os.X_OK):
        return [script, "run"]
    return [interpreter, "-m", "memd", "run"]


def user_config_home(environ: Mapping[str, str] = os.environ) -> Path:
    """Return ``$XDG_CONFIG_HOME`` (when absolute, per the XDG spec) else ``$HOME/.config``."""
    value = environ.get("XDG_CONFIG_HOME", "")
    if value and os.path.isabs(value):
        return Path(value)
    home = environ.get("HOME", "")
    return (Path(home) if home else Path.home()) / ".config"


@dataclass(frozen=True)
class InstallResult:
    """What :func:`install_unit` did.

    Attributes:
        unit_path: ``<config_home>/systemd/user/memd.service``.
        dropin_path: the hardening drop-in when requested, else ``None``.
        changed: files written or removed (empty when everything was already up to date).
        env_file: where the unit reads the API key from (``%E/memd/env``); may not exist.
        commands: the shell lines to run next, in order.
    """

    unit_path: Path
    dropin_path: Path | None
    changed: tuple[Path, ...]
    env_file: Path
    commands: tuple[str, ...]

    @property
    def message(self) -> str:
        """The text ``memd service install`` prints: what changed, the key file, the commands."""
        lines = [f"{'removed' if not p.exists() else 'wrote'} {p}" for p in self.changed]
        if not self.changed:
            lines.append(f"{self.unit_path} is up to date")
        lines.append(f"API key (optional): OPENAI_API_KEY=... in {self.env_file} (chmod 600)")
        lines.append("then run:")
        lines.extend(f"  {command}" for command in self.commands)
        return "\n".join(lines)


NEXT_COMMANDS = (
    "systemctl --user daemon-reload",
    "systemctl --user enable --now memd",
    "loginctl enable-linger $USER",
)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


def install_unit(*, config_home: Path, exec_start: list[str], hardening: bool, force: bool) -> InstallResult:
    """Write the user unit (and optionally the hardening drop-in) for this installation.

    Files: ``<config_home>/systemd/user/memd.service`` (text of :func:`render_unit`) and, with
    ``hardening``, ``memd.service.d/hardening.conf`` (:data:`HARDENING_DROPIN`). Files are
    written atomically (temp file + rename), mode 0644. Installing the same thing twice changes
    nothing. Nothing is changed unless every conflict is allowed by ``force``.

    Args:
        config_home: ``$XDG_CONFIG_HOME`` (see :func:`user_config_home`).
        exec_start: literal argv for ``ExecStart=`` (see :func:`default_exec_start`).
        hardening: install the drop-in; when ``False`` an existing drop-in is a conflict
            (removed with ``force``).
        force: overwrite a unit or drop-in whose content differs (e.g. edited by hand).

    Returns:
        The paths, what changed, and the ``systemctl``/``loginctl`` lines to print.

    Raises:
        UsageError: an existing file differs (or an unwanted drop-in exists) and ``force`` is
            false; the message names the files.
        ValueError: ``exec_start`` is not a valid command (see :func:`exec_start_line`).
        OSError: the files cannot be written.
    """
    unit_dir = config_home / "systemd" / "user"
    unit_path = unit_dir / UNIT_NAME
    dropin_path = unit_dir / f"{UNIT_NAME}.d" / DROPIN_NAME
    wanted: dict[Path, str | None] = {
        unit_path: render_unit(exec_start),
        dropin_path: HARDENING_DROPIN if hardening else None,
    }
    changes = {path: text for path, text in wanted.items() if _read_text(path) != text}
    conflicts = [path for path in changes if path.exists()]
    if conflicts and not force:
        names = ", ".join(str(path) for path in conflicts)
        raise UsageError(
            f"{names} already exists with different content (edited by hand, another "
            "installation, or a hardening drop-in you did not ask for); nothing was changed. "
            "Re-run with --force to replace it."
        )
    for path, text in changes.items():
        if text is None:
            path.unlink()
            log.info("service_dropin_removed", path=str(path))
        else:
            _write_atomic(path, text)
            log.info("service_file_written", path=str(path))
    return InstallResult(
        unit_path=unit_path,
        dropin_path=dropin_path if hardening else None,
        changed=tuple(changes),
        env_file=config_home / "memd" / "env",
        commands=NEXT_COMMANDS,
    )
