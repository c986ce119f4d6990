"""A model backend speaking the OpenAI chat-completions API with streaming (server-sent
events): OpenAI itself and the servers compatible with it (vLLM, Ollama, llama.cpp's
server, ...).

One POST to `{base_url}/chat/completions` with `"stream": true`; each `data:` event's
`choices[0].delta.content` is yielded as a piece, until `data: [DONE]`. The request asks
for `stream_options.include_usage`, so the last chunk before `[DONE]` carries the call's
`usage` (prompt_tokens, completion_tokens), reported to the step; a server that sends none
leaves the step to estimate it.

- **Secrets.** The API key is read from the environment variable named in the
  configuration, at each call; the key itself is never in settings or the database. No
  variable configured, or an empty one: no `Authorization` header (local servers need none).
- **Runtime.** aiohttp on the worker's event loop (workers/runtime.py): a call waiting on
  the model is a socket and a suspended coroutine, so one process holds thousands. aiohttp,
  not httpx2's async client, because it costs about a fourteenth of the CPU and under half
  the memory per held stream (docs/performance.md, "Holding model streams").
- **Time.** The runtime bounds each call by its soft limit and the run's deadline and stops
  it by cancelling it, so a stalled or cancelled call closes its connection at once and the
  server sees it closed.
- **Errors.** 408, 429, 5xx, connection failures, a connection lost mid-stream and a
  stalled stream are transient (`ModelError.transient`); any other 4xx, a malformed reply
  or missing configuration are permanent. The provider's Retry-After (or retry-after-ms),
  when given, is carried as `ModelError.retry_after_s`.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from contextlib import aclosing
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

# Request options a run may pass through to the provider, with the types each accepts;
# anything else in the run's options is not sent (they come from clients).
PASSED_OPTIONS: dict[str, tuple[type, ...]] = {
    "temperature": (int, float),
    "top_p": (int, float),
    "max_tokens": (int,),
    "presence_penalty": (int, float),
    "frequency_penalty": (int, float),
    "seed": (int,),
    "stop": (str, list),
}
TRANSIENT_STATUSES = frozenset({408, 429})
MAX_ERROR_BODY = 2000  # bytes of an error reply read for its message
MAX_RETRY_AFTER_S = 3600.0


class OpenAIBackend:
    """Streams chat completions from an OpenAI-compatible server. One aiohttp session (and
    connection pool) per event loop, shared by the calls on it."""

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str = "",
        api_key_env: str = "",
        *,
        connect_timeout_s: float = 5.0,
        name: str = "openai",
    ) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self.connect_timeout_s = connect_timeout_s
        self._sessions: dict[asyncio.AbstractEventLoop, aiohttp.ClientSession] = {}

    def _session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        session = self._sessions.get(loop)
        if session is None or session.closed:
            # No pool cap here: the runtime bounds calls in flight, and a cap would queue
            # calls inside aiohttp, out of sight of the soft limits' accounting.
            connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30)
            session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout_s),
            )
            self._sessions = {
                known: open_session
                for known, open_session in self._sessions.items()
                if not known.is_closed()
            }
            self._sessions[loop] = session
        return session

    async def aclose(self) -> None:
        loop = asyncio.get_running_loop()
        session = self._sessions.pop(loop, None)
        if session is not None:
            await session.close()

    async def astream(self, request: ModelRequest) -> AsyncIterator[str]:
        async for piece in self._astream(request, self.pieces):
            yield piece

    async def astream_events(self, request: ModelRequest) -> AsyncIterator[str | ToolCall]:
        """A turn of a step with tools: text pieces, then the tool calls the model asked
        for (none when it answered in text)."""
        async for item in self._astream(request, self.turn_events):
            yield item

    def turn_events(
        self, response: aiohttp.ClientResponse, usage: ReportedUsage | None = None
    ) -> AsyncIterator[str | ToolCall]:
        return _turn_events(response, usage)

    async def _astream(
        self,
        request: ModelRequest,
        read: Callable[[aiohttp.ClientResponse, ReportedUsage], AsyncIterator[Any]],
    ) -> AsyncIterator[Any]:
        model = request.model or self.model
        if not model:
            raise ModelError(
                f"{self.name} backend: no model configured",
                False,
                summary="model not configured",
                misconfigured=True,
            )
        # A tenant's own key and endpoint (admin, by reference) win over the backend's.
        key_env = request.api_key_env or self.api_key_env
        key = os.environ.get(key_env, "") if key_env else ""
        if request.api_key_env and not key:
            raise ModelError(
                f"{self.name} backend: the tenant's key variable {key_env} is not set",
                False,
                summary="model API key not configured",
                misconfigured=True,
            )
        base_url = (request.base_url or self.base_url).rstrip("/")
        url, headers, body = self.build_request(base_url, model, key, request)
        finished = False
        try:
            # No redirects: a compatible server does not redirect an API call, and following
            # one could send the key elsewhere.
            async with self._session().post(
                url, json=body, headers=headers, allow_redirects=False
            ) as response:
                try:
                    if response.status != 200:
                        raise await _status_error(response)
                    async for piece in read(response, request.usage):
                        yield piece
                    finished = True
                finally:
                    if not finished:
                        # Cancelled, timed out or failed mid-body: close the connection so
                        # the provider stops generating, rather than return it to the pool.
                        response.close()
        except ModelError:
            raise
        except (aiohttp.ClientError, OSError) as error:
            # Refused, reset, cut mid-body, or no connection within connect_timeout_s.
            raise ModelError(
                f"connection to the model failed: {error!r}", True, summary="model unreachable"
            ) from None
        except ValueError as error:
            # aiohttp's line reader refuses a line past its buffer: not a stream we can read.
            raise ModelError(f"model stream unreadable: {error}", False) from None

    def build_request(
        self, base_url: str, model: str, key: str, request: ModelRequest
    ) -> tuple[str, dict[str, str], dict[str, Any]]:
        """(URL, headers, JSON body) of the streaming call: OpenAI's chat completions."""
        headers = {"Accept": "text/event-stream"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        body: dict[str, Any] = {
            "model": model,
            "messages": [{"role": "user", "content": request.prompt}],
            "stream": True,
            # The call's token usage in the stream's last chunk (streams/usage.py).
            "stream_options": {"include_usage": True},
        }
        body.update(passed_options(request.options))
        if request.tools:
            add_openai_tools(body, request)
        return f"{base_url}/chat/completions", headers, body

    def pieces(
        self, response: aiohttp.ClientResponse, usage: ReportedUsage | None = None
    ) -> AsyncIterator[str]:
        return _pieces(response, usage)


def passed_options(options: dict[str, Any]) -> dict[str, Any]:
    """The run options a provider is sent: only known ones, of the types each accepts
    (options come from clients)."""
    passed = {}
    for option, types in PASSED_OPTIONS.items():
        value = options.get(option)
        if isinstance(value, types) and not isinstance(value, bool):
            passed[option] = value
    return passed


async def sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, str]]:
    """(event name, data) of each server-sent event of the response, in order."""
    name, data = "", []
    async for raw in response.content:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif not line and data:
            yield name, "\n".join(data)
            name, data = "", []


