"""RabbitMQ restarting under steady sends (Celery on RabbitMQ, a single Redis for streams).

The broker is a RabbitMQ node of this module's own (tests/rabbitmq.py PrivateNode: Debian's
rabbitmq-server on another port, data and node name), stopped and started with
`rabbitmqctl stop_app`/`start_app`, so the shared one is never touched.

Every accepted send's run must end exactly once, and every one is answered: the wake-ups
lost with the broker are published again by the sweeper's outbox (docs/guarantees.md)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import pytest

from client.connection import Event
from project.launcher import free_port
from tests import rabbitmq

from .conftest import Connect, Switchboard
from .support import collect_all_done, dones_by_message
from .test_rabbitmq import RUN_DEADLINE_S, cluster_on

pytestmark = pytest.mark.asyncio

OUTAGE_S = 4.0


@pytest.fixture(scope="module")
def node() -> Iterator[rabbitmq.PrivateNode]:
    private = rabbitmq.PrivateNode(free_port(), free_port())
    try:
        private.start()
    except rabbitmq.RabbitMQUnavailable as missing:
        private.stop()
        pytest.skip(f"RabbitMQ: {missing}")
    try:
        yield private
    finally:
        private.stop()


@pytest.fixture(scope="module")
def switchboard(
    node: rabbitmq.PrivateNode, test_redis_url: str, request: pytest.FixtureRequest
) -> Iterator[Switchboard]:
    with cluster_on(node.url, test_redis_url, request) as board:
        yield board


# One scenario, its two promises checked by two tests.
_restart: dict[str, object] = {}


async def _steady_sends_across_a_broker_restart(
    node: rabbitmq.PrivateNode, connect: Connect, unique: Callable[[str], str]
) -> tuple[list[str], list[Event]]:
    """Send steadily while the broker application is stopped and started again; returns
    (the ids of the sends that were acknowledged, the stream's events until every one of
    them had a reply.done, or [] if the wait ran out)."""
    if "events" in _restart:
        return _restart["accepted"], _restart["events"]  # type: ignore[return-value]
    client = await connect()
    stream = unique("rabbit-restart")
    accepted: list[str] = []
    stop = asyncio.Event()

    async def send_steadily() -> None:
        while not stop.is_set():
            message_id = f"m-{len(accepted)}"
            ack = await client.send(stream, "echo", f"reply {message_id}", id=message_id)
            assert ack["duplicate"] is False
            accepted.append(message_id)
            await asyncio.sleep(0.2)  # a steady rate, not a wait for anything

    sender = asyncio.create_task(send_steadily())
    try:
        await asyncio.sleep(2)  # sends before the outage
        await asyncio.to_thread(node.stop_app)
        await asyncio.sleep(OUTAGE_S)  # the outage itself: sends go on, acked by Redis
        await asyncio.to_thread(node.start_app)
        await asyncio.sleep(4)  # sends after it
    finally:
        stop.set()
        await sender
    try:
        events = await collect_all_done(client, stream, accepted, RUN_DEADLINE_S + 30)
    except TimeoutError:
        events = []
    _restart.update(accepted=accepted, events=events)
    return accepted, events


async def test_a_rabbitmq_restart_during_steady_sends_ends_every_accepted_run_once(
    switchboard: Switchboard,
    node: rabbitmq.PrivateNode,
    connect: Connect,
    unique: Callable[[str], str],
) -> None:
    accepted, events = await _steady_sends_across_a_broker_restart(node, connect, unique)
    assert events, "not every accepted send had its reply.done in time"
    dones = dones_by_message(events)
    assert {message: len(dones.get(message, [])) for message in accepted} == dict.fromkeys(
        accepted, 1
    )


async def test_a_rabbitmq_restart_during_steady_sends_answers_every_accepted_run(
    switchboard: Switchboard,
    node: rabbitmq.PrivateNode,
    connect: Connect,
    unique: Callable[[str], str],
) -> None:
    accepted, events = await _steady_sends_across_a_broker_restart(node, connect, unique)
    dones = dones_by_message(events)
    statuses = {
        message: [d["data"]["status"] for d in dones.get(message, [])] for message in accepted
    }
    assert statuses == dict.fromkeys(accepted, ["ok"])
