"""Tests for memd.ingest.watch.watch_roots on real directories (inotify through watchfiles.awatch).

Every wait is bounded with asyncio.wait_for so that a broken watcher fails the test instead of
hanging it. Small debounce/step/root-check values keep the tests fast; no assertion is on time.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from memd.clock import FakeClock
from memd.ingest import watch
from memd.ingest.scan import restat_paths
from memd.ingest.watch import watch_roots

WAIT_S = 10.0
FAST = {"debounce_ms": 50, "step_ms": 10, "root_check_ms": 200}


class RecordingClock(FakeClock):
    """A fake clock that records every sleep and can stop the watcher after N sleeps."""

    def __init__(self, stop_after: int | None = None, stop_event: asyncio.Event | None = None):
        super().__init__()
        self.sleeps: list[float] = []
        self._stop_after = stop_after
        self._stop_event = stop_event

    async def sleep(self, delay_s: float) -> None:
        self.sleeps.append(delay_s)
        if self._stop_event is not None and len(self.sleeps) == self._stop_after:
            self._stop_event.set()
        await super().sleep(delay_s)


async def next_batch(watcher: AsyncIterator[set[str]]) -> set[str]:
    return await asyncio.wait_for(watcher.__anext__(), WAIT_S)


async def batches_until(
    watcher: AsyncIterator[set[str]], done: Callable[[set[str]], bool]
) -> set[str]:
    """Collect batches until ``done(union of paths)``; fail after WAIT_S."""
    seen: set[str] = set()

    async def collect() -> set[str]:
        async for batch in watcher:
            seen.update(batch)
            if done(seen):
                return seen
        raise AssertionError(f"watcher ended; saw {sorted(seen)}")

    try:
        return await asyncio.wait_for(collect(), WAIT_S)
    except TimeoutError:
        raise AssertionError(f"no matching batch within {WAIT_S}s; saw {sorted(seen)}") from None


def rollout(path: Path, data: bytes = b'{"type":"session_meta","payload":{"id":"t"}}\n') -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def stop_event() -> asyncio.Event:
    return asyncio.Event()


@pytest.fixture
async def closing() -> AsyncIterator[list[Any]]:
    """Collects watchers to close at the end of a test."""
    watchers: list[Any] = []
    yield watchers
    for watcher in watchers:
        await asyncio.wait_for(watcher.aclose(), WAIT_S)


async def test_first_batch_is_the_roots_then_new_rollouts(
    tmp_path: Path, stop_event: asyncio.Event, closing: list[Any]
) -> None:
    root = tmp_path / "sessions"
    root.mkdir()
    watcher = watch_roots([root], stop_event=stop_event, **FAST)
    closing.append(watcher)

    assert await next_batch(watcher) == {str(root)}  # the watch is in place: rescan the root

    new = rollout(root / "rollout-a.jsonl")
    (root / "notes.txt").write_text("not a rollout")
    seen = await batches_until(watcher, lambda s: str(new) in s)
    assert str(root / "notes.txt") not in seen


async def test_day_directory_created_after_start_is_reported(
    tmp_path: Path, stop_event: asyncio.Event, closing: list[Any]
) -> None:
    root = tmp_path / "sessions"
    root.mkdir()
    watcher = watch_roots([root], stop_event=stop_event, **FAST)
    closing.append(watcher)
    await next_batch(watcher)

    first = rollout(root / "2026" / "01" / "02" / "rollout-a.jsonl")  # written right after mkdir
    seen = await batches_until(
        watcher, lambda s: str(first) in {f.path for f in restat_paths(s).files})
    assert str(root / "2026") in seen  # the new directory itself: the caller scans it

    second = rollout(root / "2026" / "01" / "02" / "rollout-b.jsonl")  # the new dir is watched
    await batches_until(watcher, lambda s: str(second) in s)


async def test_move_to_archive_reports_the_new_path(
    tmp_path: Path, stop_event: asyncio.Event, closing: list[Any]
) -> None:
    sessions = tmp_path / "sessions"
    archive = tmp_path / "archived_sessions"
    archive.mkdir()
    old = rollout(sessions / "2026" / "01" / "02" / "rollout-a.jsonl")
    watcher = watch_roots([sessions, archive], stop_event=stop_event, **FAST)
    closing.append(watcher)
    assert await next_batch(watcher) == {str(sessions), str(archive)}

    new = archive / old.name
    os.rename(old, new)
    seen = await batches_until(watcher, lambda s: str(new) in s)

    result = restat_paths(seen)
    assert str(new) in {f.path for f in result.files}
    assert str(old) not in {f.path for f in result.files}


async def test_watcher_failure_is_logged_and_restarted_with_backoff(
    tmp_path: Path, stop_event: asyncio.Event, closing: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "sessions"
    root.mkdir()
    real_awatch = watch.awatch
    calls = 0

    def flaky_awatch(*paths: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise OSError(errno.ENOSPC, "OS file watch limit reached")
        return real_awatch(*paths, **kwargs)

    monkeypatch.setattr(watch, "awatch", flaky_awatch)
    clock = RecordingClock()
    watcher = watch_roots([root], stop_event=stop_event, clock=clock,
                          backoff_base_s=0.5, backoff_cap_s=60.0, **FAST)
    closing.append(watcher)

    with capture_logs() as logs:
        assert await next_batch(watcher) == {str(root)}  # restarted: rescan the root
        new = rollout(root / "rollout-a.jsonl")
        await batches_until(watcher, lambda s: str(new) in s)

    failed = [e for e in logs if e["event"] == "watcher_failed"]
    assert [(e["attempt"], e["retry_in_s"]) for e in failed] == [(1, 0.5), (2, 1.0)]
    assert "watch limit" in failed[0]["error"]
    assert clock.sleeps == [0.5, 1.0]
    assert calls == 3


async def test_backoff_doubles_up_to_the_cap(
    tmp_path: Path, stop_event: asyncio.Event, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "sessions"
    root.mkdir()

    def broken_awatch(*paths: Any, **kwargs: Any) -> Any:
        raise RuntimeError("watcher crashed")

    monkeypatch.setattr(watch, "awatch", broken_awatch)
    clock = RecordingClock(stop_after=6, stop_event=stop_event)

    async def drain() -> list[set[str]]:
        return [batch async for batch in watch_roots(
            [root], stop_event=stop_event, clock=clock, backoff_base_s=1.0, backoff_cap_s=4.0)]

    with capture_logs() as logs:
        batches = await asyncio.wait_for(drain(), WAIT_S)  # ends when stop_event is set

    assert batches == []
    assert clock.sleeps == [1.0, 2.0, 4.0, 4.0, 4.0, 4.0]
    assert len([e for e in logs if e["event"] == "watcher_failed"]) == 6


async def test_root_created_later_is_watched(
    tmp_path: Path, stop_event: asyncio.Event, closing: list[Any]
) -> None:
    sessions = tmp_path / "sessions"
    sessions.mkdir()
    archive = tmp_path / "codex" / "archived_sessions"  # neither it nor its parent exists yet
    watcher = watch_roots([sessions, archive], stop_event=stop_event, **FAST)
    closing.append(watcher)
    assert await next_batch(watcher) == {str(sessions)}

    early = rollout(archive / "rollout-a.jsonl")
    seen = await batches_until(watcher, lambda s: str(archive) in s)
    assert str(early) in {f.path for f in restat_paths(seen).files}

    later = rollout(archive / "rollout-b.jsonl")
    await batches_until(watcher, lambda s: str(later) in s)


async def test_root_removed_and_recreated_is_watched_again(
    tmp_path: Path, stop_event: asyncio.Event, closing: list[Any]
) -> None:
    root = tmp_path / "sessions"
    root.mkdir()
    watcher = watch_roots([root], stop_event=stop_event, **FAST)
    closing.append(watcher)
    await next_batch(watcher)

    with capture_logs() as logs:
        shutil.rmtree(root)
        root.mkdir()  # a new directory (its inode may even be reused): the old kernel watch is gone

        async def rewatched() -> None:
            async for batch in watcher:  # the first root batch after a restart: watch in place
                if str(root) in batch and any(e["event"] == "watcher_started" for e in logs):
                    return

        await asyncio.wait_for(rewatched(), WAIT_S)

    assert [e["event"] for e in logs if e["event"].startswith("watch")] == [
        "watch_roots_changed", "watcher_started"]
    new = rollout(root / "rollout-a.jsonl")
    await batches_until(watcher, lambda s: str(new) in s)


async def test_stop_event_ends_the_generator(tmp_path: Path, stop_event: asyncio.Event) -> None:
    root = tmp_path / "sessions"
    root.mkdir()
    watcher = watch_roots([root], stop_event=stop_event, **FAST)
    await next_batch(watcher)

    stop_event.set()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(watcher.__anext__(), WAIT_S)


async def test_cancelling_the_consumer_does_not_set_the_callers_stop_event(
    tmp_path: Path, stop_event: asyncio.Event
) -> None:
    root = tmp_path / "sessions"
    root.mkdir()
    watcher = watch_roots([root], stop_event=stop_event, **FAST)
    await next_batch(watcher)

    pending = asyncio.ensure_future(watcher.__anext__())  # blocked in awatch's thread
    await asyncio.sleep(0.05)
    pending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pending

    assert not stop_event.is_set()
    await asyncio.wait_for(watcher.aclose(), WAIT_S)
