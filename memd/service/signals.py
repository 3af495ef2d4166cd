"""SIGTERM/SIGINT handling (SPEC §12), after uvicorn's ``Server``: the handler only sets an event."""

from __future__ import annotations

import asyncio
import signal

import structlog

log = structlog.get_logger(__name__)


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
