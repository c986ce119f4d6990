"""A model backend speaking the OpenAI chat-completions API with streaming (server-sent
events): OpenAI itself and the servers compatible with it (vLLM, Ollama, llama.cpp's
server, ...).

One POST to `{base_url}/chat/completions` with `"stream": true`; each `data:` event's
`choices[0].delta.content` is yielded as a piece, until `data: [DONE]`.

- **Secrets.** The API key is read from the environment variable named in the
  configuration, at each call; the key itself is never in settings or the database. No
  variable configured, or an empty one: no `Authorization` header (local servers need none).
- **Time.** Every network wait is bounded by the call's `deadline`, and a watcher thread
  aborts the connection when the deadline passes or `request.cancelled` is set, so a
  stalled or cancelled call frees its worker at once and the server sees the connection
  closed.
- **Errors.** 408, 429, 5xx, connection failures, a connection lost mid-stream and a
  stalled stream are transient (`ModelError.transient`); any other 4xx, a malformed reply
  or missing configuration are permanent. The provider's Retry-After (or retry-after-ms),
  when given, is carried as `ModelError.retry_after_s`.
"""

from __future__ import annotations

import email.utils
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx2

from workers.backends import ModelCancelled, ModelError, ModelRequest, ModelTimeout

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
    """Streams chat completions from an OpenAI-compatible server. Thread-safe: one
    connection pool per process, shared by the calls in it."""

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str = "",
        api_key_env: str = "",
        *,
        connect_timeout_s: float = 5.0,
        name: str = "openai",
        transport: httpx2.BaseTransport | None = None,
    ) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self.connect_timeout_s = connect_timeout_s
        # No redirects: a compatible server does not redirect an API call, and following
        # one could send the key elsewhere.
        self._client = httpx2.Client(follow_redirects=False, transport=transport)

    def close(self) -> None:
        self._client.close()

    def stream(self, request: ModelRequest, deadline: float) -> Iterator[str]:
        model = request.model or self.model
        if not model:
            raise ModelError(
                f"{self.name} backend: no model configured", False, summary="model not configured"
            )
        # A tenant's own key and endpoint (admin, by reference) win over the backend's.
        key_env = request.api_key_env or self.api_key_env
        key = os.environ.get(key_env, "") if key_env else ""
        if request.api_key_env and not key:
            raise ModelError(
                f"{self.name} backend: the tenant's key variable {key_env} is not set",
                False,
                summary="model API key not configured",
            )
        base_url = (request.base_url or self.base_url).rstrip("/")
        url, headers, body = self.build_request(base_url, model, key, request)
        left = deadline - time.monotonic()
        if request.cancelled.is_set():
            raise ModelCancelled()
        if left <= 0:
            raise ModelTimeout(transient=True)
        timeout = httpx2.Timeout(left, connect=min(self.connect_timeout_s, left))
        abort = _Abort(request.cancelled, deadline)
        try:
            with self._client.stream(
                "POST",
                url,
                json=body,
                headers=headers,
                timeout=timeout,
            ) as response:
                abort.watch(response)
                if response.status_code != 200:
                    raise _status_error(response)
                yield from self.pieces(response)
        except ModelError:
            if abort.reason:
                raise abort.error() from None
            raise
        except httpx2.TimeoutException as error:
            if abort.reason == "cancelled":
                raise ModelCancelled() from None
            raise ModelTimeout(
                f"model call passed its soft time limit ({type(error).__name__})", transient=True
            ) from None
        except (httpx2.TransportError, OSError) as error:
            if abort.reason:
                raise abort.error() from None
            raise ModelError(
                f"connection to the model failed: {error!r}", True, summary="model unreachable"
            ) from None
        except Exception:
            # Whatever a connection torn down under a read raises (after an abort).
            if abort.reason:
                raise abort.error() from None
            raise
        finally:
            abort.stop()

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
        }
        body.update(passed_options(request.options))
        return f"{base_url}/chat/completions", headers, body

    def pieces(self, response: httpx2.Response) -> Iterator[str]:
        return _pieces(response)


