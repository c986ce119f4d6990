"""An asyncio client for Switchboard's wire protocol v1 (docs/protocol.md).

Used by the tests, the benchmarks and load replay, so the receive path is kept short: one
reader task per connection parses each frame once (orjson, straight from the undecoded
bytes) and hands it to whoever waits for it.

    client = await SwitchboardClient.connect("ws://127.0.0.1:8000/ws/v1/", token)
    ack = await client.send("room", "echo", "hello")
    deltas, done = await client.reply(ack["id"])
    await client.close()

Routing of what the server sends:

- `ack` and `error` frames carrying an `id` resolve the `send`/`publish` waiting for that
  id (`SwitchboardError` for an error); an error for a `cancel` resolves that `cancel`.
- `subscribed`, `unsubscribed`, `presence` and `pong` resolve the matching request. An
  `error` without an `id` fails the oldest such request still waiting (the server answers
  frames in order and names no id for them), except `history_expired`, which names its
  stream and is attached to that stream's `subscribe` result.
- `event` frames go to their stream's buffer (`next_event`, `events`), to the optional
  `on_event` callback, and, for `reply.*` events of this client's own `send`s, to the
  reply collector `reply()` reads (a `reply.restart` voids the run's deltas so far: the
  reply starts again at offset 0). Presence changes (`join`/`leave`, which carry no seq)
  are kept apart, in the stream's presence buffer (`next_presence`), so what `next_event`
  and `on_event` see is exactly the stream's seq-ordered events.
- Anything no request waits for (errors answering `send_raw`, for instance) is queued for
  `recv_frame()`. Raw frames and pending requests without ids should not be mixed: an
  id-less error is credited to the oldest pending request.

Per stream, the client tracks the last seq it saw and records every seq that is not the
next one in `seq_anomalies` (the protocol promises each seq once, in order, no gaps).

Reconnection with session resume is not built yet; `_on_closed` is where it belongs: the
client already keeps the welcome's `session` and every stream's `last_seq`, which is what
a resume (`?session=...`, or `subscribe` with `since`) needs.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import secrets
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import orjson
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

Frame = dict[str, Any]
Event = dict[str, Any]

_loads = orjson.loads
_dumps = orjson.dumps


class SwitchboardError(Exception):
    """The server answered a request with an `error` frame."""

    def __init__(
        self,
        code: str,
        status: int,
        detail: str,
        retry_after_ms: int | None = None,
        frame: Frame | None = None,
    ) -> None:
        super().__init__(f"{code} ({status}): {detail}")
        self.code = code
        self.status = status
        self.detail = detail
        self.retry_after_ms = retry_after_ms
        self.frame = frame or {}

    @classmethod
    def from_frame(cls, frame: Frame) -> SwitchboardError:
        return cls(
            frame.get("code", "internal"),
            frame.get("status", 500),
            frame.get("detail", ""),
            frame.get("retry_after_ms"),
            frame,
        )


class SwitchboardClosed(ConnectionError):
    """The connection is closed. `code`/`reason` are the close frame's (1006 when none came);
    `frames` are the frames received before a welcome, which a refused connect never has."""

    def __init__(self, code: int | None, reason: str, frames: list[Frame] | None = None) -> None:
        super().__init__(f"connection closed: {code} {reason}".rstrip())
        self.code = code
        self.reason = reason
        self.frames = frames or []


class Inbox:
    """Events in arrival order, and the one reader waiting for the next."""

    __slots__ = ("items", "_waiter")

    def __init__(self) -> None:
        self.items: deque[Event] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def put(self, event: Event) -> None:
        self.items.append(event)
        self.wake()

    def wake(self) -> None:
        """Let the waiting reader look again (an event came, or the source ended)."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self, timeout: float, ended: Callable[[], BaseException | None]) -> Event:
        """The next event; waits up to `timeout` (TimeoutError), raising what `ended`
        returns once the source has ended and nothing is left."""
        items = self.items
        if items:
            return items.popleft()
        async with asyncio.timeout(timeout):
            while not items:
                error = ended()
                if error is not None:
                    raise error
                waiter = self._waiter = asyncio.get_running_loop().create_future()
                try:
                    await waiter
                finally:
                    self._waiter = None
        return items.popleft()


