"""The OpenAI-compatible backend (workers/openai_backend.py, aiohttp on an event loop)
against a local fake server (tests/fakes/openai_server.py) over real loopback sockets; the
fake itself is checked against the official `openai` client, so what passes here passes
against a faithful server. The runtime bounds a call with an asyncio timeout and stops it by
cancelling its task; these tests do the same."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import httpx2
import openai
import pytest
from multidict import CIMultiDict

from tests.fakes.openai_server import FakeOpenAIServer
from workers import backends
from workers.backends import ModelError, ModelRequest
from workers.openai_backend import OpenAIBackend, retry_after

T = TypeVar("T")

PROMPT = "The quick brown fox jumps over the lazy dog"


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    fake = FakeOpenAIServer().start()
    yield fake
    fake.stop()


@pytest.fixture
def backend(server: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch) -> OpenAIBackend:
    monkeypatch.setenv("FAKE_OPENAI_KEY", "sk-test-key")
    return OpenAIBackend(server.base_url, api_key_env="FAKE_OPENAI_KEY")


@pytest.fixture
def sdk(server: FakeOpenAIServer) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(base_url=server.base_url, api_key="sk-test-key", max_retries=0)
    yield client
    client.close()


def call(model: str, prompt: str = PROMPT, **options: object) -> ModelRequest:
    return ModelRequest(model=model, prompt=prompt, options=dict(options))


def on_a_loop(backend: OpenAIBackend, work: Callable[[], Awaitable[T]]) -> T:
    """`work` on an event loop of its own, closing the backend's session on it after."""

    async def main() -> T:
        try:
            return await work()
        finally:
            await backend.aclose()

    return asyncio.run(main())


async def read(backend: OpenAIBackend, request: ModelRequest, into: list[str]) -> list[str]:
    async for piece in backend.astream(request):
        into.append(piece)
    return into


def collect(
    backend: OpenAIBackend,
    request: ModelRequest,
    within_s: float = 5.0,
    into: list[str] | None = None,
) -> list[str]:
    """The call's pieces, bounded in time as the runtime bounds it."""
    received = [] if into is None else into

    async def work() -> list[str]:
        async with asyncio.timeout(within_s):
            return await read(backend, request, received)

    return on_a_loop(backend, work)


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
    ours = collect(backend, call(model))
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
    pieces = collect(backend, call(model, temperature=0.5, latency_ms=3))
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
    assert "".join(collect(local, call(""))) == PROMPT  # the configured model
    assert server.wait_for_outcome("stream?pieces=2").header("Authorization") is None


