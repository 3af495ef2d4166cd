"""sd_notify and the watchdog loop (SPEC §12), with no C dependency.

The notify protocol (systemd ``sd_notify(3)``) is a few lines over a socket: the service manager passes
``NOTIFY_SOCKET`` (a filesystem path, or ``@name`` for an abstract socket) and the daemon sends newline-separated
``KEY=VALUE`` assignments in one ``AF_UNIX``/``SOCK_DGRAM`` datagram each (``READY=1``, ``STATUS=...``,
``WATCHDOG=1``, ``STOPPING=1``). ``WATCHDOG_USEC`` (and optionally ``WATCHDOG_PID``) tell the daemon how often
to ping.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Mapping

import structlog

from memd.clock import Clock, SystemClock

log = structlog.get_logger(__name__)


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
