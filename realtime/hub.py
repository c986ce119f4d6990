"""One per gateway process: hears each stream once from Redis and fans it out in memory.

Every stream is a group whose members are gateway processes, not sockets: the process
subscribes to the stream's pub/sub channel when its first local connection subscribes,
and hands each notification to every local subscription. Redis work per event is one
message per process however many sockets listen (plain `group_send` costs ~8 commands per
member). Pub/sub is at-most-once, so it only says "seq N exists"; the log is the truth, and
a subscription that sees a gap, or a reconnect that may have lost messages, reads the log.

A message is `SEQ "\n" EVENT_JSON`; an empty SEQ marks an event outside the log (presence
`join`/`leave`), which listeners take as it comes, with no ordering or repair.

The process's hub is held by its node (realtime/node.py), which closes it after a drain.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

import orjson
import redis.asyncio as aredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ops import metrics
from streams import keys

logger = logging.getLogger(__name__)

RECONNECT_BACKOFF_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0)
IDLE_PING_S = 10.0
# A subscribe fails (the client gets an error) rather than hang while Redis is away.
JOIN_TIMEOUT_S = 5.0


class Listener(Protocol):
    def on_event(self, seq: int, event: str) -> None: ...

    def on_unsequenced(self, event: str, sender: str | None) -> None: ...

    def on_possible_loss(self) -> None: ...


class Hub:
    def __init__(self, client_factory: Callable[[], aredis.Redis]) -> None:
        self._client_factory = client_factory
        self._listeners: dict[bytes, set[Listener]] = {}
        self._confirmed: dict[bytes, asyncio.Future[None]] = {}
        self._pubsub: aredis.client.PubSub | None = None
        self._reader: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self.closing = False

    async def join(self, tenant: str, stream: str, listener: Listener) -> None:
        """Add a listener; returns once this process is sure to hear the stream's next event."""
        channel = keys.stream_channel(tenant, stream).encode()
        group = self._listeners.get(channel)
        if group is None:
            group = self._listeners[channel] = set()
            self._confirmed[channel] = asyncio.get_running_loop().create_future()
            self._ensure_reader()
            try:
                await asyncio.wait_for(self._connected.wait(), JOIN_TIMEOUT_S)
            except TimeoutError:
                self._forget_if_empty(channel)
                raise
            assert self._pubsub is not None
            await self._pubsub.execute_command("SUBSCRIBE", channel)
        group.add(listener)
        confirmed = self._confirmed.get(channel)
        if confirmed is not None and not confirmed.done():
            try:
                await asyncio.wait_for(asyncio.shield(confirmed), JOIN_TIMEOUT_S)
            except TimeoutError:
                self.leave(tenant, stream, listener)
                raise

    def _forget_if_empty(self, channel: bytes) -> None:
        if not self._listeners.get(channel):
            self._listeners.pop(channel, None)
            self._confirmed.pop(channel, None)

    def leave(self, tenant: str, stream: str, listener: Listener) -> None:
        channel = keys.stream_channel(tenant, stream).encode()
        group = self._listeners.get(channel)
        if group is None:
            return
        group.discard(listener)
        if not group:
            del self._listeners[channel]
            self._confirmed.pop(channel, None)
            if self._pubsub is not None and self._connected.is_set():
                asyncio.get_running_loop().create_task(self._unsubscribe(channel))

    async def _unsubscribe(self, channel: bytes) -> None:
        if channel in self._listeners or self._pubsub is None:
            return
        try:
            await self._pubsub.execute_command("UNSUBSCRIBE", channel)
        except (RedisConnectionError, RedisTimeoutError):
            pass  # the reconnect resubscribes only to channels still listened to

    def _ensure_reader(self) -> None:
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read_forever())

    async def _read_forever(self) -> None:
        failures = 0
        while not self.closing:
            try:
                await self._connect()
                failures = 0
                await self._read()
            except (RedisConnectionError, RedisTimeoutError, OSError) as error:
                self._connected.clear()
                delay = RECONNECT_BACKOFF_S[min(failures, len(RECONNECT_BACKOFF_S) - 1)]
                failures += 1
                logger.warning("hub lost redis (%s); reconnecting in %.2fs", error, delay)
                await asyncio.sleep(delay)
            except asyncio.CancelledError:
                raise
            except Exception:
                self._connected.clear()
                logger.exception("hub reader failed; restarting")
                await asyncio.sleep(0.5)

    async def _connect(self) -> None:
        if self._pubsub is not None:
            try:
                await self._pubsub.aclose()
            except Exception:  # noqa: BLE001 - the old connection is being thrown away
                pass
        self._pubsub = self._client_factory().pubsub()
        channels = list(self._listeners)
        for channel in channels:
            future = self._confirmed.get(channel)
            if future is None or future.done():
                self._confirmed[channel] = asyncio.get_running_loop().create_future()
        # PING establishes the connection even with nothing to subscribe to yet.
        await self._pubsub.execute_command("SUBSCRIBE", keys.STREAM_CHANNEL_PREFIX + "__hub__")
        if channels:
            await self._pubsub.execute_command("SUBSCRIBE", *channels)
        self._connected.set()
        if channels:
            # Anything published while we were away is only in the logs now.
            for channel in channels:
                for listener in list(self._listeners.get(channel, ())):
                    listener.on_possible_loss()

    async def _read(self) -> None:
        assert self._pubsub is not None
        parse = self._pubsub.parse_response
        listeners = self._listeners
        while True:
            response = await parse(block=False, timeout=IDLE_PING_S)
            if response is None:
                # Quiet for a while: a PING proves the connection is still alive.
                await self._pubsub.ping()
                continue
            kind = response[0]
            if kind == b"message":
                group = listeners.get(response[1])
                if not group:
                    continue
                head, _, event = response[2].partition(b"\n")
                text = event.decode()
                if not head:
                    self._deliver_unsequenced(group, text)
                    continue
                seq = int(head)
                for listener in tuple(group):
                    listener.on_event(seq, text)
                # Once per event per process: the lag to the last local socket.
                metrics.event_delivered(text)
            elif kind == b"subscribe":
                future = self._confirmed.get(response[1])
                if future is not None and not future.done():
                    future.set_result(None)

    @staticmethod
    def _deliver_unsequenced(group: set[Listener], text: str) -> None:
        # Parsed once per process, not once per socket: listeners may filter by sender.
        try:
            sender = orjson.loads(text).get("from")
        except (orjson.JSONDecodeError, AttributeError):
            logger.warning("hub dropped an unsequenced message that is not an event object")
            return
        for listener in tuple(group):
            listener.on_unsequenced(text, sender)

    async def close(self) -> None:
        self.closing = True
        if self._reader is not None:
            self._reader.cancel()
        if self._pubsub is not None:
            try:
                await self._pubsub.aclose()
            except Exception:  # noqa: BLE001
                pass
