"""The systemd user unit and its optional hardening drop-in, and ``memd service install`` (SPEC §12).

The unit texts live here as string constants so that they ship inside the wheel; ``systemd/memd.service`` and
``systemd/memd-hardening.conf`` in the source tree are the same text (a test keeps them equal).
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from memd.errors import MemdError, UsageError

log = structlog.get_logger(__name__)

UNIT_NAME = "memd.service"
DROPIN_NAME = "hardening.conf"
EXIT_CONFIG = 78
#: ``TimeoutStopSec=``: systemd SIGKILLs memd this long after SIGTERM; the daemon's shutdown
#: (grace period, then terminating the consolidation) is fitted inside it (SPEC §12).
STOP_TIMEOUT_S = 30

_EXEC_START_MARK = "@EXEC_START@"


class ServiceInstallError(MemdError):
    """``memd service install`` cannot write the unit (exit 1): a file or folder cannot be read or
    written, or this installation's path cannot be an ``ExecStart=`` command."""


UNIT_TEMPLATE = f"""\
# memd: per-project memory from coding-agent sessions, as a systemd user service (SPEC §12).
# `memd service install` writes this file to ~/.config/systemd/user/memd.service with the
# ExecStart of the installation that ran it; the copy in the source tree assumes
# ~/.local/bin/memd (pipx, pip --user). Then:
#   systemctl --user daemon-reload
#   systemctl --user enable --now memd
#   loginctl enable-linger "$USER"    # keep it running while you are logged out
# To use a model, put MEMD_LLM__API_KEY=... into ~/.config/memd/env (mode 0600).
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
TimeoutStopSec={STOP_TIMEOUT_S}
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
        lines.append(f"model API key (optional): MEMD_LLM__API_KEY=... in {self.env_file} (chmod 600)")
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


def _reason(exc: OSError | UnicodeDecodeError) -> str:
    """One line for an OS error: its text and the file it names."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return str(exc)


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
        ServiceInstallError: ``exec_start`` is not a valid command (see :func:`exec_start_line`), or
            a file cannot be read or written (files written before the failing one stay written).
    """
    unit_dir = config_home / "systemd" / "user"
    unit_path = unit_dir / UNIT_NAME
    dropin_path = unit_dir / f"{UNIT_NAME}.d" / DROPIN_NAME
    try:
        unit_text = render_unit(exec_start)
    except ValueError as exc:
        raise ServiceInstallError(f"this installation cannot be run by systemd: {exc}; nothing was changed") from None
    wanted: dict[Path, str | None] = {unit_path: unit_text, dropin_path: HARDENING_DROPIN if hardening else None}
    try:
        changes = {path: text for path, text in wanted.items() if _read_text(path) != text}
    except (OSError, UnicodeDecodeError) as exc:
        raise ServiceInstallError(f"cannot read the installed unit ({_reason(exc)}); nothing was changed") from None
    conflicts = [path for path in changes if path.exists()]
    if conflicts and not force:
        names = ", ".join(str(path) for path in conflicts)
        raise UsageError(
            f"{names} already exists with different content (edited by hand, another "
            "installation, or a hardening drop-in you did not ask for); nothing was changed. "
            "Re-run with --force to replace it."
        )
    for path, text in changes.items():
        try:
            if text is None:
                path.unlink()
            else:
                _write_atomic(path, text)
        except OSError as exc:
            raise ServiceInstallError(f"{path} cannot be written ({_reason(exc)})") from None
        log.info("service_dropin_removed" if text is None else "service_file_written", path=str(path))
    return InstallResult(
        unit_path=unit_path,
        dropin_path=dropin_path if hardening else None,
        changed=tuple(changes),
        env_file=config_home / "memd" / "env",
        commands=NEXT_COMMANDS,
    )
