"""Watching the rollout roots with :func:`watchfiles.awatch` (SPEC §3.3).

A thin async generator (after watchfiles' own ``awatch``): every batch is a set of paths to re-stat. The
watcher never touches the store; it restarts itself with backoff when inotify fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import stat as stat_mod
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import structlog
from watchfiles import Change as FsEvent
from watchfiles import awatch

from memd.clock import Clock, SystemClock
from memd.ingest.files import in_skipped_dir, is_rollout_name

log = structlog.get_logger(__name__)
_BACKOFF_MAX_EXPONENT = 30


# --------------------------------------------------------------------------------------------
# Watching
# --------------------------------------------------------------------------------------------


def _watch_filter(roots: frozenset[str], change: FsEvent, path: str) -> bool:
    """Keep rollout paths (``*.jsonl``: Codex rollouts, Claude Code ``<uuid>.jsonl`` sessions and
    their sub-agent files) and the roots themselves (any event), and directories that appeared
    (created or moved in); never anything in or under a ``tool-results`` folder."""
    if path in roots:
        return True
    if in_skipped_dir(path):
        return False  # Claude Code's tool-results/ folders never hold transcripts
    if is_rollout_name(os.path.basename(path)):
        return True
    return change == FsEvent.added and os.path.isdir(path)


class _StopFlag:
    """The ``stop_event`` handed to ``awatch``: set when the caller's event is set.

    ``awatch`` calls ``set()`` on its stop event when its task is cancelled; that must stop only
    this watcher, not set the daemon's own stop event, so ``set()`` stays local.
    """

    def __init__(self, outer: asyncio.Event) -> None:
        self._outer = outer
        self._local = False

    def is_set(self) -> bool:
        return self._local or self._outer.is_set()

    def set(self) -> None:
        self._local = True


def _existing_roots(roots: Sequence[Path | str]) -> dict[str, tuple[int, int]]:
    """Map each root that is an existing directory to its ``(dev, inode)``."""
    found: dict[str, tuple[int, int]] = {}
    for root in roots:
        path = os.fspath(root)
        try:
            st = os.stat(path)
        except OSError:
            continue
        if stat_mod.S_ISDIR(st.st_mode):
            found[path] = (st.st_dev, st.st_ino)
    return found


async def _sleep_or_stop(clock: Clock, delay_s: float, stop_event: asyncio.Event) -> None:
    """Wait ``delay_s`` on ``clock`` or until ``stop_event`` is set, whichever comes first."""
    sleeper = asyncio.ensure_future(clock.sleep(delay_s))
    stopper = asyncio.ensure_future(stop_event.wait())
    try:
        await asyncio.wait({sleeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (sleeper, stopper):
            task.cancel()
        await asyncio.gather(sleeper, stopper, return_exceptions=True)


async def watch_roots(
    roots: Sequence[Path | str],
    *,
    stop_event: asyncio.Event,
    force_polling: bool = False,
    debounce_ms: int = 1600,
    step_ms: int = 500,
    poll_delay_ms: int = 300,
    root_check_ms: int = 30_000,
    backoff_base_s: float = 1.0,
    backoff_cap_s: float = 60.0,
    clock: Clock | None = None,
) -> AsyncIterator[set[str]]:
    """Watch the rollout roots and yield batches of paths to re-stat (SPEC §3.3).

    Wraps :func:`watchfiles.awatch` (recursive inotify, or polling) over the roots that exist.
    Event kinds are coalesced and unreliable, so a batch is just a set of paths: pass it to
    :func:`memd.ingest.scan.restat_paths`. A path in a batch is one of

    - a rollout file (``*.jsonl`` / ``*.jsonl.zst``) that was created, written, moved or deleted;
    - a directory that appeared (e.g. a new ``YYYY/MM/DD``): scan it, files may have been written
      into it before the kernel watch on it existed;
    - a root itself: the first batch after the watch is (re-)established contains every watched
      root, so the caller rescans them (stat only) and nothing written while no watch was in
      place is missed. This batch arrives within ``root_check_ms`` of the (re)start.

    The roots are re-checked after every batch and at least every ``root_check_ms``: a root that
    appears, disappears or is replaced restarts the watch on the roots that exist now. If
    ``awatch`` raises (inotify limit, removed root), one ``watcher_failed`` event is logged and the
    watch restarts after an exponential backoff (``backoff_base_s`` doubling up to
    ``backoff_cap_s``) without ending this generator; the daemon keeps serving from its periodic
    scans meanwhile. The generator ends when ``stop_event`` is set (within ``step_ms``).

    Args:
        roots: the rollout roots (missing ones are watched once they appear).
        stop_event: set it to end the generator.
        force_polling: poll instead of inotify (network file systems); ``False`` lets watchfiles
            decide (it polls on WSL or with ``WATCHFILES_FORCE_POLLING``).
        debounce_ms: longest time changes are grouped into one batch, in milliseconds.
        step_ms: quiet time that ends a batch, in milliseconds. It is also how often the
            watcher thread wakes up while nothing happens (watchfiles sleeps ``step_ms``, then
            takes the GIL to check signals and ``stop_event``): 500 ms keeps an idle daemon's
            CPU low (SPEC §15) and bounds the stop latency to half a second.
        poll_delay_ms: polling interval when polling, in milliseconds.
        root_check_ms: longest time between checks of the roots themselves, in milliseconds
            (each check is a round trip through a worker thread, so not too often; missing
            files are also caught by the periodic rescan).
        backoff_base_s: first restart delay after a failure, in seconds.
        backoff_cap_s: longest restart delay, in seconds.
        clock: time source for the backoff sleeps (default :class:`~memd.clock.SystemClock`).

    Yields:
        Non-empty sets of absolute paths to re-stat.
    """
    clock = clock or SystemClock()
    failures = 0
    while not stop_event.is_set():
        watched = _existing_roots(roots)
        if not watched:
            log.debug("watcher_waiting_for_roots", roots=[os.fspath(r) for r in roots])
            await _sleep_or_stop(clock, root_check_ms / 1000, stop_event)
            continue
        log.info("watcher_started", roots=list(watched), force_polling=force_polling)
        pending: set[str] = set(watched)
        try:
            changes_iter = awatch(
                *watched,
                watch_filter=functools.partial(_watch_filter, frozenset(watched)),
                debounce=debounce_ms,
                step=step_ms,
                stop_event=_StopFlag(stop_event),
                rust_timeout=root_check_ms,
                yield_on_timeout=True,
                force_polling=True if force_polling else None,
                poll_delay_ms=poll_delay_ms,
                ignore_permission_denied=True,
            )
            async with contextlib.aclosing(changes_iter):
                async for changes in changes_iter:
                    failures = 0
                    paths = {path for _, path in changes}
                    batch = pending | paths
                    pending = set()
                    if batch:
                        yield batch
                    # A root's own event (deleted, moved, recreated: its inode may even be reused)
                    # or a root that appeared or vanished: watch the roots that exist now.
                    now_roots = _existing_roots(roots)
                    if now_roots != watched or not paths.isdisjoint(watched):
                        log.info(
                            "watch_roots_changed",
                            watched=list(watched),
                            existing=list(now_roots),
                            action="restarting the watch",
                        )
                        break
                else:
                    if not stop_event.is_set():
                        raise RuntimeError("awatch ended without a stop request")
        except Exception as exc:  # the watcher must never end the daemon
            failures += 1
            delay_s = min(backoff_cap_s, backoff_base_s * 2 ** min(failures - 1, _BACKOFF_MAX_EXPONENT))
            log.warning(
                "watcher_failed",
                error=f"{type(exc).__name__}: {exc}",
                attempt=failures,
                retry_in_s=delay_s,
                roots=list(watched),
                action="restarting after backoff; periodic scans continue",
            )
            await _sleep_or_stop(clock, delay_s, stop_event)
    log.info("watcher_stopped")
