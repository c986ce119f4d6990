"""Celery on a real RabbitMQ, with a single Redis as the data plane.

With a broker other than the streams' Redis, what a gateway or worker writes to Redis is
the outbox and each Celery message only a wake-up, published after the write by a
publishing thread (streams/enqueue.py) that never holds the event loop. These tests run
their own gateway, worker and beat on a vhost of the session's own (tests/rabbitmq.py) and
check the paths end to end: a send streams its agent's reply, a cancel ends its run,
subscriptions start their agents, a worker killed with RabbitMQ messages unacknowledged
has them redelivered, and every run ends with exactly one reply.done.

RabbitMQ restarts are in test_rabbitmq_restart.py, on a node of their own.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psutil
import pytest

from client.connection import Event, SwitchboardClient
from examples.agents import ASSISTANT_PROMPT, SUMMARY_PROMPT
from project.launcher import Proc, free_port
from streams.enqueue import MAINTENANCE_QUEUE, RUNS_QUEUE
from tests import rabbitmq
from tests.conftest import neighbour_database
from tests.fakes.openai_server import FakeOpenAIServer

from .agents_app import catalog as it
from .conftest import (
    KEY_PREFIX,
    Connect,
    StartGateway,
    Switchboard,
    running_switchboard,
)
from .support import (
    assert_contiguous,
    collect_all_done,
    collect_run,
    collect_until,
    dones_by_message,
    reply_text,
    split_run,
    wait_until,
)

pytestmark = pytest.mark.asyncio

# Long enough that a run outlives a killed worker's restart and a broker restart: these
# tests check that runs are *answered*, not ended by the deadline sweep.
RUN_DEADLINE_S = 40
# Steps a worker process holds at once: small, so that further messages wait on the
# worker's pool threads, delivered and unacknowledged (what the kill -9 test needs).
WORKER_MAX_CALLS = 2
WORKER_CONCURRENCY = 3


@contextmanager
def cluster_on(
    broker_url: str, test_redis_url: str, request: pytest.FixtureRequest
) -> Iterator[Switchboard]:
    """The suite's process group with Celery on `broker_url` and streams on a Redis
    database of their own."""
    with running_switchboard(
        request,
        neighbour_database(test_redis_url, 5),
        broker_url=broker_url,
        worker_concurrency=WORKER_CONCURRENCY,
        env={
            "SWITCHBOARD_RUN_DEADLINE_S": str(RUN_DEADLINE_S),
            "SWITCHBOARD_WORKER_MAX_CALLS": str(WORKER_MAX_CALLS),
            # Runs pile up unanswered while the broker is away (the restart test): one
            # connection may have them all in flight.
            "SWITCHBOARD_MAX_RUNS_IN_FLIGHT_PER_CONNECTION": "1000",
            # Slow simulated calls (the kill test's) are not cut short by the soft limit.
            "SWITCHBOARD_MODEL_SOFT_LIMIT_S": "10",
        },
    ) as board:
        yield board


@pytest.fixture(scope="module")
def switchboard(
    rabbitmq_session: rabbitmq.Session, test_redis_url: str, request: pytest.FixtureRequest
) -> Iterator[Switchboard]:
    """This module's own cluster (the integration suite's is on Redis's broker): Celery on
    the session's RabbitMQ vhost."""
    with cluster_on(rabbitmq_session.url, test_redis_url, request) as board:
        yield board


@pytest.fixture(scope="module")
def provider(switchboard: Switchboard) -> FakeOpenAIServer:
    return switchboard.provider


def runs_queue(vhost: str) -> tuple[int, int]:
    """(ready, unacknowledged) messages of the runs queue in the vhost."""
    return rabbitmq.queue_counts(vhost).get(RUNS_QUEUE, (0, 0))


async def quiet_until_marker(client: SwitchboardClient, stream: str) -> list[Event]:
    """What the stream got after the events already taken, up to a marker published now."""
    marker = await client.publish(stream, {"marker": True})
    events = await collect_until(client, stream, lambda event: event["seq"] == marker["seq"])
    return events[:-1]


# --- the paths, end to end ------------------------------------------------------------


