"""The Anthropic Messages backend (workers/anthropic_backend.py): its request and its
reading of the event stream. The provider is played by httpx2's MockTransport (a third
party's API); the same byte streams are also read by Anthropic's official client here, so
what the backend accepts is what the real API sends."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import anthropic
import httpx2
import pytest

from workers.anthropic_backend import AnthropicBackend
from workers.backends import ModelError, ModelRequest


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


class Provider:
    """Answers every call with one canned response and records the requests."""

    def __init__(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.status, self.body, self.headers = status, body, headers or {}
        self.requests: list[httpx2.Request] = []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        content_type = "text/event-stream" if self.status == 200 else "application/json"
        return httpx2.Response(
            self.status, content=self.body, headers={"content-type": content_type, **self.headers}
        )


def backend(provider: Provider, api_key_env: str = "") -> AnthropicBackend:
    return AnthropicBackend(
        "https://anthropic.test/v1",
        "claude-test",
        api_key_env,
        name="anthropic",
        transport=httpx2.MockTransport(provider),
    )


def official(provider: Provider) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        api_key="k",
        base_url="https://anthropic.test",
        max_retries=0,
        http_client=httpx2.Client(transport=httpx2.MockTransport(provider)),
    )


def call(model: AnthropicBackend, **options: Any) -> list[str]:
    request = ModelRequest(model="", prompt="Hi there", options=options)
    return list(model.stream(request, time.monotonic() + 5))


def test_streams_the_text_deltas_as_the_official_client_reads_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TEST_ANTHROPIC_KEY", "sk-ant-test")
    provider = Provider(200, message_stream("Hel", "lo ", "wörld"))
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
    assert ours.url.path == theirs.url.path == "/v1/messages"
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


def test_options_anthropic_lacks_are_not_sent_and_stop_becomes_stop_sequences() -> None:
    provider = Provider(200, message_stream("x"))
    call(backend(provider), seed=3, presence_penalty=0.1, stop="END")
    body = json.loads(provider.requests[0].content)
    assert body["stop_sequences"] == ["END"]
    assert body["max_tokens"] == 1024
    assert not {"seed", "presence_penalty", "stop"} & set(body)


def test_a_stream_without_message_stop_is_a_transient_error() -> None:
    with pytest.raises(ModelError, match="message_stop") as caught:
        call(backend(Provider(200, message_stream("partial", stop=False))))
    assert caught.value.transient


def test_an_error_event_mid_stream_is_transient() -> None:
    body = message_stream("a", stop=False) + sse(
        ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    )
    with pytest.raises(ModelError, match="Overloaded") as caught:
        call(backend(Provider(200, body)))
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
    status: int, transient: bool, sdk_error: type[Exception]
) -> None:
    error_body = json.dumps(
        {"type": "error", "error": {"type": "some_error", "message": f"status {status}"}}
    ).encode()
    provider = Provider(status, error_body, {"retry-after": "3"})
    with pytest.raises(ModelError, match=f"status {status}") as caught:
        call(backend(provider))
    assert caught.value.transient is transient
    assert caught.value.retry_after_s == (3.0 if transient else None)
    with pytest.raises(sdk_error):
        official(provider).messages.create(
            model="claude-test", max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )


def test_a_tenant_key_variable_that_is_not_set_is_a_permanent_error() -> None:
    request = ModelRequest(
        model="",
        prompt="x",
        api_key_env="SWITCHBOARD_SURELY_UNSET_KEY",
        cancelled=threading.Event(),
    )
    with pytest.raises(ModelError, match="SWITCHBOARD_SURELY_UNSET_KEY") as caught:
        list(backend(Provider(200, message_stream("x"))).stream(request, time.monotonic() + 5))
    assert not caught.value.transient
