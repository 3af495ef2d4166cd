"""A real HTTP server on 127.0.0.1 that speaks enough of the OpenAI APIs for memd's tests.

The ``openai`` SDK (≥ 3, built on httpx2) cannot be intercepted by respx, so the LLM path is tested
end to end against this aiohttp server (SPEC §16). It implements:

- ``POST /v1/chat/completions`` — Chat Completions, JSON or SSE (``stream: true``; the usage
  arrives in a final chunk with empty ``choices`` when ``stream_options.include_usage`` is set,
  then ``data: [DONE]``), OpenAI Chat Completions wire format.
- ``POST /v1/responses`` — Responses API, JSON or SSE (``response.created``,
  ``response.output_text.delta`` ..., ``response.completed`` carrying the usage), OpenAI
  Responses wire format.
- ``GET /v1/models`` — the model list.

Every request is recorded (:attr:`FakeOpenAI.requests`). What the server answers is scripted: each
request pops the next :class:`Behaviour` from the queue (:meth:`FakeOpenAI.enqueue`); when the queue
is empty :attr:`FakeOpenAI.default` answers. The constructors below build the behaviours the fault
tests need (429 with ``Retry-After``, 500, a hang, malformed or fenced JSON, a truncated stream,
context-length errors in the OpenAI and llama.cpp shapes, 401).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass(frozen=True)
class Behaviour:
    """One scripted answer.

    Attributes:
        kind: ``ok`` (200 with ``content`` as the model's text), ``error`` (``status`` with
            ``body`` as JSON and ``headers``), ``hang`` (wait ``hang_s`` or until the server closes,
            then answer like ``ok``), ``truncated`` (a stream that sends half of ``content`` and
            ends cleanly without a finish chunk, ``[DONE]`` or ``response.completed``; a non-stream
            request gets half of the JSON body), ``failed`` (an error inside a 200 answer: a
            Responses object with ``status: failed``, a ``response.failed`` stream event, or a
            chat stream chunk ``{"error": ...}`` after half of ``content``; ``body`` is the error
            object ``{code, message}``).
        content: the model's answer text (for ``ok``, ``hang``, ``truncated``, ``failed``).
        status: HTTP status for ``error``.
        body: JSON body for ``error``.
        headers: extra response headers (e.g. ``Retry-After``).
        usage: ``(prompt_tokens, completion_tokens, cached_tokens)``; ``None`` computes prompt
            tokens from the request's text bytes (``FakeOpenAI.bytes_per_token``).
        send_usage: ``False`` omits the usage object altogether (some servers do).
        hang_s: how long ``hang`` waits.
    """

    kind: str
    content: str = ""
    status: int = 200
    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    usage: tuple[int, int, int] | None = None
    send_usage: bool = True
    hang_s: float = 60.0


def ok(data: dict[str, Any] | str, *, usage: tuple[int, int, int] | None = None) -> Behaviour:
    """A 200 answer whose content is ``data`` as JSON (or the string as given)."""
    content = data if isinstance(data, str) else json.dumps(data)
    return Behaviour("ok", content=content, usage=usage)


def fenced(data: dict[str, Any]) -> Behaviour:
    """A 200 answer with the JSON inside a markdown fence, after a line of prose."""
    return Behaviour("ok", content="Here is the result:\n```json\n" + json.dumps(data) + "\n```\n")


def malformed() -> Behaviour:
    """A 200 answer whose content is not JSON at all."""
    return Behaviour("ok", content="I could not decide; the session was about {unbalanced")


def rate_limited(retry_after: str | None = "7") -> Behaviour:
    """A 429 with ``Retry-After`` (seconds or an HTTP date; ``None`` omits the header)."""
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    body = {
        "error": {
            "message": "Rate limit reached",
            "type": "requests",
            "code": "rate_limit_exceeded",
        }
    }
    return Behaviour("error", status=429, body=body, headers=headers)


def server_error(status: int = 500) -> Behaviour:
    """A 5xx with an OpenAI-shaped error body."""
    body = {"error": {"message": "The server had an error", "type": "server_error", "code": None}}
    return Behaviour("error", status=status, body=body)


def unauthorized() -> Behaviour:
    """A 401 as OpenAI sends it for a bad key."""
    body = {
        "error": {
            "message": "Incorrect API key provided.",
            "type": "invalid_request_error",
            "code": "invalid_api_key",
        }
    }
    return Behaviour("error", status=401, body=body)


def context_length_openai() -> Behaviour:
    """OpenAI's 400 for an input longer than the context window."""
    body = {
        "error": {
            "message": "This model's maximum context length is 128000 tokens. However, your "
            "messages resulted in 190000 tokens. Please reduce the length of the messages.",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }
    }
    return Behaviour("error", status=400, body=body)


def context_length_llamacpp() -> Behaviour:
    """llama.cpp server's 400 for an input longer than its context size."""
    body = {
        "error": {
            "code": 400,
            "message": "the request exceeds the available context size, try increasing it",
            "type": "exceed_context_size_error",
            "n_prompt_tokens": 9000,
            "n_ctx": 8192,
        }
    }
    return Behaviour("error", status=400, body=body)