def answers_own_send(event: Event, client: str | None) -> bool:
    """Whether a reply event belongs to the run one of `client`'s sends started. Runs that
    other agents' replies started (their cause has a `depth`) keep the sender's client and
    message id in their cause too, but are not that send's reply."""
    cause = event["cause"]
    return cause.get("client") == client and not cause.get("depth")


def since_last_restart(events: list[Event]) -> list[Event]:
    """A run's `reply.delta` events after its last `reply.restart` (all of them when it has
    none), in the order given: the deltas whose texts make its `reply.done` text. A restart
    voids what the run streamed before it, and the reply starts again at offset 0."""
    deltas: list[Event] = []
    for event in events:
        kind = event["kind"]
        if kind == "reply.restart":
            deltas.clear()
        elif kind == "reply.delta":
            deltas.append(event)
        elif kind == "reply.snapshot":
            # The text from its offset: from 0 it replaces whatever came before.
            if event["data"]["offset"] == 0:
                deltas.clear()
            deltas.append(event)
    return deltas


def assembled_text(events: list[Event]) -> str:
    """One run's reply text from its events in stream order: deltas placed at their
    offsets, a `reply.restart` voiding the text so far, a `reply.snapshot` (compact
    catch-up) standing for the text from its offset, and a `reply.done` being the whole."""
    text = ""
    for event in events:
        kind, data = event["kind"], event["data"]
        if kind == "reply.restart":
            text = ""
        elif kind in ("reply.delta", "reply.snapshot"):
            offset = data["offset"]
            if kind == "reply.snapshot" or offset >= len(text):
                text = text[:offset] + data["text"]
        elif kind == "reply.done":
            text = data["text"]
    return text


def reply_problems(events: list[Event], done: Event | None = None) -> list[str]:
    """What is wrong with one run's reply events (deltas, restarts, in stream order), empty
    when nothing is: after each `reply.restart` the offsets start again at 0, and the
    deltas after the last one are contiguous and make the `reply.done` text."""
    problems: list[str] = []
    offset = 0
    for event in events:
        data = event["data"]
        if event["kind"] == "reply.restart":
            offset = 0
        elif event["kind"] == "reply.snapshot" and data["offset"] <= offset:
            offset = data["offset"] + len(data["text"])
        elif event["kind"] in ("reply.delta", "reply.snapshot"):
            if data["offset"] != offset:
                problems.append(
                    f"seq {event.get('seq')}: offset {data['offset']}, expected {offset}"
                )
            offset = data["offset"] + len(data["text"])
    if done is not None:
        text = "".join(delta["data"]["text"] for delta in since_last_restart(events))
        if done["data"]["text"] != text:
            problems.append("the reply.done text is not the deltas' since the last restart")
    return problems


# Tool calls a reply keeps (a run's are bounded by the server; this bounds a hostile one).
MAX_TOOL_CALLS_KEPT = 256


def apply_tool_event(tools: list[dict[str, Any]], event: Event) -> bool:
    """Fold a `tool.call`, `tool.result` or `reply.restart` into a run's tool calls: each
    call one dict {call, name, arguments, step, ok, text, error, truncated}; `ok` is None
    until its result came (a result whose call was missed, by joining mid-run, makes one
    with `arguments` None). A restart voids the calls of the step it names and later
    ones. Returns whether `tools` changed."""
    data = event.get("data") or {}
    kind = event.get("kind")
    if kind == "reply.restart":
        step = data.get("step")
        kept = [t for t in tools if isinstance(step, int) and (t["step"] or 0) < step]
        changed = len(kept) != len(tools)
        tools[:] = kept
        return changed
    if kind not in ("tool.call", "tool.result"):
        return False
    call = data.get("call")
    found = next((t for t in reversed(tools) if t["call"] == call), None)
    if kind == "tool.call" or found is None:
        if len(tools) >= MAX_TOOL_CALLS_KEPT:
            return False
        found = {
            "call": call,
            "name": data.get("name"),
            "arguments": data.get("arguments") if kind == "tool.call" else None,
            "step": data.get("step"),
            "ok": None,
            "text": None,
            "error": None,
            "truncated": False,
        }
        tools.append(found)
    if kind == "tool.result":
        found["ok"] = bool(data.get("ok"))
        found["text"] = data.get("text")
        found["error"] = data.get("error")
        found["truncated"] = bool(data.get("truncated"))
    return True


