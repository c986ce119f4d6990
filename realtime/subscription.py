"""One stream subscribed by one connection: catch-up, gap repair, seq order, delivery.

The connection (realtime/consumer.py) owns the socket, the outbox and the session; a
subscription owns what is particular to one stream on it. The process's Hub hands it
every notification of its stream (`on_event`, `on_unsequenced`), its `StreamCursor`
(realtime/sequencing.py) releases events strictly in seq order, each once, and what the
live path missed (a gap, a pub/sub reconnect, the rest of a long catch-up) is read from
the stream's log a page at a time (`schedule_repair`). Every event it releases goes to the
connection's `push_many`, which puts it into the outbox and tells the session it moved.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ops import metrics
from project.conf import conf
from realtime.compaction import LOOKBACK, Compactor, runs_in_progress
from realtime.presence import get_tracker
from realtime.protocol import error_frame
from realtime.sequencing import StreamCursor
from streams.events import dumps
from streams.log import StreamStore
from tenants.tokens import Identity

if TYPE_CHECKING:
    from realtime.node import GatewayNode

logger = logging.getLogger(__name__)

# Events a catch-up reads from the log at a time; the next page waits until the socket
# has taken most of the last (outbox at most this long, Twisted not pushing back).
CATCH_UP_PAGE = 200
# A repair that could not reach Redis is tried again after this long.
REPAIR_RETRY_S = 0.5


class Subscriber(Protocol):
    """What a subscription needs of its connection (GatewayConsumer)."""

    identity: Identity
    connection_id: str
    node: GatewayNode

    def push(self, frame: str) -> None: ...

    # Streams with a send or publish of this connection waiting for its answer (how many
    # to each): their live events follow its ack.
    writes_in_flight: dict[str, int]

    def push_many(self, frames: list[str]) -> None: ...

    async def wait_for_room(self) -> None: ...

    async def session_subscribed(self, stream: str, position: int) -> None: ...


@dataclass(frozen=True, slots=True)
class CatchUp:
    """What a subscribe found: the stream's head and the events to send after `subscribed`."""

    head: int
    recovered: bool
    expired: bool
    events: list[str]
    more: bool = False  # missed events beyond the first page are still to be read


