"""The model client: one JSON answer per call from any OpenAI-compatible server (SPEC §6.4, §13).

Built on the ``openai`` SDK (``AsyncOpenAI``, OpenAI Chat Completions and Responses wire formats,
as served by OpenAI, Ollama, vLLM, llama.cpp and LM Studio). The SDK's own retries are disabled
(``max_retries=0``) and :class:`LLMClient` retries itself, so the number of requests is bounded by
``LLMConfig.max_attempts`` and every retry is one ``llm_retry`` log event:

- 429 → wait ``Retry-After`` (``retry-after-ms``, seconds, or an HTTP date; capped at
  ``backoff_cap_s``), exponential backoff when the header is absent;
- 5xx, 408, 409, timeouts, connection errors, truncated streams → exponential backoff with jitter;
- context-length errors → :class:`~memd.errors.ContextLengthError` at once (the caller shrinks
  the input);
- 401/403 → :class:`~memd.errors.ModelAuthError` at once (no retry: the pool pauses model work);
- any other 4xx → :class:`~memd.errors.ExtractorError` at once;
- an answer that is not JSON, even leniently (fenced JSON, an object inside prose), is asked for
  again **once** (a second bad answer is an :class:`~memd.errors.ExtractorError`): sampling often
  fixes a one-off formatting slip, and a model that cannot follow the schema should not burn the
  whole attempt budget.

Every response that reports usage is recorded through a :class:`UsageSink` (the store), including
answers that then fail to parse. Neither the API key nor any prompt text is ever logged.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import openai
import structlog

from memd.clock import Clock
from memd.errors import ContextLengthError, ExtractorError, ModelAuthError
from memd.jsonish import parse_lenient_json
from memd.llm.errors import (
    RETRYABLE,
    ErrorKind,
    InvalidOutput,
    ResponseFailed,
    StreamTruncated,
    classify_error,
    describe_error,
    retry_after_s,
    safe_url,
)

log = structlog.get_logger(__name__)

#: Placeholder bearer token for local servers that need no key (the SDK refuses an empty key).
NO_KEY = "no-key"


@dataclass(frozen=True, slots=True)
class LLMConfig:
    """How to reach the model (SPEC §9 ``[llm]``).

    Attributes:
        api: ``chat`` (Chat Completions, ``response_format`` json_schema) or ``responses``
            (Responses API, ``text.format`` json_schema, ``store=False``).
        base_url: e.g. ``http://127.0.0.1:8080/v1``; ``None`` = the SDK default (OpenAI).
        model: model name sent with every request.
        api_key: the key as plain text (the caller unwraps the ``SecretStr``); ``""`` for local
            servers without authentication. Never logged; excluded from ``repr``.
        timeout_s: the SDK timeout per request (connect, and each read: for a stream, the gap
            between two chunks).
        reasoning_effort: ``minimal``/``low``/``medium``/``high`` or ``None`` (not sent).
        max_attempts: requests per call, at most (the first one included).
        backoff_base_s: first backoff delay; doubles per attempt.
        backoff_cap_s: cap of one backoff delay and of an honoured ``Retry-After``.
        stream: ask for SSE streaming and assemble the text.
    """

    api: Literal["chat", "responses"]
    base_url: str | None
    model: str
    api_key: str
    timeout_s: float
    reasoning_effort: str | None = None
    max_attempts: int = 4
    backoff_base_s: float = 2.0
    backoff_cap_s: float = 60.0
    stream: bool = False

    def __repr__(self) -> str:
        return (
            f"LLMConfig(api={self.api!r}, base_url={self.base_url!r}, model={self.model!r}, "
            f"api_key=***, timeout_s={self.timeout_s!r}, "
            f"reasoning_effort={self.reasoning_effort!r}, "
            f"max_attempts={self.max_attempts!r}, stream={self.stream!r})"
        )


@dataclass(frozen=True, slots=True)
class LLMAnswer:
    """One parsed answer.

    Attributes:
        data: the JSON object the model returned.
        raw_text: the model's text as received.
        input_tokens / output_tokens / cached_tokens: usage of the request that produced this
            answer (0 when the server reported none).
        model: the model name the server reported (else the configured one).
        requests: how many HTTP requests this call made (1 when nothing was retried).
    """

    data: dict[str, Any]
    raw_text: str
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    model: str
    requests: int = 1


class UsageSink(Protocol):
    """Where token usage goes (the store's ``usage`` table, SPEC §5)."""

    async def record_usage(
        self, phase: str, model: str, input_tokens: int, output_tokens: int, cached_tokens: int
    ) -> None:
        """Record one request's usage; ``phase`` is ``extract`` or ``consolidate``."""
        ...


@dataclass(slots=True)
class _Raw:
    text: str
    model: str
    usage: tuple[int, int, int] | None


def _tokens(value: Any) -> int:
    return value if isinstance(value, int) and value > 0 else 0


def _usage_of(usage: Any, input_key: str, output_key: str, details_key: str) -> tuple[int, int, int] | None:
    """``(input, output, cached)`` tokens of an SDK usage object, ``None`` when there is none."""
    if usage is None:
        return None
    details = getattr(usage, details_key, None)
    return (
        _tokens(getattr(usage, input_key, 0)),
        _tokens(getattr(usage, output_key, 0)),
        _tokens(getattr(details, "cached_tokens", 0)) if details is not None else 0,
    )


def _chat_usage(usage: Any) -> tuple[int, int, int] | None:
    """Chat Completions usage: ``prompt_tokens``, ``completion_tokens``, ``prompt_tokens_details``."""
    return _usage_of(usage, "prompt_tokens", "completion_tokens", "prompt_tokens_details")


def _responses_usage(usage: Any) -> tuple[int, int, int] | None:
    """Responses API usage: ``input_tokens``, ``output_tokens``, ``input_tokens_details``."""
    return _usage_of(usage, "input_tokens", "output_tokens", "input_tokens_details")


def parse_answer(text: str) -> dict[str, Any] | None:
    """The JSON object in a model's answer: strict JSON first, then lenient (fenced JSON, an object
    embedded in prose, via :func:`memd.jsonish.parse_lenient_json`). ``None`` if none."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if isinstance(value, dict):
        return value
    return parse_lenient_json(text)


def make_openai(config: LLMConfig, timeout_s: float) -> openai.AsyncOpenAI:
    """The OpenAI SDK client for ``config``'s endpoint: one request at most ``timeout_s`` seconds,
    no SDK retries (:class:`LLMClient` retries itself, observably). Without a key it sends a
    placeholder (a local server needs none)."""
    return openai.AsyncOpenAI(
        api_key=config.api_key or NO_KEY,
        base_url=config.base_url,
        timeout=timeout_s,
        max_retries=0,
    )


class LLMClient:
    """Structured-output requests with bounded, observable retries.

    Args:
        config: endpoint, model, timeouts and retry policy.
        usage: where each response's token usage is recorded; ``None`` records nothing.
        clock: used for every backoff sleep (a ``FakeClock`` makes retries instant in tests).
        rng: source of backoff jitter (seeded in tests).
    """

    def __init__(
        self,
        config: LLMConfig,
        *,
        usage: UsageSink | None,
        clock: Clock,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self._usage = usage
        self._clock = clock
        self._rng = rng or random.Random()
        self._openai: openai.AsyncOpenAI | None = make_openai(config, config.timeout_s)

    async def aclose(self) -> None:
        """Close the HTTP connection pool. Idempotent."""
        client, self._openai = self._openai, None
        if client is not None:
            await client.close()

    async def complete_json(
        self, *, system: str, user: str, schema_name: str, schema: dict[str, Any], phase: str
    ) -> LLMAnswer:
        """Ask for one JSON object that follows ``schema`` (strict json_schema structured output).

        Args:
            system: the system prompt (chat ``system`` message; responses ``instructions``).
            user: the user turn (chat ``user`` message; responses ``input``).
            schema_name: the schema's name (``^[a-zA-Z0-9_-]+$``).
            schema: a JSON schema valid for strict mode (every property required,
                ``additionalProperties: false``).
            phase: ``extract`` or ``consolidate``; labels usage records and logs.

        Returns:
            The parsed answer with the usage of the request that produced it.

        Raises:
            ContextLengthError: the server said the input is longer than its context window.
            ModelAuthError: 401/403: credentials rejected.
            ExtractorError: any other 4xx, a second answer without JSON, or retryable faults
                that persisted for ``max_attempts`` requests.
        """
        if self._openai is None:
            raise ExtractorError("the model client is closed")
        cfg = self.config
        invalid_answers = 0
        attempt = 0
        while True:
            attempt += 1
            try:
                raw = await self._request(system, user, schema_name, schema)
                if raw.usage is not None:
                    await self._record_usage(phase, raw)
                data = parse_answer(raw.text)
                if data is None:
                    raise InvalidOutput(f"no JSON object in the answer ({len(raw.text)} chars)")
            except (
                openai.OpenAIError,
                StreamTruncated,
                ResponseFailed,
                InvalidOutput,
                json.JSONDecodeError,
            ) as exc:
                kind = classify_error(exc)
                status = getattr(exc, "status_code", None)
                if kind is ErrorKind.CONTEXT_LENGTH:
                    log.warning(
                        "llm_context_length",
                        phase=phase,
                        model=cfg.model,
                        attempt=attempt,
                        status=status,
                    )
                    raise ContextLengthError(
                        f"input longer than the model's context window: {describe_error(exc)}"
                    ) from exc
                if kind is ErrorKind.AUTH:
                    # A warning: the caller reports the one clear error (the pool pauses all
                    # model work; `memd consolidate` exits with the message).
                    log.warning(
                        "llm_auth_failed",
                        phase=phase,
                        model=cfg.model,
                        status=status,
                        base_url=safe_url(cfg.base_url),
                        next="model work pauses until the credentials are fixed",
                    )
                    raise ModelAuthError(
                        f"the model endpoint rejected the credentials (HTTP {status}); "
                        "check llm.api_key / OPENAI_API_KEY"
                    ) from exc
                if kind is ErrorKind.INVALID_OUTPUT:
                    invalid_answers += 1
                    if invalid_answers > 1 or attempt >= cfg.max_attempts:
                        log.warning("llm_invalid_output", phase=phase, model=cfg.model, attempt=attempt)
                        raise ExtractorError(f"invalid JSON from the model after {attempt} requests: {exc}") from exc
                    log.warning(
                        "llm_retry",
                        phase=phase,
                        model=cfg.model,
                        attempt=attempt,
                        kind=kind.value,
                        status=None,
                        wait_s=0.0,
                    )
                    continue
                if kind not in RETRYABLE:
                    log.warning(
                        "llm_request_rejected",
                        phase=phase,
                        model=cfg.model,
                        attempt=attempt,
                        kind=kind.value,
                        status=status,
                    )
                    raise ExtractorError(f"model request rejected: {describe_error(exc)}") from exc
                if attempt >= cfg.max_attempts:
                    log.warning(
                        "llm_gave_up",
                        phase=phase,
                        model=cfg.model,
                        attempt=attempt,
                        kind=kind.value,
                        status=status,
                    )
                    raise ExtractorError(
                        f"model request failed after {attempt} attempts ({kind.value}): {describe_error(exc)}"
                    ) from exc
                wait_s = self._wait_s(kind, exc, attempt)
                log.warning(
                    "llm_retry",
                    phase=phase,
                    model=cfg.model,
                    attempt=attempt,
                    kind=kind.value,
                    status=status,
                    wait_s=round(wait_s, 3),
                )
                await self._clock.sleep(wait_s)
                continue
            in_t, out_t, cached_t = raw.usage or (0, 0, 0)
            return LLMAnswer(
                data=data,
                raw_text=raw.text,
                input_tokens=in_t,
                output_tokens=out_t,
                cached_tokens=cached_t,
                model=raw.model,
                requests=attempt,
            )

    def _wait_s(self, kind: ErrorKind, exc: BaseException, attempt: int) -> float:
        cfg = self.config
        if kind is ErrorKind.RATE_LIMITED:
            response = getattr(exc, "response", None)
            hinted = retry_after_s(getattr(response, "headers", None), self._clock.now())
            if hinted is not None:
                return min(hinted, cfg.backoff_cap_s)
        delay = float(min(cfg.backoff_cap_s, cfg.backoff_base_s * 2.0 ** (attempt - 1)))
        # Equal jitter: at least half the delay, so retries never bunch up at zero.
        return delay / 2 + self._rng.uniform(0, delay / 2)

    def _live(self) -> openai.AsyncOpenAI:
        if self._openai is None:
            raise ExtractorError("the model client is closed")
        return self._openai

    async def _record_usage(self, phase: str, raw: _Raw) -> None:
        if self._usage is None or raw.usage is None:
            return
        in_t, out_t, cached_t = raw.usage
        try:
            await self._usage.record_usage(
                phase=phase,
                model=raw.model,
                input_tokens=in_t,
                output_tokens=out_t,
                cached_tokens=cached_t,
            )
        except Exception as exc:  # noqa: BLE001 - a lost usage row must not lose a paid answer
            log.warning("usage_record_failed", phase=phase, error=type(exc).__name__)

    async def _request(self, system: str, user: str, schema_name: str, schema: dict[str, Any]) -> _Raw:
        openai_client = self._live()
        cfg = self.config
        if cfg.api == "responses":
            kwargs: dict[str, Any] = {
                "model": cfg.model,
                "instructions": system,
                "input": user,
                "store": False,
                "text": {
                    "format": {
                        "type": "json_schema",
                        "name": schema_name,
                        "schema": schema,
                        "strict": True,
                    }
                },
            }
            if cfg.reasoning_effort:
                kwargs["reasoning"] = {"effort": cfg.reasoning_effort}
            if cfg.stream:
                return await self._responses_stream(kwargs)
            resp = await openai_client.responses.create(**kwargs)
            status = getattr(resp, "status", None)
            if status == "failed":
                error = getattr(resp, "error", None)
                raise ResponseFailed(getattr(error, "code", None), getattr(error, "message", "") or "response failed")
            return _Raw(
                resp.output_text,
                getattr(resp, "model", None) or cfg.model,
                _responses_usage(getattr(resp, "usage", None)),
            )

        kwargs = {
            "model": cfg.model,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": schema_name, "schema": schema, "strict": True},
            },
        }
        if cfg.reasoning_effort:
            kwargs["reasoning_effort"] = cfg.reasoning_effort
        if cfg.stream:
            return await self._chat_stream(kwargs)
        completion = await openai_client.chat.completions.create(**kwargs)
        choices = getattr(completion, "choices", None) or []
        if not choices:
            raise InvalidOutput("the answer has no choices")
        message = choices[0].message
        content = getattr(message, "content", None)
        if content is None:
            refusal = getattr(message, "refusal", None)
            raise InvalidOutput("the model refused" if refusal else "the answer has no content")
        return _Raw(
            content,
            getattr(completion, "model", None) or cfg.model,
            _chat_usage(getattr(completion, "usage", None)),
        )

    async def _chat_stream(self, kwargs: dict[str, Any]) -> _Raw:
        openai_client = self._live()
        stream = await openai_client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
        parts: list[str] = []
        finish: str | None = None
        usage: tuple[int, int, int] | None = None
        model = self.config.model
        async with stream:
            async for chunk in stream:
                model = getattr(chunk, "model", None) or model
                if getattr(chunk, "usage", None) is not None:
                    usage = _chat_usage(chunk.usage)
                for choice in getattr(chunk, "choices", None) or []:
                    delta = getattr(choice, "delta", None)
                    piece = getattr(delta, "content", None) if delta is not None else None
                    if piece:
                        parts.append(piece)
                    if getattr(choice, "finish_reason", None):
                        finish = choice.finish_reason
        if finish is None:
            raise StreamTruncated(f"chat stream ended without a finish_reason after {len(parts)} chunks")
        return _Raw("".join(parts), model, usage)

    async def _responses_stream(self, kwargs: dict[str, Any]) -> _Raw:
        openai_client = self._live()
        stream = await openai_client.responses.create(**kwargs, stream=True)
        parts: list[str] = []
        final: Any = None
        async with stream:
            async for event in stream:
                kind = getattr(event, "type", None)
                if kind == "response.output_text.delta":
                    parts.append(getattr(event, "delta", "") or "")
                elif kind in ("response.completed", "response.incomplete"):
                    final = event.response
                elif kind == "response.failed":
                    error = getattr(event.response, "error", None)
                    raise ResponseFailed(getattr(error, "code", None), getattr(error, "message", "") or "failed")
                elif kind == "error":
                    raise ResponseFailed(getattr(event, "code", None), getattr(event, "message", "") or "error")
        if final is None:
            raise StreamTruncated(f"responses stream ended without response.completed after {len(parts)} deltas")
        text = final.output_text or "".join(parts)
        return _Raw(
            text,
            getattr(final, "model", None) or self.config.model,
            _responses_usage(getattr(final, "usage", None)),
        )