async def test_a_send_streams_its_agents_reply_with_celery_on_rabbitmq(
    switchboard: Switchboard,
    connect: Connect,
    rabbitmq_session: rabbitmq.Session,
    unique: Callable[[str], str],
) -> None:
    client = await connect()
    stream = unique("rabbit")
    text = unique("hello through rabbitmq")
    ack = await client.send(stream, "assistant", text)
    events = await collect_run(client, stream, ack["id"], timeout=30)
    assert_contiguous(events)
    deltas, done = split_run(events, ack["id"])
    assert done["data"]["status"] == "ok"
    assert reply_text(deltas, done) == ASSISTANT_PROMPT.format(message=text)
    assert len(deltas) > 1, "the reply streamed in pieces"

    # The messages went through RabbitMQ, into durable queues, and none into Redis.
    listed = rabbitmq.ctl(
        "list_queues",
        "-p",
        rabbitmq_session.vhost,
        "--quiet",
        "--no-table-headers",
        "name",
        "durable",
    )
    durable = dict(line.split() for line in listed.splitlines() if line.strip())
    assert durable.get(RUNS_QUEUE) == "true" and durable.get(MAINTENANCE_QUEUE) == "true"
    assert switchboard.redis().keys(f"{KEY_PREFIX}:celery:*") == []


async def test_a_cancel_ends_the_run_once_and_the_worker_serves_the_next(
    connect: Connect, unique: Callable[[str], str]
) -> None:
    client = await connect()
    stream = unique("rabbit-cancel")
    # The first piece at once, the next far beyond the test.
    doomed = await client.send(
        stream, "echo", "doomed reply", {"chunks": 4, "chunk_delay_ms": 600_000}
    )
    before = await collect_until(client, stream, lambda event: event["kind"] == "reply.delta")
    await client.cancel(doomed["id"])
    after = await client.send(stream, "echo", "after the cancel")
    events = before + await collect_run(client, stream, after["id"], timeout=30)
    deltas, done = split_run(events, doomed["id"])
    assert done["data"]["status"] == "cancelled"
    assert reply_text(deltas, done) == "doo"
    _, after_done = split_run(events, after["id"])
    assert after_done["data"]["status"] == "ok"
    later = await quiet_until_marker(client, stream)
    assert [e for e in later if e["kind"].startswith("reply.")] == []


async def test_subscriptions_start_their_agents_once_through_rabbitmq(
    connect: Connect, provider: FakeOpenAIServer, unique: Callable[[str], str]
) -> None:
    client = await connect()
    # A reply.done starts the summariser (its trigger published by the worker's runtime).
    stream = f"support:{unique('case')}"
    text = unique("My invoice is wrong")
    await client.send(stream, "assistant", text)
    events = await collect_until(
        client,
        stream,
        lambda e: e["kind"] == "reply.done" and e["from"] == "agent:summariser",
        timeout=45,
    )
    assistant_done = next(
        e for e in events if e["kind"] == "reply.done" and e["from"] == "agent:assistant"
    )
    summary = events[-1]
    assert summary["data"]["status"] == "ok"
    assert summary["data"]["text"] == SUMMARY_PROMPT.format(input=assistant_done["data"]["text"])
    # A published event starts its subscriber (its trigger published by the gateway).
    inbox = f"inbox:{unique('tickets')}"
    data = {"ticket": unique("printer on fire")}
    await client.subscribe(inbox)
    published = await client.publish(inbox, data, id="ticket-1")
    intake = await collect_until(
        client,
        inbox,
        lambda e: e["kind"] == "reply.done" and e["from"] == f"agent:{it.INTAKE}",
        timeout=30,
    )
    message = json.dumps(data, separators=(",", ":"))
    assert intake[-1]["data"]["text"] == it.INTAKE_PROMPT.format(message=message)
    assert intake[-1]["cause"]["prev"] == published["event_id"]
    # Once each: nothing more on either stream.
    for name in (stream, inbox):
        later = await quiet_until_marker(client, name)
        assert [e for e in later if e["kind"] == "reply.done"] == []


# --- faults -----------------------------------------------------------------------------