class StreamSubscription:
    """One connection's interest in one stream: the Hub calls it, it keeps seq order."""

    # No more slots than needed: a fan-out to 10,000 sockets is 10,000 of these.
    __slots__ = (
        "connection", "stream", "cursor", "repairing", "active", "held", "compactor",
        "before_ack",
    )  # fmt: skip

    # Unsequenced events kept while the catch-up read runs: they follow `subscribed`.
    MAX_HELD = 1024
    # Live events kept behind the connection's own writes in flight: past this they go on.
    MAX_BEFORE_ACK = 1024

    def __init__(self, connection: Subscriber, stream: str, compact: bool = False) -> None:
        self.connection = connection
        # compact: the catch-up window's replies as reply.done or reply.snapshot
        # (realtime/compaction.py); set once the window is known, gone once it is sent.
        self.compactor: Compactor | None = Compactor(-1) if compact else None
        self.stream = stream
        self.cursor = StreamCursor()
        self.repairing = False
        self.active = True
        self.held: list[str] = []
        # (seq, event) released while the connection's own send or publish to the stream
        # was in flight: they follow its ack (`release_after_ack`).
        self.before_ack: list[tuple[int, str]] = []

    @property
    def store(self) -> StreamStore:
        return self.connection.node.streams

    # --- opening: join, catch up, report -----------------------------------------------

    async def open(self, since: int | None, report: bool = True) -> None:
        """Join the stream and deliver what the client missed since `since` (None: start at
        the head); `report`: the client asked to subscribe, so it is told `subscribed`
        first (the implicit subscription of a `send` is not)."""
        connection = self.connection
        identity = connection.identity
        metrics.subscribed(identity.tenant)
        await connection.node.hub.join(identity.tenant, self.stream, self)
        await get_tracker().join(
            identity.tenant,
            self.stream,
            identity.client,
            identity.name or "",
            connection.connection_id,
        )
        found = await self.catch_up(since)
        if report:
            self._report(since, found)
        self.deliver(found.events)
        if found.more:
            self.schedule_repair(to_head=True)

    def _report(self, since: int | None, found: CatchUp) -> None:
        if found.expired:
            self.connection.push(
                error_frame(
                    "history_expired",
                    f"events after seq {since} are no longer retained; go on from head",
                    None,
                    stream=self.stream,
                    head=found.head,
                )
            )
        self.connection.push(
            dumps(
                {
                    "type": "subscribed",
                    "stream": self.stream,
                    "head": found.head,
                    "recovered": found.recovered,
                }
            )
        )

    async def catch_up(self, since: int | None) -> CatchUp:
        """Collect what the client missed since `since`. Called once the Hub has the
        subscription, so live events heard during the read wait in the cursor and follow
        the missed ones, in seq order."""
        tenant = self.connection.identity.tenant
        head, events = await self.store.head_and_read(tenant, self.stream, since, CATCH_UP_PAGE)
        if since is None and self.compactor is not None and head:
            hydrated = await self._hydrate_at_head(tenant, head)
            if hydrated is not None:
                return hydrated
        if since is None or since == head:
            self.compactor = None  # nothing missed: nothing to fold
            await self.connection.session_subscribed(self.stream, head)
            return CatchUp(head, since is not None, False, self.start_at(head + 1))
        if self.compactor is not None:
            self.compactor = Compactor(head) if since < head else None
        if events and events[0][0] == since + 1:
            await self.connection.session_subscribed(self.stream, since)
            missed = [event for _, event in events]
            live = self.start_at(events[-1][0] + 1)
            # The rest is read page by page as the socket drains (see _repair).
            more = events[-1][0] < head
            return CatchUp(head, True, False, missed + live, more)
        self.compactor = None
        await self.connection.session_subscribed(self.stream, head)
        return CatchUp(head, False, True, self.start_at(head + 1))

    async def _hydrate_at_head(self, tenant: str, head: int) -> CatchUp | None:
        """A compact join without `since`: the replies still streaming near the head as
        snapshots, then the live events (see realtime/compaction.py). None: none found, or
        their start is no longer retained (the join goes on from the head as usual)."""
        found = runs_in_progress(await self.store.read_last(tenant, self.stream, LOOKBACK))
        if not found:
            return None
        starts = await self.store.message_seqs(list(found))
        since = min(starts.get(run, seq - 1) for run, seq in found.items())
        events = await self.store.read(
            tenant, self.stream, since + 1, min(head, since + CATCH_UP_PAGE)
        )
        if not events or events[0][0] != since + 1:
            return None
        self.compactor = Compactor(head, only=frozenset(found))
        await self.connection.session_subscribed(self.stream, head)
        missed = [event for _, event in events]
        live = self.start_at(events[-1][0] + 1)
        return CatchUp(head, False, False, missed + live, events[-1][0] < head)

    def deliver(self, frames: list[str]) -> None:
        """Hand released events to the connection, folded while a compact catch-up lasts."""
        compactor = self.compactor
        if compactor is not None:
            frames = compactor.feed(frames)
            if compactor.finished:
                self.compactor = None
        if frames:
            self.connection.push_many(frames)

    def start_at(self, next_seq: int) -> list[str]:
        """Place the cursor after the catch-up read; returns what may be sent now."""
        ready = self.cursor.start_at(next_seq)
        if self.held:
            ready.extend(self.held)
            self.held = []
        return ready

    # --- the Hub's side (realtime/hub.py Listener) -------------------------------------

    def on_unsequenced(self, event: str, sender: str | None) -> None:
        # join/leave: outside the log, so no cursor; a client is not told of itself.
        if sender == "client:" + self.connection.identity.client:
            return
        if self.cursor.next_seq is not None:
            self.connection.push(event)
        elif len(self.held) < self.MAX_HELD:
            self.held.append(event)

    def on_event(self, seq: int, event: str) -> None:
        ready = self.cursor.offer(seq, event)
        if ready:
            connection = self.connection
            if (
                self.compactor is None
                and not self.before_ack
                and self.stream not in connection.writes_in_flight
            ):
                connection.push_many(ready)  # the fan-out path: no call more than before
            else:
                self._release(ready)
        if self.cursor.missing() is not None:
            self.schedule_repair()

    def _release(self, ready: list[str]) -> None:
        """What the cursor just released, handed on in order (behind the connection's own
        write in flight, as on_event does)."""
        if not ready:
            return
        if self.before_ack or self.stream in self.connection.writes_in_flight:
            self._keep_for_ack(ready)
        else:
            self.deliver(ready)

    def _keep_for_ack(self, ready: list[str]) -> None:
        """The hub hands an event on as soon as it arrives, which can be before the
        client's own write to the stream has its ack: its event would come first. While a
        write is in flight, released events wait for it (a round trip at most)."""
        next_seq = self.cursor.next_seq
        assert next_seq is not None  # events are released only once the cursor is placed
        first = next_seq - len(ready)
        self.before_ack.extend((first + index, event) for index, event in enumerate(ready))
        if len(self.before_ack) > self.MAX_BEFORE_ACK:
            self.release_after_ack(None)

    def release_after_ack(self, acked_seq: int | None) -> None:
        """The connection's write to this stream was answered (its ack, of `acked_seq`, is
        written; None: refused, or no write waits any more): the kept events up to it go
        on, and all of them once no write of the connection is in flight."""
        kept = self.before_ack
        if not kept:
            return
        if acked_seq is None or self.stream not in self.connection.writes_in_flight:
            released, self.before_ack = kept, []
        else:
            cut = 0
            while cut < len(kept) and kept[cut][0] <= acked_seq:
                cut += 1
            if not cut:
                return
            released, self.before_ack = kept[:cut], kept[cut:]
        self.deliver([event for _, event in released])

    def on_possible_loss(self) -> None:
        self.schedule_repair(to_head=True)

    def position(self) -> int | None:
        """The seq of the last event handed on for the socket, in order (None while the
        subscription's catch-up read has not placed the cursor yet)."""
        next_seq = self.cursor.next_seq
        return None if next_seq is None else next_seq - 1

    def close(self) -> None:
        """Unsubscribed or disconnected: the Hub forgets it, a repair under way stops at
        its next step."""
        self.active = False
        tenant = self.connection.identity.tenant
        self.connection.node.hub.leave(tenant, self.stream, self)
        metrics.unsubscribed(tenant)

    # --- repair ------------------------------------------------------------------------

    def schedule_repair(self, to_head: bool = False) -> None:
        if self.repairing or not self.active:
            return
        self.repairing = True
        asyncio.get_running_loop().create_task(self._repair(to_head))

    async def _repair(self, to_head: bool) -> None:
        """Read what the live path missed, or the rest of a catch-up, from the log: a page
        at a time, each once the socket has taken the last, so a long backlog never fills
        the outbox (which would close the client 4008 on every reconnect). Never skips a
        retained event; one no longer retained is reported as history_expired."""
        tenant = self.connection.identity.tenant
        try:
            if not to_head:
                await asyncio.sleep(conf().gap_repair_s)  # it may yet arrive
            target = await self.store.head(tenant, self.stream) if to_head else 0
            if to_head and self._head_went_back(target):
                return
            while self.active:
                gap = self._next_gap(target)
                if gap is None:
                    return
                if not await self._read_page(tenant, gap):
                    return
                await self.connection.wait_for_room()
        except (RedisConnectionError, RedisTimeoutError) as error:
            # Redis is restarting or away: try again, or the client waits for events the
            # log holds (or learns too late that the log lost them).
            logger.warning(
                "stream repair postponed tenant=%s stream=%s conn=%s: %s",
                tenant,
                self.stream,
                self.connection.connection_id,
                error,
            )
            self.repairing = False
            asyncio.get_running_loop().call_later(REPAIR_RETRY_S, self.schedule_repair, True)
        except Exception:
            logger.exception(
                "stream repair failed tenant=%s stream=%s conn=%s",
                tenant,
                self.stream,
                self.connection.connection_id,
            )
        finally:
            self.repairing = False

    def _head_went_back(self, head: int) -> bool:
        """The stream is behind what was delivered: Redis restarted without its data. Say so
        (and go on from the new head) rather than wait for seqs that will be reused."""
        next_seq = self.cursor.next_seq
        if next_seq is None or head >= next_seq - 1:
            return False
        self.connection.push(
            error_frame(
                "history_expired",
                f"the stream's history was lost (its head went back to {head})",
                None,
                stream=self.stream,
                head=head,
            )
        )
        self.cursor = StreamCursor()
        self.compactor = None
        self.connection.push_many(self.cursor.start_at(head + 1))
        return True

    def _next_gap(self, target: int) -> tuple[int, int] | None:
        """The seqs still to read: a gap in the cursor, else up to `target` (0: none)."""
        cursor = self.cursor
        gap = cursor.missing()
        if gap is None and cursor.next_seq is not None and cursor.next_seq <= target:
            gap = (cursor.next_seq, target)
        return gap

    async def _read_page(self, tenant: str, gap: tuple[int, int]) -> bool:
        """Read up to a page of the gap and hand on what it releases, in order; False when
        the subscription ended during the read (nothing handed on)."""
        first, last = gap[0], min(gap[1], gap[0] + CATCH_UP_PAGE - 1)
        events = await self.store.read(tenant, self.stream, first, last)
        if not self.active:
            return False
        cursor = self.cursor
        if not events or events[0][0] != first:
            resume_at = events[0][0] if events else last + 1
            self.connection.push(
                error_frame(
                    "history_expired",
                    f"events {first}..{resume_at - 1} are no longer retained",
                    None,
                    stream=self.stream,
                    head=await self.store.head(tenant, self.stream),
                )
            )
            self._release(cursor.skip_to(resume_at))
        for seq, event in events:
            self._release(cursor.offer(seq, event))
        return True
