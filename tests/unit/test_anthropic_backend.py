"""The Anthropic Messages backend (workers/anthropic_backend.py): its request and its
reading of the event stream. The provider (a third party's API, which the OpenAI fake does
not speak) is played by a small aiohttp server on loopback answering canned bytes; the same
byte streams are also read by Anthropic's official client here, so what the backend
accepts is what the real API sends."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import anthropic
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy

from workers.anthropic_backend import AnthropicBackend, report_anthropic_usage
from workers.backends import ModelError, ModelRequest, ReportedUsage


def sse(*events: tuple[str, dict[str, Any]]) -> bytes:
    return b"".join(
        f"event: {name}\ndata: {json.dumps(data)}\n\n".encode() for name, data in events
    )


def message_stream(*texts: str, stop: bool = True) -> bytes:
    events: list[tuple[str, dict[str, Any]]] = [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "msg_1",
                    "type": "message",
                    "role": "assistant",
                    "content": [],
                    "model": "claude-test",
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {"input_tokens": 3, "output_tokens": 1},
                },
            },
        ),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        ("ping", {"type": "ping"}),
    ]
    for text in texts:
        events.append(
            (
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": text},
                },
            )
        )
    events += [
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": len(texts)},
            },
        ),
    ]
    if stop:
        events.append(("message_stop", {"type": "message_stop"}))
    return sse(*events)


@dataclass(frozen=True)
class Seen:
    path: str
    headers: CIMultiDictProxy[str]
    content: bytes


class Provider:
    """Answers every call with one canned response, over real HTTP on 127.0.0.1 (an
    aiohttp server on a thread of its own), and records the requests."""

    def __init__(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.status, self.body, self.headers = status, body, headers or {}
        self.requests: list[Seen] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def answer(self, request: web.Request) -> web.Response:
        self.requests.append(Seen(request.path, request.headers, await request.read()))
        content_type = "text/event-stream" if self.status == 200 else "application/json"
        return web.Response(
            status=self.status,
            body=self.body,
            headers={"Content-Type": content_type, **self.headers},
        )

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/{path:.*}", self.answer)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        listening = socket.socket()
        listening.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{listening.getsockname()[1]}"
        await web.SockSite(self._runner, listening).start()

    def start(self) -> Provider:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


@pytest.fixture
def serve() -> Iterator[Callable[..., Provider]]:
    started: list[Provider] = []

    def start(status: int, body: bytes, headers: dict[str, str] | None = None) -> Provider:
        provider = Provider(status, body, headers).start()
        started.append(provider)
        return provider

    yield start
    for provider in started:
        provider.stop()


def backend(provider: Provider, api_key_env: str = "") -> AnthropicBackend:
    return AnthropicBackend(f"{provider.url}/v1", "claude-test", api_key_env, name="anthropic")


def official(provider: Provider) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key="k", base_url=provider.url, max_retries=0)


def stream(model: AnthropicBackend, request: ModelRequest) -> list[str]:
    """The call's pieces on an event loop of its own, bounded as the runtime bounds it."""

    async def main() -> list[str]:
        try:
            async with asyncio.timeout(5):
                return [piece async for piece in model.astream(request)]
        finally:
            await model.aclose()

    return asyncio.run(main())


def call(model: AnthropicBackend, **options: Any) -> list[str]:
    return stream(model, ModelRequest(model="", prompt="Hi there", options=options))


def test_streams_the_text_deltas_as_the_official_client_reads_them(
    monkeypatch: pytest.MonkeyPatch, serve: Callable[..., Provider]
) -> None:
    monkeypatch.setenv("TEST_ANTHROPIC_KEY", "sk-ant-test")
    provider = serve(200, message_stream("Hel", "lo ", "wörld"))
    assert call(backend(provider, "TEST_ANTHROPIC_KEY"), max_tokens=50, temperature=0.5) == [
        "Hel",
        "lo ",
        "wörld",
    ]
    with official(provider).messages.stream(
        model="claude-test", max_tokens=50, messages=[{"role": "user", "content": "Hi there"}]
    ) as stream:
        assert "".join(stream.text_stream) == "Hello wörld"
    ours, theirs = provider.requests
    assert ours.path == theirs.path == "/v1/messages"
    assert ours.headers["x-api-key"] == "sk-ant-test"
    # The API version the event format above is documented for; the SDK may ask newer.
    assert ours.headers["anthropic-version"] == "2023-06-01"
    assert "anthropic-version" in theirs.headers
    body = json.loads(ours.content)
    assert body == {
        "model": "claude-test",
        "max_tokens": 50,
        "messages": [{"role": "user", "content": "Hi there"}],
        "stream": True,
        "temperature": 0.5,
    }


