"""Presence on the real cluster: join/leave events reach live subscribers (no seq), a client
with several connections is one entry, tenants are apart, a gateway killed without
cleaning up leaves no ghost beyond the bound (its PRESENCE_TTL_S + the sweep interval), and
a connection cut without a goodbye lingers for the leave grace: back within it, nobody
hears it leave or join; gone, its leave follows the grace."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from client.connection import Event, SwitchboardClient
from project.launcher import Proc

from .conftest import CLUSTER_ENV, OTHER_TENANT, TENANT, Connect, StartGateway, Switchboard
from .support import wait_until

pytestmark = pytest.mark.asyncio

# The gateway killed in the ghost test refreshes its entries this often, for this long.
GHOST_TTL_S = 3.0
GHOST_REFRESH_S = 1.0
SWEEP_INTERVAL_S = float(CLUSTER_ENV["SWITCHBOARD_SWEEP_INTERVAL_S"])
# A ghost's leave is due by TTL + sweep interval after the last refresh; the rest is slack
# for a loaded test machine.
GHOST_BOUND_S = GHOST_TTL_S + SWEEP_INTERVAL_S
SLACK_S = 3.0
# The grace of the gateway whose cut client never comes back.
SHORT_GRACE_S = 1.0


def presence_change(event: Event) -> tuple[str, str, str | None]:
    """(kind, client, name) of a join/leave event, which must carry no seq."""
    assert event["kind"] in ("join", "leave"), event
    assert "seq" not in event, event
    assert event["from"] == f"client:{event['data']['client']}"
    return event["kind"], event["data"]["client"], event["data"]["name"]


async def next_change(
    client: SwitchboardClient, stream: str, timeout: float = 10
) -> tuple[str, str, str | None]:
    return presence_change(await client.next_presence(stream, timeout))


async def no_change_before_now(
    client: SwitchboardClient, publisher: SwitchboardClient, stream: str
) -> None:
    """No join/leave reached `client` on `stream` before an event published now: the
    stream's notifications travel one channel in order, so any earlier one came first."""
    marker = await publisher.publish(stream, {"marker": True})
    event = await client.next_event(stream)
    assert event["seq"] == marker["seq"], event
    assert client.buffered_presence(stream) == []


def clients_of(present: list[dict[str, Any]]) -> list[str]:
    return sorted(entry["client"] for entry in present)


@pytest.fixture
def short_ttl_gateway(start_gateway: StartGateway) -> tuple[str, Proc]:
    """An extra gateway whose presence entries expire GHOST_TTL_S after its last refresh."""
    return start_gateway(
        SWITCHBOARD_PRESENCE_TTL_S=str(GHOST_TTL_S),
        SWITCHBOARD_PRESENCE_REFRESH_S=str(GHOST_REFRESH_S),
    )


async def test_subscribers_see_each_others_join_and_leave(
    connect: Connect, unique: Callable[[str], str]
) -> None:
    stream = unique("presence")
    alice = await connect(client="alice", name="Alice")
    bob = await connect(client="bob", name="Bob")
    await alice.subscribe(stream)
    await bob.subscribe(stream)
    assert await next_change(alice, stream) == ("join", "bob", "Bob")

    # Stream events go on with their own seqs; join/leave do not disturb them.
    first = await bob.publish(stream, {"n": 1})
    assert (await alice.next_event(stream))["seq"] == first["seq"]
    # Bob hears neither his own join nor alice's earlier one (he asks presence for that).
    assert (await bob.next_event(stream))["seq"] == first["seq"]
    assert bob.buffered_presence(stream) == []
    assert clients_of(await bob.presence(stream)) == ["alice", "bob"]

    await alice.unsubscribe(stream)
    assert await next_change(bob, stream) == ("leave", "alice", "Alice")
    await alice.subscribe(stream)
    assert await next_change(bob, stream) == ("join", "alice", "Alice")
    await bob.close()
    assert await next_change(alice, stream) == ("leave", "bob", "Bob")
    second = await alice.publish(stream, {"n": 2})
    assert (await alice.next_event(stream))["seq"] == second["seq"]
    assert alice.seq_anomalies == []
    assert clients_of(await alice.presence(stream)) == ["alice"]


