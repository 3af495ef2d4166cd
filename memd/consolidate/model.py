"""The model-backed consolidation writer (SPEC §7 "with an LLM configured").

One structured-output request with the consolidation templates: the current ``MEMORY.md``, the
existing skills and the project's trace memories go in; ``{memory_md, skills: [{name, description,
body}]}`` (strict JSON schema, validated with pydantic, parsed leniently) comes out. It plugs into
:func:`memd.consolidate.builtin.consolidate_root` through the writer seam, which stages and swaps
the files.

Skills: the model returns only new or changed skills. :func:`consolidate_root` replaces
``skills/`` with exactly the skills a writer returns, so this writer adds the existing skills the
model left out (read from ``<root>/skills/<name>/SKILL.md``) to its answer: a skill is never lost
because the model did not repeat it. No skills in the answer leaves ``skills/`` untouched.

Usage from the CLI (the seam is synchronous; the client is asynchronous)::

    writer = ModelWriter(client, root=root)
    loop = asyncio.get_running_loop()
    result = await asyncio.to_thread(consolidate_root, root, writer=writer.sync_writer(loop))
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pydantic
import structlog

from memd.consolidate.builtin import (
    SKILL_FILE,
    SKILLS_DIR,
    Consolidated,
    ConsolidationInput,
    MemoryWriter,
    Skill,
    offline_writer,
    parse_skill_file,
    session_date,
)
from memd.consolidate.entries import short_id, strip_marker
from memd.errors import ConsolidationError, ContextLengthError
from memd.extract.contract import cut_middle
from memd.extract.prompts import render
from memd.extract.redact import redact
from memd.llm.budget import TokenEstimator
from memd.llm.client import LLMAnswer, LLMClient
from memd.memory.files import slugify

log = structlog.get_logger(__name__)

SYSTEM_TEMPLATE = "consolidate_system.md.j2"
INPUT_TEMPLATE = "consolidate_input.md.j2"
SCHEMA_NAME = "memory_consolidation"
#: Bytes read of one existing ``SKILL.md``.
SKILL_READ_MAX_BYTES = 64 * 1024
#: No trace is cut below this many bytes when fitting the input budget.
MIN_TRACE_BYTES = 2_048

#: The strict JSON schema of the answer (every property required, no extra properties).
CONSOLIDATION_JSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "memory_md": {"type": "string"},
        "skills": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "description": {"type": "string"},
                    "body": {"type": "string"},
                },
                "required": ["name", "description", "body"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["memory_md", "skills"],
    "additionalProperties": False,
}


class SkillOutput(pydantic.BaseModel):
    """One skill as the model returns it."""

    name: str
    description: str
    body: str


class ConsolidationOutput(pydantic.BaseModel):
    """The model's answer; ``skills`` may be missing (treated as none)."""

    memory_md: str
    skills: list[SkillOutput] = []


_FRAME_TAGS = ("</trace>", "</memory>", "</skill>")


def unframe(text: str) -> str:
    """Neutralise closing ``</trace>``, ``</memory>``, ``</skill>`` tags inside recorded text so
    that it cannot end the element the prompt puts around it (trace text derives from untrusted
    sessions, SPEC §14)."""
    for tag in _FRAME_TAGS:
        if tag in text:
            text = text.replace(tag, "</ " + tag[2:])
    return text


