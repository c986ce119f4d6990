"""Sessions and resume across gateway processes: a client that drops (or whose gateway
stops or dies) comes back on another gateway and ends up with every seq once, in order,
and every accepted send with exactly one reply.done whose text its deltas make."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import pytest_asyncio

from realtime.client import Event, SwitchboardClient, SwitchboardClosed
from realtime.reconnecting import ReconnectingClient

from .conftest import OTHER_TENANT, TENANT, Connect, StartGateway, Switchboard
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
    key = f"{switchboard.key_prefix}:sess:{TENANT}:{client.session}"
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
        key = f"{switchboard.key_prefix}:sess:{TENANT}:{session}"
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
