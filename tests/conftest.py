"""Shared fixtures.

Real transcripts live in ``../shared/rollouts`` beside the checkout (never copied into the
repository). Tests that need them use the ``codex_rollouts`` fixture, which skips with a reason
when the folder is absent (a user's clone has no ``../shared``).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_ROLLOUTS = Path(os.environ.get("MEMD_SHARED_ROLLOUTS", REPO_ROOT.parent / "shared" / "rollouts"))
CODEX_ROLLOUTS = SHARED_ROLLOUTS / "codex"

SKIP_REASON = f"real transcripts not available: {CODEX_ROLLOUTS} is absent (they live in ../shared)"


@pytest.fixture
def codex_rollouts() -> Path:
    """The directory of real Codex rollouts; skips the test when it is absent."""
    if not CODEX_ROLLOUTS.is_dir():
        pytest.skip(SKIP_REASON)
    return CODEX_ROLLOUTS


def codex_rollout(name: str) -> Path:
    """Path of one real Codex rollout by file name; skips the calling test when absent."""
    path = CODEX_ROLLOUTS / name
    if not path.is_file():
        pytest.skip(SKIP_REASON)
    return path


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point HOME, CODEX_HOME and the XDG directories at a temporary tree for every test.

    No test may depend on the machine's ``~/.codex`` (SPEC §16), and no test may read an API key
    from the environment of the person running it.
    """
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("CODEX_HOME", str(home / ".codex"))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / ".local" / "share"))
    monkeypatch.setenv("XDG_STATE_HOME", str(home / ".local" / "state"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(home / "run"))
    for var in list(os.environ):
        if var.startswith("MEMD_") and var != "MEMD_SHARED_ROLLOUTS":
            monkeypatch.delenv(var, raising=False)
    for var in (
        "OPENAI_API_KEY",
        "OPENAI_BASE_URL",
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "JOURNAL_STREAM",
        "CLAUDE_CONFIG_DIR",
    ):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(autouse=True)
def _reset_logging():
    """Undo :func:`memd.logging.configure_logging` done by a test (``main()`` configures logging
    globally), so later tests see structlog's defaults and ``capture_logs`` sees debug events."""
    import logging

    import structlog

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.reset_defaults()
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture
def clock():  # type: ignore[no-untyped-def]
    """A :class:`memd.clock.FakeClock` (``manual_clock`` and ``jumping_clock`` are the other clocks; a
    module that needs yet another gives it a name of its own)."""
    from memd.clock import FakeClock

    return FakeClock()


@pytest.fixture
async def jumping_clock():  # type: ignore[no-untyped-def]
    """Makes :class:`memd.clock.ManualClock` objects (``jumping_clock(start_s)``) on which timers
    of up to 10 s (model backoff, ``Retry-After``, retry pauses) pass at once and longer ones (job
    heartbeats, idle polls) wait for the test's ``advance``: for daemon tests whose components
    sleep while a local server or a subprocess takes real time."""
    from memd.clock import ManualClock

    tasks: list[asyncio.Task[None]] = []

    def start(start_s: float) -> ManualClock:
        clock = ManualClock(start_s)
        tasks.append(asyncio.create_task(clock.autojump(horizon_s=10.0)))
        return clock

    yield start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """Where the state database of a test lives."""
    return tmp_path / "state" / "memd.sqlite3"


@pytest.fixture
async def store(db_path: Path, clock):  # type: ignore[no-untyped-def]
    """A :class:`memd.store.store.Store` on ``db_path`` driven by ``clock``."""
    from memd.store.store import Store

    s = await Store.open(db_path, clock=clock)
    yield s
    await s.close()


@pytest.fixture
def manual_clock():  # type: ignore[no-untyped-def]
    """A :class:`memd.clock.ManualClock` at 2026-01-01T00:00:00Z: its sleeps wait for the test's
    ``advance`` (pool and scheduler tests drive lease expiry and heartbeats with it)."""
    from memd.clock import ManualClock

    return ManualClock(1_767_225_600.0)


@pytest.fixture
async def manual_store(db_path: Path, manual_clock):  # type: ignore[no-untyped-def]
    """A :class:`memd.store.store.Store` on ``db_path`` driven by ``manual_clock``."""
    from memd.store.store import Store

    s = await Store.open(db_path, clock=manual_clock)
    yield s
    await s.close()


@pytest.fixture
async def system_store(db_path: Path):  # type: ignore[no-untyped-def]
    """A :class:`memd.store.store.Store` on ``db_path`` driven by the real clock (indexer tests, whose
    rollouts carry real mtimes)."""
    from memd.clock import SystemClock
    from memd.store.store import Store

    s = await Store.open(db_path, clock=SystemClock())
    yield s
    await s.close()


@pytest.fixture
async def store2(store, db_path: Path, clock):  # type: ignore[no-untyped-def]
    """A second connection (another Store) on the same file."""
    from memd.store.store import Store

    s = await Store.open(db_path, clock=clock)
    yield s
    await s.close()


@pytest.fixture
async def server():  # type: ignore[no-untyped-def]
    """A started :class:`tests.fake_openai.FakeOpenAI` on 127.0.0.1 (closed after the test)."""
    from tests import fake_openai

    srv = fake_openai.FakeOpenAI()
    await srv.start()
    yield srv
    await srv.close()