class ModelWriter:
    """Consolidation by one model request.

    Args:
        client: the model client (``phase="consolidate"`` usage records).
        root: the memory root, to read the existing skills (shown to the model and kept when it
            does not replace them). Without it, existing skills are listed by name only and an
            answer with new skills leaves ``skills/`` untouched when writing them would drop one.
        max_input_tokens: budget of the request; trace memories are cut in the middle to fit.
        estimator: bytes-per-token estimate for the budget (bytes/4 when ``None``).
    """

    def __init__(
        self,
        client: LLMClient,
        *,
        root: Path | None = None,
        max_input_tokens: int = 120_000,
        estimator: TokenEstimator | None = None,
    ) -> None:
        self._client = client
        self._root = root
        self._max_input_tokens = max_input_tokens
        self._estimator = estimator or TokenEstimator()

    async def write(self, data: ConsolidationInput) -> Consolidated:
        """Ask the model for the new ``MEMORY.md`` and skills.

        On a context-length error the traces are cut to half the budget and the request is sent
        once more. The answer is redacted (SPEC §14) before it is returned. A root without trace
        memories (all forgotten) sends nothing: the deterministic merge writes its handbook.

        Raises:
            ConsolidationError: the answer does not match the schema or its handbook is empty
                (the previous ``MEMORY.md`` stays).
            ContextLengthError: the input did not fit even at half the budget.
            ModelAuthError, ExtractorError: from the client (credentials, persistent faults).
        """
        if not data.traces:
            log.info("consolidate_without_traces", project=data.project, action="offline merge, no request")
            return offline_writer(data)
        existing = self._read_skills(data.existing_skills)
        budget_bytes = int(self._max_input_tokens * self._estimator.bytes_per_token)
        try:
            answer = await self._ask(data, existing, budget_bytes)
        except ContextLengthError:
            log.warning("consolidate_input_shrunk", project=data.project, budget_bytes=budget_bytes // 2)
            answer = await self._ask(data, existing, budget_bytes // 2)
        try:
            output = ConsolidationOutput.model_validate(answer.data)
        except pydantic.ValidationError as exc:
            raise ConsolidationError(
                f"model answer does not match the consolidation schema ({exc.error_count()} errors)"
            ) from None
        memory_md, _ = redact(output.memory_md.strip())
        if not memory_md:
            raise ConsolidationError("the model returned an empty MEMORY.md; the previous one is kept")
        return Consolidated(memory_md=memory_md + "\n", skills=self._merge_skills(data, existing, output.skills))

    def sync_writer(self, loop: asyncio.AbstractEventLoop) -> MemoryWriter:
        """A synchronous :data:`~memd.consolidate.builtin.MemoryWriter` for a worker thread: each
        call runs :meth:`write` on ``loop`` and waits for it. Calling it on ``loop``'s own thread
        would deadlock and raises ``RuntimeError``."""

        def writer(data: ConsolidationInput) -> Consolidated:
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is loop:
                raise RuntimeError("sync_writer must run in a worker thread (asyncio.to_thread)")
            return asyncio.run_coroutine_threadsafe(self.write(data), loop).result()

        return writer

    async def _ask(self, data: ConsolidationInput, existing: dict[str, Skill], budget_bytes: int) -> LLMAnswer:
        system = render(SYSTEM_TEMPLATE)
        skills_view = [
            {
                "name": slug,
                "text": unframe(cut_middle(f"description: {s.description}\n\n{s.body}", 8_192)),
            }
            for slug, s in existing.items()
        ] or [{"name": name, "text": "(content not available)"} for name in data.existing_skills]
        previous = unframe(cut_middle(strip_marker(data.previous_memory_md), max(MIN_TRACE_BYTES, budget_bytes // 4)))
        fixed = len(system.encode()) + len(previous.encode()) + sum(len(s["text"].encode()) for s in skills_view)
        per_trace = max(MIN_TRACE_BYTES, (budget_bytes - fixed) // max(1, len(data.traces)))
        traces = [
            {
                "file": doc.relpath,
                "session": short_id(doc.header.thread_id),
                "date": session_date(doc) or "undated",
                "new": "true" if data.is_new(doc) else "false",
                "text": unframe(cut_middle(doc.body, per_trace)),
            }
            for doc in data.traces
        ]
        user = render(
            INPUT_TEMPLATE,
            project=data.project,
            previous_memory_md=previous,
            existing_skills=skills_view,
            traces=traces,
        )
        user, _ = redact(user)
        answer = await self._client.complete_json(
            system=system,
            user=user,
            schema_name=SCHEMA_NAME,
            schema=CONSOLIDATION_JSON_SCHEMA,
            phase="consolidate",
        )
        self._estimator.observe(len(system.encode()) + len(user.encode()), answer.input_tokens)
        return answer

    def _read_skills(self, names: Sequence[str]) -> dict[str, Skill]:
        skills: dict[str, Skill] = {}
        if self._root is None:
            return skills
        for name in names:
            path = self._root / SKILLS_DIR / name / SKILL_FILE
            try:
                with open(path, "rb") as fh:
                    text = fh.read(SKILL_READ_MAX_BYTES).decode("utf-8", "replace")
            except OSError as exc:
                log.warning("skill_unreadable", path=str(path), error=type(exc).__name__)
                continue
            skills[name] = parse_skill_file(name, text)
        return skills

    def _merge_skills(
        self, data: ConsolidationInput, existing: dict[str, Skill], proposed: Sequence[SkillOutput]
    ) -> tuple[Skill, ...] | None:
        new: dict[str, Skill] = {}
        for item in proposed:
            name = " ".join(item.name.split())
            body = item.body.strip()
            if not name or not body:
                log.warning("skill_dropped", project=data.project, reason="empty name or body")
                continue
            new[slugify(name)] = Skill(
                name=redact(name)[0],
                description=redact(" ".join(item.description.split()))[0],
                body=redact(body)[0],
            )
        if not new:
            return None
        missing = [name for name in data.existing_skills if name not in new and name not in existing]
        if missing:
            log.warning(
                "skills_not_written",
                project=data.project,
                reason="existing skills unreadable",
                skills=missing,
            )
            return None
        merged = {**existing, **new}
        return tuple(merged[slug] for slug in sorted(merged))