def test_a_tenants_key_and_endpoint_win_and_an_unset_key_is_permanent(
    server: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TENANT_KEY", "sk-tenant")
    elsewhere = OpenAIBackend("http://127.0.0.1:9/v1", model="m", api_key_env="NOT_THIS_ONE")
    request = ModelRequest(
        model="stream?tag=tenant", prompt=PROMPT, api_key_env="TENANT_KEY", base_url=server.base_url
    )
    assert "".join(collect(elsewhere, request)) == PROMPT
    assert server.wait_for_outcome("stream?tag=tenant").header("Authorization") == (
        "Bearer sk-tenant"
    )
    unset = ModelRequest(model="m", prompt="x", api_key_env="SWITCHBOARD_SURELY_UNSET_KEY")
    with pytest.raises(ModelError, match="SWITCHBOARD_SURELY_UNSET_KEY") as raised:
        collect(elsewhere, unset)
    assert not raised.value.transient
    assert raised.value.summary == "model API key not configured"
    # The model's configuration is at fault, not the request: a fallback model may answer.
    assert raised.value.misconfigured


def test_a_stall_is_cut_off_by_the_time_bound_and_its_connection_closed(
    server: FakeOpenAIServer, backend: OpenAIBackend
) -> None:
    # The step turns the bound's TimeoutError into ModelTimeout (orchestration/steps.py).
    model = "stall?after=1"
    pieces: list[str] = []
    with pytest.raises(TimeoutError):
        collect(backend, call(model), within_s=0.5, into=pieces)
    assert len(pieces) == 1
    assert server.wait_for_outcome(model, timeout=2).outcome == "client_closed"


def test_429_is_transient_and_carries_retry_after(backend: OpenAIBackend) -> None:
    with pytest.raises(ModelError) as raised:
        collect(backend, call("status=429&retry_after=7"))
    assert raised.value.transient and raised.value.retry_after_s == 7
    assert "429" in str(raised.value) and "fake error 429" in str(raised.value)
    assert "sk-test-key" not in str(raised.value)
    # What a client may be told (a degraded reply's detail.message): not the provider's words.
    assert raised.value.summary == "provider error 429"


def test_500_is_transient(backend: OpenAIBackend) -> None:
    with pytest.raises(ModelError) as raised:
        collect(backend, call("status=503"))
    assert raised.value.transient and raised.value.retry_after_s is None
    assert raised.value.status == 503


@pytest.mark.parametrize("status", [400, 401, 404])
def test_other_4xx_are_permanent(backend: OpenAIBackend, status: int) -> None:
    with pytest.raises(ModelError) as raised:
        collect(backend, call(f"status={status}"))
    assert not raised.value.transient
    # Failover tells a bad request (400) from a refused key or model (401, 404) by it.
    assert raised.value.status == status and not raised.value.misconfigured


def test_a_disconnect_mid_stream_is_transient(
    server: FakeOpenAIServer, backend: OpenAIBackend
) -> None:
    pieces: list[str] = []
    with pytest.raises(ModelError) as raised:
        collect(backend, call("disconnect?after=2"), into=pieces)
    assert raised.value.transient
    assert len(pieces) == 2


def test_a_finish_reason_without_done_is_a_complete_reply(backend: OpenAIBackend) -> None:
    # Some compatible servers end the body after the finish_reason without `[DONE]`.
    assert "".join(collect(backend, call("stream?done=0"))) == PROMPT


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


def test_a_refused_connection_is_transient() -> None:
    with socket_closed_port() as port:
        nowhere = OpenAIBackend(f"http://127.0.0.1:{port}/v1", model="m")
        with pytest.raises(ModelError) as raised:
            collect(nowhere, call("m"))
    assert raised.value.transient
    assert raised.value.summary == "model unreachable"


async def cancel_once(task: asyncio.Task[object], ready: Callable[[], bool]) -> None:
    """Cancel `task` (a stop) once `ready()`, and see it end with the cancellation."""
    async with asyncio.timeout(5):
        while not ready():
            await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_cancellation_closes_the_stream_promptly(
    server: FakeOpenAIServer, backend: OpenAIBackend
) -> None:
    model = "stream?pieces=40&delay_ms=100"
    pieces: list[str] = []

    async def work() -> None:
        task = asyncio.create_task(read(backend, call(model), pieces))
        await cancel_once(task, lambda: bool(pieces))  # the call is under way

    on_a_loop(backend, work)
    # The server saw the connection closed long before the stream's four seconds were up.
    seen = server.wait_for_outcome(model, timeout=2)
    assert seen.outcome == "client_closed" and seen.pieces_sent < 40
    assert len(pieces) < 40


def test_cancellation_ends_a_stalled_call_at_once(
    server: FakeOpenAIServer, backend: OpenAIBackend
) -> None:
    # The fake stalls for 30 s unless the client leaves; it must see it leave within 2 s.
    model = "stall?after=0"

    async def work() -> None:
        task = asyncio.create_task(read(backend, call(model), []))
        await cancel_once(task, lambda: bool(server.calls))

    on_a_loop(backend, work)
    assert server.wait_for_outcome(model, timeout=2).outcome == "client_closed"


def test_a_call_stopped_before_it_starts_is_not_made(
    server: FakeOpenAIServer, backend: OpenAIBackend
) -> None:
    async def work() -> None:
        task = asyncio.create_task(read(backend, call("stream"), []))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    on_a_loop(backend, work)
    assert server.calls == []


def test_the_connection_is_reused_after_a_complete_stream_not_after_a_stop(
    server: FakeOpenAIServer, backend: OpenAIBackend
) -> None:
    async def work() -> None:
        for _ in range(3):
            assert "".join(await read(backend, call("stream?pieces=3"), [])) == PROMPT
            seen = await asyncio.to_thread(server.wait_for_outcome, "stream?pieces=3")
            assert seen.outcome == "completed"
        # A stopped call's connection is closed, not returned to the pool half read.
        pieces: list[str] = []
        task = asyncio.create_task(read(backend, call("stream?pieces=40&delay_ms=100"), pieces))
        await cancel_once(task, lambda: bool(pieces))
        assert "".join(await read(backend, call("stream?pieces=3&tag=after"), [])) == PROMPT

    on_a_loop(backend, work)
    peers = [seen.peer for seen in server.calls]
    assert len(set(peers[:4])) == 1  # one connection, kept alive
    assert peers[4] != peers[3]


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
    assert retry_after(CIMultiDict(headers)) == expected


def test_retry_after_header_names_are_case_insensitive() -> None:
    assert retry_after(CIMultiDict({"Retry-After": "2"})) == 2.0
    assert retry_after(CIMultiDict({"Retry-After-Ms": "100"})) == 0.1


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
        backends._backends.pop("openai", None)
    with pytest.raises(KeyError):
        backends.get_backend("no-such-backend")


# --- token usage --------------------------------------------------------------------------


def test_usage_is_asked_for_and_read_from_the_last_chunk(
    server: FakeOpenAIServer, backend: OpenAIBackend, sdk: openai.OpenAI
) -> None:
    model = "stream?pieces=3&prompt_tokens=17&completion_tokens=5"
    request = call(model)
    assert "".join(collect(backend, request)) == PROMPT
    seen = server.wait_for_outcome(model)
    assert seen.body["stream_options"] == {"include_usage": True}
    assert (request.usage.prompt_tokens, request.usage.completion_tokens) == (17, 5)
    # The official client reads the fake's usage chunk as OpenAI's.
    stream = sdk.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": PROMPT}],
        stream=True,
        stream_options={"include_usage": True},
    )
    last = list(stream)[-1]
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (17, 5)


def test_a_server_that_sends_no_usage_leaves_it_unreported(backend: OpenAIBackend) -> None:
    request = call("stream?pieces=2&usage=0")
    assert "".join(collect(backend, request)) == PROMPT
    assert (request.usage.prompt_tokens, request.usage.completion_tokens) == (None, None)
