"""A model backend speaking Anthropic's Messages API with streaming (server-sent events).

The same aiohttp client, cancellation and error classification as the OpenAI-compatible
backend (workers/openai_backend.py), which this subclasses; only the request and the event
format differ. One POST to `{base_url}/messages` with `"stream": true`; each
`content_block_delta` event's `text_delta` is yielded as a piece, until `message_stop`.
An `error` event inside the stream (e.g. `overloaded_error`) is transient, like a 529.

Configured by SWITCHBOARD_ANTHROPIC_BASE_URL, SWITCHBOARD_ANTHROPIC_MODEL and
SWITCHBOARD_ANTHROPIC_API_KEY_ENV (the NAME of the variable holding the key, sent as
`x-api-key`); a tenant's overrides from the admin apply as for "openai".
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from project.conf import conf
from workers.backends import ModelError, ModelRequest
from workers.openai_backend import (
    OpenAIBackend,
    _error_message,
    _json_event,
    passed_options,
    sse_events,
)

API_VERSION = "2023-06-01"
# The Messages API requires a cap on output tokens; a run may lower it with `max_tokens`.
DEFAULT_MAX_TOKENS = 1024
# Anthropic has no presence/frequency penalties or seed; `stop` is `stop_sequences` there.
UNSUPPORTED_OPTIONS = frozenset({"presence_penalty", "frequency_penalty", "seed", "stop"})


class AnthropicBackend(OpenAIBackend):
    def build_request(
        self, base_url: str, model: str, key: str, request: ModelRequest
    ) -> tuple[str, dict[str, str], dict[str, Any]]:
        headers = {"Accept": "text/event-stream", "anthropic-version": API_VERSION}
        if key:
            headers["x-api-key"] = key
        options = passed_options(request.options)
        body: dict[str, Any] = {
            "model": model,
            "max_tokens": options.pop("max_tokens", DEFAULT_MAX_TOKENS),
            "messages": [{"role": "user", "content": request.prompt}],
            "stream": True,
        }
        stop = request.options.get("stop")
        if isinstance(stop, str):
            body["stop_sequences"] = [stop]
        elif isinstance(stop, list) and all(isinstance(item, str) for item in stop):
            body["stop_sequences"] = stop
        body.update({k: v for k, v in options.items() if k not in UNSUPPORTED_OPTIONS})
        return f"{base_url}/messages", headers, body

    def pieces(self, response: aiohttp.ClientResponse) -> AsyncIterator[str]:
        return _pieces(response)


async def _pieces(response: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """Text pieces of a Messages stream; ModelError if it ends without `message_stop` or
    carries an `error` event."""
    finished = False
    async for name, payload in sse_events(response):
        event = _json_event(payload)
        kind = event.get("type") or name
        if kind == "content_block_delta":
            delta = event.get("delta") or {}
            text = delta.get("text") if delta.get("type") == "text_delta" else None
            if isinstance(text, str) and text:
                yield text
        elif kind == "message_stop":
            finished = True
        elif kind == "error":
            raise ModelError(f"model stream error: {_error_message(event)}", True)
    if not finished:
        raise ModelError("model stream ended before its end (message_stop)", True)


def from_settings() -> AnthropicBackend:
    config = conf()
    return AnthropicBackend(
        base_url=config.anthropic_base_url,
        model=config.anthropic_model,
        api_key_env=config.anthropic_api_key_env,
        name="anthropic",
    )
