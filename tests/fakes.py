"""Fakes shared by the tests: no test module imports another test module, they import this."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from memd.clock import Clock, ManualClock
from memd.config import Settings
from memd.daemon import Daemon, OnceSummary
from memd.extract.base import BuiltInput, ExtractionRequest, ExtractionResult, Extractor
from memd.extract.job import ExtractJob
from memd.extract.pool import JobPool, JobResult
from memd.faults import FaultLog
from memd.schedule.retry import RetryPolicy
from memd.store.records import JobKind, ThreadRecord
from memd.store.store import Store
from tests import fake_openai as fk

#: A trace memory in the SPEC §6.3 skeleton, as the fake extractors return it.
TRACE = (
    "# Fixed the build\nTrace context: demo, 2026-01-01, codex, gpt\nUser preferences: none observed\n"
    "## Task: fix the build\nOutcome: success\nKey steps: pinned the toolchain.\n"
)

#: Builds a request for a thread without reading its rollout: ``prepare(thread, max_input_tokens)``.
PrepareFn = Callable[[ThreadRecord, int], Awaitable[ExtractionRequest]]


class FixedRequests:
    """A request builder whose requests come from a test function instead of a rollout."""

    def __init__(self, prepare: PrepareFn) -> None:
        self._prepare = prepare

    async def build(self, thread: ThreadRecord, max_input_tokens: int) -> ExtractionRequest:
        return await self._prepare(thread, max_input_tokens)


def extraction_pool(
    store: Store,
    clock: Clock,
    *,
    extractor: Extractor,
    prepare: PrepareFn,
    memory_dir: Path,
    owner: str,
    concurrency: int = 4,
    lease_s: float = 900.0,
    retry: RetryPolicy | None = None,
    max_input_tokens: int = 120_000,
    poll_s: float = 5.0,
    on_done: Callable[[JobResult], None] | None = None,
) -> JobPool:
    """The daemon's extraction pool (a :class:`JobPool` running :class:`ExtractJob`), with the
    requests built by ``prepare``."""
    faults = FaultLog()
    job = ExtractJob(
        store,
        clock,
        extractor=extractor,
        requests=FixedRequests(prepare),  # type: ignore[arg-type]
        memory_dir=memory_dir,
        max_input_tokens=max_input_tokens,
        faults=faults,
    )
    return JobPool(
        store,
        clock,
        kind=JobKind.EXTRACT,
        handler=job,
        owner=owner,
        concurrency=concurrency,
        lease_s=lease_s,
        retry=retry,
        poll_s=poll_s,
        on_done=on_done,
        faults=faults,
    )


async def run_once(settings: Settings, *, start_s: float | None = None) -> OnceSummary:
    """``memd once`` in process on a :class:`ManualClock` (ahead of the rollouts' mtimes by 60 s)
    whose short timers (retry pauses, backoff) pass at once and long ones (heartbeats) wait."""
    clock = ManualClock(time.time() + 60 if start_s is None else start_s)
    jumper = asyncio.create_task(clock.autojump(horizon_s=10.0))
    daemon = await Daemon.open(settings, clock=clock)
    try:
        return await daemon.once()
    finally:
        await daemon.close()
        jumper.cancel()


async def prepare(thread: ThreadRecord, max_input_tokens: int) -> ExtractionRequest:
    """A one-line request for ``thread`` built from its title (no rollout is read): a :data:`PrepareFn`."""
    text = f"user: {thread.title}\n"
    built = BuiltInput(items=(), text=text, raw_json_bytes=len(text), text_bytes=len(text), est_tokens=1)
    return ExtractionRequest(
        thread_id=thread.id,
        project=thread.project,
        cwd=thread.cwd,
        rollout_path=thread.path,
        updated_at=thread.updated_at,
        agent="codex",
        model=thread.model,
        built=built,
        max_input_tokens=max_input_tokens,
    )


class GatedExtractor:
    """Holds every extraction until ``gate`` is set (or for ``hold`` event-loop turns)."""

    name = "gated"

    def __init__(self, *, gated: bool = True, on_start: Callable[[str], Awaitable[None]] | None = None) -> None:
        self.gate = asyncio.Event()
        if not gated:
            self.gate.set()
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.on_start = on_start

    async def extract(self, request: ExtractionRequest) -> ExtractionResult:
        self.started.append(request.thread_id)
        if self.on_start is not None:
            await self.on_start(request.thread_id)
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled.append(request.thread_id)
            raise
        return ExtractionResult(
            trace_memory=TRACE + request.thread_id, summary="pinned the toolchain", extractor=self.name
        )

    async def aclose(self) -> None:
        return None


# --------------------------------------------------------------------------- the fake model server


class RoutedFake(fk.FakeOpenAI):
    """The fake server, plus ``route(body) -> Behaviour | None`` chosen per request body (e.g.
    fail for one thread's marker, answer per thread). ``None`` keeps the queued/default one."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.route: Callable[[dict[str, Any]], fk.Behaviour | None] | None = None

    async def _record(self, request):  # type: ignore[no-untyped-def]
        rec, behaviour = await super()._record(request)
        if self.route is not None and rec.body is not None:
            behaviour = self.route(rec.body) or behaviour
        return rec, behaviour


def trace_answer(marker: str) -> dict[str, str]:
    """A model answer that follows the SPEC §6.3 skeleton and names ``marker``."""
    return {
        "trace_memory": f"# Pinned the toolchain ({marker})\nTrace context: demo, 2026-01-01, codex, gpt\n"
        f"User preferences: none observed\n## Task: fix the build\nOutcome: success\n"
        f"Key steps: pinned the toolchain; `make test` passes. {marker}\n",
        "summary": f"make test passes after pinning the toolchain ({marker}).",
    }


def schema_name(body: dict[str, Any]) -> str:
    """The structured-output schema name (Chat Completions ``response_format``, Responses
    ``text.format``)."""
    if "messages" in body:
        return ((body.get("response_format") or {}).get("json_schema") or {}).get("name", "")
    return ((body.get("text") or {}).get("format") or {}).get("name", "")


def user_content(body: dict[str, Any]) -> str:
    """The user turn: chat ``messages[role=user]``, responses ``input``."""
    if "messages" in body:
        return next(m["content"] for m in body["messages"] if m["role"] == "user")
    return body["input"]


def consolidation_answer(body: dict[str, Any]) -> fk.Behaviour:
    """A consolidation answer (a one-line handbook and one skill) with its token usage."""
    return fk.ok(
        {
            "memory_md": "# Project handbook\n\n- Always pin the toolchain before `make test` (from the model).\n",
            "skills": [
                {
                    "name": "Fix the build",
                    "description": "How the build was fixed",
                    "body": "1. Pin the toolchain.\n2. Run `make test`.",
                }
            ],
        },
        usage=(2000, 300, 0),
    )
