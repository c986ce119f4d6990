"""Flow control on the real cluster: every bound answers at once (429 with retry_after_ms, or
close 4029), a refused message is not in the stream and starts no run, every accepted
send still ends with exactly one reply.done, and a killed gateway's connections stop
counting within its TTL. The tenants and their tiny limits: LIMITED_TENANTS (conftest)."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from client.connection import SwitchboardClient, SwitchboardClosed, SwitchboardError
from client.reconnecting import ReconnectingClient
from project.launcher import Proc

from .conftest import LIMITED_TENANTS, Connect, StartGateway, Switchboard, replaced_worker
from .support import wait_until

pytestmark = pytest.mark.asyncio

# Slow enough that runs stay in flight (and workers busy) while a test sends; below the
# cluster's model soft limit, so they end `ok`.
SLOW = {"latency_ms": 1000, "chunks": 2}
# The killed gateway's connection entries expire this long after its last renewal.
TTL_S = 3.0
REFRESH_S = 1.0
SLACK_S = 3.0


def stream_events(switchboard: Switchboard, tenant: str, stream: str) -> list[dict[str, Any]]:
    """Everything the stream's log holds, in order."""
    log = f"{switchboard.key_prefix}:s:{{{tenant}}}:{stream}:log"
    return [json.loads(fields[b"e"]) for _, fields in switchboard.redis().xrange(log)]


def messages_and_dones(
    switchboard: Switchboard, tenant: str, stream: str
) -> tuple[list[str], Counter[str]]:
    """(message ids of the stream's `message`/`published` events, reply.dones per id)."""
    events = stream_events(switchboard, tenant, stream)
    messages = [e["cause"]["message"] for e in events if e["kind"] in ("message", "published")]
    dones = Counter(e["cause"]["message"] for e in events if e["kind"] == "reply.done")
    return messages, dones


def assert_refused(error: SwitchboardError, code: str, frame_id: str) -> int:
    assert (error.code, error.status) == (code, 429), error
    assert error.frame["id"] == frame_id
    assert isinstance(error.retry_after_ms, int) and error.retry_after_ms > 0, error.frame
    return error.retry_after_ms


async def all_replies_done(
    switchboard: Switchboard,
    tenant: str,
    stream: str,
    sent: list[str],
    published: tuple[str, ...] = (),
    timeout: float = 20,
) -> None:
    """The stream holds exactly the accepted messages, and every accepted send has exactly
    one reply.done (and nothing else has one)."""

    async def finished() -> bool:
        _, dones = messages_and_dones(switchboard, tenant, stream)
        return all(dones[message_id] for message_id in sent)

    await wait_until(finished, timeout, "every accepted send's reply.done")
    messages, dones = messages_and_dones(switchboard, tenant, stream)
    assert sorted(messages) == sorted([*sent, *published])
    assert dones == Counter(sent)


async def test_a_client_past_its_rate_is_refused_with_the_honest_wait(
    switchboard: Switchboard, connect: Connect, unique: Callable[[str], str]
) -> None:
    tenant = "strict"
    burst = LIMITED_TENANTS[tenant]["client_burst"]
    stream = unique("rate")
    alice = await connect(tenant=tenant)
    accepted = [(await alice.publish(stream, {"n": n}))["id"] for n in range(burst)]

    with pytest.raises(SwitchboardError) as refused:
        await alice.send(stream, "echo", "too fast", id="over")
    wait_ms = assert_refused(refused.value, "rate_limited", "over")
    assert wait_ms <= 1000  # one token at 1/s
    # Refused: not in the stream, no run, no dedupe memory (the same id is a new message).
    assert messages_and_dones(switchboard, tenant, stream) == (accepted, Counter())
    assert stream_events(switchboard, tenant, stream)[-1]["seq"] == burst

    # The wait is honest: once it has passed, the same message is accepted.
    await asyncio.sleep(wait_ms / 1000 + 0.01)
    ack = await alice.send(stream, "echo", "now", id="over")
    assert (ack["duplicate"], ack["seq"]) == (False, burst + 1)
    await all_replies_done(switchboard, tenant, stream, ["over"], tuple(accepted))


