"""Workers killed in the middle of a step. A killed pool process: the step is redelivered
and the run still ends with exactly one reply.done whose text is its deltas, none twice. A
whole worker killed mid-reply while another is alive: its lease runs out and the sweeper
redelivers the step to the other worker, long before kombu's visibility timeout would; the
dead worker's own message, restored later, does nothing. A killed worker, and none left:
the sweeper ends the run with `failed` at its deadline."""

from __future__ import annotations

import base64
import json
import os
import signal
from collections.abc import Callable
from datetime import timedelta

import psutil
import pytest

from project.launcher import Proc

from .conftest import KEY_PREFIX, RUN_DEADLINE_S, TENANT, Connect, Switchboard
from .support import (
    collect_run,
    collect_until,
    reply_text,
    restarts,
    split_run,
    ts,
    wait_until,
)

pytestmark = pytest.mark.asyncio


async def _running_run_key(switchboard: Switchboard, client: str, message_id: str) -> str:
    """The run key of an acknowledged send, once a worker has started its step."""
    receipt = switchboard.redis().get(
        f"{KEY_PREFIX}:m:{{{TENANT}}}:{len(client)}:{client}:{message_id}"
    )
    assert receipt is not None, "an acknowledged send has its dedupe receipt"
    run_id = receipt.decode().split(" ")[2]
    run_key = f"{KEY_PREFIX}:run:{{{TENANT}}}:{run_id}"
    redis = switchboard.redis()

    async def running() -> bool:
        return redis.hget(run_key, "status") == b"running"

    await wait_until(running, timeout=15, what="the step to start")
    return run_key


async def test_sigkill_of_the_only_worker_mid_step_then_a_restart_ends_the_run_once(
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
    cluster = switchboard.cluster
    # The worker process holds the step on its model-call runtime: kill it, then start a
    # worker again, as a supervisor would.
    _kill_worker(cluster.processes["worker-0"])
    cluster.start_worker(0)

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


def _kill_worker(proc: Proc) -> None:
    """SIGKILL a whole Celery worker: its main process and every pool process."""
    main = psutil.Process(proc.pid)
    for process in [*main.children(recursive=True), main]:
        try:
            os.kill(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.popen.wait(10)


def _unacked_steps(switchboard: Switchboard, run_id: str) -> list[str]:
    """Delivery tags of the run's step messages a worker took and never acknowledged, and
    of fair-queue tickets (they name no run: compare with the tickets unacked before)."""
    tags = []
    unacked = switchboard.redis().hgetall(f"{KEY_PREFIX}:celery:unacked")
    for tag, raw in unacked.items():
        message = json.loads(raw)[0]
        args = json.loads(base64.b64decode(message["body"]))[0]
        task = message["headers"]["task"]
        if task == "switchboard.run.next" or (task == "switchboard.run.step" and args[0] == run_id):
            tags.append(tag.decode())
    return tags


async def test_sigkill_of_a_whole_worker_mid_reply_hands_the_step_to_another_worker(
    switchboard: Switchboard, connect: Connect, unique: Callable[[str], str]
) -> None:
    cluster = switchboard.cluster
    redis = switchboard.redis()
    cluster.start_worker(1)  # whichever worker takes the step, another one is left
    killed: str | None = None
    try:
        client_id = unique("kill9")
        client = await connect(client=client_id)
        earlier = set(_unacked_steps(switchboard, ""))  # earlier tests' tickets
        stream = unique("kill9")
        text = "a reply streamed slowly, cut off by kill -9, finished by another worker"
        # Ten pieces 120 ms apart: the whole reply takes ~1.1 s, inside the 1.5 s soft limit
        # of one model call, so the redelivered attempt can stream it all again.
        ack = await client.send(
            stream, "echo", text, options={"chunks": 10, "chunk_delay_ms": 120}, id="m-kill9"
        )
        run_key = await _running_run_key(switchboard, client_id, "m-kill9")
        run_id = run_key.rpartition(":")[2]

        # Up to the second delta (the first one at an offset past 0).
        before = await collect_until(
            client,
            stream,
            lambda event: event["kind"] == "reply.delta" and event["data"]["offset"] > 0,
            timeout=15,
        )
        assert not any(event["kind"] == "reply.done" for event in before)
        # The worker process that claimed the step wrote its pid into the run; kill it
        # mid-reply.
        holder = int(redis.hget(run_key, "worker").decode().rpartition(":")[2])
        killed = next(
            name
            for name, proc in cluster.processes.items()
            if name.startswith("worker-") and proc.pid == holder
        )
        _kill_worker(cluster.processes[killed])

        after = await collect_run(client, stream, "m-kill9", timeout=RUN_DEADLINE_S + 10)
        events = before + after
        deltas, done = split_run(events, "m-kill9")
        assert done["data"]["status"] == "ok", done
        assert reply_text(deltas, done) == text
        seqs = [event["seq"] for event in events]
        assert seqs == list(range(ack["seq"], ack["seq"] + len(events))), "every seq once"
        assert [event["kind"] for event in events].count("reply.done") == 1
        assert redis.hget(run_key, "redeliveries") == b"1", "redelivered once, by a sweeper"
        assert int(redis.hget(run_key, "attempt")) == 2
        # The new attempt voided what the killed one had streamed and streamed it again.
        [restart] = restarts(events, "m-kill9")
        assert restart["data"]["reason"] == "redelivered"

        # The run's message was acknowledged when its step was claimed (the lease covered it
        # from then on). The dead worker may still have held prefetched messages of other
        # runs; a worker with a 1 s visibility timeout restores them as it starts, and they
        # must change nothing for this finished run.
        saved = dict(cluster.env)
        cluster.env["CELERY_VISIBILITY_TIMEOUT_S"] = "1"
        try:
            restorer = cluster.start_worker(2)
        finally:
            cluster.env.clear()
            cluster.env.update(saved)

        async def nothing_unacked_of_the_dead() -> bool:
            return not (set(_unacked_steps(switchboard, run_id)) - earlier)

        await wait_until(nothing_unacked_of_the_dead, timeout=30, what="orphans restored")
        restorer.stop()
        marker = await client.publish(stream, {"after": "kill -9"})
        following = await client.next_event(stream, timeout=10)
        assert (following["seq"], following["kind"]) == (marker["seq"], "published")
    finally:
        for name in ("worker-1", "worker-2"):
            proc = cluster.processes.pop(name, None)
            if proc is not None:
                proc.stop()
        if killed == "worker-0" or not cluster.processes["worker-0"].alive():
            cluster.start_worker(0)
