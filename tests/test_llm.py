"""The model client against a real HTTP server on 127.0.0.1 (tests/fake_openai.py), driven by the
real ``openai`` SDK: both APIs, JSON and SSE, and every fault of SPEC §13 for the LLM."""

from __future__ import annotations

import random
import socket
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest
from structlog.testing import capture_logs

from memd.clock import FakeClock
from memd.errors import ContextLengthError, ExtractorError, ModelAuthError
from memd.llm.check import EndpointCheck, check_endpoint
from memd.llm.client import LLMClient, LLMConfig
from memd.llm.errors import ErrorKind, StreamTruncated, classify_error, retry_after_s, safe_url
from tests import fake_openai as fk

API_KEY = "sk-test-DO-NOT-LOG-0123456789abcdef"
SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string"}},
    "required": ["answer"],
    "additionalProperties": False,
}
SYSTEM = "You answer questions. SYSTEM-PROMPT-MARKER"
USER = "What is six times seven? USER-PROMPT-MARKER"


class RecordingClock(FakeClock):
    """A FakeClock that remembers every sleep it was asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.sleeps: list[float] = []

    async def sleep(self, delay_s: float) -> None:
        self.sleeps.append(delay_s)
        await super().sleep(delay_s)


class MemorySink:
    """A UsageSink that keeps the records in a list."""

    def __init__(self) -> None:
        self.records: list[dict[str, object]] = []

    async def record_usage(
        self, phase: str, model: str, input_tokens: int, output_tokens: int, cached_tokens: int
    ) -> None:
        self.records.append(
            {
                "phase": phase,
                "model": model,
                "input_tokens": input_tokens,
                "output_tokens": output_tokens,
                "cached_tokens": cached_tokens,
            }
        )


@pytest.fixture
async def make_client(server):
    clients: list[LLMClient] = []

    def factory(**overrides) -> tuple[LLMClient, RecordingClock, MemorySink]:
        fields = {
            "api": "chat",
            "base_url": server.base_url,
            "model": "fake-model",
            "api_key": API_KEY,
            "timeout_s": 5.0,
            "max_attempts": 4,
            "backoff_base_s": 2.0,
            "backoff_cap_s": 60.0,
        }
        fields.update(overrides)
        clock, sink = RecordingClock(), MemorySink()
        client = LLMClient(LLMConfig(**fields), usage=sink, clock=clock, rng=random.Random(7))
        clients.append(client)
        return client, clock, sink

    yield factory
    for client in clients:
        await client.aclose()


async def ask(client: LLMClient, phase: str = "extract"):
    return await client.complete_json(
        system=SYSTEM, user=USER, schema_name="answer", schema=SCHEMA, phase=phase
    )


def events(logs: list[dict], name: str) -> list[dict]:
    return [entry for entry in logs if entry["event"] == name]


# -- happy paths ------------------------------------------------------------------------------


@pytest.mark.parametrize("api", ["chat", "responses"])
@pytest.mark.parametrize("stream", [False, True])
async def test_answer_arrives_parsed_with_usage(server, make_client, api, stream):
    client, clock, sink = make_client(api=api, stream=stream)
    server.enqueue(
        fk.ok({"answer": 'forty-two, with "quotes" and ünïcode'}, usage=(1200, 34, 1024))
    )

    answer = await ask(client)

    assert answer.data == {"answer": 'forty-two, with "quotes" and ünïcode'}
    assert (answer.input_tokens, answer.output_tokens, answer.cached_tokens) == (1200, 34, 1024)
    assert answer.model == "fake-model"
    assert answer.requests == 1
    assert sink.records == [
        {
            "phase": "extract",
            "model": "fake-model",
            "input_tokens": 1200,
            "output_tokens": 34,
            "cached_tokens": 1024,
        }
    ]
    assert clock.sleeps == []
    (request,) = server.requests
    body = request.body
    assert request.headers["Authorization"] == f"Bearer {API_KEY}"
    if api == "chat":
        assert request.path == "/v1/chat/completions"
        assert body["messages"] == [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": USER},
        ]
        assert body["response_format"] == {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True},
        }
        if stream:
            assert body["stream"] is True
            assert body["stream_options"] == {"include_usage": True}
    else:
        assert request.path == "/v1/responses"
        assert body["instructions"] == SYSTEM
        assert body["input"] == USER
        assert body["store"] is False
        assert body["text"] == {
            "format": {"type": "json_schema", "name": "answer", "schema": SCHEMA, "strict": True}
        }
        if stream:
            assert body["stream"] is True
    if not stream:
        assert "stream" not in body


@pytest.mark.parametrize("api", ["chat", "responses"])
async def test_reasoning_effort_is_sent_only_when_set(server, make_client, api):
    with_effort, _, _ = make_client(api=api, reasoning_effort="low")
    without, _, _ = make_client(api=api)
    await ask(with_effort)
    await ask(without)

    first, second = server.bodies()
    if api == "chat":
        assert first["reasoning_effort"] == "low"
        assert "reasoning_effort" not in second
    else:
        assert first["reasoning"] == {"effort": "low"}
        assert "reasoning" not in second


async def test_answer_without_usage_records_nothing(server, make_client):
    client, _, sink = make_client()
    server.enqueue(fk.Behaviour("ok", content='{"answer": "x"}', send_usage=False))
    answer = await ask(client)
    assert answer.data == {"answer": "x"}
    assert (answer.input_tokens, answer.output_tokens) == (0, 0)
    assert sink.records == []


# -- 429 --------------------------------------------------------------------------------------


async def test_429_waits_retry_after_seconds_then_succeeds(server, make_client):
    client, clock, sink = make_client()
    server.enqueue(fk.rate_limited("7"), fk.ok({"answer": "ok"}))

    with capture_logs() as logs:
        answer = await ask(client)

    assert answer.data == {"answer": "ok"}
    assert answer.requests == 2
    assert len(server.requests) == 2
    assert clock.sleeps == [7.0]
    (retry,) = events(logs, "llm_retry")
    assert (retry["attempt"], retry["status"], retry["wait_s"], retry["kind"]) == (
        1,
        429,
        7.0,
        "rate_limited",
    )
    assert len(sink.records) == 1  # the 429 reported no usage


async def test_429_retry_after_http_date_is_relative_to_the_clock(server, make_client):
    client, clock, _ = make_client()
    when = datetime.fromtimestamp(clock.now() + 30, tz=UTC)
    server.enqueue(fk.rate_limited(format_datetime(when, usegmt=True)), fk.ok({"answer": "ok"}))

    await ask(client)

    assert clock.sleeps == [30.0]


async def test_429_retry_after_is_capped(server, make_client):
    client, clock, _ = make_client(backoff_cap_s=45.0)
    server.enqueue(fk.rate_limited("3600"), fk.ok({"answer": "ok"}))
    await ask(client)
    assert clock.sleeps == [45.0]


async def test_429_without_retry_after_backs_off_exponentially(server, make_client):
    client, clock, _ = make_client(backoff_base_s=2.0)
    server.enqueue(fk.rate_limited(None), fk.rate_limited(None), fk.ok({"answer": "ok"}))
    await ask(client)
    assert len(clock.sleeps) == 2
    assert 1.0 <= clock.sleeps[0] <= 2.0
    assert 2.0 <= clock.sleeps[1] <= 4.0


async def test_insufficient_quota_429_is_not_retried(server, make_client):
    client, clock, _ = make_client()
    body = {
        "error": {
            "message": "You exceeded your current quota",
            "type": "insufficient_quota",
            "code": "insufficient_quota",
        }
    }
    server.enqueue(fk.Behaviour("error", status=429, body=body))
    with pytest.raises(ExtractorError, match="quota"):
        await ask(client)
    assert len(server.requests) == 1
    assert clock.sleeps == []


# -- 5xx, hangs, truncated streams ------------------------------------------------------------


async def test_500_is_retried_then_succeeds(server, make_client):
    client, clock, _ = make_client()
    server.enqueue(fk.server_error(500), fk.server_error(503), fk.ok({"answer": "ok"}))

    with capture_logs() as logs:
        answer = await ask(client)

    assert answer.data == {"answer": "ok"}
    assert len(server.requests) == 3
    assert [e["status"] for e in events(logs, "llm_retry")] == [500, 503]
    assert 1.0 <= clock.sleeps[0] <= 2.0 and 2.0 <= clock.sleeps[1] <= 4.0


@pytest.mark.parametrize("max_attempts", [1, 3, 4])
async def test_a_persistent_fault_makes_exactly_max_attempts_requests(
    server, make_client, max_attempts
):
    client, clock, _ = make_client(
        max_attempts=max_attempts, backoff_base_s=10.0, backoff_cap_s=25.0
    )
    server.default = fk.server_error(500)

    with capture_logs() as logs:
        with pytest.raises(ExtractorError, match=f"after {max_attempts} attempts"):
            await ask(client)

    assert len(server.requests) == max_attempts
    assert len(clock.sleeps) == max_attempts - 1
    for i, slept in enumerate(clock.sleeps):
        delay = min(25.0, 10.0 * 2**i)
        assert delay / 2 <= slept <= delay
    (gave_up,) = events(logs, "llm_gave_up")
    assert gave_up["attempt"] == max_attempts


async def test_a_hanging_server_times_out_and_is_retried(server, make_client):
    client, clock, _ = make_client(timeout_s=0.5)
    server.enqueue(fk.hang(), fk.ok({"answer": "after the hang"}))

    with capture_logs() as logs:
        answer = await ask(client)

    assert answer.data == {"answer": "after the hang"}
    assert len(server.requests) == 2
    (retry,) = events(logs, "llm_retry")
    assert retry["kind"] == "timeout"
    assert len(clock.sleeps) == 1


@pytest.mark.parametrize("api", ["chat", "responses"])
async def test_a_truncated_stream_is_retried(server, make_client, api):
    client, _, _ = make_client(api=api, stream=True)
    server.enqueue(
        fk.truncated({"answer": "a long answer that is cut half way"}), fk.ok({"answer": "whole"})
    )

    with capture_logs() as logs:
        answer = await ask(client)

    assert answer.data == {"answer": "whole"}
    assert len(server.requests) == 2
    (retry,) = events(logs, "llm_retry")
    assert retry["kind"] == "truncated"


@pytest.mark.parametrize("api", ["chat", "responses"])
async def test_a_persistently_truncated_stream_gives_up_after_max_attempts(
    server, make_client, api
):
    client, _, _ = make_client(api=api, stream=True, max_attempts=3)
    server.default = fk.truncated({"answer": "never complete"})
    with pytest.raises(ExtractorError, match="truncated"):
        await ask(client)
    assert len(server.requests) == 3


async def test_a_truncated_json_body_is_retried(server, make_client):
    client, _, _ = make_client()
    server.enqueue(fk.truncated({"answer": "cut"}), fk.ok({"answer": "whole"}))
    answer = await ask(client)
    assert answer.data == {"answer": "whole"}
    assert len(server.requests) == 2


@pytest.mark.parametrize(
    ("api", "stream"), [("responses", False), ("responses", True), ("chat", True)]
)
async def test_a_failure_inside_a_200_answer_is_retried(server, make_client, api, stream):
    client, _, _ = make_client(api=api, stream=stream)
    server.enqueue(fk.failed(), fk.ok({"answer": "recovered"}))

    with capture_logs() as logs:
        answer = await ask(client)

    assert answer.data == {"answer": "recovered"}
    assert len(server.requests) == 2
    (retry,) = events(logs, "llm_retry")
    assert retry["kind"] == "server"


@pytest.mark.parametrize("stream", [False, True])
async def test_a_responses_failure_that_is_not_transient_is_not_retried(
    server, make_client, stream
):
    client, _, _ = make_client(api="responses", stream=stream)
    server.enqueue(fk.failed("invalid_prompt", "The prompt was flagged"))
    with pytest.raises(ExtractorError, match="flagged"):
        await ask(client)
    assert len(server.requests) == 1


# -- malformed answers ------------------------------------------------------------------------


@pytest.mark.parametrize("api", ["chat", "responses"])
async def test_fenced_json_is_parsed_leniently_without_a_retry(server, make_client, api):
    client, _, _ = make_client(api=api)
    server.enqueue(fk.fenced({"answer": "in a fence"}))
    answer = await ask(client)
    assert answer.data == {"answer": "in a fence"}
    assert len(server.requests) == 1


async def test_malformed_json_is_asked_again_once(server, make_client):
    client, clock, sink = make_client()
    server.enqueue(fk.malformed(), fk.ok({"answer": "second try"}))
    answer = await ask(client)
    assert answer.data == {"answer": "second try"}
    assert answer.requests == 2
    assert clock.sleeps == []
    assert len(sink.records) == 2  # the bad answer's usage counts too


async def test_malformed_json_twice_is_an_error_after_exactly_two_requests(server, make_client):
    client, _, sink = make_client(max_attempts=4)
    server.default = fk.malformed()

    with capture_logs() as logs:
        with pytest.raises(ExtractorError, match="invalid JSON"):
            await ask(client)

    assert len(server.requests) == 2
    assert len(events(logs, "llm_invalid_output")) == 1
    assert len(sink.records) == 2


# -- errors that are not retried --------------------------------------------------------------


@pytest.mark.parametrize("api", ["chat", "responses"])
@pytest.mark.parametrize("fault", [fk.context_length_openai, fk.context_length_llamacpp])
async def test_context_length_errors_raise_at_once(server, make_client, api, fault):
    client, clock, _ = make_client(api=api)
    server.enqueue(fault())
    with pytest.raises(ContextLengthError):
        await ask(client)
    assert len(server.requests) == 1
    assert clock.sleeps == []


@pytest.mark.parametrize("stream", [False, True])
async def test_401_is_model_auth_error_after_exactly_one_request(server, make_client, stream):
    client, clock, _ = make_client(stream=stream)
    server.default = fk.unauthorized()

    with capture_logs() as logs:
        with pytest.raises(ModelAuthError, match="credentials"):
            await ask(client)

    assert len(server.requests) == 1
    assert clock.sleeps == []
    assert len(events(logs, "llm_auth_failed")) == 1


async def test_403_is_model_auth_error(server, make_client):
    client, _, _ = make_client()
    server.enqueue(fk.Behaviour("error", status=403, body={"error": {"message": "forbidden"}}))
    with pytest.raises(ModelAuthError):
        await ask(client)
    assert len(server.requests) == 1


async def test_other_4xx_is_an_extractor_error_without_retry(server, make_client):
    client, _, _ = make_client()
    server.enqueue(fk.bad_request("Invalid schema for response_format 'answer'"))
    with pytest.raises(ExtractorError, match="HTTP 400: Invalid schema") as info:
        await ask(client)
    assert not isinstance(info.value, ContextLengthError)
    assert len(server.requests) == 1


async def test_neither_key_nor_prompt_text_is_logged(server, make_client):
    client, _, _ = make_client(max_attempts=2)
    server.enqueue(fk.rate_limited("1"), fk.server_error(500))
    with capture_logs() as logs:
        with pytest.raises(ExtractorError) as info:
            await ask(client)
    server.enqueue(fk.unauthorized())
    with capture_logs() as more:
        with pytest.raises(ModelAuthError) as auth:
            await ask(client)
    text = repr(logs + more) + str(info.value) + str(auth.value) + repr(client.config)
    assert logs and more
    for secret in (API_KEY, "SYSTEM-PROMPT-MARKER", "USER-PROMPT-MARKER"):
        assert secret not in text


# -- usage ------------------------------------------------------------------------------------


async def test_a_failing_usage_sink_does_not_lose_the_answer(server, make_client):
    class BrokenSink:
        async def record_usage(self, **_: object) -> None:
            raise RuntimeError("database is locked")

    client = LLMClient(
        LLMConfig(api="chat", base_url=server.base_url, model="m", api_key=API_KEY, timeout_s=5.0),
        usage=BrokenSink(),
        clock=FakeClock(),
    )
    server.enqueue(fk.ok({"answer": "kept"}))
    try:
        with capture_logs() as logs:
            answer = await ask(client)
    finally:
        await client.aclose()
    assert answer.data == {"answer": "kept"}
    assert len(events(logs, "usage_record_failed")) == 1


async def test_usage_lands_in_the_real_store(server, tmp_path):
    from memd.store.store import Store

    clock = FakeClock()
    store = await Store.open(tmp_path / "state" / "memd.sqlite3", clock=clock)
    client = LLMClient(
        LLMConfig(
            api="responses",
            base_url=server.base_url,
            model="fake-model",
            api_key=API_KEY,
            timeout_s=5.0,
        ),
        usage=store.usage,
        clock=clock,
    )
    try:
        server.enqueue(
            fk.ok({"answer": "a"}, usage=(500, 40, 100)), fk.ok({"answer": "b"}, usage=(300, 10, 0))
        )
        await ask(client)
        await ask(client, phase="consolidate")
        assert await store.usage.tokens_since(clock.now() - 1) == 500 + 40 + 300 + 10
        assert await store.usage.tokens_since(clock.now() + 1) == 0
    finally:
        await client.aclose()
        await store.close()


# -- lifecycle, endpoint check, helpers -------------------------------------------------------


async def test_aclose_is_idempotent_and_a_closed_client_refuses_work(server, make_client):
    client, _, _ = make_client()
    await client.aclose()
    await client.aclose()
    with pytest.raises(ExtractorError, match="closed"):
        await ask(client)
    assert server.requests == []


async def test_check_endpoint_lists_models(server):
    config = LLMConfig(
        api="chat", base_url=server.base_url, model="fake-model", api_key=API_KEY, timeout_s=5.0
    )
    check = await check_endpoint(config)
    assert check == EndpointCheck(
        True, f"{server.base_url} reachable; 1 models, 'fake-model' listed", model_listed=True
    )
    assert server.requests[0].path == "/v1/models"


async def test_check_endpoint_reports_rejected_credentials_without_the_key(server):
    server.default = fk.unauthorized()
    config = LLMConfig(
        api="chat", base_url=server.base_url, model="m", api_key=API_KEY, timeout_s=5.0
    )
    check = await check_endpoint(config)
    assert not check.ok
    assert "credentials rejected" in check.detail
    assert API_KEY not in check.detail
    assert len(server.requests) == 1


async def test_check_endpoint_falls_back_to_a_probe_when_there_is_no_model_list(server):
    server.enqueue(
        fk.Behaviour("error", status=404, body={"error": {"message": "not found"}}),
        fk.ok({"ok": "ok"}),
    )
    config = LLMConfig(
        api="responses", base_url=server.base_url, model="m", api_key=API_KEY, timeout_s=5.0
    )
    check = await check_endpoint(config)
    assert check.ok, check.detail
    assert [r.path for r in server.requests] == ["/v1/models", "/v1/responses"]


async def test_check_endpoint_reports_an_unreachable_server():
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = LLMConfig(
        api="chat", base_url=f"http://127.0.0.1:{port}/v1", model="m", api_key="", timeout_s=2.0
    )
    check = await check_endpoint(config)
    assert not check.ok
    assert "unreachable" in check.detail


def test_retry_after_parsing():
    now = 1_767_225_600.0
    assert retry_after_s({"retry-after": "12"}, now) == 12.0
    assert retry_after_s({"retry-after": "1.5"}, now) == 1.5
    assert retry_after_s({"retry-after-ms": "250", "retry-after": "9"}, now) == 0.25
    date = format_datetime(datetime.fromtimestamp(now + 90, tz=UTC), usegmt=True)
    assert retry_after_s({"retry-after": date}, now) == 90.0
    past = format_datetime(datetime.fromtimestamp(now - 90, tz=UTC), usegmt=True)
    assert retry_after_s({"retry-after": past}, now) == 0.0
    assert retry_after_s({"retry-after": "soon"}, now) is None
    assert retry_after_s({}, now) is None
    assert retry_after_s(None, now) is None


def test_classify_error_of_local_exceptions():
    assert classify_error(StreamTruncated("x")) is ErrorKind.TRUNCATED
    assert classify_error(ValueError("x")) is ErrorKind.UNKNOWN


def test_config_repr_hides_the_key():
    config = LLMConfig(api="chat", base_url=None, model="m", api_key=API_KEY, timeout_s=1.0)
    assert API_KEY not in repr(config)
    assert API_KEY not in str(config)


def test_safe_url_drops_credentials():
    assert safe_url("http://user:pa55@127.0.0.1:8080/v1") == "http://127.0.0.1:8080/v1"
    assert safe_url("https://api.openai.com/v1") == "https://api.openai.com/v1"
    assert safe_url(None) is None
