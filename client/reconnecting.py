"""A client that outlives its connections: what an application uses.

`ReconnectingClient` keeps one `SwitchboardClient` connection at a time. When it drops
(a gateway restarting with 1012, a slow-consumer close 4008, a crash, a network cut) it
reconnects with exponential backoff and full jitter, to the next URL of its list, resuming
its session; and it hands each stream's events to the application once, in seq order:

- a resume sends the session and, as `positions`, the last seq the application got on
  each stream the session holds, so the gateway goes on from there (not from what it wrote
  to the old socket, some of which never arrived); events the client already has are
  still dropped by seq, and a jump past the next seq still makes the client subscribe again
  from its own last seq, dropping the stream's events until the server answers;
- a refused session (expired, unknown) or refused positions are dropped and every stream
  is subscribed again with `since` = the last seq the application got;
- `history_expired` is passed on (`expired`) and delivery goes on from what the server
  sends next.

`send` and `publish` are retried across reconnects with the same message id until acked,
so a message is accepted once (the server answers a repeat with `duplicate: true`); a 429
is retried after its `retry_after_ms`. 4001 (bad token) and a 4003 that is not about the
session end the client: it needs a new token.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from websockets.exceptions import WebSocketException

from client.connection import (
    Event,
    Frame,
    Inbox,
    ReplyCollector,
    SwitchboardClient,
    SwitchboardClosed,
    SwitchboardError,
    answers_own_send,
)

logger = logging.getLogger(__name__)

TERMINAL_CLOSE_CODES = frozenset({4001, 4003})
# 429s say when to come back; `internal` is what a frame gets while Redis is away and
# `unavailable` one its replicas did not confirm in time (SWITCHBOARD_REPLICA_ACKS), and a
# retry with the same id cannot apply a message twice.
RETRYABLE_ERRORS = frozenset({"rate_limited", "overloaded", "internal", "unavailable"})


@dataclass(slots=True)
class _Tracked:
    """One stream as the application sees it, across connections."""

    last_seq: int | None = None
    buffer: Inbox = field(default_factory=Inbox)
    resyncing: bool = False  # a subscribe from last_seq is in flight: drop until answered
    compact: bool = False  # subscribed with compact: true (so are its resyncs)
    # A compact catch-up's end (its `subscribed` head): seqs up to it may skip folded
    # deltas, and a reply.snapshot may carry a seq below the last one delivered.
    compact_through: int | None = None
    presence: Inbox = field(default_factory=Inbox)  # join/leave, as they come


def backoff_delay(attempt: int, initial_s: float, max_s: float) -> float:
    """Full jitter: uniform in [0, min(max, initial * 2^attempt)]."""
    return random.uniform(0, min(max_s, initial_s * (2**attempt)))


class ClientStopped(ConnectionError):
    """The client is closed, or the server refused it for good (4001, 4003)."""

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"client stopped (close {code}: {reason})")
        self.code = code
        self.reason = reason


class ReconnectingClient:
    def __init__(
        self,
        urls: str | Sequence[str],
        token: str,
        *,
        initial_backoff_s: float = 0.05,
        max_backoff_s: float = 5.0,
        connect_timeout_s: float = 10.0,
        on_state: Callable[[str], None] | None = None,
    ) -> None:
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        self.token = token
        self.initial_backoff_s = initial_backoff_s
        self.max_backoff_s = max_backoff_s
        self.connect_timeout_s = connect_timeout_s
        self.on_state = on_state
        self.state = "connecting"
        self.client: str | None = None
        self.session: str | None = None
        self.connections = 0  # welcomes received
        self.close_codes: list[int | None] = []  # one per lost connection
        self.refused_sessions: list[Frame] = []
        self.expired: list[Frame] = []  # history_expired frames passed on
        self._streams: dict[str, _Tracked] = {}
        # Streams the session is known to hold (a `subscribed` came under it): only these
        # may be named in a resume's positions.
        self._held: set[str] = set()
        self._replies: dict[str, ReplyCollector] = {}
        self._conn: SwitchboardClient | None = None
        self._open = asyncio.Event()
        self._stopped: ClientStopped | None = None
        self._state_changed = asyncio.Event()
        self._url_index = 0
        self._runner: asyncio.Task[None] | None = None

    @classmethod
    async def connect(
        cls, urls: str | Sequence[str], token: str, **options: Any
    ) -> ReconnectingClient:
        """Start, and return once the first connection is open."""
        client = cls(urls, token, **options)
        client._runner = asyncio.get_running_loop().create_task(client._run())
        await client.wait_open(client.connect_timeout_s)
        return client

    # --- connection ------------------------------------------------------------------

    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            if self.on_state is not None:
                self.on_state(state)
        self._state_changed.set()

    async def wait_open(self, timeout: float = 10.0) -> SwitchboardClient:
        async with asyncio.timeout(timeout):
            while True:
                if self._stopped is not None:
                    raise self._stopped
                if self._open.is_set() and self._conn is not None and not self._conn.closed:
                    return self._conn
                self._state_changed.clear()
                await self._state_changed.wait()

    async def _run(self) -> None:
        attempt = 0
        while self._stopped is None:
            url = self.urls[self._url_index % len(self.urls)]
            self._url_index += 1
            try:
                conn = await self._open_connection(url)
            except SwitchboardClosed as refused:
                if self._session_refused(refused):
                    continue  # at once, without the session
                if refused.code in TERMINAL_CLOSE_CODES:
                    self._stop(refused.code, refused.reason)
                    return
                await asyncio.sleep(
                    backoff_delay(attempt, self.initial_backoff_s, self.max_backoff_s)
                )
                attempt += 1
                continue
            except (OSError, TimeoutError, SwitchboardError, WebSocketException) as error:
                logger.debug("connect to %s failed: %s", url, error)
                await asyncio.sleep(
                    backoff_delay(attempt, self.initial_backoff_s, self.max_backoff_s)
                )
                attempt += 1
                continue
            attempt = 0
            self._conn = conn
            self._open.set()
            self._set_state("open")
            code = await conn.wait_closed(timeout=float("inf"))
            self._open.clear()
            self.close_codes.append(code)
            if self._stopped is not None:
                return
            if code in TERMINAL_CLOSE_CODES:
                self._stop(code, conn.close_reason)
                return
            logger.info("connection lost (close %s); reconnecting", code)
            self._set_state("reconnecting")
            # Spread a gateway's clients over time instead of all at once.
            await asyncio.sleep(backoff_delay(0, self.initial_backoff_s, self.max_backoff_s))

    async def _open_connection(self, url: str) -> SwitchboardClient:
        restored: set[str] = set()

        def on_frame(frame: Frame) -> None:
            if frame.get("type") == "subscribed":
                restored.add(frame["stream"])
            self._on_frame(frame)

        if self.session is None:
            self._held.clear()  # a new session holds nothing yet
        conn = await SwitchboardClient.connect(
            url,
            self.token,
            session=self.session,
            positions=self.resume_positions() if self.session is not None else None,
            timeout=self.connect_timeout_s,
            buffer_events=False,
            track_replies=False,
            on_event=self._on_event,
            on_frame=on_frame,
            on_presence=self._on_presence,
        )
        welcome = conn.welcome
        self.client = welcome.get("client")
        self.session = welcome.get("session")
        self.connections += 1
        try:
            if welcome.get("resumed"):
                # The server restores the session's streams before it reads any frame of
                # ours, so once this ping is answered every restored `subscribed` is in.
                for _ in range(len(restored) + 3):
                    try:
                        await conn.ping(self.connect_timeout_s)
                        break
                    except SwitchboardError:
                        continue  # an id-less refusal of a restored stream came first
            for stream, tracked in list(self._streams.items()):
                if stream not in restored:
                    tracked.resyncing = True
                    await conn.subscribe(
                        stream, tracked.last_seq, self.connect_timeout_s, compact=tracked.compact
                    )
        except BaseException:
            await conn.close()
            raise
        return conn

    def resume_positions(self) -> dict[str, int]:
        """What a resume sends as `positions`: per stream the session holds, the last seq
        the application got (streams without one go on from the session's record)."""
        return {
            stream: tracked.last_seq
            for stream, tracked in self._streams.items()
            if stream in self._held and tracked.last_seq is not None
        }

    def _session_refused(self, refused: SwitchboardClosed) -> bool:
        for frame in refused.frames:
            if frame.get("type") == "error" and frame.get("session"):
                self.refused_sessions.append(frame)
                self.session = None
                return True
        return False

    def _stop(self, code: int | None, reason: str) -> None:
        self._stopped = ClientStopped(code, reason)
        self._set_state("closed")
        for tracked in self._streams.values():
            tracked.buffer.wake()
            tracked.presence.wake()
        for reply in self._replies.values():
            if reply.done is not None and not reply.done.done():
                reply.done.set_exception(self._stopped)
                reply.done.exception()

    async def close(self) -> None:
        if self._stopped is None:
            self._stop(1000, "closed by the client")
        if self._conn is not None:
            await self._conn.close()
        if self._runner is not None:
            self._runner.cancel()
            try:
                await self._runner
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - closing anyway
                pass

    async def __aenter__(self) -> ReconnectingClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- requests --------------------------------------------------------------------

    async def subscribe(
        self, stream: str, since: int | None = None, timeout: float = 10.0, compact: bool = False
    ) -> Frame:
        """`compact`: missed replies as reply.done or reply.snapshot (docs/protocol.md)."""
        tracked = self._streams.setdefault(stream, _Tracked())
        if since is not None:
            tracked.last_seq = since
        tracked.resyncing = True
        tracked.compact = compact
        conn = await self.wait_open(timeout)
        return await conn.subscribe(stream, tracked.last_seq, timeout, compact=compact)

    async def send(
        self,
        stream: str,
        agent: str,
        text: str,
        options: dict[str, Any] | None = None,
        id: str | None = None,
        timeout: float = 30.0,
    ) -> Frame:
        """Send to an agent; retried across reconnects with one id until acked."""
        if stream not in self._streams:
            await self.subscribe(stream, timeout=timeout)
        message_id = id or f"m-{random.getrandbits(64):016x}"
        self._replies.setdefault(message_id, ReplyCollector())
        return await self._until_acked(
            lambda conn, left: conn.send(stream, agent, text, options, id=message_id, timeout=left),
            timeout,
        )

    async def publish(
        self, stream: str, data: Any, id: str | None = None, timeout: float = 30.0
    ) -> Frame:
        message_id = id or f"p-{random.getrandbits(64):016x}"
        return await self._until_acked(
            lambda conn, left: conn.publish(stream, data, id=message_id, timeout=left), timeout
        )

    async def _until_acked(
        self, request: Callable[[SwitchboardClient, float], Any], timeout: float
    ) -> Frame:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no ack before the timeout")
            conn = await self.wait_open(left)
            try:
                return await request(conn, min(left, 10.0))
            except SwitchboardClosed:
                continue  # the same id again on the next connection: accepted at most once
            except TimeoutError:
                if conn.closed:
                    continue
                raise
            except SwitchboardError as error:
                if error.code not in RETRYABLE_ERRORS:
                    raise
                wait_s = (error.retry_after_ms or 200) / 1000 * random.uniform(1.0, 1.5)
                if time.monotonic() + wait_s > deadline:
                    raise
                await asyncio.sleep(wait_s)

    # --- events ----------------------------------------------------------------------

    def last_seq(self, stream: str) -> int | None:
        tracked = self._streams.get(stream)
        return tracked.last_seq if tracked else None

    async def next_event(self, stream: str, timeout: float = 10.0) -> Event:
        tracked = self._streams.setdefault(stream, _Tracked())
        return await tracked.buffer.get(timeout, lambda: self._stopped)

    async def reply(self, message_id: str, timeout: float = 30.0) -> tuple[list[Event], Event]:
        """(reply.delta events in order, reply.done) of one of this client's sends; after a
        `reply.restart`, the deltas since the last one (the reply started again at 0)."""
        return await self._replies.setdefault(message_id, ReplyCollector()).wait(timeout)

    async def reply_with_tools(
        self, message_id: str, timeout: float = 30.0
    ) -> tuple[list[Event], list[dict[str, Any]], Event]:
        """`reply`, with the run's tool calls of its last attempt (client.connection's
        `apply_tool_event`), in the order they were called."""
        collector = self._replies.setdefault(message_id, ReplyCollector())
        deltas, done = await collector.wait(timeout)
        return deltas, collector.tools, done

    async def next_presence(self, stream: str, timeout: float = 10.0) -> Event:
        """The stream's next `join` or `leave` (they have no seq and are not resumed)."""
        tracked = self._streams.setdefault(stream, _Tracked())
        return await tracked.presence.get(timeout, lambda: self._stopped)

    async def presence(self, stream: str, timeout: float = 10.0) -> list[dict[str, Any]]:
        conn = await self.wait_open(timeout)
        return await conn.presence(stream, timeout)

    def _on_presence(self, event: Event) -> None:
        self._streams.setdefault(event["stream"], _Tracked()).presence.put(event)

    def _on_event(self, event: Event) -> None:
        """A sequenced event (join/leave come through `_on_presence`)."""
        stream = event["stream"]
        tracked = self._streams.get(stream)
        if tracked is None:
            tracked = self._streams[stream] = _Tracked()
        if tracked.resyncing:
            return  # a subscribe from last_seq is coming; it delivers this again
        seq = event["seq"]
        last = tracked.last_seq
        through = tracked.compact_through
        if event["kind"] == "reply.snapshot":
            # Not a stored event: its seq is the last one it covers (maybe below `last`),
            # and taking it twice leaves the same text.
            if last is None or seq > last:
                tracked.last_seq = seq
            self._deliver(tracked, event)
            return
        if through is not None and seq >= through:
            tracked.compact_through = None
        if last is not None and seq <= last:
            return  # already delivered (a resume from a lagging checkpoint)
        if last is not None and seq > last + 1 and not (through is not None and seq <= through):
            # Lost in flight with the old socket: ask again from what we have.
            tracked.resyncing = True
            asyncio.get_running_loop().create_task(self._resync(stream))
            return
        tracked.last_seq = seq
        self._deliver(tracked, event)

    async def _resync(self, stream: str) -> None:
        conn = self._conn
        tracked = self._streams[stream]
        if conn is None or conn.closed:
            # The gap showed while a new connection was being opened (its resume restored
            # the stream past what reached us), and `_conn` is still the old one: that new
            # connection will not subscribe a stream it restored, so do it once it is open,
            # unless a `subscribed` has ended the resync meanwhile.
            try:
                conn = await self.wait_open(float("inf"))
            except ClientStopped:
                return
            if not tracked.resyncing:
                return
        try:
            await conn.subscribe(
                stream, tracked.last_seq, self.connect_timeout_s, compact=tracked.compact
            )
        except (SwitchboardClosed, SwitchboardError, TimeoutError) as error:
            logger.info("resubscribing %s failed (%s); the next connection will", stream, error)

    def _deliver(self, tracked: _Tracked, event: Event) -> None:
        kind = event["kind"]
        if kind.startswith(("reply.", "tool.")) and answers_own_send(event, self.client):
            collector = self._replies.get(event["cause"].get("message"))
            if collector is not None:
                collector.add(event)
        tracked.buffer.put(event)

    def _on_frame(self, frame: Frame) -> None:
        kind = frame.get("type")
        stream = frame.get("stream")
        if kind == "subscribed":
            self._held.add(stream)  # written to the session before it is answered
        tracked = self._streams.get(stream) if stream is not None else None
        if tracked is None:
            return
        if kind == "subscribed":
            # Events follow from since + 1 when recovered, from head + 1 otherwise.
            # Compact only when it answers our own subscribe (a session's restored streams
            # are caught up in full).
            asked = tracked.resyncing
            tracked.resyncing = False
            if not frame.get("recovered"):
                tracked.last_seq = frame["head"]
            tracked.compact_through = frame["head"] if tracked.compact and asked else None
        elif kind == "error" and frame.get("code") == "history_expired":
            self.expired.append(frame)
            tracked.last_seq = None  # go on from whatever the server sends next