def bad_request(message: str = "Invalid schema for response_format") -> Behaviour:
    """A plain 400 that is not about the context length."""
    body = {"error": {"message": message, "type": "invalid_request_error", "code": None}}
    return Behaviour("error", status=400, body=body)


def hang(content: dict[str, Any] | None = None, hang_s: float = 60.0) -> Behaviour:
    """Sleep longer than any client timeout used in tests, then answer."""
    return Behaviour("hang", content=json.dumps(content or {}), hang_s=hang_s)


def truncated(data: dict[str, Any]) -> Behaviour:
    """A stream that stops half-way without a terminal event."""
    return Behaviour("truncated", content=json.dumps(data))


def failed(code: str = "server_error", message: str = "The model is overloaded") -> Behaviour:
    """An error reported inside a 200 answer (not supported for non-stream chat)."""
    return Behaviour(
        "failed", content='{"answer": "partial', body={"code": code, "message": message}
    )


@dataclass
class RecordedRequest:
    """One request as the server saw it: method, path, headers and the parsed JSON body."""

    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any] | None


DEFAULT_ANSWER = {"trace_memory": "", "summary": ""}


class FakeOpenAI:
    """The server. ``await start()`` returns the base URL (``http://127.0.0.1:<port>/v1``).

    Args:
        model: the model name ``GET /v1/models`` lists.
        bytes_per_token: how computed prompt tokens relate to the request's text bytes.
        latency_s: a fixed delay before every answer (for throughput measurements).
    """

    def __init__(
        self, *, model: str = "fake-model", bytes_per_token: float = 4.0, latency_s: float = 0.0
    ) -> None:
        self.model = model
        self.latency_s = latency_s
        self.bytes_per_token = bytes_per_token
        self.requests: list[RecordedRequest] = []
        self.queue: deque[Behaviour] = deque()
        self.default: Behaviour = ok(DEFAULT_ANSWER)
        self.base_url = ""
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._counter = 0

    def enqueue(self, *behaviours: Behaviour) -> None:
        """Append behaviours; each request consumes one."""
        self.queue.extend(behaviours)

    def bodies(self, path_suffix: str = "") -> list[dict[str, Any]]:
        """The JSON bodies of the recorded requests whose path ends with ``path_suffix``."""
        return [r.body or {} for r in self.requests if r.path.endswith(path_suffix)]

    async def start(self) -> str:
        """Bind to 127.0.0.1 on a free port and return the base URL."""
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/responses", self._responses)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return self.base_url

    async def close(self) -> None:
        """Release hanging handlers and stop the server."""
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- plumbing -----------------------------------------------------------------------------

    async def _record(self, request: web.Request) -> tuple[RecordedRequest, Behaviour]:
        body: dict[str, Any] | None = None
        if request.can_read_body:
            raw = await request.read()
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
        rec = RecordedRequest(request.method, request.path, dict(request.headers), body)
        self.requests.append(rec)
        behaviour = self.queue.popleft() if self.queue else self.default
        if self.latency_s > 0:
            await asyncio.sleep(self.latency_s)
        if behaviour.kind == "hang":
            try:
                await asyncio.wait_for(self._closing.wait(), timeout=behaviour.hang_s)
            except TimeoutError:
                pass
        return rec, behaviour

    def _usage(self, behaviour: Behaviour, body: dict[str, Any]) -> tuple[int, int, int]:
        if behaviour.usage is not None:
            return behaviour.usage
        text_bytes = len(_input_text(body).encode())
        prompt = max(1, round(text_bytes / self.bytes_per_token))
        completion = max(1, round(len(behaviour.content.encode()) / 4))
        return prompt, completion, 0

    def _next_id(self, prefix: str) -> str:
        self._counter += 1
        return f"{prefix}_{self._counter}"

    @staticmethod
    def _error(behaviour: Behaviour) -> web.Response:
        return web.json_response(
            behaviour.body or {}, status=behaviour.status, headers=behaviour.headers
        )

    # -- GET /v1/models -----------------------------------------------------------------------

    async def _models(self, request: web.Request) -> web.StreamResponse:
        _, behaviour = await self._record(request)
        if behaviour.kind == "error":
            return self._error(behaviour)
        data = [{"id": self.model, "object": "model", "created": 0, "owned_by": "fake"}]
        return web.json_response({"object": "list", "data": data})

    # -- POST /v1/chat/completions ------------------------------------------------------------

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        rec, behaviour = await self._record(request)
        if behaviour.kind == "error":
            return self._error(behaviour)
        body = rec.body or {}
        prompt, completion, cached = self._usage(behaviour, body)
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }
        cid = self._next_id("chatcmpl")
        created = int(time.time())
        model = body.get("model", self.model)
        if not body.get("stream"):
            if behaviour.kind == "failed":
                raise NotImplementedError("no in-band failure for non-stream chat")
            payload: dict[str, Any] = {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": behaviour.content,
                            "refusal": None,
                        },
                        "finish_reason": "stop",
                        "logprobs": None,
                    }
                ],
            }
            if behaviour.send_usage:
                payload["usage"] = usage
            if behaviour.kind == "truncated":
                text = json.dumps(payload)
                return web.Response(text=text[: len(text) // 2], content_type="application/json")
            return web.json_response(payload)

        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)

        def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            return {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [
                    {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
                ],
            }

        await _sse(resp, chunk({"role": "assistant", "content": ""}, None))
        pieces = _split(behaviour.content)
        if behaviour.kind in ("truncated", "failed"):
            pieces = pieces[: max(1, len(pieces) // 2)]
        for piece in pieces:
            await _sse(resp, chunk({"content": piece}, None))
        if behaviour.kind == "failed":
            await _sse(resp, {"error": {**(behaviour.body or {}), "type": "server_error"}})
        elif behaviour.kind != "truncated":
            await _sse(resp, chunk({}, "stop"))
            include_usage = (body.get("stream_options") or {}).get("include_usage")
            if include_usage and behaviour.send_usage:
                final = {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": usage,
                }
                await _sse(resp, final)
            await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    # -- POST /v1/responses -------------------------------------------------------------------

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        rec, behaviour = await self._record(request)
        if behaviour.kind == "error":
            return self._error(behaviour)
        body = rec.body or {}
        prompt, completion, cached = self._usage(behaviour, body)
        usage = {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion,
        }
        rid = self._next_id("resp")
        mid = self._next_id("msg")
        model = body.get("model", self.model)

        def response_obj(status: str, text: str | None) -> dict[str, Any]:
            output = []
            if text is not None:
                output = [
                    {
                        "type": "message",
                        "id": mid,
                        "status": "completed",
                        "role": "assistant",
                        "content": [{"type": "output_text", "text": text, "annotations": []}],
                    }
                ]
            obj: dict[str, Any] = {
                "id": rid,
                "object": "response",
                "created_at": int(time.time()),
                "status": status,
                "model": model,
                "output": output,
                "error": behaviour.body if status == "failed" else None,
                "incomplete_details": None,
                "parallel_tool_calls": True,
                "tool_choice": "auto",
                "tools": [],
            }
            if status == "completed" and behaviour.send_usage:
                obj["usage"] = usage
            return obj

        if not body.get("stream"):
            if behaviour.kind == "failed":
                return web.json_response(response_obj("failed", None))
            payload = response_obj("completed", behaviour.content)
            if behaviour.kind == "truncated":
                text = json.dumps(payload)
                return web.Response(text=text[: len(text) // 2], content_type="application/json")
            return web.json_response(payload)

        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        seq = 0

        async def event(kind: str, data: dict[str, Any]) -> None:
            nonlocal seq
            data = {"type": kind, "sequence_number": seq, **data}
            seq += 1
            await resp.write(f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode())

        await event("response.created", {"response": response_obj("in_progress", None)})
        item = {
            "type": "message",
            "id": mid,
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        await event("response.output_item.added", {"output_index": 0, "item": item})
        pieces = _split(behaviour.content)
        if behaviour.kind in ("truncated", "failed"):
            pieces = pieces[: max(1, len(pieces) // 2)]
        for piece in pieces:
            await event(
                "response.output_text.delta",
                {
                    "item_id": mid,
                    "output_index": 0,
                    "content_index": 0,
                    "delta": piece,
                    "logprobs": [],
                },
            )
        if behaviour.kind == "failed":
            await event("response.failed", {"response": response_obj("failed", None)})
        elif behaviour.kind != "truncated":
            await event(
                "response.output_text.done",
                {
                    "item_id": mid,
                    "output_index": 0,
                    "content_index": 0,
                    "text": behaviour.content,
                    "logprobs": [],
                },
            )
            await event(
                "response.completed", {"response": response_obj("completed", behaviour.content)}
            )
        await resp.write_eof()
        return resp


async def _sse(resp: web.StreamResponse, data: dict[str, Any]) -> None:
    await resp.write(f"data: {json.dumps(data)}\n\n".encode())


def _split(text: str, size: int = 16) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def _input_text(body: dict[str, Any]) -> str:
    """The text a request carries: chat ``messages[].content`` or responses ``instructions`` +
    ``input``."""
    parts: list[str] = []
    for message in body.get("messages") or []:
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
    for key in ("instructions", "input"):
        value = body.get(key)
        if isinstance(value, str):
            parts.append(value)
    return "".join(parts)


class MemorySink:
    """A :class:`memd.llm.client.UsageSink` that keeps the recorded usage in a list (tests)."""

    def __init__(self) -> None:
        self.records: list[tuple] = []

    async def record_usage(self, phase, model, input_tokens, output_tokens, cached_tokens) -> None:  # type: ignore[no-untyped-def]
        """Append ``(phase, model, input_tokens, output_tokens, cached_tokens)``."""
        self.records.append((phase, model, input_tokens, output_tokens, cached_tokens))
