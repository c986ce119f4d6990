"""Sessions and resume across gateway processes: a client that drops (or whose gateway
stops or dies) comes back on another gateway and ends up with every seq once, in order,
and every accepted send with exactly one reply.done whose text its deltas make."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlencode

import pytest
import pytest_asyncio
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as plain_ws_connect

from client.connection import Event, SwitchboardClient, SwitchboardClosed
from client.reconnecting import ReconnectingClient

from .conftest import OTHER_TENANT, POSITIONS_TENANT, TENANT, Connect, StartGateway, Switchboard
from .support import assert_contiguous, reply_text, wait_until

pytestmark = pytest.mark.asyncio

SLOW_REPLY = {"chunks": 24, "chunk_delay_ms": 60}  # about 1.5 s of streaming


@pytest_asyncio.fixture
async def reconnecting(
    switchboard: Switchboard, unique: Callable[[str], str]
) -> AsyncIterator[Callable[..., Awaitable[ReconnectingClient]]]:
    opened: list[ReconnectingClient] = []

    async def open_client(urls: list[str], client: str | None = None) -> ReconnectingClient:
        token = switchboard.token(client or unique("rc"), TENANT)
        # Quick retries: the tests wait on conditions, not on backoff.
        made = await ReconnectingClient.connect(urls, token, max_backoff_s=0.5)
        opened.append(made)
        return made

    yield open_client
    for made in opened:
        await made.close()


async def drain_events(client: SwitchboardClient, stream: str, until_seq: int) -> list[Event]:
    """The stream's sequenced events up to `until_seq` (presence's join/leave left out)."""
    events: list[Event] = []
    while not events or events[-1]["seq"] < until_seq:
        event = await client.next_event(stream, timeout=10)
        if event.get("seq") is not None:
            events.append(event)
    return events


async def collect_through(
    client: ReconnectingClient, stream: str, last_seq: int, timeout: float = 30
) -> list[Event]:
    events: list[Event] = []
    async with asyncio.timeout(timeout):
        while not events or events[-1].get("seq", 0) < last_seq:
            event = await client.next_event(stream, timeout=timeout)
            if event.get("seq") is not None:
                events.append(event)
    return events


def kill_connection(client: ReconnectingClient) -> None:
    """Cut the socket as a network failure would: no close frame, the server sees 1006."""
    conn = client._conn
    assert conn is not None
    conn._ws.transport.abort()


# --- sessions over the raw protocol -------------------------------------------------


async def test_a_session_resumes_on_another_gateway_with_exactly_what_was_missed(
    switchboard: Switchboard,
    start_gateway: StartGateway,
    connect: Connect,
    unique: Callable[[str], str],
) -> None:
    other_url, _ = start_gateway()
    stream = unique("resume")
    client_id = unique("c")
    first = await SwitchboardClient.connect(switchboard.url, switchboard.token(client_id))
    assert first.welcome["resumed"] is False
    await first.subscribe(stream)
    publisher = await connect()
    acks = [await publisher.publish(stream, {"n": n}) for n in range(3)]
    seen = await drain_events(first, stream, acks[-1]["seq"])
    await first.close()

    acks += [await publisher.publish(stream, {"n": n}) for n in range(3, 6)]
    second = await SwitchboardClient.connect(
        other_url, switchboard.token(client_id), session=first.session
    )
    assert second.welcome["resumed"] is True
    assert second.welcome["session"] == first.session
    restored = await second.recv_frame()
    assert restored["type"] == "subscribed" and restored["stream"] == stream
    assert restored["recovered"] is True
    missed = await drain_events(second, stream, acks[-1]["seq"])
    live = await publisher.publish(stream, {"n": 6})
    after = await drain_events(second, stream, live["seq"])

    everything = seen + missed + after
    assert_contiguous(everything)
    assert [e["data"]["n"] for e in everything] == list(range(7))
    assert second.seq_anomalies == []
    await second.close()


async def test_a_session_ends_ttl_after_its_last_connection(
    switchboard: Switchboard, unique: Callable[[str], str]
) -> None:
    client_id = unique("c")
    client = await SwitchboardClient.connect(switchboard.url, switchboard.token(client_id))
    await client.subscribe(unique("s"))
    key = f"{switchboard.key_prefix}:sess:{{{TENANT}}}:{client.session}"
    r = switchboard.redis()
    assert r.ttl(key) > 300  # while connected: twice the TTL, refreshed
    await client.close()
    await wait_until(
        lambda: asyncio.to_thread(lambda: 0 < r.ttl(key) <= 300),
        10,
        "the session's after-disconnect TTL",
    )


@pytest.mark.parametrize("case", ["unknown", "expired", "other client", "other tenant"])
async def test_a_session_that_cannot_be_resumed_is_refused_not_made_new(
    switchboard: Switchboard, unique: Callable[[str], str], case: str
) -> None:
    owner = unique("owner")
    client = await SwitchboardClient.connect(switchboard.url, switchboard.token(owner))
    await client.subscribe(unique("s"))  # a session is written from its first subscription
    session = client.session
    await client.close()
    token = switchboard.token(owner)
    expected = "not_found"
    if case == "unknown":
        session = "no-such-session"
    elif case == "expired":
        r = switchboard.redis()
        key = f"{switchboard.key_prefix}:sess:{{{TENANT}}}:{session}"
        # The gateway's save at close comes first (it sets the after-disconnect TTL);
        # then the key goes as its expiry would take it.
        await wait_until(
            lambda: asyncio.to_thread(lambda: 0 < r.ttl(key) <= 300), 10, "the save at close"
        )
        r.delete(key)
    elif case == "other client":
        token = switchboard.token(unique("thief"))
        expected = "forbidden"
    else:
        token = switchboard.token(owner, OTHER_TENANT)
    with pytest.raises(SwitchboardClosed) as refused:
        await SwitchboardClient.connect(switchboard.url, token, session=session)
    assert refused.value.code == 4003
    [error] = refused.value.frames
    assert (error["type"], error["code"], error["session"]) == ("error", expected, session)


async def test_a_mid_generation_drop_resumes_the_rest_of_the_reply(
    switchboard: Switchboard, start_gateway: StartGateway, unique: Callable[[str], str]
) -> None:
    """Raw protocol, closed cleanly mid-reply: the two connections' events together are
    every seq once, and the deltas make the reply.done text."""
    other_url, _ = start_gateway()
    stream = unique("mid")
    client_id = unique("c")
    first = await SwitchboardClient.connect(switchboard.url, switchboard.token(client_id))
    await first.subscribe(stream)
    ack = await first.send(stream, "echo", "a reply long enough to stream", options=SLOW_REPLY)
    before: list[Event] = []
    while sum(e["kind"] == "reply.delta" for e in before) < 3:
        before.append(await first.next_event(stream))
    await first.close()

    second = await SwitchboardClient.connect(
        other_url, switchboard.token(client_id), session=first.session
    )
    after: list[Event] = []
    while not after or after[-1]["kind"] != "reply.done":
        after.append(await second.next_event(stream, timeout=15))
    await second.close()

    everything = before + after
    assert_contiguous(everything)
    assert everything[0]["seq"] == ack["seq"]
    deltas = [e for e in everything if e["kind"] == "reply.delta"]
    text = reply_text(deltas, everything[-1])
    assert everything[-1]["data"]["status"] == "ok"
    assert "a reply long enough to stream" in text


# --- the reconnecting client ---------------------------------------------------------


async def test_a_socket_cut_mid_reply_loses_nothing_and_repeats_nothing(
    switchboard: Switchboard,
    start_gateway: StartGateway,
    reconnecting: Callable[..., Awaitable[ReconnectingClient]],
    unique: Callable[[str], str],
) -> None:
    other_url, _ = start_gateway()
    client = await reconnecting([switchboard.url, other_url])
    stream = unique("cut")
    await client.subscribe(stream)
    ack = await client.send(stream, "echo", "cut me off in the middle", options=SLOW_REPLY)
    first = await client.next_event(stream)
    assert first["seq"] == ack["seq"]
    second = await client.next_event(stream)  # a delta: the reply is streaming
    assert second["kind"] == "reply.delta"
    kill_connection(client)
    deltas, done = await client.reply(ack["id"], timeout=20)
    assert client.connections >= 2 and client.close_codes[0] == 1006
    events = [first, second, *await collect_through(client, stream, done["seq"])]
    assert_contiguous(events)
    assert reply_text(deltas, done) == reply_text(
        [e for e in events if e["kind"] == "reply.delta"], done
    )
    assert done["data"]["status"] == "ok"


async def _publish_steadily(publisher: SwitchboardClient, stream: str, count: int) -> list[int]:
    seqs = []
    for n in range(count):
        seqs.append((await publisher.publish(stream, {"n": n}))["seq"])
        await asyncio.sleep(0.01)  # pacing the load, not synchronising
    return seqs


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_clients_of_a_gateway_that_stops_recover_on_another_with_nothing_lost(
    switchboard: Switchboard,
    start_gateway: StartGateway,
    connect: Connect,
    reconnecting: Callable[..., Awaitable[ReconnectingClient]],
    unique: Callable[[str], str],
    how: signal.Signals,
) -> None:
    doomed_url, doomed = start_gateway()
    stream = unique("stop")
    clients = [await reconnecting([doomed_url, switchboard.url]) for _ in range(4)]
    for client in clients:
        await client.subscribe(stream)
    publisher = await connect()
    publishing = asyncio.create_task(_publish_steadily(publisher, stream, 60))
    await wait_until(
        lambda: asyncio.sleep(0, all((c.last_seq(stream) or 0) >= 5 for c in clients)),
        10,
        "events flowing to every client",
    )
    doomed.signal(how)
    seqs = await publishing
    expected = 1012 if how == signal.SIGTERM else 1006
    for client in clients:
        events = await collect_through(client, stream, seqs[-1])
        assert [e["seq"] for e in events] == seqs, "every seq once, in order"
        assert [e["data"]["n"] for e in events] == list(range(60))
        assert client.close_codes[0] == expected
        assert client.connections == 2
    if how == signal.SIGTERM:
        await asyncio.to_thread(doomed.popen.wait, 20)
        assert doomed.popen.returncode == 0


async def test_sends_in_flight_when_a_gateway_dies_each_get_exactly_one_reply(
    switchboard: Switchboard,
    start_gateway: StartGateway,
    reconnecting: Callable[..., Awaitable[ReconnectingClient]],
    unique: Callable[[str], str],
) -> None:
    doomed_url, doomed = start_gateway()
    client = await reconnecting([doomed_url, switchboard.url])
    stream = unique("sends")
    await client.subscribe(stream)
    acks = [await client.send(stream, "echo", f"message {n}", options=SLOW_REPLY) for n in range(3)]
    await client.next_event(stream)
    doomed.signal(signal.SIGKILL)
    more = [await client.send(stream, "echo", f"late {n}") for n in range(2)]
    replies: dict[str, tuple[list[Event], Event]] = {}
    for ack in acks + more:
        replies[ack["id"]] = await client.reply(ack["id"], timeout=30)
    for ack in acks + more:
        deltas, done = replies[ack["id"]]
        assert done["data"]["status"] == "ok"
        reply_text(deltas, done)
    last = max(done["seq"] for _, done in replies.values())
    events = await collect_through(client, stream, last)
    # Events of the stream before the collection started were taken by next_event above.
    assert_contiguous(events)
    dones = [e for e in events if e["kind"] == "reply.done"]
    assert sorted(e["cause"]["message"] for e in dones) == sorted(a["id"] for a in acks + more)


# --- several gateways ------------------------------------------------------------------


async def test_subscribers_on_three_gateways_see_one_publisher_in_one_order(
    switchboard: Switchboard,
    start_gateway: StartGateway,
    connect: Connect,
    unique: Callable[[str], str],
) -> None:
    urls = [switchboard.url, start_gateway()[0], start_gateway()[0]]
    stream = unique("fan")
    subscribers = [
        await SwitchboardClient.connect(url, switchboard.token(unique("sub"))) for url in urls
    ]
    for subscriber in subscribers:
        await subscriber.subscribe(stream)
    publisher = await SwitchboardClient.connect(urls[1], switchboard.token(unique("pub")))
    # Two publishers on different gateways, interleaving: the order is the stream's.
    other = await connect()
    sent: list[Any] = await asyncio.gather(
        *(publisher.publish(stream, {"p": 1, "n": n}) for n in range(40)),
        *(other.publish(stream, {"p": 2, "n": n}) for n in range(40)),
    )
    last = max(ack["seq"] for ack in sent)
    seen = [await drain_events(subscriber, stream, last) for subscriber in subscribers]
    for events in seen:
        assert_contiguous(events)
        assert len(events) == 80
    assert seen[0] == seen[1] == seen[2]
    for client in (*subscribers, publisher):
        await client.close()


async def test_the_reconnecting_client_hears_presence_apart_from_the_stream(
    switchboard: Switchboard,
    reconnecting: Callable[..., Awaitable[ReconnectingClient]],
    unique: Callable[[str], str],
) -> None:
    stream = unique("who")
    watcher = await reconnecting([switchboard.url])
    await watcher.subscribe(stream)
    arriving = unique("arriving")
    newcomer = await reconnecting([switchboard.url], client=arriving)
    await newcomer.subscribe(stream)
    join = await watcher.next_presence(stream)
    assert (join["kind"], join["data"]["client"]) == ("join", arriving)
    assert {c["client"] for c in await watcher.presence(stream)} >= {arriving}
    ack = await newcomer.publish(stream, {"hello": True})
    event = await watcher.next_event(stream)
    assert event["seq"] == ack["seq"]  # the join did not take a place in the stream


# --- resume positions, with a plain WebSocket client (not this project's) ---------------


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def positions_param(positions: dict[str, int]) -> str:
    return b64url(json.dumps(positions).encode())


async def plain_connect(url: str, **params: str) -> ClientConnection:
    return await plain_ws_connect(f"{url}?{urlencode(params)}", compression=None)


async def plain_frame(ws: ClientConnection) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), 10))


async def plain_until(ws: ClientConnection, kind: str) -> tuple[dict[str, Any], list[Event]]:
    """Read up to the next frame of `kind`; returns it and the sequenced events before it."""
    events: list[Event] = []
    while True:
        frame = await plain_frame(ws)
        if frame["type"] == kind:
            return frame, events
        if frame["type"] == "event" and frame.get("seq") is not None:
            events.append(frame)


async def plain_events(ws: ClientConnection, count: int) -> list[Event]:
    events: list[Event] = []
    while len(events) < count:
        frame = await plain_frame(ws)
        if frame["type"] == "event" and frame.get("seq") is not None:
            events.append(frame)
    return events


async def test_a_plain_client_resumes_from_what_it_processed_not_what_was_written(
    switchboard: Switchboard, connect: Connect, unique: Callable[[str], str]
) -> None:
    stream = unique("positions")
    token = switchboard.token(unique("plain"))
    ws = await plain_connect(switchboard.url, token=token)
    welcome = await plain_frame(ws)
    session = welcome["session"]
    await ws.send(json.dumps({"type": "subscribe", "stream": stream}))
    await plain_until(ws, "subscribed")
    publisher = await connect()
    for n in range(1, 11):
        await publisher.publish(stream, {"n": n})
    # The application processes four events; the other six were written to the socket and
    # sit unread in the client's buffers when the network goes.
    processed = await plain_events(ws, 4)
    assert [e["seq"] for e in processed] == [1, 2, 3, 4]
    ws.transport.abort()
    # The gateway's record of the session says it handed all ten to the socket: a resume
    # from that record alone would skip 5..10.
    r = switchboard.redis()
    key = f"{switchboard.key_prefix}:sess:{{{TENANT}}}:{session}"
    await wait_until(
        lambda: asyncio.to_thread(lambda: r.hget(key, f"s:{stream}") == b"10"),
        10,
        "the session saved at the abrupt close",
    )
    for n in range(11, 13):
        await publisher.publish(stream, {"n": n})

    resumed = await plain_connect(
        switchboard.url, token=token, session=session, positions=positions_param({stream: 4})
    )
    welcome = await plain_frame(resumed)
    assert (welcome["type"], welcome["resumed"], welcome["session"]) == ("welcome", True, session)
    restored, early = await plain_until(resumed, "subscribed")
    assert early == []
    assert (restored["stream"], restored["recovered"], restored["head"]) == (stream, True, 12)
    missed = await plain_events(resumed, 8)
    live = await publisher.publish(stream, {"n": 13})
    assert live["seq"] == 13
    missed += await plain_events(resumed, 1)
    await resumed.send(json.dumps({"type": "ping"}))
    _, extra = await plain_until(resumed, "pong")
    assert extra == []
    everything = processed + missed
    assert_contiguous(everything)
    assert [e["data"]["n"] for e in everything] == list(range(1, 14))
    await resumed.close()


async def _a_session_of(
    switchboard: Switchboard, client_id: str, stream: str, publisher: SwitchboardClient
) -> str:
    """A session holding `stream` (head 2), its connection gone."""
    client = await SwitchboardClient.connect(switchboard.url, switchboard.token(client_id))
    await client.subscribe(stream)
    for n in range(2):
        await publisher.publish(stream, {"n": n})
    await drain_events(client, stream, 2)
    await client.close()
    return client.session  # type: ignore[return-value]


@pytest.mark.parametrize(
    ("case", "problem"),
    [
        ("not base64url", "not base64url"),
        ("padded", "not base64url"),
        ("not JSON", "not a JSON object"),
        ("not an object", "must be a JSON object"),
        ("negative seq", "non-negative integer"),
        ("string seq", "non-negative integer"),
        ("invalid stream name", "invalid stream"),
        ("stream not held", "does not hold"),
        ("beyond head", "beyond its head (2)"),
        ("no session", "without a session"),
    ],
)
async def test_positions_that_cannot_be_honoured_are_a_bad_request_and_close_4003(
    switchboard: Switchboard,
    connect: Connect,
    unique: Callable[[str], str],
    case: str,
    problem: str,
) -> None:
    stream = unique("held")
    client_id = unique("c")
    session: str | None = await _a_session_of(switchboard, client_id, stream, await connect())
    raw = {
        "not base64url": "e30!",
        "padded": b64url(b"{}") + "=",
        "not JSON": b64url(b"{room"),
        "not an object": b64url(b"[1, 2]"),
        "negative seq": positions_param({stream: -1}),
        "string seq": b64url(json.dumps({stream: "1"}).encode()),
        "invalid stream name": positions_param({"no spaces": 1}),
        "stream not held": positions_param({stream: 1, unique("other"): 1}),
        "beyond head": positions_param({stream: 3}),
        "no session": positions_param({stream: 1}),
    }[case]
    if case == "no session":
        session = None
    with pytest.raises(SwitchboardClosed) as refused:
        await SwitchboardClient.connect(
            f"{switchboard.url}?positions={raw}", switchboard.token(client_id), session=session
        )
    assert refused.value.code == 4003
    [error] = refused.value.frames  # no welcome
    assert (error["type"], error["code"], error["status"]) == ("error", "bad_request", 400)
    assert problem in error["detail"], error
    if case == "beyond head":
        assert (error["stream"], error["head"]) == (stream, 2)
    if session is not None:
        # The session is untouched: resumed with positions it can honour, it goes on.
        again = await SwitchboardClient.connect(
            switchboard.url, switchboard.token(client_id), session=session, positions={stream: 1}
        )
        assert again.welcome["resumed"] is True
        assert [e["seq"] for e in await drain_events(again, stream, 2)] == [2]
        await again.close()


async def test_positions_are_checked_before_the_connection_is_admitted(
    switchboard: Switchboard, unique: Callable[[str], str]
) -> None:
    # The tenant allows one connection and 1 KiB frames: its only place is taken.
    holder = await SwitchboardClient.connect(
        switchboard.url, switchboard.token(unique("holder"), POSITIONS_TENANT)
    )
    try:
        token = switchboard.token(unique("c"), POSITIONS_TENANT)
        oversized = positions_param({f"stream-{i}": i for i in range(100)})
        assert len(oversized) > 1024
        for raw, problem in ((oversized, "frame limit (1024 bytes)"), ("!", "not base64url")):
            with pytest.raises(SwitchboardClosed) as refused:
                await SwitchboardClient.connect(
                    f"{switchboard.url}?positions={raw}", token, session="any"
                )
            # Not 4029 (too many connections): refused before admission, which reads Redis.
            assert refused.value.code == 4003
            [error] = refused.value.frames
            assert error["code"] == "bad_request" and problem in error["detail"], error
        with pytest.raises(SwitchboardClosed) as full:
            await SwitchboardClient.connect(switchboard.url, token)
        assert full.value.code == 4029
    finally:
        await holder.close()