async def test_a_tenant_past_its_rate_is_refused_though_its_clients_are_not(
    connect: Connect, unique: Callable[[str], str]
) -> None:
    tenant = "strict"
    burst = LIMITED_TENANTS[tenant]["client_burst"]
    stream = unique("tenant-rate")
    clients = [await connect(tenant=tenant) for _ in range(3)]
    used = [0, 0, 0]
    refusal: tuple[int, SwitchboardError] | None = None
    for n in range(3 * burst):
        which = n % 3
        try:
            await clients[which].publish(stream, {"n": n}, id=f"p-{n}")
        except SwitchboardError as error:
            refusal = (which, error)
            assert_refused(error, "rate_limited", f"p-{n}")
            break
        used[which] += 1
    assert refusal is not None, "the tenant's burst (5) is below its clients' together (9)"
    # The refused client had tokens of its own left: the tenant's bucket said no.
    assert used[refusal[0]] < burst, used


async def test_a_connection_past_its_runs_in_flight_is_refused_until_one_ends(
    switchboard: Switchboard, connect: Connect, unique: Callable[[str], str]
) -> None:
    tenant = "busy"
    limit = LIMITED_TENANTS[tenant]["max_runs_in_flight_per_connection"]
    stream = unique("inflight")
    client_id = unique("client")
    alice = await connect(tenant=tenant, client=client_id)
    accepted = []
    for n in range(limit):
        accepted.append((await alice.send(stream, "echo", f"run {n}", SLOW, id=f"m-{n}"))["id"])

    with pytest.raises(SwitchboardError) as refused:
        await alice.send(stream, "echo", "one too many", SLOW, id="extra")
    assert assert_refused(refused.value, "rate_limited", "extra") <= 1000
    assert messages_and_dones(switchboard, tenant, stream)[0] == accepted

    # The bound is per connection: the same client's other connection may send.
    other = await connect(tenant=tenant, client=client_id)
    accepted.append((await other.send(stream, "echo", "elsewhere", id="elsewhere"))["id"])

    # A run counts until its reply.done; then there is room again.
    await alice.reply("m-0", timeout=20)
    ack = await alice.send(stream, "echo", "now there is room", id="extra")
    assert ack["duplicate"] is False
    accepted.append("extra")
    await all_replies_done(switchboard, tenant, stream, accepted)


async def test_a_tenant_past_its_queued_runs_is_overloaded(
    switchboard: Switchboard, connect: Connect, unique: Callable[[str], str]
) -> None:
    """A worker that holds 2 model calls at once, each for a second: of 6 sends in a row at
    most 2 are claimed while the others arrive, so the queue bound (3) must refuse some."""
    with replaced_worker(switchboard, concurrency=1, SWITCHBOARD_WORKER_MAX_CALLS="2"):
        await six_slow_sends(switchboard, connect, unique)