class ReplyCollector:
    """One run's reply as it streams: its deltas in order, then its reply.done; and the
    run's tool calls (`tools`, see `apply_tool_event`).

    A `reply.restart` voids the deltas so far (kept in `restarts`, counted per attempt):
    `deltas` are always those of the current attempt. An event whose seq is not past the
    last one taken is a repeat (a resume from a lagging checkpoint) and is ignored, so a
    restart delivered twice never voids the deltas that followed it.
    """

    __slots__ = ("deltas", "done", "restarts", "tools", "voided", "_last_seq")

    def __init__(self) -> None:
        self.deltas: list[Event] = []
        self.tools: list[dict[str, Any]] = []
        self.done: asyncio.Future[Event] | None = None
        self.restarts: list[Event] = []
        self.voided = 0  # deltas discarded by restarts
        self._last_seq: int | None = None

    def add(self, event: Event) -> None:
        seq = event.get("seq")
        if isinstance(seq, int):
            if self._last_seq is not None and seq <= self._last_seq:
                return
            self._last_seq = seq
        kind = event["kind"]
        if kind == "reply.delta":
            self.deltas.append(event)
        elif kind == "reply.snapshot":
            # Compact catch-up: the text from its offset, one event for the deltas it
            # folded; from offset 0 it stands for everything before it.
            if event["data"]["offset"] == 0:
                self.voided += len(self.deltas)
                self.deltas = []
            self.deltas.append(event)
        elif kind == "reply.restart":
            self.restarts.append(event)
            self.voided += len(self.deltas)
            self.deltas = []
            apply_tool_event(self.tools, event)
        elif kind in ("tool.call", "tool.result"):
            apply_tool_event(self.tools, event)
        elif kind == "reply.done":
            if self.done is None:
                self.done = asyncio.get_running_loop().create_future()
            if not self.done.done():
                self.done.set_result(event)

    async def wait(self, timeout: float) -> tuple[list[Event], Event]:
        if self.done is None:
            self.done = asyncio.get_running_loop().create_future()
        async with asyncio.timeout(timeout):
            done = await asyncio.shield(self.done)
        return self.deltas, done


@dataclass(slots=True)
class _Stream:
    """What the client knows of one stream on this connection."""

    buffer: Inbox = field(default_factory=Inbox)
    last_seq: int | None = None
    presence: Inbox = field(default_factory=Inbox)  # join/leave, in arrival order
    # A compact catch-up's end (its `subscribed` head): seqs up to it may skip folded
    # deltas, and a reply.snapshot may carry a seq below the last one seen.
    compact_through: int | None = None


@dataclass(slots=True)
class _IdlessRequest:
    kind: str  # the answer's type: subscribed, unsubscribed, presence, pong
    stream: str | None
    future: asyncio.Future[Frame]
    history_expired: Frame | None = None


def encode_positions(positions: Mapping[str, int]) -> str:
    """A resume's `positions` parameter: base64url, without padding, of the JSON object
    stream -> last seq processed."""
    return base64.urlsafe_b64encode(_dumps(dict(positions))).rstrip(b"=").decode()


def with_query(url: str, **params: str | None) -> str:
    """`url` with the given query parameters added (None values left out)."""
    parts = urlsplit(url)
    extra = urlencode({k: v for k, v in params.items() if v is not None})
    query = "&".join(q for q in (parts.query, extra) if q)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


