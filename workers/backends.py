"""Model backends behind one small interface: a stream of text pieces, or a ModelError.

A backend honours `deadline` (time.monotonic()) itself: it must not block past it, so a
stalled model is abandoned when its soft limit runs out rather than left hanging. It also
honours `request.cancelled`: once that event is set (the run was cancelled, finished by
someone else or taken over by a newer attempt) it stops waiting at once and raises
ModelCancelled (or simply stops yielding), so the worker is free again in moments rather
than at the call's soft limit. Wait with `request.cancelled.wait(seconds)`, never
`time.sleep`.
"""

from __future__ import annotations

import importlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol


class ModelError(Exception):
    """`transient`: the same call may succeed if tried again. `retry_after_s`: how long the
    provider asked us to wait before that (its Retry-After), when it said. `summary`: what
    the client may be told of it (a degraded reply.done's detail.message), short and free
    of keys, URLs and the provider's own words; "" lets the caller say something generic."""

    def __init__(
        self,
        detail: str,
        transient: bool,
        retry_after_s: float | None = None,
        summary: str = "",
    ) -> None:
        super().__init__(detail)
        self.transient = transient
        self.retry_after_s = retry_after_s
        self.summary = summary


class ModelTimeout(ModelError):
    def __init__(
        self, detail: str = "model call passed its soft time limit", transient: bool = False
    ) -> None:
        super().__init__(detail, transient=transient)


class ModelCancelled(ModelError):
    """The call was abandoned because `request.cancelled` was set; the caller owes nobody
    an answer for it (whoever cancelled the run has written its reply.done)."""

    def __init__(self, detail: str = "model call abandoned: the run no longer needs it") -> None:
        super().__init__(detail, transient=False)


@dataclass(frozen=True, slots=True)
class ModelRequest:
    model: str
    prompt: str
    options: dict[str, Any] = field(default_factory=dict)
    attempt: int = 1
    # Set by the step's lease keeper when the run stops needing this call (cancelled,
    # ended by the sweeper, or fenced by a newer attempt). Backends must honour it.
    cancelled: threading.Event = field(default_factory=threading.Event, compare=False)
    # The tenant's overrides for this agent (admin): the NAME of the variable holding its
    # API key, and its endpoint. Empty: the backend's own configuration.
    api_key_env: str = ""
    base_url: str = ""


class ModelBackend(Protocol):
    name: str

    def stream(self, request: ModelRequest, deadline: float) -> Iterator[str]: ...


def split_evenly(text: str, pieces: int) -> list[str]:
    """Split text into `pieces` contiguous non-empty parts (fewer when text is shorter)."""
    pieces = max(1, min(pieces, len(text))) if text else 1
    size, extra = divmod(len(text), pieces)
    parts, start = [], 0
    for index in range(pieces):
        end = start + size + (1 if index < extra else 0)
        parts.append(text[start:end])
        start = end
    return parts


def _sleep_until(moment: float, deadline: float, cancelled: threading.Event) -> None:
    """Wait until `moment`, or until the deadline (ModelTimeout) if that comes first; a
    cancellation ends the wait at once (ModelCancelled)."""
    until = min(moment, deadline)
    delay = until - time.monotonic()
    if cancelled.wait(delay) if delay > 0 else cancelled.is_set():
        raise ModelCancelled()
    if moment > deadline:
        raise ModelTimeout()


class SimulatedBackend:
    """Echoes the prompt, shaped by options so load and failure can be rehearsed:
    `latency_ms` before the first piece, `chunks` pieces, `chunk_delay_ms` between pieces,
    `fail` "error" (a transient error on every attempt), "error_once" (only on the first
    attempt) or "timeout" (stalls). Every wait is bounded by the call's deadline and ends
    at once when the request is cancelled."""

    name = "simulated"
    MAX_CHUNKS = 1000
    MAX_LATENCY_MS = 600_000
    MAX_CHUNK_DELAY_MS = 600_000

    def stream(self, request: ModelRequest, deadline: float) -> Iterator[str]:
        options = request.options
        latency_ms = _bounded_int(options.get("latency_ms"), 0, 0, self.MAX_LATENCY_MS)
        chunks = _bounded_int(options.get("chunks"), 4, 1, self.MAX_CHUNKS)
        chunk_delay_ms = _bounded_int(options.get("chunk_delay_ms"), 0, 0, self.MAX_CHUNK_DELAY_MS)
        fail = options.get("fail")
        cancelled = request.cancelled
        start = time.monotonic()
        if fail == "timeout":
            _sleep_until(float("inf"), deadline, cancelled)
        if fail == "error" or (fail == "error_once" and request.attempt <= 1):
            raise ModelError("simulated model error", transient=True)
        first = start + latency_ms / 1000
        _sleep_until(first, deadline, cancelled)
        for index, piece in enumerate(split_evenly(request.prompt, chunks)):
            if index and chunk_delay_ms:
                # Scheduled from the first piece, not from the previous yield, so time the
                # consumer spends between pieces does not stretch the whole reply.
                _sleep_until(first + index * chunk_delay_ms / 1000, deadline, cancelled)
            yield piece


def _bounded_int(value: Any, default: int, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return default
    return int(min(max(value, low), high))


_backends: dict[str, ModelBackend] = {"simulated": SimulatedBackend()}


# Backends built on first use, from settings, in the process that uses them (after a
# prefork worker's fork, so no connection pool is shared across processes).
_factories: dict[str, str] = {
    "openai": "workers.openai_backend.from_settings",
    "anthropic": "workers.anthropic_backend.from_settings",
}
_factory_lock = threading.Lock()


def get_backend(name: str) -> ModelBackend:
    try:
        return _backends[name]
    except KeyError:
        if name not in _factories:
            raise
    with _factory_lock:
        if name not in _backends:
            module, _, attribute = _factories[name].rpartition(".")
            register_backend(getattr(importlib.import_module(module), attribute)())
        return _backends[name]


def register_backend(backend: ModelBackend) -> None:
    _backends[backend.name] = backend
