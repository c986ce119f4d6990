"""One per gateway process: hears each stream once from Redis and fans it out in memory.

Every stream is a group whose members are gateway processes, not sockets: the process
subscribes to the stream's pub/sub channel when its first local connection subscribes,
and hands each notification to every local subscription. Redis work per event is one
message per process however many sockets listen (plain `group_send` costs ~8 commands per
member). Pub/sub is at-most-once, so it only says "seq N exists"; the log is the truth, and
a subscription that sees a gap, or a reconnect that may have lost messages, reads the log.

A message is `SEQ "\n" EVENT_JSON`; an empty SEQ marks an event outside the log (presence
`join`/`leave`), which listeners take as it comes, with no ordering or repair.

In a Redis Cluster a stream's channel is sharded (SSUBSCRIBE, published by SPUBLISH in the
slot of the stream's tenant), so it is heard only from the master that owns that slot: the
hub keeps one plain pub/sub connection per master it needs, a "shard", and asks the
cluster's slot map which one a channel goes to. redis-py's own cluster pub/sub is not used:
it reconnects and moves subscriptions by itself, and a subscription that came back by
itself would not say that messages may have been lost meanwhile. Here a shard's lost
connection, a MOVED answer and a server-sent SUNSUBSCRIBE (its slot moved: failover,
resharding) all end the shard's connection: the hub reads the slot map again, moves every
channel whose slot has a new owner to that owner's shard, subscribes again and tells each
listener it may have missed events, so it re-reads the stream's log.

Each shard's connection is a `PubSubLink` (realtime/pubsub_link.py): a notification is
handed to its listeners, and on to their sockets, from the socket's read callback, not one
turn of the event loop later by a reading task.

The process's hub is held by its node (realtime/node.py), which closes it after a drain.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from typing import Protocol

import orjson
import redis.asyncio as aredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ops import metrics
from realtime.pubsub_link import PubSubLink, Reply
from streams import keys

logger = logging.getLogger(__name__)

RECONNECT_BACKOFF_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0)
# A link quiet this long is pinged; one still quiet after as long again is given up.
IDLE_PING_S = 10.0
# A subscribe fails (the client gets an error) rather than hang while Redis is away.
JOIN_TIMEOUT_S = 5.0


class Listener(Protocol):
    def on_event(self, seq: int, event: str) -> None: ...

    def on_unsequenced(self, event: str, sender: str | None) -> None: ...

    def on_possible_loss(self) -> None: ...


class Topology(Protocol):
    """A Redis Cluster's slot map, as the hub needs it (streams/redis_clients.py)."""

    async def owner(self, channel: bytes) -> str:
        """The address ("host:port") of the master that owns the channel's slot."""
        ...

    async def refresh(self) -> None:
        """Read the slot map again (after a shard was lost or answered MOVED)."""
        ...

    def client(self, address: str) -> aredis.Redis:
        """A client of that one node, which never retries (see pubsub_client)."""
        ...


class SlotMoved(Exception):
    """A shard's node no longer owns a subscribed channel's slot."""


