"""The consumer's protocol, frame by frame: connect and refusal, subscribe with catch-up,
publish, resume with positions, bad frames, unsubscribe (see docs/protocol.md)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator

import pytest

from client.connection import encode_positions
from realtime.admission import connection_registry
from realtime.handshakes import HandshakeLine
from realtime.node import GatewayNode
from realtime.presence import get_tracker
from realtime.protocol import Publish
from realtime.subscription import CATCH_UP_PAGE
from tenants.tokens import issue_token

from .conftest import TENANT, WAIT_S, Connect, Socket, wait_until

pytestmark = pytest.mark.asyncio(loop_scope="package")


async def publish(socket: Socket, stream: str, message_id: str, data: object) -> int:
    """Publish and return the event's seq from the ack."""
    await socket.send({"type": "publish", "id": message_id, "stream": stream, "data": data})
    ack = await socket.next_of("ack")
    assert ack["id"] == message_id and ack["duplicate"] is False
    return ack["seq"]


async def test_connect_is_welcomed_with_a_new_session(connect: Connect) -> None:
    alice = await connect("alice")
    welcome = await alice.receive()
    assert welcome["type"] == "welcome"
    assert (welcome["client"], welcome["tenant"]) == ("alice", TENANT)
    assert welcome["session"] and welcome["resumed"] is False
    assert welcome["limits"]["max_frame_bytes"] > 0


@pytest.mark.parametrize(
    ("token", "reason"),
    [(None, "missing token"), ("not-a-token", "malformed token")],
)
async def test_a_refused_token_is_accepted_then_closed_4001_with_nothing_else(
    connect: Connect, token: str | None, reason: str
) -> None:
    socket = await connect("alice", token=token)
    closed = await socket.close_frame()
    assert (closed["code"], closed["reason"]) == (4001, reason)
    assert closed["before"] == []


async def test_a_token_signed_with_another_secret_is_refused(connect: Connect) -> None:
    other_secret = "another-signing-secret-of-32-bytes-or-more"
    socket = await connect("alice", token=issue_token(other_secret, TENANT, "alice"))
    closed = await socket.close_frame()
    assert (closed["code"], closed["reason"]) == (4001, "bad signature")


async def test_subscribe_catches_up_from_since_then_goes_on_live(connect: Connect) -> None:
    writer = await connect("writer")
    for number in range(1, 4):
        assert await publish(writer, "room", f"m{number}", {"n": number}) == number

    reader = await connect("reader")
    await reader.send({"type": "subscribe", "stream": "room", "since": 1})
    subscribed = await reader.next_of("subscribed")
    assert (subscribed["stream"], subscribed["head"], subscribed["recovered"]) == ("room", 3, True)
    missed = await reader.events("room", 2)
    assert [(e["seq"], e["data"]) for e in missed] == [(2, {"n": 2}), (3, {"n": 3})]

    assert await publish(writer, "room", "m4", {"n": 4}) == 4
    [live] = await reader.events("room", 1)
    assert (live["seq"], live["data"], live["kind"]) == (4, {"n": 4}, "published")


async def test_subscribe_without_since_starts_at_the_head(connect: Connect) -> None:
    writer = await connect("writer")
    await publish(writer, "room", "m1", "before")
    reader = await connect("reader")
    await reader.send({"type": "subscribe", "stream": "room"})
    subscribed = await reader.next_of("subscribed")
    assert (subscribed["head"], subscribed["recovered"]) == (1, False)
    await publish(writer, "room", "m2", "after")
    [event] = await reader.events("room", 1)
    assert (event["seq"], event["data"]) == (2, "after")


async def test_a_repeated_publish_is_acked_as_a_duplicate_and_delivered_once(
    connect: Connect,
) -> None:
    reader = await connect("reader")
    await reader.send({"type": "subscribe", "stream": "room"})
    await reader.next_of("subscribed")
    writer = await connect("writer")
    first = await publish(writer, "room", "once", 1)
    await writer.send({"type": "publish", "id": "once", "stream": "room", "data": 1})
    again = await writer.next_of("ack")
    assert (again["seq"], again["duplicate"]) == (first, True)
    await publish(writer, "room", "next", 2)
    assert [e["seq"] for e in await reader.events("room", 2)] == [first, first + 1]


