"""Classifying model-endpoint failures and reading ``Retry-After`` (SPEC §6.4, §13).

OpenAI SDK exceptions (and the equivalent answers of Ollama, vLLM, llama.cpp and LM Studio) are sorted into
:class:`ErrorKind`; :class:`~memd.llm.client.LLMClient` decides from the kind whether to retry, back off,
shrink the input or stop model work. Descriptions never contain the API key or prompt text.
"""

from __future__ import annotations

import json
import re
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import openai
import structlog

log = structlog.get_logger(__name__)


class ErrorKind(StrEnum):
    """What went wrong with one request, as far as retrying is concerned."""

    RATE_LIMITED = "rate_limited"
    SERVER = "server"
    TIMEOUT = "timeout"
    CONNECTION = "connection"
    TRUNCATED = "truncated"
    CONTEXT_LENGTH = "context_length"
    AUTH = "auth"
    REJECTED = "rejected"
    INVALID_OUTPUT = "invalid_output"
    UNKNOWN = "unknown"


#: Kinds retried with backoff.
RETRYABLE = frozenset(
    {
        ErrorKind.RATE_LIMITED,
        ErrorKind.SERVER,
        ErrorKind.TIMEOUT,
        ErrorKind.CONNECTION,
        ErrorKind.TRUNCATED,
    }
)


class StreamTruncated(Exception):
    """A stream ended without its terminal event (chat: no ``finish_reason``; responses: no
    ``response.completed``/``response.incomplete``). Retryable; never leaves :class:`LLMClient`."""


class ResponseFailed(Exception):
    """The server reported a failure inside a 200 answer (Responses ``status: failed``, a
    ``response.failed`` or ``error`` stream event). Never leaves :class:`LLMClient`.

    Args:
        code: the error code the server gave (``server_error``, ``rate_limit_exceeded``, ...).
        message: the server's message.
    """

    def __init__(self, code: str | None, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class InvalidOutput(Exception):
    """The model's answer held no JSON object, even leniently parsed; or it refused."""


_CONTEXT_CODES = {"context_length_exceeded", "exceed_context_size_error", "context_window_exceeded"}
_CONTEXT_PATTERNS = re.compile(
    r"maximum context length|context length|context window|context size"
    r"|exceeds? the (?:available )?context|prompt is too long|too many tokens",
    re.IGNORECASE,
)


def _is_context_error(code: str | None, type_: str | None, message: str | None) -> bool:
    if code in _CONTEXT_CODES or type_ in _CONTEXT_CODES:
        return True
    return bool(message and _CONTEXT_PATTERNS.search(message))


def classify_error(exc: BaseException) -> ErrorKind:
    """Map an exception from one request to an :class:`ErrorKind`.

    Recognises the ``openai`` SDK's exceptions (``RateLimitError``, ``AuthenticationError``,
    ``PermissionDeniedError``, ``BadRequestError``, ``APIStatusError``, ``APITimeoutError``,
    ``APIConnectionError``, ``APIError`` raised for an error inside a stream), and this module's
    :class:`StreamTruncated`, :class:`ResponseFailed`, :class:`InvalidOutput`.

    Context-length errors are recognised from OpenAI's ``code: context_length_exceeded``,
    llama.cpp's ``type: exceed_context_size_error``, and messages such as "maximum context
    length" (vLLM, LM Studio) on any 4xx.
    """
    if isinstance(exc, StreamTruncated | json.JSONDecodeError):
        return ErrorKind.TRUNCATED
    if isinstance(exc, InvalidOutput):
        return ErrorKind.INVALID_OUTPUT
    if isinstance(exc, ResponseFailed):
        return _classify_failed_response(exc)
    if isinstance(exc, openai.APITimeoutError):
        return ErrorKind.TIMEOUT
    if isinstance(exc, openai.APIConnectionError):
        return ErrorKind.CONNECTION
    if isinstance(exc, openai.APIStatusError):
        return _classify_status(exc)
    if isinstance(exc, openai.APIError):
        # An error object inside an SSE stream (no HTTP status): transient unless it says otherwise.
        if _is_context_error(exc.code, exc.type, exc.message):
            return ErrorKind.CONTEXT_LENGTH
        return ErrorKind.SERVER
    return ErrorKind.UNKNOWN


def _classify_failed_response(exc: ResponseFailed) -> ErrorKind:
    """A Responses API ``response.failed`` / ``error`` event, by its code."""
    if _is_context_error(exc.code, None, exc.message):
        return ErrorKind.CONTEXT_LENGTH
    if exc.code == "rate_limit_exceeded":
        return ErrorKind.RATE_LIMITED
    if exc.code in (None, "", "server_error", "internal_error"):
        return ErrorKind.SERVER
    return ErrorKind.REJECTED


def _classify_status(exc: openai.APIStatusError) -> ErrorKind:
    """An HTTP error status, by its code (and the body's code, type and message)."""
    status = exc.status_code
    if status in (401, 403):
        return ErrorKind.AUTH
    if status == 429:
        # A spent quota does not come back by waiting a minute.
        return ErrorKind.REJECTED if exc.code == "insufficient_quota" else ErrorKind.RATE_LIMITED
    if status >= 500 or status in (408, 409):
        return ErrorKind.SERVER
    if _is_context_error(exc.code, exc.type, _status_message(exc)):
        return ErrorKind.CONTEXT_LENGTH
    return ErrorKind.REJECTED


def _status_message(exc: openai.APIStatusError) -> str:
    body = exc.body
    message = body.get("message") if isinstance(body, dict) else None
    if isinstance(message, str):
        return message
    return exc.message or ""


def safe_url(url: str | None) -> str | None:
    """``url`` without any ``user:password@`` part, for logs and messages."""
    if not url:
        return url
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def shorten(text: str, limit: int = 200) -> str:
    """``text`` on one line (whitespace runs become one space), at most ``limit`` characters
    (cut with ``...``): for an error body in a log event or a message."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def retry_after_s(headers: Any, now_s: float) -> float | None:
    """Read a wait from response headers: ``retry-after-ms``, then ``retry-after`` as seconds or
    as an HTTP date (RFC 9110 §10.2.3) relative to ``now_s``. ``None`` when absent or unparseable;
    never negative."""
    if headers is None:
        return None
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return max(0.0, float(value) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - now_s)


def describe_error(exc: BaseException) -> str:
    """A short, secret-free description of a request failure (no prompt text, no key)."""
    status = getattr(exc, "status_code", None)
    if isinstance(exc, openai.APIStatusError):
        message = _status_message(exc)
        return f"HTTP {status}: {shorten(message)}" if message else f"HTTP {status}"
    return f"{type(exc).__name__}: {shorten(str(exc))}"