async def test_sending_joins_and_a_connection_not_subscribed_hears_nothing(
    connect: Connect, unique: Callable[[str], str]
) -> None:
    stream, elsewhere = unique("presence"), unique("elsewhere")
    watcher = await connect()
    await watcher.subscribe(stream)
    bystander = await connect()
    await bystander.subscribe(elsewhere)
    sender = await connect(client=unique("sender"))
    ack = await sender.send(stream, "echo", "hello")  # sending subscribes, so it joins
    assert await next_change(watcher, stream) == ("join", sender.client, None)
    assert (await watcher.next_event(stream))["seq"] == ack["seq"]
    await sender.close()
    assert await next_change(watcher, stream) == ("leave", sender.client, None)
    await no_change_before_now(bystander, watcher, elsewhere)
    assert bystander.buffered(stream) == [] and bystander.buffered_presence(stream) == []


async def test_a_client_with_two_connections_is_one_entry(
    switchboard: Switchboard,
    connect: Connect,
    unique: Callable[[str], str],
    short_ttl_gateway: tuple[str, Proc],
) -> None:
    stream = unique("twice")
    carol_id = unique("carol")
    observer = await connect()
    await observer.subscribe(stream)
    other_url, _ = short_ttl_gateway
    token = switchboard.token(carol_id, TENANT, name="Carol")
    # Two on this gateway (counted in the process) and one on another (counted in Redis).
    carols = [await connect(token=token), await connect(token=token)]
    carols.append(await SwitchboardClient.connect(other_url, token))
    try:
        for carol in carols:
            await carol.subscribe(stream)
        assert await next_change(observer, stream) == ("join", carol_id, "Carol")
        present = await observer.presence(stream)
        assert [entry["client"] for entry in present].count(carol_id) == 1
        assert {"client": carol_id, "name": "Carol"} in present

        assert len(members_of(switchboard, stream, carol_id)) == 2  # one per gateway
        await carols[0].close()
        await carols[2].close()

        async def other_gateway_let_go() -> bool:
            return len(members_of(switchboard, stream, carol_id)) == 1

        await wait_until(other_gateway_let_go, 10, "gateway 1 to remove its entry")
        await no_change_before_now(observer, observer, stream)
        assert carol_id in clients_of(await observer.presence(stream))

        await carols[1].unsubscribe(stream)
        assert await next_change(observer, stream) == ("leave", carol_id, "Carol")
        # The only leave: the closed connections said nothing, earlier or later.
        await no_change_before_now(observer, observer, stream)
        assert carol_id not in clients_of(await observer.presence(stream))
    finally:
        await carols[2].close()


async def test_presence_is_per_tenant(connect: Connect, unique: Callable[[str], str]) -> None:
    stream = unique("shared-name")
    acme = await connect(client="twin", tenant=TENANT, name="Acme twin")
    acme_peer = await connect(tenant=TENANT)
    globex = await connect(client="twin", tenant=OTHER_TENANT, name="Globex twin")
    globex_peer = await connect(client="gpeer", tenant=OTHER_TENANT)
    await acme.subscribe(stream)
    await globex.subscribe(stream)
    await globex_peer.subscribe(stream)
    assert await next_change(globex, stream) == ("join", "gpeer", None)
    await acme_peer.subscribe(stream)
    assert (await next_change(acme, stream))[:2] == ("join", acme_peer.client)

    assert clients_of(await acme.presence(stream)) == sorted([acme_peer.client, "twin"])
    assert await globex.presence(stream) == [
        {"client": "gpeer", "name": None},
        {"client": "twin", "name": "Globex twin"},
    ]
    await globex_peer.close()
    assert await next_change(globex, stream) == ("leave", "gpeer", None)
    # Acme heard none of globex's comings and goings.
    await no_change_before_now(acme, acme_peer, stream)
    assert {"client": "twin", "name": "Acme twin"} in await acme.presence(stream)