async def test_resume_with_positions_restores_subscriptions_from_them(connect: Connect) -> None:
    first = await connect("alice")
    session = (await first.next_of("welcome"))["session"]
    await first.send({"type": "subscribe", "stream": "room"})
    await first.next_of("subscribed")
    writer = await connect("writer")
    for number in range(1, 5):
        await publish(writer, "room", f"m{number}", number)
    # All four reached the first socket; the client says it processed only two of them.
    assert [e["seq"] for e in await first.events("room", 4)] == [1, 2, 3, 4]
    await first.disconnect()
    await publish(writer, "room", "m5", 5)

    resumed = await connect("alice", session=session, positions=encode_positions({"room": 2}))
    welcome = await resumed.next_of("welcome")
    assert (welcome["session"], welcome["resumed"]) == (session, True)
    subscribed = await resumed.next_of("subscribed", "room")
    assert (subscribed["head"], subscribed["recovered"]) == (5, True)
    assert [e["seq"] for e in await resumed.events("room", 3)] == [3, 4, 5]


async def test_resume_with_a_position_beyond_the_head_is_refused(connect: Connect) -> None:
    first = await connect("alice")
    session = (await first.next_of("welcome"))["session"]
    await first.send({"type": "subscribe", "stream": "room"})
    await first.next_of("subscribed")
    await first.disconnect()

    resumed = await connect("alice", session=session, positions=encode_positions({"room": 9}))
    closed = await resumed.close_frame()
    assert closed["code"] == 4003
    assert closed["reason"] == "position 9 of stream 'room' is beyond its head (0)"
    # Under daphne the bad_request error frame precedes the close; without daphne's socket
    # the frame waits in the outbox, which a close empties (realtime/consumer.py close_with).
    assert all(frame["type"] == "error" for frame in closed["before"])


async def test_a_bad_frame_is_answered_with_an_error_and_the_connection_goes_on(
    connect: Connect,
) -> None:
    alice = await connect("alice")
    await alice.next_of("welcome")
    await alice.send_text("{not json")
    error = await alice.receive()
    assert (error["type"], error["code"], error["status"]) == ("error", "bad_request", 400)
    await alice.send({"type": "subscribe", "stream": "room", "since": -1, "id": "s1"})
    error = await alice.receive()
    assert (error["code"], error["id"]) == ("bad_request", "s1")
    await alice.send({"type": "no-such-frame"})
    assert "unknown frame type" in (await alice.receive())["detail"]
    await alice.send({"type": "ping"})
    assert await alice.receive() == {"type": "pong"}


async def test_unsubscribe_stops_delivery(connect: Connect) -> None:
    reader = await connect("reader")
    for stream in ("room", "sentinel"):
        await reader.send({"type": "subscribe", "stream": stream})
        await reader.next_of("subscribed", stream)
    await reader.send({"type": "unsubscribe", "stream": "room"})
    assert (await reader.next_of("unsubscribed"))["stream"] == "room"

    writer = await connect("writer")
    await publish(writer, "room", "m1", "not for the reader")
    await publish(writer, "sentinel", "m2", "for the reader")
    # Both go through this process's one pub/sub connection, in order: had the first
    # been delivered, it would have come before the second.
    frames = []
    while not frames or frames[-1].get("stream") != "sentinel" or frames[-1]["type"] != "event":
        frames.append(await reader.receive())
    assert frames[-1]["data"] == "for the reader"
    assert [f for f in frames if f.get("stream") == "room"] == []


async def test_a_drain_closes_sockets_1012_and_refuses_new_ones(
    connect: Connect, node: GatewayNode
) -> None:
    alice = await connect("alice")
    await alice.next_of("welcome")
    draining = asyncio.create_task(node.drain(WAIT_S))
    closed = await alice.close_frame()
    assert (closed["code"], closed["reason"]) == (1012, "service restart")
    await alice.communicator.send_input({"type": "websocket.disconnect", "code": 1012})
    assert await draining == 0  # none left open
    assert not node.started

    late = await connect("bob")
    closed = await late.close_frame()
    assert (closed["code"], closed["before"]) == (1012, [])


async def test_a_catch_up_longer_than_a_page_arrives_whole_and_in_order(
    connect: Connect, node: GatewayNode
) -> None:
    total = CATCH_UP_PAGE * 2 + 50  # the first page at once, the rest read by repair
    for number in range(1, total + 1):
        frame = Publish(f"m{number}", "long", number)
        await node.streams.publish(TENANT, "writer", frame, None)

    reader = await connect("reader")
    await reader.send({"type": "subscribe", "stream": "long", "since": 0})
    subscribed = await reader.next_of("subscribed")
    assert (subscribed["head"], subscribed["recovered"]) == (total, True)
    events = await reader.events("long", total)
    assert [e["seq"] for e in events] == list(range(1, total + 1))
    assert [e["data"] for e in events] == list(range(1, total + 1))


