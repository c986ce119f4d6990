"""The worker's model-call runtime over real processes: one worker process holds many calls
at once, stops taking messages at its bound, and drains on SIGTERM by finishing what it can
and handing the rest to another worker (workers/runtime.py, orchestration/dispatch.py)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from typing import Any

import pytest

from client.connection import Event, SwitchboardClient
from streams.enqueue import RUNS_QUEUE

from .conftest import KEY_PREFIX, TENANT, Connect, Switchboard, replaced_worker
from .support import collect_run, collect_until, reply_text, restarts, split_run, wait_until
from .test_metrics import scrape, value

pytestmark = pytest.mark.asyncio

LEASES = f"{KEY_PREFIX}:runs:{{{TENANT}}}:leases"
RUNS_QUEUE_KEY = f"{KEY_PREFIX}:celery:{RUNS_QUEUE}"


def held_by(switchboard: Switchboard) -> dict[str, str]:
    """Leased runs -> the worker process (host:pid) that holds each."""
    redis = switchboard.redis()
    held = {}
    for run_id in redis.zrange(LEASES, 0, -1):
        worker = redis.hget(f"{KEY_PREFIX}:run:{{{TENANT}}}:{run_id.decode()}", "worker")
        held[run_id.decode()] = worker.decode() if worker else ""
    return held


async def reply_dones(client: SwitchboardClient, stream: str, count: int) -> list[Event]:
    """The next `count` reply.done events of the stream, in the order they come."""
    dones: list[Event] = []
    while len(dones) < count:
        event = await client.next_event(stream, timeout=30)
        if event["kind"] == "reply.done":
            dones.append(event)
    return dones


async def test_one_worker_process_holds_many_model_calls_at_once(
    switchboard: Switchboard, connect: Connect, unique: Callable[[str], str]
) -> None:
    """32 calls "thinking" at once, on a worker of two pool threads: every one is claimed
    and held by the same process before the first answers."""
    stream = unique("many")
    clients = [await connect() for _ in range(4)]  # 8 runs in flight per connection at most
    sends = [
        client.send(stream, "echo", f"call {n}", {"latency_ms": 1400})
        for client in clients
        for n in range(8)
    ]
    acks = await asyncio.gather(*sends)

    async def all_held() -> set[str] | None:
        holders = set(held_by(switchboard).values())
        return holders if len(held_by(switchboard)) >= len(acks) else None

    holders = await wait_until(all_held, timeout=15, what="every call held at once")
    assert len(holders) == 1, holders
    [holder] = holders
    assert holder.endswith(f":{switchboard.cluster.processes['worker-0'].pid}")
    # What an operator sees: the calls the host's workers hold, on the gateway's /metrics.
    samples = await scrape(switchboard)
    assert value(samples, "switchboard_worker_calls_in_flight") >= len(acks)

    # Every client sees every reply of the stream: all of them end ok.
    dones = await reply_dones(clients[0], stream, len(acks))
    assert [done["data"]["status"] for done in dones] == ["ok"] * len(acks)


async def test_at_its_bound_a_worker_leaves_further_runs_waiting_in_redis(
    switchboard: Switchboard, connect: Connect, unique: Callable[[str], str]
) -> None:
    bound = 3
    with replaced_worker(switchboard, concurrency=1, SWITCHBOARD_WORKER_MAX_CALLS=str(bound)):
        client = await connect()
        stream = unique("bound")
        acks = [
            await client.send(stream, "echo", f"call {n}", {"latency_ms": 1000}) for n in range(8)
        ]
        redis = switchboard.redis()
        most_held = 0
        waiting_at_bound = 0

        async def sample() -> None:
            nonlocal most_held, waiting_at_bound
            while True:
                held = len(held_by(switchboard))
                most_held = max(most_held, held)
                if held == bound:
                    waiting_at_bound = max(waiting_at_bound, redis.llen(RUNS_QUEUE_KEY))
                await asyncio.sleep(0.02)

        sampler = asyncio.create_task(sample())
        try:
            dones = await reply_dones(client, stream, len(acks))
        finally:
            sampler.cancel()
        assert [done["data"]["status"] for done in dones] == ["ok"] * len(acks)
        # Never more calls than the bound; the rest waited as tickets in Redis (the one
        # pool thread holds at most one message while the runtime is full).
        assert most_held == bound
        assert waiting_at_bound >= len(acks) - bound - 1


async def test_sigterm_finishes_short_calls_and_hands_long_ones_to_another_worker(
    switchboard: Switchboard, connect: Connect, unique: Callable[[str], str]
) -> None:
    cluster = switchboard.cluster
    # Model calls may take 5 s here, so a call can outlive the drain by a margin.
    slow_model = {"SWITCHBOARD_MODEL_SOFT_LIMIT_S": "5"}
    with replaced_worker(switchboard, SWITCHBOARD_WORKER_DRAIN_S="1", **slow_model) as draining:
        client = await connect()
        stream = unique("drain")
        long_text = "a long reply that outlives the drain and finishes on the other worker"
        # 24 pieces 100 ms apart (~2.3 s): longer than the drain.
        long = await client.send(
            stream, "echo", long_text, {"chunks": 24, "chunk_delay_ms": 100}, id="long"
        )
        events = await collect_until(
            client,
            stream,
            lambda event: event["kind"] == "reply.delta" and event["data"]["offset"] > 0,
        )
        # Well within the drain.
        short = await client.send(stream, "echo", "short", {"latency_ms": 500}, id="short")
        await wait_until(
            lambda: asyncio.sleep(0, result=len(held_by(switchboard)) == 2),
            timeout=10,
            what="both calls held by the draining worker",
        )
        draining.signal(signal.SIGTERM)
        # Where the long call goes once handed back (it waits in Redis meanwhile).
        saved = dict(cluster.env)
        cluster.env.update(slow_model)
        try:
            cluster.start_worker(1)
        finally:
            cluster.env.clear()
            cluster.env.update(saved)

        events += await collect_run(client, stream, "long", timeout=20)
        events += (
            await collect_run(client, stream, "short", timeout=20)
            if not any(
                e["kind"] == "reply.done" and e["cause"]["message"] == "short" for e in events
            )
            else []
        )
        _, short_done = split_run(events, "short")
        assert short_done["data"]["status"] == "ok"
        assert restarts(events, "short") == []  # finished where it started, within the drain

        deltas, long_done = split_run(events, "long")
        assert long_done["data"]["status"] == "ok"
        assert reply_text(deltas, long_done) == long_text
        [restart] = restarts(events, "long")  # the other worker voided the cut-off text
        assert restart["data"]["reason"] == "redelivered"
        kinds = [e["kind"] for e in events if e["cause"]["message"] == "long"]
        assert kinds.count("reply.done") == 1

        def exited() -> Any:
            return asyncio.sleep(0, result=not draining.alive())

        await wait_until(exited, timeout=20, what="the draining worker to exit")
        assert draining.popen.returncode == 0
        log = draining.log_path.read_text(errors="replace")
        assert "handing over the calls still in flight" in log
        # Handed back at once, not left to a lapsed lease and the sweeper.
        redis = switchboard.redis()
        run_id = long_done["data"]["run"]
        assert redis.hget(f"{KEY_PREFIX}:run:{{{TENANT}}}:{run_id}", "redeliveries") is None
        assert short["duplicate"] is False and long["duplicate"] is False