async def test_a_killed_gateways_clients_leave_presence_within_the_bound(
    switchboard: Switchboard,
    connect: Connect,
    unique: Callable[[str], str],
    short_ttl_gateway: tuple[str, Proc],
) -> None:
    stream = unique("ghost")
    doomed_id = unique("doomed")
    watcher = await connect()  # on gateway 0, which sweeps
    await watcher.subscribe(stream)
    url, proc = short_ttl_gateway
    doomed = await SwitchboardClient.connect(url, switchboard.token(doomed_id, TENANT))
    try:
        await doomed.subscribe(stream)
        assert await next_change(watcher, stream) == ("join", doomed_id, None)
        # The living gateway's heartbeat extends the entry, so it stays past its first TTL.
        (first_expiry,) = members_of(switchboard, stream, doomed_id).values()

        async def extended_past_first_ttl() -> bool:
            expiry = members_of(switchboard, stream, doomed_id).values()
            return any(score > first_expiry + GHOST_TTL_S * 1000 for score in expiry)

        await wait_until(extended_past_first_ttl, 10, "refreshes to outlive the first TTL")
        assert doomed_id in clients_of(await watcher.presence(stream))

        proc.kill()  # SIGKILL: no disconnect, no cleanup
        killed_at = time.monotonic()
        # Still listed until its entry expires: nobody removed it on the gateway's behalf.
        assert doomed_id in clients_of(await watcher.presence(stream))
        left = await next_change(watcher, stream, timeout=GHOST_BOUND_S + SLACK_S)
        elapsed = time.monotonic() - killed_at
        assert left == ("leave", doomed_id, None)
        assert elapsed <= GHOST_BOUND_S + SLACK_S, elapsed
        assert doomed_id not in clients_of(await watcher.presence(stream))
        assert clients_of(await watcher.presence(stream)) == [watcher.client]
    finally:
        await doomed.close()


def members_of(switchboard: Switchboard, stream: str, client: str) -> dict[str, float]:
    """Gateway process id -> expiry (ms, Redis clock) of each entry `client` has."""
    key = f"{switchboard.key_prefix}:s:{{{TENANT}}}:{stream}:presence.gw"
    entries = {}
    for member, score in switchboard.redis().zrange(key, 0, -1, withscores=True):
        gateway, _, owner = member.decode().partition(" ")
        if owner == client:
            entries[gateway] = score
    return entries


def cut(client: SwitchboardClient) -> None:
    """Cut the socket as a network failure would: no close frame, the server sees 1006."""
    client._ws.transport.abort()


async def test_a_cut_client_back_within_the_grace_neither_leaves_nor_joins(
    switchboard: Switchboard,
    connect: Connect,
    start_gateway: StartGateway,
    unique: Callable[[str], str],
) -> None:
    stream = unique("blip")
    dana_id = unique("dana")
    watcher = await connect()
    await watcher.subscribe(stream)
    token = switchboard.token(dana_id, TENANT, name="Dana")
    dana = await SwitchboardClient.connect(switchboard.url, token)
    await dana.subscribe(stream)
    assert await next_change(watcher, stream) == ("join", dana_id, "Dana")

    cut(dana)
    # Back with its session on another gateway (within the default 15 s grace).
    other_url, _ = start_gateway()
    back = await SwitchboardClient.connect(other_url, token, session=dana.session)
    try:
        assert back.welcome["resumed"] is True
        assert dana_id in clients_of(await watcher.presence(stream))
        await no_change_before_now(watcher, back, stream)
        # A goodbye is a leave at once, grace or not.
        await back.close()
        assert await next_change(watcher, stream) == ("leave", dana_id, "Dana")
        await no_change_before_now(watcher, watcher, stream)
    finally:
        await back.close()


async def test_a_cut_client_that_stays_away_leaves_after_the_grace(
    switchboard: Switchboard,
    connect: Connect,
    start_gateway: StartGateway,
    unique: Callable[[str], str],
) -> None:
    stream = unique("gone")
    eve_id = unique("eve")
    watcher = await connect()  # on gateway 0, which sweeps too
    await watcher.subscribe(stream)
    url, _ = start_gateway(SWITCHBOARD_PRESENCE_LEAVE_GRACE_S=str(SHORT_GRACE_S))
    eve = await SwitchboardClient.connect(url, switchboard.token(eve_id, TENANT))
    await eve.subscribe(stream)
    assert await next_change(watcher, stream) == ("join", eve_id, None)

    cut(eve)
    cut_at = time.monotonic()
    left = await next_change(watcher, stream, timeout=SHORT_GRACE_S + SWEEP_INTERVAL_S + SLACK_S)
    elapsed = time.monotonic() - cut_at
    assert left == ("leave", eve_id, None)
    assert elapsed <= SHORT_GRACE_S + SWEEP_INTERVAL_S + SLACK_S, elapsed
    assert clients_of(await watcher.presence(stream)) == [watcher.client]
