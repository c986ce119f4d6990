"""Model backends behind one small interface: an async stream of text pieces, or a ModelError.

Backends run on the worker's model-call runtime (workers/runtime.py): one asyncio event loop
per worker process holding thousands of calls at once, so a backend must never block the
loop. `astream(request)` is an async iterator of pieces. The runtime bounds it in time (the
step's soft limit and the run's deadline, as asyncio timeouts) and stops it by cancelling
its task (a cancelled run, a run taken over by a newer attempt, a worker draining); a
backend only has to let `asyncio.CancelledError` through and close what it opened, which
`async with` does.

A backend that only has a blocking `stream(request, deadline)` iterator (the interface of
earlier versions) still works: it runs in the runtime's thread pool, and must then honour
`deadline` (time.monotonic()) and `request.cancelled` itself, waiting with
`request.cancelled.wait(seconds)`, never `time.sleep`.

Token usage travels beside the pieces, not among them: a backend that learns what the call
cost (a provider's usage fields) calls `request.usage.report(...)`, at any time during the
stream. One that never does leaves the step to estimate it (streams/usage.py).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import re
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from streams.usage import estimate_tokens


class ModelError(Exception):
    """`transient`: the same call may succeed if tried again. `retry_after_s`: how long the
    provider asked us to wait before that (its Retry-After), when it said. `summary`: what
    the client may be told of it (a degraded reply.done's detail.message), short and free
    of keys, URLs and the provider's own words; "" lets the caller say something generic.
    `status`: the provider's HTTP status, when it answered one. `misconfigured`: the call
    could not be made as configured (no model name, the key's variable unset): a fault of
    this model's configuration, not of the request (what failover decides on)."""

    def __init__(
        self,
        detail: str,
        transient: bool,
        retry_after_s: float | None = None,
        summary: str = "",
        status: int | None = None,
        misconfigured: bool = False,
    ) -> None:
        super().__init__(detail)
        self.transient = transient
        self.retry_after_s = retry_after_s
        self.summary = summary
        self.status = status
        self.misconfigured = misconfigured


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


@dataclass(slots=True)
class ReportedUsage:
    """What the provider said a call cost, as the backend heard it (None: not said). A
    later report of a part replaces the earlier one (Anthropic sends running totals)."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None

    def report(
        self, prompt_tokens: int | None = None, completion_tokens: int | None = None
    ) -> None:
        if prompt_tokens is not None:
            self.prompt_tokens = prompt_tokens
        if completion_tokens is not None:
            self.completion_tokens = completion_tokens


@dataclass(frozen=True, slots=True)
class ModelRequest:
    model: str
    prompt: str
    options: dict[str, Any] = field(default_factory=dict)
    attempt: int = 1
    # Set when the run stops needing this call (cancelled, ended by the sweeper, fenced by a
    # newer attempt): what a blocking `stream` backend watches. Async backends are cancelled.
    cancelled: threading.Event = field(default_factory=threading.Event, compare=False)
    # The tenant's overrides for this agent (admin): the NAME of the variable holding its
    # API key, and its endpoint. Empty: the backend's own configuration.
    api_key_env: str = ""
    base_url: str = ""
    # Tool calling (a backend with `astream_events`): the tools offered, as
    # {"name", "description", "parameters": JSON schema}; the rounds of calls made so far in
    # this step, fed back to the model; "none" to forbid further calls (the last round).
    tools: tuple[dict[str, Any], ...] = ()
    rounds: tuple[ToolRound, ...] = ()
    tool_choice: str = "auto"
    # Filled by a backend that knows what the call cost (see the module doc).
    usage: ReportedUsage = field(default_factory=ReportedUsage, compare=False)


# Bounds on what a model's tool calls may hold, whatever it streams: calls kept per turn
# (later ones are dropped), characters of one call's arguments and of its name.
MAX_TOOL_CALLS_PER_TURN = 16
MAX_TOOL_ARGUMENT_CHARS = 16_384
MAX_TOOL_NAME_CHARS = 128
TOOL_CALL_ID = re.compile(r"\A[A-Za-z0-9_-]{1,64}\Z")


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A call the model asked for: its id, the tool's name and the arguments as the JSON
    text it streamed (`oversized`: cut at MAX_TOOL_ARGUMENT_CHARS, so not to be run)."""

    id: str
    name: str
    arguments: str
    oversized: bool = False


@dataclass(frozen=True, slots=True)
class ToolResult:
    call_id: str
    name: str
    content: str
    is_error: bool = False


@dataclass(frozen=True, slots=True)
class ToolRound:
    """One round of a step's tool loop as the model must be told it again: what it said
    (text and calls) and what each call answered."""

    text: str
    calls: tuple[ToolCall, ...]
    results: tuple[ToolResult, ...]


class ToolCallAssembler:
    """Tool calls from their streamed fragments (by index), bounded: at most
    MAX_TOOL_CALLS_PER_TURN calls, names and arguments cut at their bounds. Ids a provider
    gives that are missing, malformed or repeated are replaced, so each call of a step has
    a distinct id of safe characters."""

    def __init__(self, round_index: int = 0) -> None:
        self.round_index = round_index
        self._calls: dict[int, dict[str, Any]] = {}
        self.dropped = 0

    def add(self, index: Any, call_id: Any = None, name: Any = None, arguments: Any = None) -> None:
        if isinstance(index, bool) or not isinstance(index, int):
            return
        call = self._calls.get(index)
        if call is None:
            if len(self._calls) >= MAX_TOOL_CALLS_PER_TURN:
                self.dropped += 1
                return
            call = self._calls[index] = {"id": "", "name": "", "arguments": [], "chars": 0}
            call["oversized"] = False
        if isinstance(call_id, str) and call_id and not call["id"]:
            call["id"] = call_id
        # A name may come in fragments (appended), but llama-cpp-python's server repeats
        # the whole name (and id) in every fragment of a call: a repeat is not appended.
        if isinstance(name, str) and name and name != call["name"]:
            call["name"] = (call["name"] + name)[:MAX_TOOL_NAME_CHARS]
        if isinstance(arguments, str) and arguments and not call["oversized"]:
            if call["chars"] + len(arguments) > MAX_TOOL_ARGUMENT_CHARS:
                call["oversized"] = True
            else:
                call["arguments"].append(arguments)
                call["chars"] += len(arguments)

    def calls(self, seen_ids: set[str] | None = None) -> list[ToolCall]:
        """The calls in index order; `seen_ids` (the step's ids so far) grows with them."""
        seen = seen_ids if seen_ids is not None else set()
        made = []
        for position, index in enumerate(sorted(self._calls)):
            call = self._calls[index]
            call_id = call["id"]
            if not TOOL_CALL_ID.match(call_id) or call_id in seen:
                call_id = f"call_{self.round_index}_{position}"
                while call_id in seen:
                    call_id += "x"
            seen.add(call_id)
            made.append(
                ToolCall(call_id, call["name"], "".join(call["arguments"]), call["oversized"])
            )
        return made


def arguments_object(text: str) -> dict[str, Any]:
    """A call's arguments as a JSON object to send back to the provider: {} when they are
    not one (the model was told so in the call's result)."""
    try:
        value = json.loads(text) if text.strip() else {}
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


class ToolBackend(Protocol):
    """A backend that can offer tools: `astream_events` yields text pieces and, after the
    model's turn ended, the ToolCall objects it asked for."""

    name: str

    def astream_events(self, request: ModelRequest) -> AsyncIterator[str | ToolCall]: ...


def supports_tools(backend: Any) -> bool:
    return callable(getattr(backend, "astream_events", None))


@runtime_checkable
class ModelBackend(Protocol):
    name: str

    def astream(self, request: ModelRequest) -> AsyncIterator[str]: ...


@runtime_checkable
class BlockingModelBackend(Protocol):
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


async def _sleep_until(moment: float) -> None:
    delay = moment - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


class SimulatedBackend:
    """Echoes the prompt, shaped by options so load and failure can be rehearsed:
    `latency_ms` before the first piece, `chunks` pieces, `chunk_delay_ms` between pieces,
    `fail` "error" (a transient error on every attempt), "error_once" (only on the first
    attempt) or "timeout" (stalls until the runtime's soft limit ends the call). A waiting
    call is a sleeping coroutine: it costs the worker nothing but a timer."""

    name = "simulated"
    MAX_CHUNKS = 1000
    MAX_LATENCY_MS = 600_000
    MAX_CHUNK_DELAY_MS = 600_000

    async def astream(self, request: ModelRequest) -> AsyncIterator[str]:
        options = request.options
        latency_ms = _bounded_int(options.get("latency_ms"), 0, 0, self.MAX_LATENCY_MS)
        chunks = _bounded_int(options.get("chunks"), 4, 1, self.MAX_CHUNKS)
        chunk_delay_ms = _bounded_int(options.get("chunk_delay_ms"), 0, 0, self.MAX_CHUNK_DELAY_MS)
        fail = options.get("fail")
        start = time.monotonic()
        if fail == "timeout":
            await asyncio.Event().wait()
        if fail == "error" or (fail == "error_once" and request.attempt <= 1):
            raise ModelError("simulated model error", transient=True)
        first = start + latency_ms / 1000
        await _sleep_until(first)
        for index, piece in enumerate(split_evenly(request.prompt, chunks)):
            if index and chunk_delay_ms:
                # Scheduled from the first piece, not from the previous yield, so time the
                # consumer spends between pieces does not stretch the whole reply.
                await _sleep_until(first + index * chunk_delay_ms / 1000)
            yield piece
        # Reported as a provider would, at the end: its "tokenizer" is the estimate's rule.
        tokens = estimate_tokens(request.prompt)
        request.usage.report(prompt_tokens=tokens, completion_tokens=tokens)


async def blocking_stream(
    backend: BlockingModelBackend, request: ModelRequest, deadline: float
) -> AsyncIterator[str]:
    """A blocking `stream` backend's pieces, read in the loop's default executor (the
    runtime's bounded thread pool) and handed to the loop one by one. Leaving early (a
    cancel, a timeout) sets `request.cancelled`, which such a backend must watch."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def hand(kind: str, value: Any) -> None:
        try:
            loop.call_soon_threadsafe(pieces.put_nowait, (kind, value))
        except RuntimeError:  # the loop has closed: nobody is waiting any more
            pass

    def produce() -> None:
        try:
            for piece in backend.stream(request, deadline):
                if request.cancelled.is_set():
                    return
                hand("piece", piece)
        except BaseException as error:  # re-raised in the loop, where the step handles it
            hand("error", error)
        finally:
            hand("end", None)

    producer = loop.run_in_executor(None, produce)
    try:
        while True:
            kind, value = await pieces.get()
            if kind == "piece":
                yield value
            elif kind == "error":
                raise value
            else:
                return
    finally:
        request.cancelled.set()
        producer.cancel()


def open_stream(
    backend: ModelBackend | BlockingModelBackend, request: ModelRequest, deadline: float
) -> AsyncIterator[str]:
    """The call's pieces, whichever interface the backend has."""
    if isinstance(backend, ModelBackend):
        return backend.astream(request)
    return blocking_stream(backend, request, deadline)


def _bounded_int(value: Any, default: int, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return default
    return int(min(max(value, low), high))


_backends: dict[str, ModelBackend | BlockingModelBackend] = {"simulated": SimulatedBackend()}


# Backends built on first use, from settings, in the process that uses them (after a
# prefork worker's fork, so no connection pool is shared across processes).
_factories: dict[str, str] = {
    "openai": "workers.openai_backend.from_settings",
    "anthropic": "workers.anthropic_backend.from_settings",
}
_factory_lock = threading.Lock()


def backend_names() -> list[str]:
    """The names a step (or a tenant's fallback list) may use: the backends registered in
    this process and those built from settings on first use."""
    return sorted(set(_backends) | set(_factories))


def get_backend(name: str) -> ModelBackend | BlockingModelBackend:
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


async def close_backends() -> None:
    """Close what backends hold open on the calling loop (HTTP sessions), at shutdown."""
    for backend in list(_backends.values()):
        close = getattr(backend, "aclose", None)
        if close is not None:
            await close()


def register_backend(backend: ModelBackend | BlockingModelBackend) -> None:
    if not isinstance(backend, (ModelBackend, BlockingModelBackend)):
        raise TypeError(f"{backend!r} has neither astream(request) nor stream(request, deadline)")
    _backends[backend.name] = backend
