"""The OpenAI-compatible backend (workers/openai_backend.py) against a local fake server
(tests/fakes/openai_server.py) over real sockets; the fake itself is checked against the
official `openai` client, so what passes here passes against a faithful server."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx2
import openai
import pytest

from tests.fakes.openai_server import FakeOpenAIServer
from workers import backends
from workers.backends import ModelCancelled, ModelError, ModelRequest, ModelTimeout
from workers.openai_backend import OpenAIBackend, retry_after

PROMPT = "The quick brown fox jumps over the lazy dog"


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    fake = FakeOpenAIServer().start()
    yield fake
    fake.stop()


@pytest.fixture
def backend(server: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[OpenAIBackend]:
    monkeypatch.setenv("FAKE_OPENAI_KEY", "sk-test-key")
    made = OpenAIBackend(server.base_url, api_key_env="FAKE_OPENAI_KEY")
    yield made
    made.close()


@pytest.fixture
def sdk(server: FakeOpenAIServer) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(base_url=server.base_url, api_key="sk-test-key", max_retries=0)
    yield client
    client.close()


def call(model: str, prompt: str = PROMPT, **options: object) -> ModelRequest:
    return ModelRequest(model=model, prompt=prompt, options=dict(options))


def soon(seconds: float = 5.0) -> float:
    return time.monotonic() + seconds


# --- the fake is faithful: the official client reads it as it reads OpenAI -------------


def test_official_client_streams_the_same_pieces_as_the_backend(
    server: FakeOpenAIServer, backend: OpenAIBackend, sdk: openai.OpenAI
) -> None:
    model = "stream?pieces=5&delay_ms=5"
    stream = sdk.chat.completions.create(
        model=model, messages=[{"role": "user", "content": PROMPT}], stream=True
    )
    from_sdk = [chunk.choices[0].delta.content for chunk in stream if chunk.choices]
    from_sdk = [piece for piece in from_sdk if piece]
    ours = list(backend.stream(call(model), soon()))
    assert from_sdk == ours
    assert len(ours) == 5 and "".join(ours) == PROMPT


@pytest.mark.parametrize(
    ("model", "error_type"),
    [
        ("status=429&retry_after=7", openai.RateLimitError),
        ("status=500", openai.InternalServerError),
        ("status=400", openai.BadRequestError),
    ],
)
def test_official_client_sees_the_fakes_errors_as_its_own_types(
    sdk: openai.OpenAI, model: str, error_type: type[Exception]
) -> None:
    with pytest.raises(error_type) as raised:
        sdk.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], stream=True
        )
    if error_type is openai.RateLimitError:
        assert raised.value.response.headers["retry-after"] == "7"


def test_official_client_fails_on_a_stream_cut_mid_body(sdk: openai.OpenAI) -> None:
    stream = sdk.chat.completions.create(
        model="disconnect?after=2", messages=[{"role": "user", "content": PROMPT}], stream=True
    )
    with pytest.raises((openai.APIConnectionError, httpx2.TransportError)):
        list(stream)


# --- the backend -----------------------------------------------------------------------


def test_streams_pieces_in_order_with_the_key_from_the_environment(
    server: FakeOpenAIServer, backend: OpenAIBackend
) -> None:
    model = "stream?pieces=6&delay_ms=10"
    pieces = list(backend.stream(call(model, temperature=0.5, latency_ms=3), soon()))
    assert len(pieces) == 6 and "".join(pieces) == PROMPT
    seen = server.wait_for_outcome(model)
    assert seen.outcome == "completed"
    assert seen.headers["Authorization"] == "Bearer sk-test-key"
    assert seen.body["stream"] is True
    assert seen.body["messages"] == [{"role": "user", "content": PROMPT}]
    # Known provider options pass through; the simulated backend's do not.
    assert seen.body["temperature"] == 0.5 and "latency_ms" not in seen.body


def test_no_key_variable_means_no_authorization_header(server: FakeOpenAIServer) -> None:
    local = OpenAIBackend(server.base_url, model="stream?pieces=2")
    try:
        assert "".join(local.stream(call(""), soon())) == PROMPT  # the configured model
    finally:
        local.close()
    assert "Authorization" not in server.wait_for_outcome("stream?pieces=2").headers


def test_a_stall_times_out_by_the_deadline_as_transient(
    server: FakeOpenAIServer, backend: OpenAIBackend
) -> None:
    model = "stall?after=1"
    started = time.monotonic()
    pieces = []
    with pytest.raises(ModelTimeout) as raised:
        for piece in backend.stream(call(model), started + 0.5):
            pieces.append(piece)
    elapsed = time.monotonic() - started
    assert 0.45 <= elapsed < 0.9
    assert raised.value.transient and "time limit" in str(raised.value)
    assert len(pieces) == 1
    assert server.wait_for_outcome(model, timeout=2).outcome == "client_closed"


def test_429_is_transient_and_carries_retry_after(backend: OpenAIBackend) -> None:
    with pytest.raises(ModelError) as raised:
        list(backend.stream(call("status=429&retry_after=7"), soon()))
    assert raised.value.transient and raised.value.retry_after_s == 7
    assert "429" in str(raised.value) and "fake error 429" in str(raised.value)
    assert "sk-test-key" not in str(raised.value)


def test_500_is_transient(backend: OpenAIBackend) -> None:
    with pytest.raises(ModelError) as raised:
        list(backend.stream(call("status=503"), soon()))
    assert raised.value.transient and raised.value.retry_after_s is None


@pytest.mark.parametrize("status", [400, 401, 404])
def test_other_4xx_are_permanent(backend: OpenAIBackend, status: int) -> None:
    with pytest.raises(ModelError) as raised:
        list(backend.stream(call(f"status={status}"), soon()))
    assert not raised.value.transient


def test_a_disconnect_mid_stream_is_transient(
    server: FakeOpenAIServer, backend: OpenAIBackend
) -> None:
    pieces = []
    with pytest.raises(ModelError) as raised:
        for piece in backend.stream(call("disconnect?after=2"), soon()):
            pieces.append(piece)
    assert raised.value.transient and not isinstance(raised.value, ModelCancelled)
    assert len(pieces) == 2


def test_a_finish_reason_without_done_is_a_complete_reply(backend: OpenAIBackend) -> None:
    # Some compatible servers end the body after the finish_reason without `[DONE]`.
    assert "".join(backend.stream(call("stream?done=0"), soon())) == PROMPT


def test_a_refused_connection_is_transient() -> None:
    with socket_closed_port() as port:
        nowhere = OpenAIBackend(f"http://127.0.0.1:{port}/v1", model="m")
        with pytest.raises(ModelError) as raised:
            list(nowhere.stream(call("m"), soon()))
        nowhere.close()
    assert raised.value.transient


def test_cancellation_closes_the_stream_promptly(
    server: FakeOpenAIServer, backend: OpenAIBackend
) -> None:
    model = "stream?pieces=40&delay_ms=100"
    request = call(model)
    stream = backend.stream(request, soon(30))
    assert next(stream)  # the call is under way
    threading.Timer(0.25, request.cancelled.set).start()
    started = time.monotonic()
    with pytest.raises(ModelCancelled):
        for _ in stream:
            pass
    assert time.monotonic() - started < 0.25 + 0.2
    seen = server.wait_for_outcome(model, timeout=2)
    assert seen.outcome == "client_closed" and seen.pieces_sent < 40
    assert seen.ended_at is not None and seen.ended_at - started < 0.25 + 0.3


def test_cancellation_ends_a_stalled_call_at_once(
    server: FakeOpenAIServer, backend: OpenAIBackend
) -> None:
    model = "stall?after=0"
    request = call(model)
    threading.Timer(0.3, request.cancelled.set).start()
    started = time.monotonic()
    with pytest.raises(ModelCancelled):
        list(backend.stream(request, soon(30)))
    assert time.monotonic() - started < 0.3 + 0.2
    assert server.wait_for_outcome(model, timeout=2).outcome == "client_closed"


def test_an_already_cancelled_or_late_call_is_not_made(
    server: FakeOpenAIServer, backend: OpenAIBackend
) -> None:
    request = call("stream")
    request.cancelled.set()
    with pytest.raises(ModelCancelled):
        list(backend.stream(request, soon()))
    with pytest.raises(ModelTimeout):
        list(backend.stream(call("stream"), time.monotonic() - 1))
    assert server.calls == []


def test_the_connection_is_reused_after_a_complete_stream(
    server: FakeOpenAIServer, backend: OpenAIBackend
) -> None:
    for _ in range(3):
        assert "".join(backend.stream(call("stream?pieces=3"), soon())) == PROMPT
        assert server.wait_for_outcome("stream?pieces=3").outcome == "completed"
    assert len({seen.peer for seen in server.calls}) == 1  # one connection, kept alive


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "3"}, 3.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),
        ({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0),  # in the past
        ({"retry-after": "soon"}, None),
        ({"retry-after": "999999"}, 3600.0),
        ({}, None),
    ],
)
def test_retry_after_parsing(headers: dict[str, str], expected: float | None) -> None:
    assert retry_after(httpx2.Headers(headers)) == expected


def test_registered_as_openai_from_settings(settings, monkeypatch: pytest.MonkeyPatch) -> None:
    settings.SWITCHBOARD = {
        **settings.SWITCHBOARD,
        "OPENAI_BASE_URL": "http://127.0.0.1:9/v1/",
        "OPENAI_MODEL": "some-model",
        "OPENAI_API_KEY_ENV": "SOME_KEY_VAR",
    }
    monkeypatch.delitem(backends._backends, "openai", raising=False)
    made = backends.get_backend("openai")
    try:
        assert isinstance(made, OpenAIBackend) and made.name == "openai"
        assert made.base_url == "http://127.0.0.1:9/v1"
        assert made.model == "some-model" and made.api_key_env == "SOME_KEY_VAR"
        assert backends.get_backend("openai") is made
    finally:
        made.close()
        backends._backends.pop("openai", None)
    with pytest.raises(KeyError):
        backends.get_backend("no-such-backend")


class socket_closed_port:
    """A port on 127.0.0.1 nobody listens on (bound, then released)."""

    def __enter__(self) -> int:
        import socket

        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        return self.port

    def __exit__(self, *exc: object) -> None:
        pass


@pytest.mark.parametrize(
    ("model", "summary"),
    [
        ("status=500", "provider error 500"),
        ("status=429", "provider error 429"),
        ("", "model not configured"),
    ],
)
def test_errors_carry_a_summary_a_client_may_be_shown(
    backend: OpenAIBackend, model: str, summary: str
) -> None:
    unconfigured = OpenAIBackend(backend.base_url, model="")
    with pytest.raises(ModelError) as raised:
        list((backend if model else unconfigured).stream(call(model), soon()))
    unconfigured.close()
    assert raised.value.summary == summary


def test_a_refused_connection_says_the_model_is_unreachable() -> None:
    with socket_closed_port() as port:
        nowhere = OpenAIBackend(f"http://127.0.0.1:{port}/v1", model="m")
        with pytest.raises(ModelError) as raised:
            list(nowhere.stream(call("m"), soon()))
        nowhere.close()
    assert raised.value.summary == "model unreachable"