async def _pieces(
    response: aiohttp.ClientResponse, usage: ReportedUsage | None = None
) -> AsyncIterator[str]:
    """The content pieces of an SSE chat-completion stream: `_turn_events` without the
    tool calls, which a request that offers no tools does not ask for."""
    async with aclosing(_turn_events(response, usage)) as events:
        async for item in events:
            if isinstance(item, str):
                yield item


def add_openai_tools(body: dict[str, Any], request: ModelRequest) -> None:
    """The tools offered and the rounds so far, as chat completions expects them: each
    round an assistant message with its `tool_calls`, then one `role: tool` message per
    call with its result."""
    body["tools"] = [{"type": "function", "function": spec} for spec in request.tools]
    if request.tool_choice == "none":
        body["tool_choice"] = "none"
    messages = body["messages"]
    for turn in request.rounds:
        messages.append(
            {
                "role": "assistant",
                # A string even when the model said nothing: llama-cpp-python's server
                # refuses a null content (its request schema) and one left out (its chat
                # template), where OpenAI's API takes all three beside tool_calls.
                "content": turn.text,
                "tool_calls": [
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {
                            "name": call.name,
                            # Sent back as valid JSON: some servers parse what they sent.
                            "arguments": json.dumps(arguments_object(call.arguments)),
                        },
                    }
                    for call in turn.calls
                ],
            }
        )
        for result in turn.results:
            messages.append(
                {"role": "tool", "tool_call_id": result.call_id, "content": result.content}
            )


