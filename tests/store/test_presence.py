"""Presence scripts (realtime/presence.py) on a real Redis: entries per gateway process,
join/leave announced once per client, ghosts expiring by the Redis clock, tenants apart."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import pytest_asyncio
import redis
import redis.asyncio as aredis
from pytest_django.fixtures import Settings

from realtime.presence import PresenceStore, PresenceTracker
from streams import keys
from tests.integration.support import wait_until
from tests.store.conftest import count_pipelines

pytestmark = pytest.mark.asyncio

TENANT = "acme"
OTHER = "globex"
ROOM = "room"


@pytest_asyncio.fixture
async def client(r: redis.Redis, store_redis_url: str) -> AsyncIterator[aredis.Redis]:
    connection = aredis.Redis.from_url(store_redis_url)
    yield connection
    await connection.aclose()


class Channel:
    """What the scripts publish on one stream's channel."""

    def __init__(self, pubsub: aredis.client.PubSub) -> None:
        self.pubsub = pubsub

    async def next(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next notification, which must be an unsequenced event; parsed."""
        async with asyncio.timeout(timeout):
            while True:
                message = await self.pubsub.get_message(timeout=timeout)
                if message is not None and message["type"] == "message":
                    head, _, event = message["data"].decode().partition("\n")
                    assert head == "", "presence events carry no seq"
                    return json.loads(event)

    async def nothing_more(self) -> None:
        """Nothing was published before a marker this test publishes now."""
        marker = keys.stream_channel(TENANT, "__marker__")
        await self.pubsub.subscribe(marker)
        await self.pubsub.get_message(timeout=5)  # its subscribe confirmation
        client = self.pubsub.connection_pool
        async with aredis.Redis(connection_pool=client) as publisher:
            await publisher.publish(marker, "marker")
        async with asyncio.timeout(5):
            while True:
                message = await self.pubsub.get_message(timeout=5)
                if message is None or message["type"] != "message":
                    continue
                assert message["channel"].decode() == marker, message
                return


@pytest_asyncio.fixture
async def listen(client: aredis.Redis) -> AsyncIterator[Callable[..., Awaitable[Channel]]]:
    pubsubs: list[aredis.client.PubSub] = []

    async def subscribe(stream: str = ROOM, tenant: str = TENANT) -> Channel:
        pubsub = client.pubsub()
        pubsubs.append(pubsub)
        await pubsub.subscribe(keys.stream_channel(tenant, stream))
        confirmation = await pubsub.get_message(timeout=5)
        assert confirmation is not None and confirmation["type"] == "subscribe"
        return Channel(pubsub)

    yield subscribe
    for pubsub in pubsubs:
        await pubsub.aclose()


def stream_keys(tenant: str = TENANT, stream: str = ROOM) -> list[str]:
    return [
        keys.presence_members(tenant, stream),
        keys.presence_counts(tenant, stream),
        keys.presence_names(tenant, stream),
    ]


def names(present: list[dict[str, Any]]) -> list[str]:
    return [entry["client"] for entry in present]


async def test_a_client_on_two_gateways_joins_once_and_leaves_with_the_last(
    client: aredis.Redis, r: redis.Redis, listen: Callable[..., Awaitable[Channel]]
) -> None:
    channel = await listen()
    g1 = PresenceStore(client, "g1", 30)
    g2 = PresenceStore(client, "g2", 30)

    assert await g1.join(TENANT, ROOM, "alice", "Alice") is True
    joined = await channel.next()
    assert await g2.join(TENANT, ROOM, "alice", "Alice") is False
    assert await g1.clients(TENANT, ROOM) == [{"client": "alice", "name": "Alice"}]
    assert r.hget(keys.presence_counts(TENANT, ROOM), "alice") == b"2"
    assert sorted(r.zrange(keys.presence_members(TENANT, ROOM), 0, -1)) == [
        b"g1 alice",
        b"g2 alice",
    ]

    assert await g1.leave(TENANT, ROOM, "alice") is False
    assert names(await g2.clients(TENANT, ROOM)) == ["alice"]
    assert await g1.leave(TENANT, ROOM, "alice") is False  # already gone: a no-op
    assert await g2.leave(TENANT, ROOM, "alice") is True
    left = await channel.next()
    await channel.nothing_more()  # one join, one leave: nothing for the second gateway

    assert (joined["kind"], left["kind"]) == ("join", "leave")
    for event in (joined, left):
        assert "seq" not in event
        assert event["type"] == "event" and event["stream"] == ROOM
        assert event["from"] == "client:alice"
        assert event["cause"] == {"client": "alice", "message": None, "prev": None}
        assert event["data"] == {"client": "alice", "name": "Alice"}
        assert len(event["id"]) == 32 and int(event["id"], 16) >= 0
        assert event["ts"].endswith("Z")
    assert joined["id"] != left["id"]
    assert await g1.clients(TENANT, ROOM) == []
    assert r.exists(*stream_keys()) == 0, "nothing is left behind"
    assert r.zscore(keys.presence_due(TENANT), ROOM) is None


async def test_one_gateway_joining_a_client_twice_holds_one_member(
    client: aredis.Redis, r: redis.Redis
) -> None:
    g1 = PresenceStore(client, "g1", 30)
    assert await g1.join(TENANT, ROOM, "alice", "") is True
    assert await g1.join(TENANT, ROOM, "alice", "") is False
    assert r.hget(keys.presence_counts(TENANT, ROOM), "alice") == b"1"
    assert await g1.leave(TENANT, ROOM, "alice") is True
    assert await g1.clients(TENANT, ROOM) == []


async def test_joins_made_together_go_in_one_pipeline_each_with_its_own_answer(
    client: aredis.Redis, r: redis.Redis
) -> None:
    """A reconnect storm's resumed subscriptions join by the thousand: one pipeline."""
    g1 = PresenceStore(client, "g1", 30)
    assert await g1.join(TENANT, ROOM, "alice", "") is True
    pipelines = count_pipelines(client)
    answers = await asyncio.gather(
        g1.join(TENANT, ROOM, "alice", ""),
        g1.join(TENANT, ROOM, "bob", ""),
        g1.join(TENANT, "other", "alice", ""),
    )
    assert answers == [False, True, True]
    assert len(pipelines) == 1
    assert names(await g1.clients(TENANT, ROOM)) == ["alice", "bob"]


async def test_leaves_made_together_go_in_one_pipeline_each_with_its_own_answer(
    client: aredis.Redis, r: redis.Redis
) -> None:
    """A mass close (a load balancer's restart) leaves by the ten thousand: one pipeline,
    one pool place, not one each."""
    g1 = PresenceStore(client, "g1", 30)
    g2 = PresenceStore(client, "g2", 30)  # alice is on another gateway too
    for store, member in ((g1, "alice"), (g1, "bob"), (g2, "alice"), (g1, "carol")):
        await store.join(TENANT, ROOM, member, "")
    pipelines = count_pipelines(client)
    answers = await asyncio.gather(
        g1.leave(TENANT, ROOM, "alice"),
        g1.leave(TENANT, ROOM, "bob"),
        g1.leave(TENANT, ROOM, "nobody"),
    )
    assert answers == [False, True, False]  # alice stays (g2); nobody was never there
    assert len(pipelines) == 1
    assert names(await g1.clients(TENANT, ROOM)) == ["alice", "carol"]


async def test_tracker_one_client_with_two_connections_is_one_entry(
    client: aredis.Redis, r: redis.Redis, listen: Callable[..., Awaitable[Channel]]
) -> None:
    channel = await listen()
    tracker = PresenceTracker(lambda: client)
    other = PresenceTracker(lambda: client)  # another gateway process
    try:
        await tracker.join(TENANT, ROOM, "alice", "Alice", "conn-1")
        await tracker.join(TENANT, ROOM, "alice", "Alice", "conn-2")
        await other.join(TENANT, ROOM, "alice", "Alice", "conn-3")
        assert (await channel.next())["kind"] == "join"
        assert await tracker.clients(TENANT, ROOM) == [{"client": "alice", "name": "Alice"}]
        assert r.zcard(keys.presence_members(TENANT, ROOM)) == 2  # one per gateway

        await tracker.leave_connection("conn-1")
        await other.leave(TENANT, ROOM, "alice", "conn-3")
        assert names(await tracker.clients(TENANT, ROOM)) == ["alice"]
        await tracker.leave(TENANT, ROOM, "alice", "conn-2")
        left = await channel.next()
        assert (left["kind"], left["data"]) == ("leave", {"client": "alice", "name": "Alice"})
        await channel.nothing_more()
        assert await tracker.clients(TENANT, ROOM) == []
    finally:
        for loop in tracker._loops + other._loops:
            loop.cancel()


async def test_a_dead_gateways_entry_expires_and_leaves(
    client: aredis.Redis, r: redis.Redis, listen: Callable[..., Awaitable[Channel]]
) -> None:
    channel = await listen()
    dead = PresenceStore(client, "dead", 0.2)  # never refreshes again
    live = PresenceStore(client, "live", 30)
    await dead.join(TENANT, ROOM, "ghost", "Ghost")
    await live.join(TENANT, ROOM, "alice", "")
    assert [(await channel.next())["data"]["client"] for _ in range(2)] == ["ghost", "alice"]
    # The index says when the stream needs a sweep: the ghost's expiry, the earliest.
    ghost_expiry = r.zscore(keys.presence_members(TENANT, ROOM), "dead ghost")
    assert r.zscore(keys.presence_due(TENANT), ROOM) == ghost_expiry

    async def swept() -> dict[tuple[str, str], int]:
        return await live.sweep()

    assert await wait_until(swept, 5, "the ghost to be swept") == {(TENANT, ROOM): 1}
    left = await channel.next()
    assert (left["kind"], left["data"]) == ("leave", {"client": "ghost", "name": "Ghost"})
    assert await live.clients(TENANT, ROOM) == [{"client": "alice", "name": None}]
    assert r.hgetall(keys.presence_counts(TENANT, ROOM)) == {b"alice": b"1"}
    # Only alice's entry is left to expire.
    alice_expiry = r.zscore(keys.presence_members(TENANT, ROOM), "live alice")
    assert r.zscore(keys.presence_due(TENANT), ROOM) == alice_expiry
    assert await live.sweep() == {}


async def test_a_query_never_lists_a_ghost_even_before_a_sweep(
    client: aredis.Redis, listen: Callable[..., Awaitable[Channel]]
) -> None:
    channel = await listen()
    dead = PresenceStore(client, "dead", 0.2)
    live = PresenceStore(client, "live", 30)
    await dead.join(TENANT, ROOM, "ghost", "")
    assert (await channel.next())["kind"] == "join"

    async def ghost_gone() -> bool:
        return await live.clients(TENANT, ROOM) == []

    await wait_until(ghost_gone, 5, "the query to drop the expired entry")
    # Pruning it announced the leave: the sweeper has nothing left to say.
    assert (await channel.next())["kind"] == "leave"
    assert await live.sweep() == {}
    await channel.nothing_more()


async def test_a_ghost_of_a_client_present_elsewhere_leaves_silently(
    client: aredis.Redis, listen: Callable[..., Awaitable[Channel]]
) -> None:
    channel = await listen()
    dead = PresenceStore(client, "dead", 0.2)
    live = PresenceStore(client, "live", 30)
    await dead.join(TENANT, ROOM, "alice", "")
    await live.join(TENANT, ROOM, "alice", "")
    assert (await channel.next())["kind"] == "join"

    async def swept() -> dict[tuple[str, str], int]:
        return await live.sweep()

    await wait_until(swept, 5, "the dead gateway's member to be swept")
    assert names(await live.clients(TENANT, ROOM)) == ["alice"]
    await channel.nothing_more()


async def test_refresh_extends_entries_but_never_brings_a_left_one_back(
    client: aredis.Redis, r: redis.Redis, listen: Callable[..., Awaitable[Channel]]
) -> None:
    g1 = PresenceStore(client, "g1", 30)
    await g1.join(TENANT, ROOM, "alice", "")
    await g1.join(TENANT, "hall", "alice", "")
    members = keys.presence_members(TENANT, ROOM)
    r.zadd(members, {"g1 alice": 1})  # as if it were about to expire
    assert await g1.refresh([(TENANT, ROOM, ["alice", "bob"]), (TENANT, "hall", ["alice"])]) == [
        (TENANT, ROOM, "bob")
    ]
    expiry = r.zscore(members, "g1 alice")
    assert expiry is not None and expiry > 1
    assert r.zscore(members, "g1 bob") is None, "a refresh creates nothing"
    assert r.zscore(keys.presence_due(TENANT), ROOM) == expiry


async def test_tracker_joins_again_an_entry_swept_while_it_was_alive(
    client: aredis.Redis, r: redis.Redis, listen: Callable[..., Awaitable[Channel]]
) -> None:
    """A gateway cut off from Redis for longer than the TTL was taken for dead; once it
    refreshes again its clients are back, announced with a new join."""
    channel = await listen()
    tracker = PresenceTracker(lambda: client)
    try:
        await tracker.join(TENANT, ROOM, "alice", "Alice", "conn-1")
        assert (await channel.next())["kind"] == "join"
        r.zadd(keys.presence_members(TENANT, ROOM), {f"{tracker.gateway_id} alice": 1})
        r.zadd(keys.presence_due(TENANT), {ROOM: 1})
        assert await PresenceStore(client, "other", 30).sweep() == {(TENANT, ROOM): 1}
        assert (await channel.next())["kind"] == "leave"

        await tracker.refresh()
        rejoined = await channel.next()
        assert (rejoined["kind"], rejoined["data"]) == (
            "join",
            {"client": "alice", "name": "Alice"},
        )
        assert names(await tracker.clients(TENANT, ROOM)) == ["alice"]
    finally:
        for loop in tracker._loops:
            loop.cancel()


async def test_tenants_never_see_each_others_presence(
    client: aredis.Redis, r: redis.Redis, listen: Callable[..., Awaitable[Channel]]
) -> None:
    acme = await listen(ROOM, TENANT)
    globex = await listen(ROOM, OTHER)
    g1 = PresenceStore(client, "g1", 30)
    await g1.join(TENANT, ROOM, "twin", "Acme twin")
    await g1.join(OTHER, ROOM, "twin", "Globex twin")
    await g1.join(OTHER, ROOM, "carol", "")
    assert (await acme.next())["data"] == {"client": "twin", "name": "Acme twin"}
    assert [(await globex.next())["data"]["client"] for _ in range(2)] == ["twin", "carol"]
    assert await g1.clients(TENANT, ROOM) == [{"client": "twin", "name": "Acme twin"}]
    assert names(await g1.clients(OTHER, ROOM)) == ["carol", "twin"]

    assert await g1.leave(TENANT, ROOM, "twin") is True
    assert (await acme.next())["kind"] == "leave"
    assert await g1.clients(TENANT, ROOM) == []
    assert names(await g1.clients(OTHER, ROOM)) == ["carol", "twin"]
    await globex.nothing_more()


async def test_names_and_ids_of_any_shape_survive_the_event(
    client: aredis.Redis, listen: Callable[..., Awaitable[Channel]]
) -> None:
    channel = await listen()
    g1 = PresenceStore(client, "g1", 30)
    odd_client = 'a b/c "q" \\ é 中'
    odd_name = 'Zoë "the" /slash\\ 🎉 \n'
    await g1.join(TENANT, ROOM, odd_client, odd_name)
    event = await channel.next()
    assert event["from"] == f"client:{odd_client}"
    assert event["data"] == {"client": odd_client, "name": odd_name}
    assert await g1.clients(TENANT, ROOM) == [{"client": odd_client, "name": odd_name}]
    assert await g1.leave(TENANT, ROOM, odd_client) is True
    assert (await channel.next())["data"] == {"client": odd_client, "name": odd_name}


async def test_a_crowd_is_not_announced_but_still_answers_the_query(
    client: aredis.Redis,
    listen: Callable[..., Awaitable[Channel]],
    settings: Settings,
) -> None:
    settings.SWITCHBOARD = {**settings.SWITCHBOARD, "PRESENCE_ANNOUNCE_MAX": 2}
    channel = await listen()
    gateway = PresenceStore(client, "g1", 30)
    for name in ("a", "b", "c"):
        await gateway.join(TENANT, ROOM, name, "")
    assert [(await channel.next())["data"]["client"] for _ in range(2)] == ["a", "b"]
    await gateway.leave(TENANT, ROOM, "a")  # 2 present after it: announced again
    left = await channel.next()
    assert (left["kind"], left["data"]["client"]) == ("leave", "a")
    await channel.nothing_more()  # c's join went unannounced
    assert sorted(names(await gateway.clients(TENANT, ROOM))) == ["b", "c"]


async def test_one_refresh_call_covers_many_streams(client: aredis.Redis, r: redis.Redis) -> None:
    """A gateway whose sockets each follow their own stream pays per batch of clients, not
    per stream."""
    g1 = PresenceStore(client, "g1", 30)
    streams = [f"own-{i}" for i in range(300)]
    for stream in streams:
        await g1.join(TENANT, stream, f"c-{stream}", "")
    for stream in streams:
        r.zadd(keys.presence_members(TENANT, stream), {f"g1 c-{stream}": 1})
    r.zrem(keys.presence_members(TENANT, "own-7"), "g1 c-own-7")  # swept meanwhile
    calls = 0
    refresh = g1._refresh

    def counted(*args: Any, **kwargs: Any) -> Any:  # builds one script call
        nonlocal calls
        calls += 1
        return refresh(*args, **kwargs)

    g1._refresh = counted  # type: ignore[method-assign]
    missing = await g1.refresh([(TENANT, stream, [f"c-{stream}"]) for stream in streams])
    assert calls == 1
    assert missing == [(TENANT, "own-7", "c-own-7")]
    for stream in ("own-0", "own-299"):
        expiry = r.zscore(keys.presence_members(TENANT, stream), f"g1 c-{stream}")
        assert expiry is not None and expiry > 1
        assert r.zscore(keys.presence_due(TENANT), stream) == expiry
    assert r.zscore(keys.presence_due(TENANT), "own-7") is None


async def test_a_lingering_member_keeps_its_client_until_the_grace_ends_then_leaves(
    client: aredis.Redis, r: redis.Redis, listen: Callable[..., Awaitable[Channel]]
) -> None:
    channel = await listen()
    gateway = PresenceStore(client, "g1", 30)
    await gateway.join(TENANT, ROOM, "alice", "Alice")
    await gateway.join(TENANT, "other", "alice", "Alice")
    assert (await channel.next())["kind"] == "join"
    members = keys.presence_members(TENANT, ROOM)
    ttl_expiry = r.zscore(members, "g1 alice")

    # Two streams of one tenant in one call; a client with no member is not brought back.
    lingering = await gateway.linger([(TENANT, ROOM, ["alice", "nobody"])], 0.3)
    await gateway.linger([(TENANT, "other", ["alice"])], 0.3)
    assert lingering == 1
    assert r.zscore(members, "g1 nobody") is None
    kept_until = r.zscore(members, "g1 alice")
    assert kept_until is not None and ttl_expiry is not None and kept_until < ttl_expiry
    assert r.zscore(keys.presence_due(TENANT), ROOM) == kept_until
    # A longer grace never extends a member past what it had.
    await gateway.linger([(TENANT, ROOM, ["alice"])], 3600)
    assert r.zscore(members, "g1 alice") == kept_until
    assert names(await gateway.clients(TENANT, ROOM)) == ["alice"]  # still present
    await channel.nothing_more()  # and nothing announced

    async def swept() -> dict[tuple[str, str], int]:
        return await gateway.sweep()

    assert (TENANT, ROOM) in await wait_until(swept, 5, "the lingering member to expire")
    left = await channel.next()
    assert (left["kind"], left["data"]) == ("leave", {"client": "alice", "name": "Alice"})
    assert await gateway.clients(TENANT, ROOM) == []


async def test_a_client_back_within_the_grace_neither_left_nor_joined(
    client: aredis.Redis, r: redis.Redis, listen: Callable[..., Awaitable[Channel]]
) -> None:
    channel = await listen()
    first = PresenceStore(client, "g1", 30)
    second = PresenceStore(client, "g2", 30)
    for name in ("alice", "bob"):
        await first.join(TENANT, ROOM, name, "")
        assert (await channel.next())["kind"] == "join"
    await first.linger([(TENANT, ROOM, ["alice", "bob"])], 30)
    lingering = keys.presence_lingering(TENANT, ROOM)
    assert r.hgetall(lingering) == {b"alice": b"g1", b"bob": b"g1"}
    # alice comes back on another gateway, which takes the kept member over; bob on the
    # same one, whose kept member is his again, with its TTL.
    assert await second.join(TENANT, ROOM, "alice", "") is False
    assert await first.join(TENANT, ROOM, "bob", "") is False
    members = keys.presence_members(TENANT, ROOM)
    assert sorted(r.zrange(members, 0, -1)) == [b"g1 bob", b"g2 alice"]
    assert r.hgetall(lingering) == {}
    assert r.hgetall(keys.presence_counts(TENANT, ROOM)) == {b"alice": b"1", b"bob": b"1"}
    bob_expiry = r.zscore(members, "g1 bob")
    assert bob_expiry is not None and bob_expiry > r.time()[0] * 1000 + 20_000
    await channel.nothing_more()

    # Their goodbyes are leaves at once: nothing of the cut connections is left to wait for.
    assert await second.leave(TENANT, ROOM, "alice") is True
    assert await first.leave(TENANT, ROOM, "bob") is True
    assert [(await channel.next())["data"]["client"] for _ in range(2)] == ["alice", "bob"]
    assert r.exists(*stream_keys()) == 0, "nothing is left behind"


async def test_tracker_lingers_a_cut_connection_and_a_goodbye_leaves_at_once(
    client: aredis.Redis, r: redis.Redis, listen: Callable[..., Awaitable[Channel]]
) -> None:
    channel = await listen()
    tracker = PresenceTracker(lambda: client)
    tracker.leave_grace_s = 10  # below the TTL (30 s), so a join visibly extends
    try:
        await tracker.join(TENANT, ROOM, "alice", "", "conn-1")
        await tracker.join(TENANT, ROOM, "bob", "", "conn-2")
        for _ in range(2):
            assert (await channel.next())["kind"] == "join"
        # Both cut in the same moment: one linger call; then alice is back on this gateway.
        await asyncio.gather(
            tracker.leave_connection("conn-1", linger=True),
            tracker.leave_connection("conn-2", linger=True),
        )
        members = keys.presence_members(TENANT, ROOM)
        lingering_until = r.zscore(members, f"{tracker.gateway_id} alice")
        assert lingering_until is not None
        assert lingering_until == r.zscore(members, f"{tracker.gateway_id} bob")
        await tracker.join(TENANT, ROOM, "alice", "", "conn-3")
        assert (r.zscore(members, f"{tracker.gateway_id} alice") or 0) > lingering_until
        await channel.nothing_more()

        await tracker.leave_connection("conn-3")  # a goodbye: no grace
        left = await channel.next()
        assert (left["kind"], left["data"]["client"]) == ("leave", "alice")
        assert names(await tracker.clients(TENANT, ROOM)) == ["bob"]  # bob still lingers
    finally:
        for loop in tracker._loops:
            loop.cancel()