def passed_options(options: dict[str, Any]) -> dict[str, Any]:
    """The run options a provider is sent: only known ones, of the types each accepts
    (options come from clients)."""
    passed = {}
    for option, types in PASSED_OPTIONS.items():
        value = options.get(option)
        if isinstance(value, types) and not isinstance(value, bool):
            passed[option] = value
    return passed


def sse_events(response: httpx2.Response) -> Iterator[tuple[str, str]]:
    """(event name, data) of each server-sent event of the response, in order."""
    name, data = "", []
    for line in response.iter_lines():
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif not line and data:
            yield name, "\n".join(data)
            name, data = "", []


def _pieces(response: httpx2.Response) -> Iterator[str]:
    """The content pieces of an SSE chat-completion stream; ModelError if it ends without
    `[DONE]` (or a finish_reason) or carries an error."""
    finished = False
    for _, payload in sse_events(response):
        if payload.strip() == "[DONE]":
            # Read on to the body's end (its last chunk, at once) so the connection goes
            # back to the pool for the next call rather than being closed.
            finished = True
            continue
        event = _json_event(payload)
        if "error" in event:
            raise ModelError(f"model stream error: {_error_message(event)}", True)
        for choice in event.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            content = (choice.get("delta") or {}).get("content")
            if isinstance(content, str) and content:
                yield content
            if choice.get("finish_reason"):
                finished = True
    if not finished:
        raise ModelError("model stream ended before its end ([DONE])", True)


def _json_event(payload: str) -> dict[str, Any]:
    try:
        event = json.loads(payload)
    except ValueError:
        raise ModelError(f"model stream: malformed event {payload[:200]!r}", False) from None
    if not isinstance(event, dict):
        raise ModelError(f"model stream: unexpected event {payload[:200]!r}", False)
    return event


def _status_error(response: httpx2.Response) -> ModelError:
    status = response.status_code
    raw = b""
    try:
        for chunk in response.iter_bytes():
            raw += chunk
            if len(raw) >= MAX_ERROR_BODY:
                break
    except httpx2.HTTPError:
        pass
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
    )


def _error_message(body: Any) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or error)[:300]
    return str(error or body)[:300]


def retry_after(headers: httpx2.Headers) -> float | None:
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


class _Abort:
    """Watches a call from a thread: when `cancelled` is set or the deadline passes, shuts
    the response's socket down, which wakes the read blocked on it and tells the server."""

    def __init__(self, cancelled: threading.Event, deadline: float) -> None:
        self.cancelled = cancelled
        self.deadline = deadline
        self.reason: str | None = None
        self._done = False
        self._lock = threading.Lock()

    def watch(self, response: httpx2.Response) -> None:
        stream = response.extensions.get("network_stream")
        sock = stream.get_extra_info("socket") if stream is not None else None
        threading.Thread(target=self._run, args=(sock,), name="openai-watch", daemon=True).start()

    def _run(self, sock: socket.socket | None) -> None:
        while True:
            # Woken at once by a cancellation; at the latest every 0.1 s to see the end.
            self.cancelled.wait(min(max(self.deadline - time.monotonic(), 0), 0.1))
            with self._lock:
                if self._done:
                    return
                if self.cancelled.is_set():
                    self.reason = "cancelled"
                elif time.monotonic() >= self.deadline:
                    self.reason = "deadline"
                else:
                    continue
                if sock is not None:
                    try:
                        # The plain socket's shutdown, also under TLS: it wakes a blocked
                        # read at once (close() alone would not) and sends the server a FIN.
                        socket.socket.shutdown(sock, socket.SHUT_RDWR)
                    except OSError:
                        pass
                return

    def stop(self) -> None:
        with self._lock:
            self._done = True

    def error(self) -> ModelError:
        if self.reason == "cancelled":
            return ModelCancelled()
        return ModelTimeout("model call passed its soft time limit (stalled)", transient=True)


def from_settings() -> OpenAIBackend:
    from django.conf import settings

    config = settings.SWITCHBOARD
    return OpenAIBackend(
        base_url=config.get("OPENAI_BASE_URL") or "https://api.openai.com/v1",
        model=config.get("OPENAI_MODEL") or "",
        api_key_env=config.get("OPENAI_API_KEY_ENV") or "",
    )