async def test_handshakes_wait_their_turn_and_a_full_line_is_closed_1012_at_once(
    connect: Connect, node: GatewayNode
) -> None:
    node._handshakes = HandshakeLine(concurrency=1, max_waiting=1)
    await node.handshakes.enter()  # the only turn, held as by a slow handshake
    waiting = await connect("alice")  # accepted, then waits for its turn
    assert await waiting.nothing_more()
    assert node.handshakes.waiting == 1

    turned_away = await connect("bob")
    closed = await turned_away.close_frame()
    assert (closed["code"], closed["reason"], closed["before"]) == (1012, "gateway busy", [])

    node.handshakes.leave()
    welcome = await waiting.next_of("welcome")
    assert welcome["client"] == "alice"
    assert node.handshakes.waiting == 0
    again = await connect("bob")  # reconnecting, as 1012 asks, it gets in
    assert (await again.next_of("welcome"))["client"] == "bob"


@contextlib.asynccontextmanager
async def every_redis_connection_busy(
    node: GatewayNode, wait_s: float = 0.2
) -> AsyncIterator[None]:
    """Every connection of the gateway's pool taken and no room for more: a command waits
    `wait_s` for one, then fails as a pool at its limit does."""
    pool = node.streams.client.connection_pool
    saved = pool.max_connections, pool.timeout
    taken = [await pool.get_connection()]
    while pool._available_connections:
        taken.append(await pool.get_connection())
    pool.max_connections, pool.timeout = len(pool._in_use_connections), wait_s
    try:
        yield
    finally:
        pool.max_connections, pool.timeout = saved
        for connection in taken:
            await pool.release(connection)


async def test_a_frame_that_finds_every_redis_connection_busy_is_refused_overloaded(
    connect: Connect, node: GatewayNode
) -> None:
    alice = await connect("alice")
    await alice.next_of("welcome")
    async with every_redis_connection_busy(node):
        await alice.send({"type": "publish", "id": "p1", "stream": "room", "data": {}})
        refused = await alice.next_of("error")
    assert (refused["id"], refused["code"], refused["status"]) == ("p1", "overloaded", 429)
    assert refused["retry_after_ms"] > 0
    # Not applied: sent again once Redis has room, it is the first event of the stream.
    assert await publish(alice, "room", "p1", {}) == 1


async def test_a_close_ends_its_handler_at_once_and_its_leave_and_release_follow(
    connect: Connect, node: GatewayNode
) -> None:
    """A gateway closing thousands of sockets at once queues their Redis writes behind one
    another: a handler that waited for its own would be cancelled by daphne past its
    application_close_timeout. The handler ends with Redis still out of reach; its client's
    presence leave and its connection count's release are written once Redis has room."""
    alice = await connect("alice")
    await alice.next_of("welcome")
    await alice.send({"type": "subscribe", "stream": "room"})
    await alice.next_of("subscribed")
    tracker, registry = get_tracker(), connection_registry()
    assert [entry["client"] for entry in await tracker.clients(TENANT, "room")] == ["alice"]
    [(tenant_counts, _)] = registry.members.values()
    assert await registry.client.hget(tenant_counts, registry.lease_id) in ("1", b"1")

    async with every_redis_connection_busy(node, wait_s=3 * WAIT_S):
        # With every command waiting for a pooled connection, the handler ends all the same.
        await alice.communicator.send_input({"type": "websocket.disconnect", "code": 1000})
        await alice.communicator.wait(WAIT_S)

    async def written() -> bool:
        present = await tracker.clients(TENANT, "room")
        count = await registry.client.hget(tenant_counts, registry.lease_id)
        return not present and count in (None, "0", b"0")

    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not await written():
        assert asyncio.get_running_loop().time() < deadline, "leave and release not written"
        await asyncio.sleep(0.01)


async def test_a_last_save_that_finds_every_redis_connection_busy_is_one_warning(
    connect: Connect, node: GatewayNode, caplog: pytest.LogCaptureFixture
) -> None:
    """A gateway closing thousands of sockets at once can wait past its pool's limit for
    their sessions' last saves. Each failure is a warning naming the session, not a task
    whose exception no one retrieves (asyncio's "never retrieved" error, a traceback each)."""
    alice = await connect("alice")
    session = (await alice.next_of("welcome"))["session"]
    await alice.send({"type": "subscribe", "stream": "room"})
    await alice.next_of("subscribed")
    caplog.set_level(logging.WARNING)

    def not_saved() -> list[str]:
        return [
            record.getMessage()
            for record in caplog.records
            if "last positions not saved" in record.getMessage()
        ]

    async with every_redis_connection_busy(node):
        await alice.communicator.disconnect(timeout=WAIT_S)
        await wait_until(lambda: bool(not_saved()))
    gc.collect()  # a task left with its exception is reported when it is collected
    assert len(not_saved()) == 1 and f"session={session}" in not_saved()[0]
    assert not [record for record in caplog.records if "never retrieved" in record.getMessage()]
