"""The model extractor: one structured-output request per session (SPEC §6.4 ``openai``).

Renders the phase-1 templates around the already filtered and redacted session text
(``request.built.text``; nothing else from the session is sent), asks the model for the strict JSON
schema of :data:`memd.extract.contract.TRACE_OUTPUT_JSON_SCHEMA`, and validates the answer with
:class:`memd.extract.contract.TraceOutput`. Normalisation (skeleton check, redaction of the output,
caps) is the caller's job.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

import pydantic
import structlog

from memd.clock import iso_utc
from memd.errors import ContextLengthError, ExtractorError
from memd.extract.base import BuiltInput, ExtractionRequest, ExtractionResult
from memd.extract.contract import TRACE_OUTPUT_JSON_SCHEMA, TraceOutput
from memd.extract.prompts import render
from memd.llm.budget import DailyBudget, TokenEstimator
from memd.llm.client import LLMAnswer, LLMClient

log = structlog.get_logger(__name__)

#: Rebuilds a request's input for a smaller token budget: ``(request, max_input_tokens) ->
#: BuiltInput`` (sync or async), e.g. by refitting ``request.built.items``.
RebuildFn = Callable[[ExtractionRequest, int], BuiltInput | Awaitable[BuiltInput]]

SYSTEM_TEMPLATE = "extract_system.md.j2"
INPUT_TEMPLATE = "extract_input.md.j2"
SCHEMA_NAME = "trace_memory"


def frame_session(text: str) -> str:
    """Neutralise a closing ``</session>`` inside session text so that it cannot end the frame the
    prompt puts around it (the text is untrusted, SPEC §14)."""
    return text.replace("</session>", "</ session>").replace("</SESSION>", "</ SESSION>")


def render_prompt(request: ExtractionRequest, built: BuiltInput) -> tuple[str, str]:
    """The ``(system, user)`` messages sent for ``request`` with the session input ``built``.

    The user message frames ``built.text`` (already filtered and redacted) as evidence between
    ``<session>`` tags, after the thread's project, cwd, rollout path, date, agent and model.
    """
    system = render(SYSTEM_TEMPLATE)
    user = render(
        INPUT_TEMPLATE,
        project=request.project,
        cwd=request.cwd,
        rollout_path=request.rollout_path,
        date=iso_utc(request.started_at or request.updated_at),
        agent=request.agent,
        model=request.model,
        omitted_items=built.omitted_items,
        session=frame_session(built.text),
    )
    return system, user


class OpenAIExtractor:
    """The :class:`~memd.extract.base.Extractor` backed by an OpenAI-compatible model.

    Args:
        client: the model client (owns the HTTP pool; closed by :meth:`aclose`).
        estimator: bytes-per-token estimate, calibrated here from the prompt tokens the server
            reports (the caller persists it).
        budget: the daily token budget, checked before every request; ``None`` = unlimited.
        rebuild: how to shrink an input after a context-length error; ``None`` = such an error
            is raised as is.

    ``name`` is the model name (stored as the memory's extractor).
    """

    def __init__(
        self,
        client: LLMClient,
        *,
        estimator: TokenEstimator,
        budget: DailyBudget | None = None,
        rebuild: RebuildFn | None = None,
    ) -> None:
        self._client = client
        self._estimator = estimator
        self._budget = budget
        self._rebuild = rebuild
        self.name = client.config.model

    async def extract(self, request: ExtractionRequest) -> ExtractionResult:
        """Return the model's trace memory and summary for ``request``.

        On a context-length error the input is rebuilt once for half of the smaller of
        ``request.max_input_tokens`` and the estimated size of what was sent, and sent again.

        Raises:
            BudgetExhausted: the daily budget is spent (checked before each request).
            ContextLengthError: the input did not fit even at half the budget, or no ``rebuild``.
            ModelAuthError: credentials rejected.
            ExtractorError: the request failed after its retries, or the answer does not match the
                output schema.
        """
        built = request.built
        notes: dict[str, str] = {"api": self._client.config.api}
        try:
            answer = await self._ask(request, built)
        except ContextLengthError:
            if self._rebuild is None:
                raise
            sent_tokens = self._estimator.estimate(built.text_bytes)
            smaller_tokens = max(1, min(request.max_input_tokens, sent_tokens) // 2)
            rebuilt = self._rebuild(request, smaller_tokens)
            if inspect.isawaitable(rebuilt):
                rebuilt = await rebuilt
            built = rebuilt
            log.warning(
                "extract_input_shrunk",
                thread_id=request.thread_id,
                max_input_tokens=smaller_tokens,
                text_bytes=built.text_bytes,
                omitted_items=built.omitted_items,
            )
            notes["input_shrunk_to_tokens"] = str(smaller_tokens)
            answer = await self._ask(request, built)
        try:
            output = TraceOutput.model_validate(answer.data)
        except pydantic.ValidationError as exc:
            raise ExtractorError(
                f"model answer does not match the trace output schema ({exc.error_count()} errors)"
            ) from None
        notes["requests"] = str(answer.requests)
        if answer.model != self.name:
            notes["served_model"] = answer.model
        return ExtractionResult(
            trace_memory=output.trace_memory,
            summary=output.summary,
            extractor=self.name,
            tokens_in=answer.input_tokens,
            tokens_out=answer.output_tokens,
            tokens_cached=answer.cached_tokens,
            notes=notes,
        )

    async def _ask(self, request: ExtractionRequest, built: BuiltInput) -> LLMAnswer:
        if self._budget is not None:
            await self._budget.check()
        system, user = render_prompt(request, built)
        answer = await self._client.complete_json(
            system=system,
            user=user,
            schema_name=SCHEMA_NAME,
            schema=TRACE_OUTPUT_JSON_SCHEMA,
            phase="extract",
        )
        self._estimator.observe(len(system.encode()) + len(user.encode()), answer.input_tokens)
        return answer

    async def aclose(self) -> None:
        """Close the model client. Idempotent."""
        await self._client.aclose()