def test_options_anthropic_lacks_are_not_sent_and_stop_becomes_stop_sequences(
    serve: Callable[..., Provider],
) -> None:
    provider = serve(200, message_stream("x"))
    call(backend(provider), seed=3, presence_penalty=0.1, stop="END")
    body = json.loads(provider.requests[0].content)
    assert body["stop_sequences"] == ["END"]
    assert body["max_tokens"] == 1024
    assert not {"seed", "presence_penalty", "stop"} & set(body)


def test_a_stream_without_message_stop_is_a_transient_error(
    serve: Callable[..., Provider],
) -> None:
    with pytest.raises(ModelError, match="message_stop") as caught:
        call(backend(serve(200, message_stream("partial", stop=False))))
    assert caught.value.transient


def test_an_error_event_mid_stream_is_transient(serve: Callable[..., Provider]) -> None:
    body = message_stream("a", stop=False) + sse(
        ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    )
    with pytest.raises(ModelError, match="Overloaded") as caught:
        call(backend(serve(200, body)))
    assert caught.value.transient


@pytest.mark.parametrize(
    ("status", "transient", "sdk_error"),
    [
        (529, True, anthropic.InternalServerError),
        (429, True, anthropic.RateLimitError),
        (400, False, anthropic.BadRequestError),
    ],
)
def test_status_errors_are_classified_with_the_providers_retry_after(
    serve: Callable[..., Provider], status: int, transient: bool, sdk_error: type[Exception]
) -> None:
    error_body = json.dumps(
        {"type": "error", "error": {"type": "some_error", "message": f"status {status}"}}
    ).encode()
    provider = serve(status, error_body, {"retry-after": "3"})
    with pytest.raises(ModelError, match=f"status {status}") as caught:
        call(backend(provider))
    assert caught.value.transient is transient
    assert caught.value.retry_after_s == (3.0 if transient else None)
    with pytest.raises(sdk_error):
        official(provider).messages.create(
            model="claude-test", max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )


def test_a_tenant_key_variable_that_is_not_set_is_a_permanent_error(
    serve: Callable[..., Provider],
) -> None:
    provider = serve(200, message_stream("x"))
    request = ModelRequest(model="", prompt="x", api_key_env="SWITCHBOARD_SURELY_UNSET_KEY")
    with pytest.raises(ModelError, match="SWITCHBOARD_SURELY_UNSET_KEY") as caught:
        stream(backend(provider), request)
    assert not caught.value.transient
    assert provider.requests == []  # nothing was sent without the key


def test_usage_comes_from_message_start_and_message_delta(
    serve: Callable[..., Provider],
) -> None:
    provider = serve(200, message_stream("Hel", "lo"))
    request = ModelRequest(model="", prompt="Hi there")
    assert stream(backend(provider), request) == ["Hel", "lo"]
    # message_start's input tokens; message_delta's output tokens (a running total) win
    # over message_start's first count.
    assert (request.usage.prompt_tokens, request.usage.completion_tokens) == (3, 2)


def test_cached_input_tokens_count_as_prompt_tokens() -> None:
    usage = ReportedUsage()
    report_anthropic_usage(
        {
            "type": "message_start",
            "message": {
                "usage": {
                    "input_tokens": 5,
                    "cache_creation_input_tokens": 100,
                    "cache_read_input_tokens": 20,
                    "output_tokens": 1,
                }
            },
        },
        usage,
    )
    assert (usage.prompt_tokens, usage.completion_tokens) == (125, 1)
    report_anthropic_usage({"type": "message_delta", "usage": {"output_tokens": "x"}}, usage)
    assert (usage.prompt_tokens, usage.completion_tokens) == (125, 1)
