"""The gateway: one consumer per WebSocket, small handlers dispatched by frame type.

A consumer holds its connection's state (CONNECTING, OPEN, CLOSED), its outbox and its
session's positions; each stream it subscribes to is a `StreamSubscription`
(realtime/subscription.py: catch-up, gap repair, seq order), and what every connection of
the process shares (hub, flusher, checkpointer, sweeper, tenant watch, drain) is the
process's `GatewayNode` (realtime/node.py).

Deliberate departures from a stock Channels consumer, both for the per-frame hot path:
- no channel-layer channel per socket (stream events reach sockets through the process's
  Hub, see realtime/hub.py), so an idle socket costs no receive task and no Redis key;
- no `close_old_connections` database hop per frame: the gateway never touches the
  database per frame (tenants are cached, see tenants/config.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import random
import secrets
import time
from collections.abc import Coroutine
from typing import Any
from urllib.parse import parse_qs

from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from redis.exceptions import RedisError

from agents import UnknownAgent, get_agent
from ops import logcontext, metrics
from ops.collector import tune_for_long_lived_connections
from project.conf import conf
from realtime.admission import (
    REDIS_AWAY,
    budget_refusal,
    connection_registry,
    limit_retry_ms,
    rate_limiter,
    run_options,
    subscription_refusal,
)
from realtime.handshakes import LineFull
from realtime.lifecycle import age_limit_s
from realtime.node import GatewayNode, gateway_node
from realtime.outbox import Outbox, OutboxFull
from realtime.presence import get_tracker
from realtime.protocol import (
    CLOSE_FORBIDDEN,
    CLOSE_NORMAL,
    CLOSE_SERVICE_RESTART,
    CLOSE_SLOW_CONSUMER,
    CLOSE_TOO_MANY_CONNECTIONS,
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
    interrupts,
    parse_frame,
)
from realtime.recording import get_recorder
from realtime.security import BrowserOriginValidator
from realtime.sessions import (
    BadPositions,
    PendingSave,
    SessionRefused,
    delivered_positions,
    parse_positions,
    position_changes,
    resume_problem,
    session_store,
    undelivered_floor,
)
from realtime.subscription import CATCH_UP_PAGE, StreamSubscription
from realtime.throttles import throttle_counter
from realtime.transport import DaphneSocket, daphne_protocol
from streams import keys
from streams.events import dumps
from streams.log import Appended, BudgetExhausted, LimitReached, RunLimits
from streams.receipts import BeyondHead, receipt_store
from streams.redis_clients import pool_exhausted
from streams.replication import NotReplicated
from tenants.config import TenantConfig, tenant_cache
from tenants.tokens import AuthError, Identity, authenticate

logger = logging.getLogger(__name__)


# Traffic recording for load replay: a dict lookup per frame while a tenant is not recorded.
_RECORDER = get_recorder()
# A closing connection waits at most this long for its session to be saved.
SESSION_SAVE_TIMEOUT_S = 2.0
# A write the replicas did not confirm in time: about one failover's worth (a replica is
# promoted within seconds), with the client's own jitter on top.
UNREPLICATED_RETRY_MS = 1000
# After a frame refused because every pooled Redis connection was busy.
POOL_EXHAUSTED_RETRY_MS = 1000
# After a frame refused because Redis was out of reach: a replica is promoted, or a
# restarted Redis answers, within seconds.
UNAVAILABLE_RETRY_MS = 1000


# Work that must finish even when the handler awaiting it is cancelled, held here so the
# event loop's weak reference to a task is not its only one.
_UNCANCELLABLE: set[asyncio.Task[None]] = set()


async def _shielded(work: Coroutine[Any, Any, None]) -> None:
    task = asyncio.ensure_future(work)
    _UNCANCELLABLE.add(task)
    task.add_done_callback(_UNCANCELLABLE.discard)
    await asyncio.shield(task)


class ConnectionState(enum.Enum):
    """CONNECTING until accepted (or refused before it), OPEN while frames are handled and
    written, CLOSED from the first close on either side; never back."""

    CONNECTING = 0
    OPEN = 1
    CLOSED = 2


def _count_refusal(tenant: str, reason: str) -> None:
    """One refusal, for the admin's live page (per minute, in Redis) and for Prometheus."""
    throttle_counter().count(tenant, reason)
    metrics.refused(tenant, reason)


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


