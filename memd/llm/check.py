"""The endpoint probe behind ``memd doctor`` (SPEC §10): is the model server reachable, and is the model listed."""

from __future__ import annotations

from dataclasses import dataclass

import openai
import structlog

from memd.clock import SystemClock
from memd.errors import ContextLengthError, ExtractorError, ModelAuthError
from memd.llm.client import LLMClient, LLMConfig, make_openai
from memd.llm.errors import ErrorKind, classify_error, describe_error, safe_url, shorten

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class EndpointCheck:
    """Result of :func:`check_endpoint`: ``ok`` and a one-line human ``detail`` (no secrets).

    ``model_listed`` is whether the configured model is in the server's model list (``None``
    when the server has no list or was not reached).
    """

    ok: bool
    detail: str
    model_listed: bool | None = None


async def check_endpoint(config: LLMConfig, *, timeout_s: float = 10.0) -> EndpointCheck:
    """Probe the model endpoint for ``memd doctor``: list the models (``GET /models``).

    A server without a model list (404) is probed with one tiny structured request instead. The
    probe makes no retries and waits at most ``min(timeout_s, config.timeout_s)`` per request.

    Returns:
        ``EndpointCheck(ok, detail)``; ``detail`` names the failure (unreachable, timeout,
        credentials rejected, HTTP status) and never contains the key. Never raises for endpoint
        faults.
    """
    bounded = min(timeout_s, config.timeout_s)
    client = make_openai(config, bounded)
    where = safe_url(config.base_url) or "the OpenAI API"
    try:
        try:
            page = await client.models.list()
            names = [getattr(m, "id", "") for m in getattr(page, "data", None) or []]
            listed = config.model in names
            return EndpointCheck(
                True,
                f"{where} reachable; {len(names)} models, {config.model!r} {'listed' if listed else 'not listed'}",
                model_listed=listed,
            )
        except openai.NotFoundError:
            probe = LLMClient(
                LLMConfig(
                    config.api,
                    config.base_url,
                    config.model,
                    config.api_key,
                    bounded,
                    max_attempts=1,
                ),
                usage=None,
                clock=SystemClock(),
            )
            try:
                await probe.complete_json(
                    system="Answer with the JSON object the schema describes.",
                    user='Say "ok".',
                    schema_name="probe",
                    schema={
                        "type": "object",
                        "properties": {"ok": {"type": "string"}},
                        "required": ["ok"],
                        "additionalProperties": False,
                    },
                    phase="doctor",
                )
            finally:
                await probe.aclose()
            return EndpointCheck(True, f"{where} answered a probe request with model {config.model!r}")
    except ModelAuthError:
        return EndpointCheck(False, f"{where}: credentials rejected")
    except ContextLengthError:
        return EndpointCheck(True, f"{where} reachable (probe rejected as too long)")
    except ExtractorError as exc:
        return EndpointCheck(False, f"{where}: {exc}")
    except openai.OpenAIError as exc:
        kind = classify_error(exc)
        if kind is ErrorKind.AUTH:
            return EndpointCheck(False, f"{where}: credentials rejected (HTTP {getattr(exc, 'status_code', '?')})")
        if kind is ErrorKind.TIMEOUT:
            return EndpointCheck(False, f"{where}: no answer within {bounded:g} s")
        if kind is ErrorKind.CONNECTION:
            return EndpointCheck(False, f"{where}: unreachable ({shorten(str(exc))})")
        return EndpointCheck(False, f"{where}: {describe_error(exc)}")
    finally:
        await client.close()
