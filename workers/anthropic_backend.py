"""A model backend speaking Anthropic's Messages API with streaming (server-sent events).

The same aiohttp client, cancellation and error classification as the OpenAI-compatible
backend (workers/openai_backend.py), which this subclasses; only the request and the event
format differ. One POST to `{base_url}/messages` with `"stream": true`; each
`content_block_delta` event's `text_delta` is yielded as a piece, until `message_stop`.
The call's token usage is reported from `message_start` (input tokens) and `message_delta`
(output tokens, a running total).
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
from streams.usage import token_count
from workers.backends import (
    ModelError,
    ModelRequest,
    ReportedUsage,
    ToolCall,
    ToolCallAssembler,
    arguments_object,
)
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
        if request.tools:
            add_anthropic_tools(body, request)
        return f"{base_url}/messages", headers, body

    def pieces(
        self, response: aiohttp.ClientResponse, usage: ReportedUsage | None = None
    ) -> AsyncIterator[str]:
        return _pieces(response, usage)

    def turn_events(
        self, response: aiohttp.ClientResponse, usage: ReportedUsage | None = None
    ) -> AsyncIterator[str | ToolCall]:
        return _turn_events(response, usage)


def add_anthropic_tools(body: dict[str, Any], request: ModelRequest) -> None:
    """The tools offered and the rounds so far, as the Messages API expects them: each
    round an assistant message of its text and `tool_use` blocks, then a user message of
    one `tool_result` block per call."""
    body["tools"] = [
        {
            "name": spec["name"],
            "description": spec.get("description", ""),
            "input_schema": spec["parameters"],
        }
        for spec in request.tools
    ]
    if request.tool_choice == "none":
        body["tool_choice"] = {"type": "none"}
    messages = body["messages"]
    for turn in request.rounds:
        content: list[dict[str, Any]] = []
        if turn.text:
            content.append({"type": "text", "text": turn.text})
        content.extend(
            {
                "type": "tool_use",
                "id": call.id,
                "name": call.name,
                "input": arguments_object(call.arguments),
            }
            for call in turn.calls
        )
        messages.append({"role": "assistant", "content": content})
        messages.append(
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": result.call_id,
                        "content": result.content,
                        "is_error": result.is_error,
                    }
                    for result in turn.results
                ],
            }
        )


async def _turn_events(
    response: aiohttp.ClientResponse, usage: ReportedUsage | None = None
) -> AsyncIterator[str | ToolCall]:
    """Text pieces, then the turn's tool calls: a `content_block_start` of type `tool_use`
    (id, name) and its `input_json_delta` fragments, by block index. Usage as `_pieces`."""
    finished = False
    calls = ToolCallAssembler()
    tool_blocks: set[int] = set()
    async for name, payload in sse_events(response):
        event = _json_event(payload)
        kind = event.get("type") or name
        if usage is not None and kind in ("message_start", "message_delta"):
            report_anthropic_usage(event, usage)
        if kind == "content_block_start":
            block = event.get("content_block")
            index = event.get("index")
            if isinstance(block, dict) and block.get("type") == "tool_use":
                if isinstance(index, int) and not isinstance(index, bool):
                    tool_blocks.add(index)
                calls.add(index, block.get("id"), block.get("name"))
        elif kind == "content_block_delta":
            delta = event.get("delta") or {}
            if not isinstance(delta, dict):
                continue
            if delta.get("type") == "text_delta":
                text = delta.get("text")
                if isinstance(text, str) and text:
                    yield text
            elif delta.get("type") == "input_json_delta" and event.get("index") in tool_blocks:
                calls.add(event.get("index"), arguments=delta.get("partial_json"))
        elif kind == "message_stop":
            finished = True
        elif kind == "error":
            raise ModelError(f"model stream error: {_error_message(event)}", True)
    if not finished:
        raise ModelError("model stream ended before its end (message_stop)", True)
    for call in calls.calls():
        yield call


async def _pieces(
    response: aiohttp.ClientResponse, usage: ReportedUsage | None = None
) -> AsyncIterator[str]:
    """Text pieces of a Messages stream; ModelError if it ends without `message_stop` or
    carries an `error` event. Its usage goes to `usage`."""
    finished = False
    async for name, payload in sse_events(response):
        event = _json_event(payload)
        kind = event.get("type") or name
        if usage is not None and kind in ("message_start", "message_delta"):
            report_anthropic_usage(event, usage)
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


def report_anthropic_usage(event: dict[str, Any], usage: ReportedUsage) -> None:
    """`message_start` carries `message.usage` (input tokens, cached ones apart, and the
    first output tokens); `message_delta` carries `usage.output_tokens` so far."""
    message = event.get("message")
    fields = message.get("usage") if isinstance(message, dict) else event.get("usage")
    if not isinstance(fields, dict):
        return
    parts = [
        token_count(fields.get(name))
        for name in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
    ]
    counted = [part for part in parts if part is not None]
    usage.report(sum(counted) if counted else None, token_count(fields.get("output_tokens")))


def from_settings() -> AnthropicBackend:
    config = conf()
    return AnthropicBackend(
        base_url=config.anthropic_base_url,
        model=config.anthropic_model,
        api_key_env=config.anthropic_api_key_env,
        name="anthropic",
    )
