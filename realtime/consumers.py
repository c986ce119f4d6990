"""The gateway: one consumer per WebSocket, small handlers dispatched by frame type.

Deliberate departures from a stock Channels consumer, both for the per-frame hot path:
- no channel-layer channel per socket (stream events reach sockets through the process's
  Hub, see realtime/hub.py), so an idle socket costs no receive task and no Redis key;
- no `close_old_connections` database hop per frame: the gateway never touches the
  database per frame (tenants are cached, see realtime/tenants.py).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from orchestration.agents import UnknownAgent, get_agent
from realtime import keys
from realtime.auth import AuthError, Identity, authenticate
from realtime.events import dumps
from realtime.flusher import get_flusher
from realtime.hub import get_hub
from realtime.lifecycle import lifecycle
from realtime.outbox import Outbox, OutboxFull
from realtime.protocol import (
    CLOSE_SERVICE_RESTART,
    CLOSE_SLOW_CONSUMER,
    CLOSE_UNAUTHORIZED,
    PONG,
    Cancel,
    Ping,
    Presence,
    ProtocolError,
    Publish,
    Receipt,
    Send,
    Subscribe,
    Unsubscribe,
    ack_frame,
    error_frame,
    parse_frame,
)
from realtime.redis_clients import async_client
from realtime.security import BrowserOriginValidator
from realtime.sequencing import StreamCursor
from realtime.streams import StreamStore
from realtime.sweeper import ensure_sweeping
from realtime.tenants import TenantConfig, tenant_cache
from realtime.transport import DaphneSocket, daphne_protocol

logger = logging.getLogger(__name__)


ORIGINS = BrowserOriginValidator(None, settings.WEBSOCKET_ALLOWED_ORIGINS)
# Events a catch-up reads from the log at a time; the next page waits until the socket
# has taken most of the last (outbox at most this long, Twisted not pushing back).
CATCH_UP_PAGE = 200


class ConnectionState(enum.Enum):
    CONNECTING = 0
    OPEN = 1
    CLOSED = 2


_store: StreamStore | None = None


def stream_store() -> StreamStore:
    global _store
    if _store is None:
        _store = StreamStore(async_client())
    return _store


class StreamSubscription:
    """One socket's interest in one stream: the Hub calls it, it keeps seq order."""

    __slots__ = ("consumer", "stream", "cursor", "repairing", "active")

    def __init__(self, consumer: GatewayConsumer, stream: str) -> None:
        self.consumer = consumer
        self.stream = stream
        self.cursor = StreamCursor()
        self.repairing = False
        self.active = True

    def on_event(self, seq: int, event: str) -> None:
        ready = self.cursor.offer(seq, event)
        if ready:
            self.consumer.push_many(ready)
        if self.cursor.missing() is not None:
            self.consumer.schedule_repair(self)

    def on_possible_loss(self) -> None:
        self.consumer.schedule_repair(self, to_head=True)


# Frame type -> handler method name; one table for the class, not one per socket.
HANDLERS: dict[type, str] = {
    Send: "handle_send",
    Publish: "handle_publish",
    Subscribe: "handle_subscribe",
    Unsubscribe: "handle_unsubscribe",
    Receipt: "handle_receipt",
    Cancel: "handle_cancel",
    Presence: "handle_presence",
    Ping: "handle_ping",
}


@dataclass(frozen=True, slots=True)
class SubscribeResult:
    head: int
    recovered: bool
    expired: bool
    events: list[str]
    more: bool = False  # missed events beyond the first page are still to be read