class GatewayConsumer(AsyncWebsocketConsumer):
    # Set by websocket_connect before the socket is OPEN; frame handlers run only when OPEN,
    # and only sockets that were OPEN can have subscriptions to clean up.
    identity: Identity
    tenant: TenantConfig

    def __init__(self, node: GatewayNode | None = None) -> None:
        super().__init__()
        # The process's shared parts (tests give a consumer a node of their own).
        self.node = node if node is not None else gateway_node()
        self.state = ConnectionState.CONNECTING
        self.subscriptions: dict[str, StreamSubscription] = {}
        # Streams this connection's sends and publishes wait on, how many to each: their
        # live events wait for those acks (StreamSubscription.release_after_ack).
        self.writes_in_flight: dict[str, int] = {}
        self.outbox = Outbox(conf().outbox_max_events, conf().outbox_max_bytes)
        self.connection_id = secrets.token_hex(6)
        self.socket: DaphneSocket | None = None
        self._room: asyncio.Event | None = None  # set when a paged catch-up may go on
        self.session_id = ""
        self._saved_positions: dict[str, int] = {}  # what the session in Redis holds
        self._session_refreshed_at = 0.0
        self._session_ended = False
        self._counted = False  # in the tenant's and client's connection counts
        self._age_limit: asyncio.TimerHandle | None = None  # SWITCHBOARD_WS_MAX_AGE_S
        self.reply_clock = metrics.ReplyClock()  # its sends awaiting their reply.done

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

    # --- connect: origin, token, resume, admission, session, welcome, subscriptions ----

    async def websocket_connect(self, message: dict[str, Any]) -> None:
        # This task runs the whole connection: its log lines carry these ids from here on.
        logcontext.bind(connection=self.connection_id)
        if not BrowserOriginValidator(None, conf().websocket_allowed_origins).allows(self.scope):
            await self.base_send({"type": "websocket.close"})  # refused: HTTP 403
            self.state = ConnectionState.CLOSED
            return
        query = parse_qs(self.scope.get("query_string", b"").decode(), keep_blank_values=True)
        if not await self._authenticate(query):
            return
        await self._accept()
        line = self.node.handshakes
        try:
            await line.enter()
        except LineFull:
            metrics.handshake_dropped("line_full")
            logger.info("handshake line full conn=%s: closed 1012", self.connection_id)
            self.close_with(CLOSE_SERVICE_RESTART, "gateway busy", save_session=False)
            return
        try:
            if self.socket is not None and not self.socket.open:
                # Gave up while it waited (its disconnect is next in line): no work for it.
                metrics.handshake_dropped("client_left")
                return
            await self._set_up(query)
        finally:
            line.leave()

    async def _set_up(self, query: dict[str, list[str]]) -> None:
        """Admission, session, welcome and the resumed subscriptions, in its turn."""
        requested = (query.get("session") or [""])[0]
        try:
            positions = self._resume_positions(query, requested)
        except BadPositions as bad:
            self._refuse_resume(bad, requested)
            return
        if not self._admit() or not await self._count_connection():
            return
        restored = await self._open_session(requested, positions)
        if restored is None:
            return
        self._welcome(resumed=bool(requested))
        await self._restore_subscriptions(restored)

    async def _authenticate(self, query: dict[str, list[str]]) -> bool:
        """Learn who connects from the token; False when refused (and closed)."""
        token = (query.get("token") or [None])[0] or _bearer_token(self.scope)
        try:
            self.identity, self.tenant = await authenticate(token, tenant_cache)
        except AuthError as error:
            # The protocol says: accept, then close 4001 with a reason, and nothing else.
            await self._accept()
            self.close_with(CLOSE_UNAUTHORIZED, str(error))
            logger.info("connection refused conn=%s: %s", self.connection_id, error)
            return False
        logcontext.bind(tenant=self.identity.tenant, client=self.identity.client)
        return True

    def _resume_positions(
        self, query: dict[str, list[str]], requested: str
    ) -> dict[str, int] | None:
        """The positions a resume gives (None: none given); BadPositions when unusable.
        Size and shape first: nothing the client sent reaches Redis unchecked."""
        if "positions" not in query:
            return None
        positions = parse_positions(query["positions"][0], self.tenant.max_frame_bytes)
        if not requested:
            raise BadPositions("positions given without a session to resume")
        return positions

    def _admit(self) -> bool:
        """Join the process's connections; False while it drains (closed 1012 at once)."""
        node = self.node
        if not node.lifecycle.admit(self):
            self.close_for_restart()
            return False
        node.start()
        # Findable by tenant, so an operator's change (disable, rotation) reaches it.
        node.tenants.watch(self)
        return True

    async def _count_connection(self) -> bool:
        """Count the connection for its tenant and client; False past a cap (closed 4029)."""
        identity = self.identity
        refused_why = await connection_registry().admit(
            self.tenant, identity.client, self.connection_id
        )
        if refused_why is not None:
            # Like 4001: accepted, then closed with a reason, and nothing else sent.
            self.close_with(CLOSE_TOO_MANY_CONNECTIONS, refused_why, save_session=False)
            _count_refusal(identity.tenant, "connections")
            self._log_refused("connection", refused_why)
            return False
        self._counted = True
        metrics.connection_opened(identity.tenant)
        return True

    async def _open_session(
        self, requested: str, positions: dict[str, int] | None
    ) -> dict[str, int] | None:
        """Start a session, or resume the one requested; returns the positions to restore
        subscriptions at, or None when the resume was refused (and the socket closed)."""
        try:
            if requested:
                restored = await self._resume_session(requested, positions)
            else:
                self.session_id = session_store().create()
                restored = {}
        except BadPositions as bad:
            self._refuse_resume(bad, requested)
            return None
        except SessionRefused as refused:
            # Never silently a new session: the client learns its state was not restored
            # and starts over with its own positions (subscribe with since).
            self.push(error_frame(refused.code, refused.detail, None, session=requested))
            self.close_with(CLOSE_FORBIDDEN, refused.detail[:100], save_session=False)
            self._log_refused("session", refused.detail)
            return None
        self._session_refreshed_at = time.monotonic()
        if requested:
            # A new session is in Redis only from its first subscription: until then the
            # checkpointer has nothing to keep (see session_subscribed).
            self.node.checkpointer.add(self)
        return restored

    async def _resume_session(
        self, requested: str, positions: dict[str, int] | None
    ) -> dict[str, int]:
        """The resumed session's positions, overridden by the client's own where given;
        SessionRefused or BadPositions when it cannot be resumed so."""
        identity = self.identity
        # Heads are read with the session, in the same round trip: only for streams the
        # token allows (one it no longer allows is not restored, so not checked).
        checked = [s for s in positions if identity.may_use(s)] if positions else []
        record, heads = await session_store().resume(
            identity.tenant, identity.client, requested, checked
        )
        restored = dict(record.positions)
        if positions:
            problem = resume_problem(positions, restored, heads)
            if problem is not None:
                raise problem
            # The client's own positions: what it processed, not what was written to its
            # old socket (some of which it may never have read).
            restored.update(positions)
        self.session_id = requested
        self._saved_positions = dict(record.positions)
        return restored

    def _welcome(self, resumed: bool) -> None:
        identity = self.identity
        self.push(
            dumps(
                {
                    "type": "welcome",
                    "client": identity.client,
                    "tenant": identity.tenant,
                    "session": self.session_id,
                    "resumed": resumed,
                    "heartbeat_s": conf().heartbeat_s,
                    "limits": self.tenant.public_limits(),
                }
            )
        )
        _RECORDER.opened(identity.tenant, identity.client, self.connection_id, resumed)

    async def _restore_subscriptions(self, restored: dict[str, int]) -> None:
        """Subscribe again to the resumed session's streams, each from its position."""
        for stream, position in restored.items():
            if self.state is not ConnectionState.OPEN:
                return
            if not self.identity.may_use(stream):
                # The new token no longer allows it: it is not restored.
                self.push(
                    error_frame(
                        "forbidden", f"token does not allow stream {stream!r}", stream=stream
                    )
                )
                continue
            await self._subscribe(stream, position)

    def _refuse_resume(self, bad: BadPositions, requested: str) -> None:
        """Refused positions end the connection like a refused session: the client learns
        its state was not restored (its libraries then resubscribe with `since`)."""
        metrics.error_answered("bad_request")
        self.push(error_frame("bad_request", bad.detail, None, session=requested, **bad.extra))
        self.close_with(CLOSE_FORBIDDEN, bad.detail[:100], save_session=False)
        self._log_refused("resume positions", bad.detail)

    def _log_refused(self, what: str, detail: str) -> None:
        identity = self.identity
        logger.info(
            "%s refused tenant=%s client=%s conn=%s: %s",
            what,
            identity.tenant,
            identity.client,
            self.connection_id,
            detail,
        )

    async def _accept(self) -> None:
        tune_for_long_lived_connections(conf().gc_young_threshold)
        await self.base_send({"type": "websocket.accept"})
        self.state = ConnectionState.OPEN
        if conf().ws_max_age_s > 0:
            self._age_limit = asyncio.get_running_loop().call_later(
                age_limit_s(conf().ws_max_age_s, random.random), self._close_for_age
            )
        protocol = daphne_protocol(self.base_send)
        if protocol is not None:
            self.socket = DaphneSocket(protocol, on_resume=self._on_socket_resume)
            self.socket.start()

    async def websocket_disconnect(self, message: dict[str, Any]) -> None:
        if self._age_limit is not None:
            self._age_limit.cancel()
        was_open = self.state is ConnectionState.OPEN
        self.state = ConnectionState.CLOSED
        self._signal_room()
        if was_open:
            self._end_session()
        self.node.lifecycle.forget(self)
        self.node.tenants.forget(self)
        _RECORDER.closed(self.connection_id, message.get("code"))
        streams = list(self.subscriptions)
        for stream in streams:
            self._drop_subscription(stream)
        counted, self._counted = self._counted, False
        if counted:
            metrics.connection_closed(self.identity.tenant)
        # A client that said goodbye (1000) leaves at once; one cut, going away or closed
        # by us (a restart, say) is likely back soon, so its presence lingers.
        linger = message.get("code") != CLOSE_NORMAL
        # The close's Redis writes are batched with every other close's and go on without
        # this handler (a drain waits for them): a gateway closing thousands of sockets at
        # once would otherwise keep each handler waiting for its batch past daphne's
        # application_close_timeout, to be cancelled and logged one by one.
        self.node.lifecycle.track(self._leave_after_close(linger, counted))
        raise StopConsumer()

    async def _leave_after_close(self, linger: bool, counted: bool) -> None:
        """Presence leaves and the connection count's release, after the handler ended."""
        try:
            await get_tracker().leave_connection(self.connection_id, linger=linger)
        except Exception:
            # Not fatal: the members stay until their TTL and leave as a ghost's would.
            logger.warning(
                "presence leave failed tenant=%s conn=%s",
                self.identity.tenant,
                self.connection_id,
                exc_info=True,
            )
        if not counted:
            return
        try:
            await connection_registry().release(self.connection_id)
        except Exception:
            # Not fatal: the next renewal writes this gateway's counts whole.
            logger.warning(
                "connection count release failed tenant=%s conn=%s",
                self.identity.tenant,
                self.connection_id,
                exc_info=True,
            )

    async def websocket_receive(self, message: dict[str, Any]) -> None:
        if self.state is not ConnectionState.OPEN:
            return
        text = message.get("text")
        if text is None:
            metrics.error_answered("bad_request")
            self.push(error_frame("bad_request", "binary frames are not supported; send JSON text"))
            return
        frame_id = None
        try:
            frame = parse_frame(text, self.tenant.max_frame_bytes)
            frame_id = getattr(frame, "id", None)
            metrics.frame_in(frame)
            _RECORDER.frame(self.identity.tenant, self.identity.client, self.connection_id, frame)
            await getattr(self, HANDLERS[type(frame)])(frame)
        except ProtocolError as error:
            metrics.error_answered(error.code)
            self.push(error.frame())
        except NotReplicated as short:
            # On the master, maybe lost by a failover: not acked. The same id sent again is
            # deduplicated and waits for the replicas again (docs/guarantees.md).
            logger.warning(
                "write not replicated in time tenant=%s client=%s conn=%s: %s",
                self.identity.tenant,
                self.identity.client,
                self.connection_id,
                short,
            )
            metrics.error_answered("unavailable")
            self.push(
                error_frame(
                    "unavailable",
                    "not yet confirmed by the replicas; send it again with the same id",
                    frame_id,
                    retry_after_ms=UNREPLICATED_RETRY_MS,
                )
            )
        except Exception as error:
            if pool_exhausted(error):
                # Never sent (every pooled connection busy: Redis is behind): a bound like
                # any other, so the client backs off and sends it again.
                logger.warning(
                    "Redis pool exhausted; frame refused tenant=%s client=%s conn=%s",
                    self.identity.tenant,
                    self.identity.client,
                    self.connection_id,
                )
                _count_refusal(self.identity.tenant, "redis_pool")
                self.push(
                    error_frame(
                        "overloaded",
                        "the gateway's Redis connections are all busy; retry later",
                        frame_id,
                        retry_after_ms=POOL_EXHAUSTED_RETRY_MS,
                    )
                )
                return
            if isinstance(error, REDIS_AWAY):
                # Redis restarting or a cluster master failing over: not a bug, and the
                # outcome of a write cut off mid-way is unknown. The client waits and sends
                # it again with the same id, which cannot apply it twice.
                logger.warning(
                    "Redis out of reach; frame refused tenant=%s client=%s conn=%s: %r",
                    self.identity.tenant,
                    self.identity.client,
                    self.connection_id,
                    error,
                )
                metrics.error_answered("unavailable")
                self.push(
                    error_frame(
                        "unavailable",
                        "the data store is out of reach (restarting or failing over); send it"
                        " again with the same id",
                        frame_id,
                        retry_after_ms=UNAVAILABLE_RETRY_MS,
                    )
                )
                return
            logger.exception(
                "frame failed tenant=%s client=%s conn=%s",
                self.identity.tenant,
                self.identity.client,
                self.connection_id,
            )
            metrics.error_answered("internal")
            self.push(
                error_frame("internal", "internal error; the frame was not applied", frame_id)
            )

    # --- outbound ----------------------------------------------------------------------

    def push(self, frame: str) -> None:
        if self.state is not ConnectionState.OPEN:
            return
        metrics.frame_out(frame)
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
        self.node.flusher.mark(self)

    def push_many(self, frames: list[str]) -> None:
        """Deliver stream events (every delivery goes through here): the session's
        positions moved, so the next checkpoint looks at this connection."""
        for frame in frames:
            self.push(frame)
        if frames and self.session_id:
            self.node.checkpointer.dirty.add(self)
        if self.reply_clock.started:
            self.reply_clock.delivered(self.identity.tenant, frames)

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
            self.node.flusher.mark(self)
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
        metrics.slow_consumer_closed(self.identity.tenant)
        self.close_with(CLOSE_SLOW_CONSUMER, "slow consumer")

    def close_with(self, code: int, reason: str, save_session: bool = True) -> None:
        if self.state is not ConnectionState.OPEN:
            return
        self.state = ConnectionState.CLOSED
        saving = self._end_session() if save_session else None
        while self.outbox.pop() is not None:
            pass
        self._signal_room()
        if saving is None:
            self._send_close(code, reason)
        else:
            self.node.lifecycle.track(self._close_after(saving, code, reason))

    async def _close_after(self, saving: asyncio.Task[None], code: int, reason: str) -> None:
        """Close once the session is saved, so a client reconnecting at once to another
        gateway resumes from where this one stopped (bounded: Redis may be away)."""
        try:
            await asyncio.wait_for(asyncio.shield(saving), SESSION_SAVE_TIMEOUT_S)
        except Exception:
            logger.warning(
                "session not saved before close tenant=%s conn=%s session=%s",
                self.identity.tenant,
                self.connection_id,
                self.session_id,
                exc_info=True,
            )
        self._send_close(code, reason)

    def _send_close(self, code: int, reason: str) -> None:
        if self.socket is not None:
            self.socket.close(code, reason)
            return
        asyncio.get_running_loop().create_task(
            self.base_send({"type": "websocket.close", "code": code, "reason": reason})
        )

    def close_for_restart(self) -> None:
        self.close_with(CLOSE_SERVICE_RESTART, "service restart")

    def _close_for_age(self) -> None:
        logger.info(
            "connection at its age limit tenant=%s client=%s conn=%s: closed 1012",
            self.identity.tenant,
            self.identity.client,
            self.connection_id,
        )
        self.close_with(CLOSE_SERVICE_RESTART, "connection age limit")

    # --- session -----------------------------------------------------------------------

    def _delivered_positions(self) -> dict[str, int]:
        cursors: dict[str, int] = {}
        for stream, subscription in self.subscriptions.items():
            position = subscription.position()
            if position is None:
                # Still reading its catch-up: the position written at subscribe stands.
                position = self._saved_positions.get(stream)
            if position is not None:
                cursors[stream] = position
        if not len(self.outbox):
            return cursors
        return delivered_positions(cursors, undelivered_floor(self.outbox.frames()))

    def session_changes(self, now: float) -> PendingSave | None:
        """For the checkpointer: what the session in Redis lacks (None: nothing)."""
        if self.state is not ConnectionState.OPEN or not self.session_id:
            return None
        changed, gone = position_changes(self._saved_positions, self._delivered_positions())
        refresh = now - self._session_refreshed_at > conf().session_ttl_s / 3
        if not (changed or gone or refresh):
            return None
        return PendingSave(
            self.identity.tenant, self.session_id, self.identity.client, changed, gone, refresh
        )

    def session_saved(self, save: PendingSave, now: float) -> None:
        self._saved_positions.update(save.changed)
        for stream in save.gone:
            self._saved_positions.pop(stream, None)
        if save.refresh:
            self._session_refreshed_at = now

    def _end_session(self) -> asyncio.Task[None] | None:
        """Write the session's final positions (once) and start its after-disconnect TTL.
        Must run before the outbox is emptied: what is still in it was not delivered."""
        self.node.checkpointer.discard(self)
        if self._session_ended or not self.session_id:
            return None
        self._session_ended = True
        changed, gone = position_changes(self._saved_positions, self._delivered_positions())
        task = asyncio.get_running_loop().create_task(self._save_last_positions(changed, gone))
        self.node.lifecycle.track(task)
        return task

    async def _save_last_positions(self, changed: dict[str, int], gone: list[str]) -> None:
        """The session's last save; a failure is logged here, once: after a disconnect no
        one awaits this task (a gateway closing thousands of sockets at once can wait past
        REDIS_POOL_WAIT_S for its pool). A resume then starts from the last checkpoint, or
        from the positions the client sends."""
        try:
            await session_store().save(
                self.identity.tenant,
                self.session_id,
                self.identity.client,
                changed,
                gone,
                conf().session_ttl_s,
            )
        except RedisError as error:
            logger.warning(
                "session's last positions not saved tenant=%s conn=%s session=%s: %s",
                self.identity.tenant,
                self.connection_id,
                self.session_id,
                error,
            )
        except Exception:
            logger.exception(
                "session's last positions not saved tenant=%s conn=%s session=%s",
                self.identity.tenant,
                self.connection_id,
                self.session_id,
            )

    # --- subscriptions -----------------------------------------------------------------

    def _require_stream(self, stream: str, frame_id: str | None = None) -> None:
        if not self.identity.may_use(stream):
            raise ProtocolError("forbidden", f"token does not allow stream {stream!r}", frame_id)

    async def _subscribe(
        self, stream: str, since: int | None, report: bool = True, compact: bool = False
    ) -> None:
        """Subscribe (again) from `since`: see StreamSubscription.open."""
        self._drop_subscription(stream)
        subscription = StreamSubscription(self, stream, compact)
        self.subscriptions[stream] = subscription
        await subscription.open(since, report)

    async def session_subscribed(self, stream: str, position: int) -> None:
        """The session knows of a subscription as soon as it starts, not a checkpoint later."""
        if self.session_id:
            identity = self.identity
            await session_store().subscribed(
                identity.tenant, self.session_id, identity.client, stream, position
            )
            self._saved_positions[stream] = position
            if self.state is ConnectionState.OPEN and not self._session_ended:
                self.node.checkpointer.add(self)

    def _drop_subscription(self, stream: str) -> None:
        subscription = self.subscriptions.pop(stream, None)
        if subscription is not None:
            subscription.close()

    def _require_room_for(self, stream: str, frame_id: str | None = None) -> None:
        """A new subscription must fit the tenant's per-connection cap."""
        if stream in self.subscriptions:
            return
        refusal = subscription_refusal(self.tenant, len(self.subscriptions), stream, frame_id)
        if refusal is not None:
            _count_refusal(self.identity.tenant, "subscriptions")
            raise refusal

    async def handle_subscribe(self, frame: Subscribe) -> None:
        self._require_stream(frame.stream)
        self._require_room_for(frame.stream)
        await self._subscribe(frame.stream, frame.since, compact=frame.compact)

    async def handle_unsubscribe(self, frame: Unsubscribe) -> None:
        self._require_stream(frame.stream)
        self._drop_subscription(frame.stream)
        if self.session_id and self._saved_positions.pop(frame.stream, None) is not None:
            await session_store().unsubscribed(self.identity.tenant, self.session_id, frame.stream)
        identity = self.identity
        await get_tracker().leave(
            identity.tenant, frame.stream, identity.client, self.connection_id
        )
        self.push(dumps({"type": "unsubscribed", "stream": frame.stream}))

    def _backlogged(self) -> bool:
        return len(self.outbox) > CATCH_UP_PAGE or (self.socket is not None and self.socket.paused)

    async def wait_for_room(self) -> None:
        """Return once the socket has taken most of what waits (a paged read goes on)."""
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
            await self._subscribe(stream, None, report=False)

    # --- frame handlers ----------------------------------------------------------------

    async def handle_send(self, frame: Send) -> None:
        started = time.monotonic()  # where its send→reply.done latency starts
        self._require_stream(frame.stream, frame.id)
        try:
            agent = get_agent(frame.agent)
        except UnknownAgent:
            raise ProtocolError("not_found", f"no agent named {frame.agent!r}", frame.id) from None
        limits = await self._take_message_token(frame.id)
        # Checked on the tenant's cached settings (fresh within SWITCHBOARD_TENANT_CACHE_S,
        # no database read here), after the token: refused sends are paid for like others.
        if not limits.may_use(agent.name):
            raise ProtocolError(
                "forbidden", f"agent {agent.name!r} is not enabled for this tenant", frame.id
            )
        self._require_room_for(frame.stream, frame.id)
        await self._ensure_subscribed(frame.stream)
        options = run_options(frame.options, limits)
        identity = self.identity
        slot = connection_registry().run_slot(self.connection_id)
        if "interrupted" in options or interrupts(frame):
            options = await self._interrupt_first(frame, options, slot)
        if options is not frame.options:
            frame = dataclasses.replace(frame, options=options)
        try:
            appended = await self._append_and_ack(
                frame.stream,
                frame.id,
                self.node.streams.accept_send(
                    identity.tenant,
                    identity.client,
                    frame,
                    agent,
                    self.tenant.stream_retention,
                    RunLimits(
                        slot,
                        limits.max_runs_in_flight_per_connection,
                        limits.max_queued_runs,
                    ),
                    weight=limits.weight,
                    agent_config=limits.agent_overrides(agent.name),
                    budgets=limits.token_budgets(),
                    after_ack=True,
                ),
            )
        except BudgetExhausted as spent:
            _count_refusal(identity.tenant, "token_budget")
            raise budget_refusal(spent.exhausted, frame.id) from None
        except LimitReached as reached:
            reason = "runs_in_flight" if reached.code == "rate_limited" else "queued_runs"
            _count_refusal(identity.tenant, reason)
            if reached.code == "rate_limited":
                detail = (
                    f"this connection has {limits.max_runs_in_flight_per_connection} "
                    "runs in flight; wait for a reply.done"
                )
            else:
                detail = f"the tenant has {limits.max_queued_runs} runs waiting for a worker"
            raise ProtocolError(
                reached.code, detail, frame.id, retry_after_ms=limit_retry_ms(reached.wait_ms)
            ) from None
        metrics.acked(identity.tenant, appended.duplicate)
        if appended.after_ack is not None:
            # The fair ring's join (and a publish to another broker) once the ack is out,
            # shielded: a client that disconnects now cancels this handler, and a join left
            # undone would leave the run queued outside the ring until a sweep repairs it.
            await _shielded(appended.after_ack)
        if not appended.duplicate:
            self.reply_clock.sent(appended.run_id, started)
            logger.debug(
                "send accepted tenant=%s client=%s conn=%s stream=%s event=%s run=%s",
                identity.tenant,
                identity.client,
                self.connection_id,
                frame.stream,
                appended.event_id,
                appended.run_id,
            )

    async def _interrupt_first(
        self, frame: Send, options: dict[str, Any], slot: str
    ) -> dict[str, Any]:
        """A send with `interrupt: true`: this client's runs in flight on the stream (those
        this connection started) end `cancelled` before the new run is created, and what
        they had said goes into its options as `interrupted`. A client never sets that
        option itself, and a repeated send (its id already taken) interrupts nothing."""
        from orchestration.cancel import interrupt_runs

        options = {name: value for name, value in options.items() if name != "interrupted"}
        if not interrupts(frame):
            return options
        identity = self.identity
        if await self.node.streams.client.exists(
            keys.client_message(identity.tenant, identity.client, frame.id)
        ):
            return options  # a repeat: the first one already interrupted
        interrupted = await interrupt_runs(
            identity.tenant,
            identity.client,
            frame.stream,
            keys.runs_in_flight(identity.tenant, slot),
        )
        if interrupted:
            options["interrupted"] = interrupted
        return options

    async def handle_publish(self, frame: Publish) -> None:
        self._require_stream(frame.stream, frame.id)
        await self._take_message_token(frame.id)
        identity = self.identity
        appended = await self._append_and_ack(
            frame.stream,
            frame.id,
            self.node.streams.publish(
                identity.tenant, identity.client, frame, self.tenant.stream_retention
            ),
        )
        metrics.acked(identity.tenant, appended.duplicate)

    # --- the client's own writes come before their events ------------------------------

    async def _append_and_ack(
        self, stream: str, message_id: str, append: Coroutine[Any, Any, Appended]
    ) -> Appended:
        """Await `append` (a send's or a publish's write) and ack it; meanwhile the stream's
        events are kept back, so the client gets its ack before its own event. A refusal
        raised by the write releases them unacked."""
        self._write_started(stream)
        acked: int | None = None
        try:
            appended = await append
            self.push(ack_frame(message_id, appended.event_id, appended.seq, appended.duplicate))
            acked = appended.seq
        finally:
            self._write_ended(stream, acked)
        return appended

    def _write_started(self, stream: str) -> None:
        self.writes_in_flight[stream] = self.writes_in_flight.get(stream, 0) + 1

    def _write_ended(self, stream: str, acked_seq: int | None) -> None:
        left = self.writes_in_flight[stream] - 1
        if left:
            self.writes_in_flight[stream] = left
        else:
            del self.writes_in_flight[stream]
        subscription = self.subscriptions.get(stream)
        if subscription is not None:
            subscription.release_after_ack(acked_seq)

    async def _take_message_token(
        self, frame_id: str | None, receipt: bool = False, **extra: Any
    ) -> TenantConfig:
        """A `send` or `publish` pays its client's and its tenant's rate (before its dedupe
        lookup: a repeat costs a token too), a `receipt` its client's receipt rate; `extra`
        goes into the refusal. Returns the tenant's current limits."""
        limits = self.tenant
        try:
            # The cached settings (not the connection's snapshot), so an operator's change
            # reaches open connections within SWITCHBOARD_TENANT_CACHE_S.
            limits = await tenant_cache.get(limits.slug) or limits
        except Exception:
            logger.warning("tenant settings unavailable; using the connection's", exc_info=True)
        wait_ms = await rate_limiter().wait_ms(limits, self.identity.client, receipt)
        if wait_ms:
            _count_refusal(limits.slug, "receipts" if receipt else "messages")
            raise ProtocolError(
                "rate_limited",
                "too many receipts from this client; retry after retry_after_ms"
                if receipt
                else "too many messages from this client or tenant; retry after retry_after_ms",
                frame_id,
                retry_after_ms=wait_ms,
                **extra,
            )
        return limits

    async def handle_receipt(self, frame: Receipt) -> None:
        self._require_stream(frame.stream)
        # Every receipt is a Redis write: it pays a token of the client's receipt bucket.
        await self._take_message_token(None, receipt=True, stream=frame.stream)
        identity = self.identity
        try:
            # A receipt lower than the stored one (late, reordered) is ignored silently.
            await receipt_store().record(identity.tenant, frame.stream, identity.client, frame.seq)
        except BeyondHead as beyond:
            # Refused rather than clamped: a seq the stream never assigned is a client bug,
            # and a clamped position would claim events read that the client never saw.
            raise ProtocolError(
                "bad_request", str(beyond), None, stream=frame.stream, head=beyond.head
            ) from None

    async def handle_cancel(self, frame: Cancel) -> None:
        from orchestration.cancel import cancel_run

        identity = self.identity
        outcome = await cancel_run(identity.tenant, identity.client, frame.id)
        if outcome is not None:
            raise ProtocolError(outcome[0], outcome[1], frame.id)

    async def handle_presence(self, frame: Presence) -> None:
        self._require_stream(frame.stream)
        clients = await get_tracker().clients(self.identity.tenant, frame.stream)
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