async def _turn_events(
    response: aiohttp.ClientResponse, usage: ReportedUsage | None = None
) -> AsyncGenerator[str | ToolCall, None]:
    """Content pieces, then the turn's tool calls, assembled from `delta.tool_calls`
    fragments (index, id, function.name, function.arguments). ModelError if the stream ends
    without `[DONE]` (or a finish_reason) or carries an error; a chunk's `usage` goes to
    `usage`."""
    finished = False
    calls = ToolCallAssembler()
    async for _, payload in sse_events(response):
        if payload.strip() == "[DONE]":
            finished = True
            continue
        event = _json_event(payload)
        if "error" in event:
            raise ModelError(f"model stream error: {_error_message(event)}", True)
        if usage is not None:
            report_openai_usage(event.get("usage"), usage)
        for choice in event.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if not isinstance(delta, dict):
                continue
            content = delta.get("content")
            if isinstance(content, str) and content:
                yield content
            for fragment in delta.get("tool_calls") or ():
                if not isinstance(fragment, dict):
                    continue
                function = fragment.get("function")
                function = function if isinstance(function, dict) else {}
                calls.add(
                    fragment.get("index", 0),
                    fragment.get("id"),
                    function.get("name"),
                    function.get("arguments"),
                )
            if choice.get("finish_reason"):
                finished = True
    if not finished:
        raise ModelError("model stream ended before its end ([DONE])", True)
    for call in calls.calls():
        yield call


def report_openai_usage(fields: Any, usage: ReportedUsage) -> None:
    """An OpenAI-style `usage` object's counts (absent, null or malformed: nothing)."""
    if isinstance(fields, dict):
        usage.report(
            token_count(fields.get("prompt_tokens")), token_count(fields.get("completion_tokens"))
        )


def _json_event(payload: str) -> dict[str, Any]:
    try:
        event = json.loads(payload)
    except ValueError:
        raise ModelError(f"model stream: malformed event {payload[:200]!r}", False) from None
    if not isinstance(event, dict):
        raise ModelError(f"model stream: unexpected event {payload[:200]!r}", False)
    return event


async def _status_error(response: aiohttp.ClientResponse) -> ModelError:
    status = response.status
    try:
        raw = await response.content.read(MAX_ERROR_BODY)
    except (aiohttp.ClientError, OSError):
        raw = b""
    text = raw[:MAX_ERROR_BODY].decode("utf-8", "replace")
    try:
        message = _error_message(json.loads(text))
    except ValueError:
        message = text.strip()[:300]
    transient = status in TRANSIENT_STATUSES or status >= 500
    return ModelError(
        f"model server answered {status}: {message}",
        transient,
        retry_after_s=retry_after(response.headers) if transient else None,
        summary=f"provider error {status}",
        status=status,
    )


def _error_message(body: Any) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or error)[:300]
    return str(error or body)[:300]


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds the provider asks to wait: `retry-after-ms`, else `Retry-After` in seconds
    or as an HTTP date; None when absent or unreadable. Capped at an hour."""
    seconds: float | None = None
    if value := headers.get("retry-after-ms"):
        try:
            seconds = float(value) / 1000
        except ValueError:
            seconds = None
    if seconds is None and (value := headers.get("retry-after")):
        try:
            seconds = float(value)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
                seconds = when.timestamp() - time.time()
            except (TypeError, ValueError):
                return None
    if seconds is None or seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def from_settings() -> OpenAIBackend:
    config = conf()
    return OpenAIBackend(
        base_url=config.openai_base_url,
        model=config.openai_model,
        api_key_env=config.openai_api_key_env,
    )