async def six_slow_sends(
    switchboard: Switchboard, connect: Connect, unique: Callable[[str], str]
) -> None:
    tenant = "busy"
    limit = LIMITED_TENANTS[tenant]["max_queued_runs"]
    stream = unique("queued")
    clients = [await connect(tenant=tenant) for _ in range(3)]
    accepted: list[tuple[SwitchboardClient, str]] = []
    refused: list[tuple[SwitchboardClient, str, SwitchboardError]] = []
    for n in range(6):
        client, message_id = clients[n // 2], f"q-{n}"
        try:
            await client.send(stream, "echo", f"run {n}", SLOW, id=message_id)
            accepted.append((client, message_id))
        except SwitchboardError as error:
            refused.append((client, message_id, error))
    assert refused, "six slow sends against a queue of three and two worker processes"
    assert limit <= len(accepted) <= limit + 2
    for _, message_id, error in refused:
        assert assert_refused(error, "overloaded", message_id) <= 1000
    accepted_ids = [message_id for _, message_id in accepted]
    assert messages_and_dones(switchboard, tenant, stream)[0] == accepted_ids

    # Retried after its hint, each refused send is accepted once the queue has drained.
    deadline = time.monotonic() + 20
    for client, message_id, error in refused:
        wait_ms = error.retry_after_ms or 0
        while True:
            await asyncio.sleep(wait_ms / 1000)
            try:
                await client.send(stream, "echo", "again", SLOW, id=message_id)
                break
            except SwitchboardError as again:
                assert again.code == "overloaded" and time.monotonic() < deadline, again
                wait_ms = again.retry_after_ms or 0
        accepted_ids.append(message_id)
    await all_replies_done(switchboard, tenant, stream, accepted_ids, timeout=30)


class CountingReconnectingClient(ReconnectingClient):
    """A ReconnectingClient that keeps the close codes of the connects it was refused."""

    made: list[CountingReconnectingClient] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.refusals: list[int | None] = []
        self.made.append(self)

    async def _open_connection(self, url: str) -> SwitchboardClient:
        try:
            return await super()._open_connection(url)
        except SwitchboardClosed as closed:
            self.refusals.append(closed.code)
            raise


async def test_connections_past_the_client_and_tenant_caps_are_closed_4029(
    switchboard: Switchboard, connect: Connect, unique: Callable[[str], str]
) -> None:
    tenant = "crowded"  # 3 connections, 2 per client
    first, second, third = unique("x"), unique("y"), unique("z")
    x1 = await connect(tenant=tenant, client=first)
    await connect(tenant=tenant, client=first)
    with pytest.raises(SwitchboardClosed) as closed:
        await connect(tenant=tenant, client=first)
    assert (closed.value.code, closed.value.reason) == (4029, "too many connections for the client")
    assert closed.value.frames == []  # accepted, closed, nothing sent

    await connect(tenant=tenant, client=second)
    with pytest.raises(SwitchboardClosed) as closed:
        await connect(tenant=tenant, client=third)
    assert (closed.value.code, closed.value.reason) == (4029, "too many connections for the tenant")

    # 4029 is not terminal for ReconnectingClient: it backs off and tries again, and gets
    # in once a place is free.
    CountingReconnectingClient.made.clear()
    joining = asyncio.get_running_loop().create_task(
        CountingReconnectingClient.connect(
            switchboard.url,
            switchboard.token(third, tenant),
            initial_backoff_s=0.05,
            max_backoff_s=0.2,
            connect_timeout_s=20,
        )
    )
    try:

        async def refused_twice() -> bool:
            made = CountingReconnectingClient.made
            return bool(made) and len(made[0].refusals) >= 2

        await wait_until(refused_twice, 10, "the reconnecting client to be refused twice")
        assert not joining.done()
        await x1.close()
        reconnecting = await asyncio.wait_for(joining, 20)
    finally:
        if not joining.done():
            joining.cancel()
    try:
        assert reconnecting.connections == 1
        assert set(CountingReconnectingClient.made[0].refusals) == {4029}
        # Its place counts like any other: the tenant is full again.
        with pytest.raises(SwitchboardClosed) as closed:
            await connect(tenant=tenant, client=unique("w"))
        assert closed.value.code == 4029
    finally:
        await reconnecting.close()


@pytest.fixture
def short_ttl_gateway(start_gateway: StartGateway) -> tuple[str, Proc]:
    """An extra gateway whose connection entries expire TTL_S after its last renewal."""
    return start_gateway(
        SWITCHBOARD_PRESENCE_TTL_S=str(TTL_S), SWITCHBOARD_PRESENCE_REFRESH_S=str(REFRESH_S)
    )


async def test_a_killed_gateways_connections_stop_counting_within_its_ttl(
    switchboard: Switchboard,
    connect: Connect,
    unique: Callable[[str], str],
    short_ttl_gateway: tuple[str, Proc],
) -> None:
    tenant = "capped"  # 2 connections
    url, proc = short_ttl_gateway
    doomed = [
        await SwitchboardClient.connect(url, switchboard.token(unique("doomed"), tenant))
        for _ in range(2)
    ]
    try:
        r = switchboard.redis()
        # Its connections are counted under its id, alive while its lease is.
        [gateway] = r.hkeys(f"{switchboard.key_prefix}:conn:{{{tenant}}}")
        leases = f"{switchboard.key_prefix}:gateways"
        first_expiry = r.zscore(leases, gateway)
        assert first_expiry is not None

        async def renewed() -> bool:
            return (r.zscore(leases, gateway) or 0) > first_expiry

        # The living gateway renews its lease, so its connections outlive their first TTL.
        await wait_until(renewed, 10, "the gateway to renew its lease")
        with pytest.raises(SwitchboardClosed) as closed:
            await connect(tenant=tenant)
        assert closed.value.code == 4029

        proc.kill()  # SIGKILL: no close, no release
        killed_at = time.monotonic()

        async def admitted() -> SwitchboardClient | None:
            try:
                return await connect(tenant=tenant)
            except SwitchboardClosed as refused:
                assert refused.code == 4029
                return None

        await wait_until(admitted, TTL_S + SLACK_S, "the dead gateway's places", interval=0.1)
        assert time.monotonic() - killed_at <= TTL_S + SLACK_S
    finally:
        for client in doomed:
            await client.close()