def _kill_whole_worker(proc: Proc) -> None:
    worker = psutil.Process(proc.pid)
    for process in [*worker.children(recursive=True), worker]:
        try:
            os.kill(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.popen.wait(15)


async def test_a_worker_killed_holding_rabbitmq_messages_has_them_redelivered(
    switchboard: Switchboard,
    connect: Connect,
    rabbitmq_session: rabbitmq.Session,
    unique: Callable[[str], str],
) -> None:
    client = await connect()
    stream = unique("rabbit-kill")
    count = 6
    ids = [f"m-{index}" for index in range(count)]
    for message_id in ids:
        # Each step holds a call slot for a while: with WORKER_MAX_CALLS slots, the other
        # messages wait on the worker's pool threads, delivered and not acknowledged.
        await client.send(
            stream,
            "echo",
            f"reply {message_id}",
            {"latency_ms": 3000, "chunks": 2},
            id=message_id,
        )

    async def holding() -> int:
        return (await asyncio.to_thread(runs_queue, rabbitmq_session.vhost))[1]

    # The worker holds messages delivered and unacknowledged (only it consumes here).
    unacked = await wait_until(holding, timeout=30, what="the worker to hold messages")
    cluster = switchboard.cluster
    _kill_whole_worker(cluster.processes["worker-0"])

    # No consumer is left: RabbitMQ puts the dead connection's messages back as soon as it
    # sees the connection closed.
    async def returned() -> tuple[int, int] | None:
        counts = await asyncio.to_thread(runs_queue, rabbitmq_session.vhost)
        return counts if counts[1] == 0 else None

    ready, _ = await wait_until(returned, timeout=30, what="the unacknowledged to return")
    # Held ones came back (the count read before the kill may be a moment stale: a held
    # message can have been claimed and acknowledged since, so not all of them).
    assert ready >= 1, (ready, unacked)

    cluster.start_worker(0)  # as a supervisor would
    events = await collect_all_done(client, stream, ids, RUN_DEADLINE_S + 30)
    dones = dones_by_message(events)
    for message_id in ids:
        deltas, done = split_run(events, message_id)  # exactly one reply.done each
        assert done["data"]["status"] == "ok", done
        assert reply_text(deltas, done) == f"reply {message_id}"
    assert set(dones) == set(ids)
    later = await quiet_until_marker(client, stream)
    assert [e for e in later if e["kind"] == "reply.done"] == [], "a second reply.done"


# A gateway whose broker is down: one scenario, its two promises checked by two tests.
_unreachable: dict[str, object] = {}


async def _sends_through_a_gateway_without_its_broker(
    switchboard: Switchboard, start_gateway: StartGateway, unique: Callable[[str], str]
) -> tuple[list[str], list[Event], str]:
    """Sends through a gateway whose CELERY_BROKER_URL answers nothing: (the ids acked, the
    stream's events until each had a reply.done or the wait ran out, the gateway's log)."""
    if "events" in _unreachable:
        return _unreachable["accepted"], _unreachable["events"], _unreachable["log"]  # type: ignore[return-value]
    url, proc = start_gateway(CELERY_BROKER_URL=f"amqp://guest:guest@127.0.0.1:{free_port()}//")
    token = switchboard.token(unique("nobroker"))
    client = await SwitchboardClient.connect(url, token)
    stream = unique("rabbit-down")
    accepted: list[str] = []
    try:
        for index in range(3):
            # Acked once Redis has the send: the publish that fails happens after, off the
            # gateway's event loop.
            ack = await client.send(stream, "echo", f"reply {index}", id=f"m-{index}")
            assert ack["duplicate"] is False
            accepted.append(ack["id"])
        try:
            events = await collect_all_done(client, stream, accepted, RUN_DEADLINE_S + 20)
        except TimeoutError:
            events = []
    finally:
        await client.close()
    log = proc.log_path.read_text(errors="replace")
    _unreachable.update(accepted=accepted, events=events, log=log)
    return accepted, events, log


async def test_a_gateway_whose_broker_is_down_acks_sends_and_each_run_ends_once(
    switchboard: Switchboard, start_gateway: StartGateway, unique: Callable[[str], str]
) -> None:
    accepted, events, log = await _sends_through_a_gateway_without_its_broker(
        switchboard, start_gateway, unique
    )
    assert "publish failed; the work is in Redis and left to the sweeper" in log
    assert events, "not every accepted send had its reply.done in time"
    dones = dones_by_message(events)
    assert {message: len(dones.get(message, [])) for message in accepted} == dict.fromkeys(
        accepted, 1
    )


async def test_a_gateway_whose_broker_is_down_has_every_accepted_run_answered(
    switchboard: Switchboard, start_gateway: StartGateway, unique: Callable[[str], str]
) -> None:
    accepted, events, _ = await _sends_through_a_gateway_without_its_broker(
        switchboard, start_gateway, unique
    )
    dones = dones_by_message(events)
    statuses = {
        message: [done["data"]["status"] for done in dones.get(message, [])] for message in accepted
    }
    assert statuses == dict.fromkeys(accepted, ["ok"])