class SwitchboardClient:
    """One WebSocket connection speaking protocol v1. Create it with `connect()`."""

    def __init__(
        self,
        ws: ClientConnection,
        *,
        buffer_events: bool = True,
        on_event: Callable[[Event], None] | None = None,
        track_replies: bool = True,
        on_frame: Callable[[Frame], None] | None = None,
        on_presence: Callable[[Event], None] | None = None,
    ) -> None:
        self._ws = ws
        self.buffer_events = buffer_events
        self.on_event = on_event
        # Sees every frame but events, in arrival order, before it is routed.
        self.on_frame = on_frame
        self.on_presence = on_presence  # join/leave events, whether buffered or not
        self.track_replies = track_replies
        self.welcome: Frame = {}
        self.client: str | None = None
        self.session: str | None = None
        self.close_code: int | None = None
        self.close_reason: str = ""
        # Every seq that was not the next one on its stream: (stream, expected, got).
        self.seq_anomalies: list[tuple[str, int, int]] = []
        self._welcome: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._early: list[Frame] = []
        self._pending: dict[str, asyncio.Future[Frame]] = {}
        self._cancels: dict[str, asyncio.Future[Frame]] = {}
        self._idless: deque[_IdlessRequest] = deque()
        self._streams: dict[str, _Stream] = {}
        self._replies: dict[str, ReplyCollector] = {}
        self._since: dict[str, int | None] = {}
        self._compact_asked: set[str] = set()  # subscribes with compact: true unanswered
        self._unrouted: deque[Frame] = deque()
        self._unrouted_waiter: asyncio.Future[None] | None = None
        self._ids = itertools.count(1)
        self._id_prefix = secrets.token_hex(4)
        self._closed = False
        self._reader = asyncio.get_running_loop().create_task(self._read())

    # --- connecting ------------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        url: str,
        token: str | None = None,
        session: str | None = None,
        *,
        positions: Mapping[str, int] | None = None,
        token_in_header: bool = False,
        wait_welcome: bool = True,
        timeout: float = 10.0,
        buffer_events: bool = True,
        on_event: Callable[[Event], None] | None = None,
        track_replies: bool = True,
        on_frame: Callable[[Frame], None] | None = None,
        on_presence: Callable[[Event], None] | None = None,
        **ws_options: Any,
    ) -> SwitchboardClient:
        """Open a connection and wait for the `welcome`.

        The token goes in the query string, or in `Authorization: Bearer` when
        `token_in_header`. With `session`, `positions` (stream -> the last seq the
        caller processed) makes the resume go on from those seqs rather than from what the
        server wrote to the old socket. A refused connection (close 4001, say) raises
        `SwitchboardClosed` with the close code and what, if anything, came before it.
        `ws_options` go to `websockets.connect` (`max_size`, `proxy`, ...); compression is
        off by default: it costs CPU on both ends for small JSON frames.
        `buffer_events=False` keeps no per-stream event buffers (use `on_event`), and
        `track_replies=False` keeps no reply collectors: long load runs need neither.
        """
        headers = dict(ws_options.pop("additional_headers", None) or {})
        if token is not None and token_in_header:
            headers["Authorization"] = f"Bearer {token}"
            token = None
        ws_options.setdefault("compression", None)
        ws_options.setdefault("open_timeout", timeout)
        ws = await ws_connect(
            with_query(
                url,
                token=token,
                session=session,
                positions=encode_positions(positions) if positions is not None else None,
            ),
            additional_headers=headers or None,
            **ws_options,
        )
        client = cls(
            ws,
            buffer_events=buffer_events,
            on_event=on_event,
            track_replies=track_replies,
            on_frame=on_frame,
            on_presence=on_presence,
        )
        if wait_welcome:
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.shield(client._welcome)
            except BaseException:
                await client.close()
                raise
        return client

    # --- requests --------------------------------------------------------------------

    def new_id(self) -> str:
        """A client message id unique for this connection (and, in practice, any)."""
        return f"{self._id_prefix}-{next(self._ids)}"

    async def send(
        self,
        stream: str,
        agent: str,
        text: str,
        options: dict[str, Any] | None = None,
        id: str | None = None,
        prev: str | None = None,
        timeout: float = 10.0,
    ) -> Frame:
        """Send a message to an agent; returns the `ack` (raises SwitchboardError)."""
        message_id = id or self.new_id()
        frame: Frame = {
            "type": "send",
            "id": message_id,
            "stream": stream,
            "agent": agent,
            "text": text,
        }
        if options is not None:
            frame["options"] = options
        if prev is not None:
            frame["prev"] = prev
        collector = None
        if self.track_replies and message_id not in self._replies:
            # Before the frame leaves: the reply may arrive before the ack is read.
            collector = self._replies[message_id] = ReplyCollector()
        try:
            return await self._request(message_id, frame, timeout)
        except SwitchboardError:
            # Refused: no run, so no reply to wait for.
            if collector is not None and self._replies.get(message_id) is collector:
                del self._replies[message_id]
            raise

    async def publish(
        self, stream: str, data: Any, id: str | None = None, timeout: float = 10.0
    ) -> Frame:
        """Publish `data` to a stream; returns the `ack` (raises SwitchboardError)."""
        message_id = id or self.new_id()
        frame = {"type": "publish", "id": message_id, "stream": stream, "data": data}
        return await self._request(message_id, frame, timeout)

    async def subscribe(
        self, stream: str, since: int | None = None, timeout: float = 10.0, compact: bool = False
    ) -> Frame:
        """Subscribe; returns the `subscribed` frame. When the server said `history_expired`
        first, the returned dict also holds that error frame under "history_expired".
        `compact`: the replies missed since `since` come as their reply.done alone, or one
        reply.snapshot while still streaming, not as every delta (docs/protocol.md)."""
        frame: Frame = {"type": "subscribe", "stream": stream}
        if since is not None:
            frame["since"] = since
        if compact:
            frame["compact"] = True
            self._compact_asked.add(stream)
        else:
            self._compact_asked.discard(stream)
        self._since[stream] = since
        request = await self._idless_request("subscribed", stream, frame, timeout)
        answer = request.future.result()
        if request.history_expired is not None:
            answer = {**answer, "history_expired": request.history_expired}
        return answer

    async def unsubscribe(self, stream: str, timeout: float = 10.0) -> Frame:
        request = await self._idless_request(
            "unsubscribed", stream, {"type": "unsubscribe", "stream": stream}, timeout
        )
        return request.future.result()

    async def presence(self, stream: str, timeout: float = 10.0) -> list[dict[str, Any]]:
        """The clients subscribed to the stream now (the `presence` frame's `clients`)."""
        request = await self._idless_request(
            "presence", stream, {"type": "presence", "stream": stream}, timeout
        )
        return request.future.result()["clients"]

    async def ping(self, timeout: float = 10.0) -> Frame:
        """Round trip a `ping`; also a barrier: the server has handled every earlier frame."""
        request = await self._idless_request("pong", None, {"type": "ping"}, timeout)
        return request.future.result()

    async def receipt(self, stream: str, seq: int) -> None:
        """Record that this client has processed `stream` up to `seq`. The server answers
        nothing; an error (forbidden stream, rate_limited) fails the next id-less request."""
        await self._ws.send(_dumps({"type": "receipt", "stream": stream, "seq": seq}), text=True)

    async def cancel(self, id: str, timeout: float = 10.0) -> None:
        """Cancel the run of one of this client's sends; raises SwitchboardError (not_found,
        ...) when the server refuses. Success has no answer frame, so a `ping` behind the
        cancel proves none is coming; the run then ends with reply.done `cancelled`."""
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._cancels[id] = future
        try:
            await self._ws.send(_dumps({"type": "cancel", "id": id}), text=True)
            await self.ping(timeout)
            if future.done():
                raise SwitchboardError.from_frame(future.result())
        finally:
            if self._cancels.get(id) is future:
                del self._cancels[id]

    async def _request(self, message_id: str, frame: Frame, timeout: float) -> Frame:
        if message_id in self._pending:
            raise ValueError(f"a request with id {message_id!r} is already waiting")
        self._check_open()
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._pending[message_id] = future
        try:
            await self._ws.send(_dumps(frame), text=True)
            async with asyncio.timeout(timeout):
                return await future
        finally:
            if self._pending.get(message_id) is future:
                del self._pending[message_id]

    async def _idless_request(
        self, kind: str, stream: str | None, frame: Frame, timeout: float
    ) -> _IdlessRequest:
        self._check_open()
        request = _IdlessRequest(kind, stream, asyncio.get_running_loop().create_future())
        self._idless.append(request)
        try:
            await self._ws.send(_dumps(frame), text=True)
            async with asyncio.timeout(timeout):
                await request.future
        finally:
            if not request.future.done():
                request.future.cancel()
            try:
                self._idless.remove(request)
            except ValueError:
                pass
        return request

    # --- events ----------------------------------------------------------------------

    def last_seq(self, stream: str) -> int | None:
        """The highest seq of `stream` this connection has seen (None: none yet)."""
        state = self._streams.get(stream)
        return state.last_seq if state else None

    async def next_event(self, stream: str, timeout: float = 10.0) -> Event:
        """The stream's next buffered event; waits up to `timeout` (TimeoutError) for one.
        Raises SwitchboardClosed once the connection is closed and the buffer is empty."""
        return await self._stream(stream).buffer.get(timeout, self._ended)

    async def next_presence(self, stream: str, timeout: float = 10.0) -> Event:
        """The stream's next `join` or `leave` event (no seq); waits like `next_event`."""
        return await self._stream(stream).presence.get(timeout, self._ended)

    def _ended(self) -> SwitchboardClosed | None:
        return SwitchboardClosed(self.close_code, self.close_reason) if self._closed else None

    def buffered_presence(self, stream: str) -> list[Event]:
        """The stream's join/leave events received but not yet taken (a copy)."""
        state = self._streams.get(stream)
        return list(state.presence.items) if state else []

    async def events(self, stream: str) -> AsyncIterator[Event]:
        """Every event of `stream`, in arrival order, until the connection closes."""
        while True:
            try:
                yield await self.next_event(stream, timeout=float("inf"))
            except SwitchboardClosed:
                return

    def buffered(self, stream: str) -> list[Event]:
        """The events of `stream` received but not yet taken (a copy)."""
        state = self._streams.get(stream)
        return list(state.buffer.items) if state else []

    async def reply(self, key: str, timeout: float = 30.0) -> tuple[list[Event], Event]:
        """Wait for a run's `reply.done`; returns (its reply.delta events in order, it).
        After a `reply.restart` the deltas are those since the last restart, whose texts
        make the reply.done text; the collector's `restarts` says how many came.

        `key` is the id of one of this client's `send`s (collected from the moment it was
        sent), or a run id (collected from now on: deltas before this call are missed).
        """
        collector = self._replies.get(key)
        if collector is None:
            collector = self._replies[key] = ReplyCollector()
        answer = await collector.wait(timeout)
        if self._replies.get(key) is collector:
            del self._replies[key]
        return answer

    async def reply_with_tools(
        self, key: str, timeout: float = 30.0
    ) -> tuple[list[Event], list[dict[str, Any]], Event]:
        """`reply`, with the run's tool calls and their results (`apply_tool_event`) of its
        last attempt, in the order they were called."""
        collector = self._replies.get(key)
        if collector is None:
            collector = self._replies[key] = ReplyCollector()
        deltas, done = await collector.wait(timeout)
        if self._replies.get(key) is collector:
            del self._replies[key]
        return deltas, collector.tools, done

    def _stream(self, stream: str) -> _Stream:
        state = self._streams.get(stream)
        if state is None:
            state = self._streams[stream] = _Stream()
        return state

    # --- raw access (bad-input tests) ---------------------------------------------------

    async def send_raw(self, data: str | bytes) -> None:
        """Send one frame as given: str as a text frame, bytes as a binary frame."""
        await self._ws.send(data)

    async def recv_frame(self, timeout: float = 10.0) -> Frame:
        """The next frame no request was waiting for (errors answering `send_raw`, ...)."""
        async with asyncio.timeout(timeout):
            while not self._unrouted:
                if self._closed:
                    raise SwitchboardClosed(self.close_code, self.close_reason)
                waiter = self._unrouted_waiter = asyncio.get_running_loop().create_future()
                try:
                    await waiter
                finally:
                    self._unrouted_waiter = None
        return self._unrouted.popleft()

    def unread_frames(self) -> list[Frame]:
        """The frames `recv_frame` would return now, without taking them (a copy)."""
        return list(self._unrouted)

    # --- closing ---------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self._ws.close(code, reason)
        try:
            await self._reader
        except Exception:  # noqa: BLE001 - the reader's failure is reported through futures
            pass

    async def wait_closed(self, timeout: float = 10.0) -> int | None:
        """Wait for the server to close the connection; returns the close code."""
        async with asyncio.timeout(timeout):
            await asyncio.shield(self._reader)
        return self.close_code

    async def __aenter__(self) -> SwitchboardClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- the reader ------------------------------------------------------------------

    async def _read(self) -> None:
        recv = self._ws.recv
        welcome = self._welcome
        try:
            while True:
                message = await recv(decode=False)
                try:
                    frame = _loads(message)
                except orjson.JSONDecodeError:
                    frame = {"type": None, "raw": message}
                if not welcome.done() and frame.get("type") != "welcome":
                    # Kept for SwitchboardClosed.frames: a refused connect must have none.
                    self._early.append(frame)
                self._dispatch(frame)
        except ConnectionClosed:
            pass
        except Exception:
            # A frame this client cannot handle: close rather than leave the socket unread.
            await self._ws.close(1011, "client failed to handle a frame")
            raise
        finally:
            self._on_closed()

    def _dispatch(self, frame: Frame) -> None:
        kind = frame.get("type")
        if kind == "event":
            self._on_event(frame)
            return
        if self.on_frame is not None:
            self.on_frame(frame)
        if kind == "ack":
            self._resolve_id(frame)
        elif kind == "error":
            self._on_error(frame)
        elif kind in ("pong", "subscribed", "unsubscribed", "presence"):
            self._on_idless_answer(kind, frame)
        elif kind == "welcome":
            self._on_welcome(frame)
        else:
            self._unroute(frame)

    def _on_event(self, event: Event) -> None:
        stream = event["stream"]
        state = self._streams.get(stream)
        if state is None:
            state = self._streams[stream] = _Stream()
        seq = event.get("seq")
        if seq is None:  # join/leave: outside the stream's order, so apart from its events
            if self.on_presence is not None:
                self.on_presence(event)
            if self.buffer_events:
                state.presence.put(event)
            return
        last = state.last_seq
        through = state.compact_through
        if event["kind"] == "reply.snapshot":
            pass  # no stored event: its seq is the last it covers, maybe below `last`
        elif through is not None and last is not None and last < seq <= through:
            pass  # a compact catch-up skips the seqs of the deltas it folded
        elif last is not None and seq != last + 1:
            self.seq_anomalies.append((stream, last + 1, seq))
        if through is not None and seq >= through:
            state.compact_through = None
        if last is None or seq > last:
            state.last_seq = seq
        if self._replies and event["kind"].startswith(("reply.", "tool.")):
            self._collect_reply(event)
        if self.on_event is not None:
            self.on_event(event)
        if self.buffer_events:
            state.buffer.put(event)

    def _collect_reply(self, event: Event) -> None:
        data = event["data"]
        collector = self._replies.get(data["run"])
        if collector is None and answers_own_send(event, self.client):
            collector = self._replies.get(event["cause"].get("message"))
        if collector is not None:
            collector.add(event)

    def _resolve_id(self, frame: Frame) -> bool:
        future = self._pending.pop(frame.get("id"), None)  # type: ignore[arg-type]
        if future is None:
            self._unroute(frame)
            return False
        if not future.done():
            if frame["type"] == "error":
                future.set_exception(SwitchboardError.from_frame(frame))
            else:
                future.set_result(frame)
        return True

    def _on_error(self, frame: Frame) -> None:
        frame_id = frame.get("id")
        if frame_id is not None:
            if frame_id in self._pending:
                self._resolve_id(frame)
                return
            cancel = self._cancels.get(frame_id)
            if cancel is not None and not cancel.done():
                cancel.set_result(frame)
                return
            self._unroute(frame)
            return
        stream = frame.get("stream")
        if frame.get("code") == "history_expired" and stream is not None:
            # The server goes on from head: the next seq is not last + 1.
            state = self._streams.get(stream)
            if state is not None:
                state.last_seq = None
            for request in self._idless:
                if request.kind == "subscribed" and request.stream == stream:
                    request.history_expired = frame
                    return
            self._unroute(frame)
            return
        while self._idless:
            request = self._idless.popleft()
            if not request.future.done():
                request.future.set_exception(SwitchboardError.from_frame(frame))
                return
        self._unroute(frame)

    def _on_idless_answer(self, kind: str, frame: Frame) -> None:
        stream = frame.get("stream")
        if kind == "subscribed":
            # Events follow from since + 1 when recovered, from head + 1 otherwise.
            asked = stream in self._since
            since = self._since.pop(stream, None)  # type: ignore[arg-type]
            if not asked and frame.get("recovered"):
                pass  # a resumed session's stream: it goes on from the session's position
            else:
                base = since if frame.get("recovered") and since is not None else frame["head"]
                state = self._stream(stream)  # type: ignore[arg-type]
                state.last_seq = base
                compact = stream in self._compact_asked and frame.get("recovered")
                state.compact_through = frame["head"] if compact else None
                self._compact_asked.discard(stream)  # type: ignore[arg-type]
        elif kind == "unsubscribed":
            state = self._streams.get(stream)  # type: ignore[arg-type]
            if state is not None:
                state.last_seq = None
        for request in self._idless:
            if request.kind == kind and request.stream == stream:
                self._idless.remove(request)
                if not request.future.done():
                    request.future.set_result(frame)
                return
        self._unroute(frame)

    def _on_welcome(self, frame: Frame) -> None:
        self.welcome = frame
        self.client = frame.get("client")
        self.session = frame.get("session")
        if not self._welcome.done():
            self._welcome.set_result(frame)

    def _unroute(self, frame: Frame) -> None:
        self._unrouted.append(frame)
        waiter = self._unrouted_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _check_open(self) -> None:
        if self._closed:
            raise SwitchboardClosed(self.close_code, self.close_reason)

    def _on_closed(self) -> None:
        """The connection is gone: fail every waiter. (Reconnect and resume go here.)"""
        self._closed = True
        self.close_code = self._ws.close_code if self._ws.close_code is not None else 1006
        self.close_reason = self._ws.close_reason or ""
        closed = SwitchboardClosed(self.close_code, self.close_reason, list(self._early))
        if not self._welcome.done():
            self._welcome.set_exception(closed)
            self._welcome.exception()  # retrieved: no "never retrieved" warning if unused
        futures: list[asyncio.Future[Any]] = [
            *self._pending.values(),
            *self._cancels.values(),
            *(request.future for request in self._idless),
            *(reply.done for reply in self._replies.values() if reply.done is not None),
        ]
        for future in futures:
            if not future.done():
                future.set_exception(closed)
                future.exception()
        for state in self._streams.values():
            state.buffer.wake()
            state.presence.wake()
        if self._unrouted_waiter is not None and not self._unrouted_waiter.done():
            self._unrouted_waiter.set_result(None)