class _Shard:
    """One pub/sub connection and the channels subscribed on it: the only one on a single
    Redis (address ""), one per master in a Redis Cluster."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.channels: set[bytes] = set()
        self.link: PubSubLink | None = None
        self.reader: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()
        # Our own unsubscribes not confirmed yet: any other SUNSUBSCRIBE is the server's.
        self.leaving: Counter[bytes] = Counter()


class Hub:
    def __init__(
        self, client_factory: Callable[[], aredis.Redis], topology: Topology | None = None
    ) -> None:
        self._client_factory = client_factory
        self._topology = topology
        sharded = topology is not None
        self._subscribe = "SSUBSCRIBE" if sharded else "SUBSCRIBE"
        self._unsubscribe_command = "SUNSUBSCRIBE" if sharded else "UNSUBSCRIBE"
        self._message = b"smessage" if sharded else b"message"
        self._subscribed = b"ssubscribe" if sharded else b"subscribe"
        self._listeners: dict[bytes, set[Listener]] = {}
        self._confirmed: dict[bytes, asyncio.Future[None]] = {}
        self._shards: dict[str, _Shard] = {}
        self._shard_of: dict[bytes, _Shard] = {}
        self.closing = False

    async def join(self, tenant: str, stream: str, listener: Listener) -> None:
        """Add a listener; returns once this process is sure to hear the stream's next event."""
        channel = keys.stream_channel(tenant, stream).encode()
        group = self._listeners.get(channel)
        if group is None:
            group = self._listeners[channel] = set()
            self._confirmed[channel] = asyncio.get_running_loop().create_future()
            try:
                shard = await asyncio.wait_for(self._assign(channel), JOIN_TIMEOUT_S)
                await asyncio.wait_for(shard.connected.wait(), JOIN_TIMEOUT_S)
                assert shard.link is not None
                shard.link.send(self._subscribe, channel)
            except BaseException:
                # Redis away, the slot map unreadable, or the join cancelled: the next join
                # of the stream starts over.
                self._forget_if_empty(channel)
                raise
        group.add(listener)
        confirmed = self._confirmed.get(channel)
        if confirmed is not None and not confirmed.done():
            try:
                await asyncio.wait_for(asyncio.shield(confirmed), JOIN_TIMEOUT_S)
            except TimeoutError:
                self.leave(tenant, stream, listener)
                raise

    async def _assign(self, channel: bytes) -> _Shard:
        """The shard the channel is heard on (its reader started), the channel counted in
        it: the one connection on a single Redis, the slot owner's in a Redis Cluster."""
        address = "" if self._topology is None else await self._topology.owner(channel)
        shard = self._shard(address)
        if channel in self._listeners:  # not left while the slot map was read
            shard.channels.add(channel)
            self._shard_of[channel] = shard
        return shard

    def _shard(self, address: str) -> _Shard:
        shard = self._shards.get(address)
        if shard is None:
            shard = self._shards[address] = _Shard(address)
        if shard.reader is None or shard.reader.done():
            shard.reader = asyncio.get_running_loop().create_task(self._read_forever(shard))
        return shard

    def _forget_if_empty(self, channel: bytes) -> None:
        if not self._listeners.get(channel):
            self._listeners.pop(channel, None)
            self._confirmed.pop(channel, None)
            shard = self._shard_of.pop(channel, None)
            if shard is not None:
                shard.channels.discard(channel)

    def leave(self, tenant: str, stream: str, listener: Listener) -> None:
        channel = keys.stream_channel(tenant, stream).encode()
        group = self._listeners.get(channel)
        if group is None:
            return
        group.discard(listener)
        if not group:
            del self._listeners[channel]
            self._confirmed.pop(channel, None)
            shard = self._shard_of.pop(channel, None)
            if shard is None:
                return
            shard.channels.discard(channel)
            if shard.link is not None and shard.connected.is_set():
                asyncio.get_running_loop().call_soon(self._unsubscribe, shard, channel)

    def _unsubscribe(self, shard: _Shard, channel: bytes) -> None:
        # Soon, not at once: a listener that leaves and another that joins in the same
        # turn (a resubscribe) keep the channel.
        if channel in shard.channels or shard.link is None:
            return
        shard.leaving[channel] += 1
        try:
            shard.link.send(self._unsubscribe_command, channel)
        except RedisConnectionError:
            pass  # the reconnect resubscribes only to channels still listened to

    async def _read_forever(self, shard: _Shard) -> None:
        failures = 0
        while not self.closing:
            try:
                await self._connect(shard)
                failures = 0
                await self._read(shard)
            except (RedisConnectionError, RedisTimeoutError, OSError, SlotMoved) as error:
                shard.connected.clear()
                delay = RECONNECT_BACKOFF_S[min(failures, len(RECONNECT_BACKOFF_S) - 1)]
                failures += 1
                logger.warning(
                    "hub lost redis%s (%s); reconnecting in %.2fs",
                    f" shard {shard.address}" if shard.address else "",
                    error,
                    delay,
                )
                await asyncio.sleep(delay)
            except asyncio.CancelledError:
                raise
            except Exception:
                shard.connected.clear()
                logger.exception("hub reader failed; restarting")
                await asyncio.sleep(0.5)
            if self._topology is not None and not self.closing:
                if not await self._reassign(shard):
                    return

    async def _reassign(self, shard: _Shard) -> bool:
        """After a shard was lost: read the slot map again and move each of its channels
        whose slot has another owner now to that owner's shard (which subscribes to it and
        tells its listeners they may have missed events). False when the shard has nothing
        left to hear: its reader ends, its connection is closed."""
        assert self._topology is not None
        try:
            await self._topology.refresh()
            owners = {channel: await self._topology.owner(channel) for channel in shard.channels}
        except (RedisError, RedisClusterException, OSError) as error:
            # The cluster is between owners (a failover under way): try this node again
            # after the backoff, and look again.
            logger.warning("hub could not read the cluster's slot map (%s)", error)
            return True
        moved: Counter[str] = Counter()
        for channel, address in owners.items():
            if address == shard.address or channel not in shard.channels:
                continue
            shard.channels.discard(channel)
            target = self._shard(address)
            target.channels.add(channel)
            self._shard_of[channel] = target
            moved[address] += 1
            if target.connected.is_set():
                self._subscribe_moved(target, channel)
        for address, count in moved.items():
            logger.info("hub moved %s channels from shard %s to %s", count, shard.address, address)
        if shard.channels:
            return True
        if self._shards.get(shard.address) is shard:
            del self._shards[shard.address]
        self._close_link(shard)
        shard.reader = None
        return False

    def _subscribe_moved(self, shard: _Shard, channel: bytes) -> None:
        """A channel moved to an already connected shard: subscribed there, then its
        listeners re-read (what was published while it moved is only in the log)."""
        if shard.link is None:
            return
        try:
            shard.link.send(self._subscribe, channel)
        except RedisConnectionError:
            return  # that shard's reconnect subscribes it and tells the listeners
        for listener in list(self._listeners.get(channel, ())):
            listener.on_possible_loss()

    @staticmethod
    def _close_link(shard: _Shard) -> None:
        if shard.link is not None:
            shard.link.close()
            shard.link = None

    async def _connect(self, shard: _Shard) -> None:
        self._close_link(shard)
        if self._topology is None:
            client = self._client_factory()
        else:
            client = self._topology.client(shard.address)
        shard.leaving.clear()
        shard.link = await PubSubLink.open(client, lambda reply: self._on_reply(shard, reply))
        channels = list(shard.channels)
        for channel in channels:
            future = self._confirmed.get(channel)
            if future is None or future.done():
                self._confirmed[channel] = asyncio.get_running_loop().create_future()
        # A first subscription even with nothing to hear yet: the link is in pub/sub mode
        # from here on, as every reply it expects is.
        commands: list[tuple[str | bytes, ...]] = [
            ("SUBSCRIBE", keys.STREAM_CHANNEL_PREFIX + "__hub__")
        ]
        if channels and self._topology is None:
            commands.append((self._subscribe, *channels))
        else:
            # One SSUBSCRIBE per channel: a node refuses one whose channels span slots.
            commands.extend((self._subscribe, channel) for channel in channels)
        shard.link.send_many(commands)
        shard.connected.set()
        if channels:
            # Anything published while we were away is only in the logs now.
            for channel in channels:
                for listener in list(self._listeners.get(channel, ())):
                    listener.on_possible_loss()

    async def _read(self, shard: _Shard) -> None:
        """Wait while the shard's link delivers (its replies go to `_on_reply` as they
        arrive); ping it when quiet, give it up when a ping is not answered, and raise why
        it ended."""
        link = shard.link
        assert link is not None
        pinged = False
        while True:
            heard = link.replies
            try:
                await asyncio.wait_for(asyncio.shield(link.closed), IDLE_PING_S)
            except TimeoutError:
                if link.replies != heard:
                    pinged = False
                elif pinged:
                    raise RedisTimeoutError(f"no answer to a PING in {IDLE_PING_S:.0f} s") from None
                else:
                    link.send("PING")
                    pinged = True
                continue
            except RedisError as error:
                if self._topology is not None and not isinstance(
                    error, (RedisConnectionError, RedisTimeoutError)
                ):
                    # MOVED, ASK, CLUSTERDOWN: the slot map changed under us.
                    raise SlotMoved(str(error)) from error
                raise
            raise RedisConnectionError("the pub/sub connection was closed")

    def _on_reply(self, shard: _Shard, reply: Reply) -> None:
        """One reply of a shard's link, in its read callback: a notification goes to its
        listeners (and their sockets) now. A PING's answer is "PONG" over RESP3 and a
        list over RESP2: only the link's count of replies needs it."""
        if not isinstance(reply, list):
            return
        kind = reply[0]
        if kind == self._message:
            group = self._listeners.get(reply[1])
            if not group:
                return
            head, _, event = reply[2].partition(b"\n")
            text = event.decode()
            if not head:
                self._deliver_unsequenced(group, text)
                return
            seq = int(head)
            for listener in tuple(group):
                listener.on_event(seq, text)
            # Once per event per process: the lag to the last local socket.
            metrics.event_delivered(text)
        elif kind == self._subscribed:
            future = self._confirmed.get(reply[1])
            if future is not None and not future.done():
                future.set_result(None)
        elif kind == b"sunsubscribe":
            channel = reply[1]
            if shard.leaving[channel] > 0:
                shard.leaving[channel] -= 1
            elif channel in shard.channels:
                # Not ours: the node gave the slot away (failover, resharding).
                raise SlotMoved(f"the node unsubscribed {channel!r}")

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
        for shard in list(self._shards.values()):
            if shard.reader is not None:
                shard.reader.cancel()
            self._close_link(shard)
