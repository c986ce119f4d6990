"""Workers killed in the middle of a step. A killed pool process: the step is redelivered
and the run still ends with exactly one reply.done whose text is its deltas, none twice. A
killed worker, and none left: the sweeper ends the run with `failed` at its deadline."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from datetime import timedelta

import psutil
import pytest

from .conftest import KEY_PREFIX, RUN_DEADLINE_S, TENANT, Connect, Switchboard
from .support import collect_run, reply_text, split_run, ts, wait_until

pytestmark = pytest.mark.asyncio


async def _running_run_key(switchboard: Switchboard, client: str, message_id: str) -> str:
    """The run key of an acknowledged send, once a worker has started its step."""
    receipt = switchboard.redis().get(
        f"{KEY_PREFIX}:m:{TENANT}:{len(client)}:{client}:{message_id}"
    )
    assert receipt is not None, "an acknowledged send has its dedupe receipt"
    run_key = f"{KEY_PREFIX}:run:{receipt.decode().split(' ')[2]}"
    redis = switchboard.redis()

    async def running() -> bool:
        return redis.hget(run_key, "status") == b"running"

    await wait_until(running, timeout=15, what="the step to start")
    return run_key


async def test_sigkill_of_the_process_running_a_step_still_ends_the_run_once(
    switchboard: Switchboard, connect: Connect, unique: Callable[[str], str]
) -> None:
    client_id = unique("crash")
    client = await connect(client=client_id)
    stream = unique("crash")
    text = "the reply survives a worker killed mid-step"
    # Long enough to kill the step while the model "thinks", short of the soft limit.
    ack = await client.send(
        stream, "echo", text, options={"latency_ms": 1000, "chunks": 3}, id="m-crash"
    )
    run_key = await _running_run_key(switchboard, client_id, "m-crash")
    redis = switchboard.redis()
    worker = psutil.Process(switchboard.cluster.processes["worker-0"].pid)
    pool = worker.children()
    assert pool, "a prefork worker has pool processes"
    for child in pool:
        os.kill(child.pid, signal.SIGKILL)

    events = await collect_run(client, stream, "m-crash", timeout=30)
    deltas, done = split_run(events, "m-crash")
    assert done["data"]["status"] == "ok"
    assert reply_text(deltas, done) == text
    seqs = [event["seq"] for event in events]
    assert seqs == list(range(ack["seq"], ack["seq"] + len(events))), "every seq once, in order"
    assert int(redis.hget(run_key, "attempt")) >= 2, "the killed attempt was redelivered"

    # Nothing more for this run arrives later (a second reply.done would be a bug).
    marker = await client.publish(stream, {"after": "crash"})
    following = await client.next_event(stream, timeout=10)
    assert (following["seq"], following["kind"]) == (marker["seq"], "published")

    # The worker replaced its children and serves the next run.
    await wait_until(
        lambda: asyncio.sleep(0, result=len(worker.children()) >= len(pool)),
        timeout=30,
        what="the worker to replace its pool processes",
    )
    again = await client.send(stream, "echo", "still serving", id="m-after")
    deltas, done = split_run(await collect_run(client, stream, "m-after"), "m-after")
    assert done["data"]["status"] == "ok" and again["duplicate"] is False


async def test_a_run_with_no_worker_left_is_ended_by_the_sweeper_at_its_deadline(
    switchboard: Switchboard, connect: Connect, unique: Callable[[str], str]
) -> None:
    client_id = unique("orphan")
    client = await connect(client=client_id)
    stream = unique("orphan")
    await client.send(stream, "echo", "never answered", options={"latency_ms": 1000}, id="m-1")
    await _running_run_key(switchboard, client_id, "m-1")
    cluster = switchboard.cluster
    worker = psutil.Process(cluster.processes["worker-0"].pid)
    # The whole worker, main process included: its message stays unacknowledged in Redis
    # until the visibility timeout, long after the run's deadline, and no worker is left to
    # run beat's sweep either. The gateways' sweepers end the run.
    for process in [*worker.children(), worker]:
        os.kill(process.pid, signal.SIGKILL)
    try:
        events = await collect_run(client, stream, "m-1", timeout=RUN_DEADLINE_S + 20)
    finally:
        cluster.processes["worker-0"].popen.wait(10)
        cluster.start_worker(0)
    deltas, done = split_run(events, "m-1")
    assert done["data"]["status"] == "failed"
    assert done["data"]["detail"] == {"reason": "deadline"}
    assert reply_text(deltas, done) == ""
    assert ts(done) - ts(events[0]) >= timedelta(seconds=RUN_DEADLINE_S - 1), "not before"

    # A worker that picks the orphaned step up later finds the run finished.
    marker = await client.publish(stream, {"after": "sweep"})
    following = await client.next_event(stream, timeout=10)
    assert (following["seq"], following["kind"]) == (marker["seq"], "published")