class GatewayConsumer(AsyncWebsocketConsumer):
    # Set by websocket_connect before the socket is OPEN; frame handlers run only when OPEN,
    # and only sockets that were OPEN can have subscriptions to clean up.
    identity: Identity
    tenant: TenantConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.state = ConnectionState.CONNECTING
        self.subscriptions: dict[str, StreamSubscription] = {}
        self.outbox = Outbox(
            settings.SWITCHBOARD["OUTBOX_MAX_EVENTS"], settings.SWITCHBOARD["OUTBOX_MAX_BYTES"]
        )
        self.connection_id = secrets.token_hex(6)
        self.socket: DaphneSocket | None = None
        self._room: asyncio.Event | None = None  # set when a paged catch-up may go on

    # --- ASGI plumbing ---------------------------------------------------------------

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.scope = scope
        self.channel_layer = None
        self.base_send = send
        try:
            while True:
                await self.dispatch(await receive())
        except StopConsumer:
            pass

    async def dispatch(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "websocket.receive":
            await self.websocket_receive(message)
        elif kind == "websocket.connect":
            await self.websocket_connect(message)
        elif kind == "websocket.disconnect":
            await self.websocket_disconnect(message)

    async def websocket_connect(self, message: dict[str, Any]) -> None:
        if not ORIGINS.allows(self.scope):
            await self.base_send({"type": "websocket.close"})  # refused: HTTP 403
            self.state = ConnectionState.CLOSED
            return
        query = parse_qs(self.scope.get("query_string", b"").decode(), keep_blank_values=True)
        token = (query.get("token") or [None])[0] or _bearer_token(self.scope)
        try:
            self.identity, self.tenant = await authenticate(token, tenant_cache)
        except AuthError as error:
            # The protocol says: accept, then close 4001 with a reason, and nothing else.
            await self._accept()
            self.close_with(CLOSE_UNAUTHORIZED, str(error))
            logger.info("connection refused conn=%s: %s", self.connection_id, error)
            return
        await self._accept()
        if not lifecycle.admit(self):
            self.close_for_restart()
            return
        ensure_sweeping()
        self.push(
            dumps(
                {
                    "type": "welcome",
                    "client": self.identity.client,
                    "tenant": self.identity.tenant,
                    "session": secrets.token_urlsafe(18),
                    "heartbeat_s": settings.SWITCHBOARD["HEARTBEAT_S"],
                    "limits": self.tenant.public_limits(),
                }
            )
        )

    async def _accept(self) -> None:
        await self.base_send({"type": "websocket.accept"})
        self.state = ConnectionState.OPEN
        protocol = daphne_protocol(self.base_send)
        if protocol is not None:
            self.socket = DaphneSocket(protocol, on_resume=self._on_socket_resume)
            self.socket.start()

    async def websocket_disconnect(self, message: dict[str, Any]) -> None:
        self.state = ConnectionState.CLOSED
        self._signal_room()
        lifecycle.forget(self)
        streams = list(self.subscriptions)
        for stream in streams:
            self._drop_subscription(stream)
        if streams:
            identity = self.identity
            async with async_client().pipeline(transaction=False) as pipe:
                for stream in streams:
                    pipe.hdel(keys.presence(identity.tenant, stream), identity.client)
                await pipe.execute()
        raise StopConsumer()

    async def websocket_receive(self, message: dict[str, Any]) -> None:
        if self.state is not ConnectionState.OPEN:
            return
        text = message.get("text")
        if text is None:
            self.push(error_frame("bad_request", "binary frames are not supported; send JSON text"))
            return
        frame_id = None
        try:
            frame = parse_frame(text, self.tenant.max_frame_bytes)
            frame_id = getattr(frame, "id", None)
            await getattr(self, HANDLERS[type(frame)])(frame)
        except ProtocolError as error:
            self.push(error.frame())
        except Exception:
            logger.exception(
                "frame failed tenant=%s client=%s conn=%s",
                self.identity.tenant,
                self.identity.client,
                self.connection_id,
            )
            self.push(
                error_frame("internal", "internal error; the frame was not applied", frame_id)
            )

    # --- outbound ----------------------------------------------------------------------

    def push(self, frame: str) -> None:
        if self.state is not ConnectionState.OPEN:
            return
        socket = self.socket
        if socket is not None and not len(self.outbox) and not socket.paused and socket.open:
            # Nothing is queued ahead of this frame, so writing it now keeps the order and
            # skips the outbox and the flusher: the common case on every socket of a fan-out.
            socket.write(frame)
            return
        try:
            self.outbox.push(frame)
        except OutboxFull as full:
            self.close_slow_consumer(str(full))
            return
        get_flusher().mark(self)

    def push_many(self, frames: list[str]) -> None:
        for frame in frames:
            self.push(frame)

    def flush_now(self) -> bool:
        """Write what is buffered without awaiting; False when only `flush` can (not daphne).

        Stops while Twisted says the socket's buffers are full; resumes on its word."""
        socket = self.socket
        if socket is None:
            return False
        outbox = self.outbox
        while not socket.paused and self.state is ConnectionState.OPEN and socket.open:
            frame = outbox.pop()
            if frame is None:
                break
            socket.write(frame)
        self._signal_room()
        return True

    async def flush(self) -> None:
        """Write what is buffered; only the process flusher calls this (one writer)."""
        if self.flush_now():
            return
        outbox = self.outbox
        send = self.base_send
        while self.state is ConnectionState.OPEN:
            frame = outbox.pop()
            if frame is None:
                break
            await send({"type": "websocket.send", "text": frame})
        self._signal_room()

    def _on_socket_resume(self) -> None:
        if len(self.outbox):
            get_flusher().mark(self)
        else:
            self._signal_room()

    def close_slow_consumer(self, detail: str) -> None:
        logger.warning(
            "slow consumer closed tenant=%s client=%s conn=%s: %s",
            self.identity.tenant,
            self.identity.client,
            self.connection_id,
            detail,
        )
        self.close_with(CLOSE_SLOW_CONSUMER, "slow consumer")

    def close_with(self, code: int, reason: str) -> None:
        if self.state is not ConnectionState.OPEN:
            return
        self.state = ConnectionState.CLOSED
        while self.outbox.pop() is not None:
            pass
        self._signal_room()
        if self.socket is not None:
            self.socket.close(code, reason)
            return
        asyncio.get_running_loop().create_task(
            self.base_send({"type": "websocket.close", "code": code, "reason": reason})
        )

    def close_for_restart(self) -> None:
        self.close_with(CLOSE_SERVICE_RESTART, "service restart")

    # --- subscriptions -----------------------------------------------------------------

    def _require_stream(self, stream: str, frame_id: str | None = None) -> None:
        if not self.identity.may_use(stream):
            raise ProtocolError("forbidden", f"token does not allow stream {stream!r}", frame_id)

    async def _subscribe(self, stream: str, since: int | None) -> SubscribeResult:
        """Join the stream and collect what the client missed. Live events heard during
        the catch-up read wait in the cursor and follow the missed ones, in seq order."""
        identity = self.identity
        tenant = identity.tenant
        self._drop_subscription(stream)
        subscription = StreamSubscription(self, stream)
        self.subscriptions[stream] = subscription
        hub = get_hub()
        await hub.join(tenant, stream, subscription)
        await async_client().hset(
            keys.presence(tenant, stream),
            identity.client,
            identity.name or "",
        )
        store = stream_store()
        head = await store.head(tenant, stream)
        if since is None or since == head:
            live = subscription.cursor.start_at(head + 1)
            return SubscribeResult(head, since is not None, False, live)
        last = min(head, since + CATCH_UP_PAGE)
        events = await store.read(tenant, stream, since + 1, last) if since < head else []
        if events and events[0][0] == since + 1:
            missed = [event for _, event in events]
            live = subscription.cursor.start_at(events[-1][0] + 1)
            # The rest is read page by page as the socket drains (see _repair).
            more = events[-1][0] < head
            return SubscribeResult(head, True, False, missed + live, more)
        live = subscription.cursor.start_at(head + 1)
        return SubscribeResult(head, False, True, live)

    def _drop_subscription(self, stream: str) -> None:
        subscription = self.subscriptions.pop(stream, None)
        if subscription is not None:
            subscription.active = False
            get_hub().leave(self.identity.tenant, stream, subscription)

    async def handle_subscribe(self, frame: Subscribe) -> None:
        self._require_stream(frame.stream)
        result = await self._subscribe(frame.stream, frame.since)
        if result.expired:
            self.push(
                error_frame(
                    "history_expired",
                    f"events after seq {frame.since} are no longer retained; go on from head",
                    None,
                    stream=frame.stream,
                    head=result.head,
                )
            )
        self.push(
            dumps(
                {
                    "type": "subscribed",
                    "stream": frame.stream,
                    "head": result.head,
                    "recovered": result.recovered,
                }
            )
        )
        self.push_many(result.events)
        if result.more:
            self.schedule_repair(self.subscriptions[frame.stream], to_head=True)

    async def handle_unsubscribe(self, frame: Unsubscribe) -> None:
        self._drop_subscription(frame.stream)
        identity = self.identity
        await async_client().hdel(keys.presence(identity.tenant, frame.stream), identity.client)
        self.push(dumps({"type": "unsubscribed", "stream": frame.stream}))

    def schedule_repair(self, subscription: StreamSubscription, to_head: bool = False) -> None:
        if subscription.repairing or not subscription.active:
            return
        subscription.repairing = True
        asyncio.get_running_loop().create_task(self._repair(subscription, to_head))

    async def _repair(self, subscription: StreamSubscription, to_head: bool) -> None:
        """Read what the live path missed, or the rest of a catch-up, from the log: a page
        at a time, each once the socket has taken the last, so a long backlog never fills
        the outbox (which would close the client 4008 on every reconnect). Never skips a
        retained event; one no longer retained is reported as history_expired."""
        tenant = self.identity.tenant
        stream = subscription.stream
        store = stream_store()
        try:
            if not to_head:
                await asyncio.sleep(settings.SWITCHBOARD["GAP_REPAIR_S"])  # it may yet arrive
            target = await store.head(tenant, stream) if to_head else 0
            while subscription.active:
                cursor = subscription.cursor
                gap = cursor.missing()
                if gap is None and cursor.next_seq is not None and cursor.next_seq <= target:
                    gap = (cursor.next_seq, target)
                if gap is None:
                    return
                first, last = gap[0], min(gap[1], gap[0] + CATCH_UP_PAGE - 1)
                events = await store.read(tenant, stream, first, last)
                if not subscription.active:
                    return
                if not events or events[0][0] != first:
                    resume_at = events[0][0] if events else last + 1
                    self.push(
                        error_frame(
                            "history_expired",
                            f"events {first}..{resume_at - 1} are no longer retained",
                            None,
                            stream=stream,
                            head=await store.head(tenant, stream),
                        )
                    )
                    self.push_many(cursor.skip_to(resume_at))
                for seq, event in events:
                    self.push_many(cursor.offer(seq, event))
                await self._wait_for_room()
        except Exception:
            logger.exception(
                "stream repair failed tenant=%s stream=%s conn=%s",
                tenant,
                stream,
                self.connection_id,
            )
        finally:
            subscription.repairing = False

    def _backlogged(self) -> bool:
        return len(self.outbox) > CATCH_UP_PAGE or (self.socket is not None and self.socket.paused)

    async def _wait_for_room(self) -> None:
        while self.state is ConnectionState.OPEN and self._backlogged():
            if self._room is None:
                self._room = asyncio.Event()
            self._room.clear()
            await self._room.wait()

    def _signal_room(self) -> None:
        if self._room is not None and (
            self.state is not ConnectionState.OPEN or not self._backlogged()
        ):
            self._room.set()

    async def _ensure_subscribed(self, stream: str) -> None:
        if stream not in self.subscriptions:
            self.push_many((await self._subscribe(stream, None)).events)

    # --- frame handlers ----------------------------------------------------------------

    async def handle_send(self, frame: Send) -> None:
        self._require_stream(frame.stream, frame.id)
        try:
            agent = get_agent(frame.agent)
        except UnknownAgent:
            raise ProtocolError("not_found", f"no agent named {frame.agent!r}", frame.id) from None
        await self._ensure_subscribed(frame.stream)
        identity = self.identity
        appended = await stream_store().accept_send(
            identity.tenant,
            identity.client,
            frame,
            agent,
            self.tenant.stream_retention,
        )
        self.push(ack_frame(frame.id, appended.event_id, appended.seq, appended.duplicate))
        if not appended.duplicate:
            logger.debug(
                "send accepted tenant=%s client=%s conn=%s stream=%s event=%s run=%s",
                identity.tenant,
                identity.client,
                self.connection_id,
                frame.stream,
                appended.event_id,
                appended.run_id,
            )

    async def handle_publish(self, frame: Publish) -> None:
        self._require_stream(frame.stream, frame.id)
        identity = self.identity
        appended = await stream_store().publish(
            identity.tenant,
            identity.client,
            frame,
            self.tenant.stream_retention,
        )
        self.push(ack_frame(frame.id, appended.event_id, appended.seq, appended.duplicate))

    async def handle_receipt(self, frame: Receipt) -> None:
        self._require_stream(frame.stream)
        identity = self.identity
        await async_client().hset(
            keys.receipts(identity.tenant, frame.stream),
            identity.client,
            frame.seq,
        )

    async def handle_cancel(self, frame: Cancel) -> None:
        from orchestration.intake import cancel_run

        identity = self.identity
        outcome = await cancel_run(identity.tenant, identity.client, frame.id)
        if outcome is not None:
            raise ProtocolError(outcome[0], outcome[1], frame.id)

    async def handle_presence(self, frame: Presence) -> None:
        self._require_stream(frame.stream)
        raw = await async_client().hgetall(keys.presence(self.identity.tenant, frame.stream))
        clients = [
            {"client": client.decode(), "name": name.decode() or None}
            for client, name in raw.items()
        ]
        self.push(dumps({"type": "presence", "stream": frame.stream, "clients": clients}))

    async def handle_ping(self, frame: Ping) -> None:
        self.push(PONG)


def _bearer_token(scope: dict[str, Any]) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token:
                return token.strip()
    return None
