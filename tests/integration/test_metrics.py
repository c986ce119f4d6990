"""Prometheus metrics on the real cluster: a gateway's /metrics moves with the traffic, and
includes what the Celery worker's pool processes counted (multiprocess mode: the launcher
gives the cluster's processes one PROMETHEUS_MULTIPROC_DIR)."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from client.connection import SwitchboardClient, SwitchboardError

from .conftest import (
    LIMITED_TENANTS,
    METRICS_TOKEN,
    Connect,
    StartGateway,
    Switchboard,
    replaced_worker,
)
from .support import wait_until

pytestmark = pytest.mark.asyncio

# "busy" allows 2 runs in flight per connection: a third send is refused with 429.
TENANT = "busy"
# Slow enough that both runs are still in flight when the third send arrives, and below
# the cluster's model soft limit.
SLOW = {"latency_ms": 1000, "chunks": 2}
SCRAPE_TIMEOUT_S = 30.0

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _get(url: str) -> str:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
        return response.read().decode()


async def scrape(switchboard: Switchboard, gateway: int = 0) -> Samples:
    """Every sample of a gateway's /metrics (gateway-0's by default), by (name, labels)."""
    port = switchboard.cluster.gateway_ports[gateway]
    text = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/metrics")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """Summed over the labels not given."""
    wanted = set(labels.items())
    return sum(v for (n, found), v in samples.items() if n == name and wanted <= found)


async def test_metrics_move_with_connections_frames_refusals_and_runs(
    switchboard: Switchboard, connect: Connect, unique: Callable[[str], str]
) -> None:
    assert LIMITED_TENANTS[TENANT]["max_runs_in_flight_per_connection"] == 2
    before = await scrape(switchboard)
    stream = unique("metrics")
    alice = await connect(tenant=TENANT)
    await alice.subscribe(stream)

    async def connected() -> Samples | None:
        now = await scrape(switchboard)
        opened = value(now, "switchboard_connections", tenant=TENANT)
        subscribed = value(now, "switchboard_subscriptions", tenant=TENANT)
        if opened >= value(before, "switchboard_connections", tenant=TENANT) + 1 and (
            subscribed >= value(before, "switchboard_subscriptions", tenant=TENANT) + 1
        ):
            return now
        return None

    await wait_until(connected, SCRAPE_TIMEOUT_S, "the connection and subscription gauges")

    await alice.send(stream, "echo", "first", SLOW, id="m-1")
    await alice.send(stream, "echo", "second", SLOW, id="m-2")
    with pytest.raises(SwitchboardError) as refused:
        await alice.send(stream, "echo", "one too many", SLOW, id="m-3")
    assert (refused.value.code, refused.value.status) == ("rate_limited", 429)
    await alice.reply("m-1", timeout=30)
    await alice.reply("m-2", timeout=30)
    # The same id again: answered from its dedupe record, a dedupe hit.
    assert (await alice.send(stream, "echo", "first", SLOW, id="m-1"))["duplicate"] is True

    def grown(now: Samples, name: str, by: float, **labels: str) -> bool:
        return total(now, name, **labels) >= total(before, name, **labels) + by

    async def counted() -> Samples | None:
        now = await scrape(switchboard)
        ready = (
            grown(now, "switchboard_send_to_reply_done_seconds_count", 2, tenant=TENANT)
            # Counted in the worker's pool processes, read by the gateway's /metrics.
            and grown(now, "switchboard_model_calls_total", 2, backend="simulated")
            and grown(now, "switchboard_acks_total", 1, tenant=TENANT, duplicate="true")
        )
        return now if ready else None

    after = await wait_until(counted, SCRAPE_TIMEOUT_S, "the run's metrics")

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    # Only this test uses the tenant while it runs: its series moved by exactly this much.
    assert delta("switchboard_send_to_reply_done_seconds_count", tenant=TENANT) == 2
    assert delta("switchboard_send_to_reply_done_seconds_bucket", tenant=TENANT, le="+Inf") == 2
    assert delta("switchboard_send_to_reply_done_seconds_sum", tenant=TENANT) > 0
    assert delta("switchboard_acks_total", tenant=TENANT, duplicate="false") == 2
    assert delta("switchboard_acks_total", tenant=TENANT, duplicate="true") == 1
    refusal = {"tenant": TENANT, "code": "rate_limited", "reason": "runs_in_flight"}
    assert delta("switchboard_refusals_total", **refusal) == 1
    # The cluster's other series: at least this traffic.
    assert delta("switchboard_frames_in_total", type="send") >= 4
    assert delta("switchboard_frames_in_total", type="subscribe") >= 1
    assert delta("switchboard_error_answers_total", code="rate_limited") >= 1
    assert delta("switchboard_frames_out_total", kind="ack") >= 3
    assert delta("switchboard_frames_out_total", kind="reply.done") >= 2
    assert delta("switchboard_frames_out_total", kind="message") >= 2
    assert delta("switchboard_model_call_seconds_count", backend="simulated") >= 2
    assert delta("switchboard_delivery_lag_seconds_count") >= 4  # 2 messages, 2 reply.dones
    # Read from Redis at scrape time.
    assert value(after, "switchboard_state_up") == 1
    assert ("switchboard_runs_unfinished", frozenset()) in after
    assert ("switchboard_queue_depth", frozenset({("queue", "switchboard.runs")})) in after

    await alice.close()

    async def closed() -> bool:
        now = await scrape(switchboard)
        return value(now, "switchboard_connections", tenant=TENANT) == value(
            before, "switchboard_connections", tenant=TENANT
        ) and value(now, "switchboard_subscriptions", tenant=TENANT) == value(
            before, "switchboard_subscriptions", tenant=TENANT
        )

    await wait_until(closed, SCRAPE_TIMEOUT_S, "the gauges back where they were")


def _status(url: str, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10):
            return 200
    except urllib.error.HTTPError as error:
        error.close()
        return error.code


async def test_metrics_answer_only_the_metrics_token(
    switchboard: Switchboard, start_gateway: StartGateway
) -> None:
    """/metrics names every tenant and its traffic, on the port clients connect to."""
    url = f"http://127.0.0.1:{switchboard.cluster.gateway_ports[0]}/metrics"
    for token in (None, "", "wrong", METRICS_TOKEN + "x"):
        assert await asyncio.to_thread(_status, url, token) == 401, token
    assert await asyncio.to_thread(_status, url, METRICS_TOKEN) == 200
    # A gateway given no token serves no metrics at all.
    _, gateway = start_gateway(SWITCHBOARD_METRICS_TOKEN="")
    url = f"http://127.0.0.1:{gateway.port}/metrics"  # type: ignore[attr-defined]
    for token in (None, METRICS_TOKEN):
        assert await asyncio.to_thread(_status, url, token) == 403


async def test_daphne_forgets_closed_connections(
    switchboard: Switchboard, connect: Connect
) -> None:
    """Daphne's connections are reaped when they close (realtime/daphne_tuning.py marks
    them, in place of daphne's walk over every connection each second): the number it
    tracks comes back down once the clients are gone. The gauge is set once a second and
    counts the scrapes' own HTTP connections of that second too (a few, at two scrapes a
    second): a margin of 5 either way still tells 20 kept from 20 forgotten."""
    before = value(await scrape(switchboard), "switchboard_daphne_connections")
    clients = [await connect() for _ in range(20)]

    async def tracked(at_least: float = 0.0, at_most: float = float("inf")) -> bool:
        now = value(await scrape(switchboard), "switchboard_daphne_connections")
        return at_least <= now <= at_most

    await wait_until(
        lambda: tracked(at_least=before + 15), SCRAPE_TIMEOUT_S, "the 20 tracked", interval=0.5
    )
    for client in clients:
        await client.close()
    await wait_until(
        lambda: tracked(at_most=before + 5), SCRAPE_TIMEOUT_S, "the 20 forgotten", interval=0.5
    )


async def test_gateways_and_workers_report_their_collector_pauses(
    switchboard: Switchboard, start_gateway: StartGateway, unique: Callable[[str], str]
) -> None:
    """Each gateway and worker process times its garbage collections (ops/collector.py).
    A fresh gateway's first socket, and a fresh worker's first model call, collect the
    whole heap once (before freezing it): each shows on /metrics as a generation-2 pause
    within that process's next second, and the gateway's as one of its event loop's long
    turns. Every process shares the scrape (multiprocess mode), so each is told by the
    count growing after it started."""

    async def whole_heap_collections_past(count: float) -> float | None:
        now = value(await scrape(switchboard), "switchboard_gc_pause_seconds_count", generation="2")
        return now if now > count else None

    async def long_turns_past(count: float) -> float | None:
        now = value(await scrape(switchboard), "switchboard_loop_long_turn_seconds_count")
        return now if now > count else None

    before = value(await scrape(switchboard), "switchboard_gc_pause_seconds_count", generation="2")
    turns_before = value(await scrape(switchboard), "switchboard_loop_long_turn_seconds_count")
    url, _ = start_gateway()
    client = await SwitchboardClient.connect(url, switchboard.token(unique("gc")), timeout=30)
    try:
        after_gateway = await wait_until(
            lambda: whole_heap_collections_past(before),
            SCRAPE_TIMEOUT_S,
            "the new gateway's collection",
            interval=0.5,
        )
        # That collection held the gateway's event loop for one of its turns: the turn is
        # observed among its long ones (realtime/daphne_tuning.time_loop_turns).
        await wait_until(
            lambda: long_turns_past(turns_before),
            SCRAPE_TIMEOUT_S,
            "the new gateway's long turn",
            interval=0.5,
        )
        with replaced_worker(switchboard):
            stream = unique("gc")
            await client.subscribe(stream)
            await client.send(stream, "echo", "collect", id="gc-1")
            await client.reply("gc-1", timeout=30)
            await wait_until(
                lambda: whole_heap_collections_past(after_gateway),
                SCRAPE_TIMEOUT_S,
                "the new worker's collection",
                interval=0.5,
            )
    finally:
        await client.close()
    assert value(await scrape(switchboard), "switchboard_gc_pause_seconds_sum", generation="2") > 0
