"""The fair queue against a real Redis: ACCEPT_SEND's part and FAIR_PICK (fairness.py).

Runs are accepted through the gateway's own StreamStore, picked by the worker's FairQueue,
and compared with the plain Python model of the same algorithm.
"""

from __future__ import annotations

import random
import uuid
from collections import Counter

import pytest
import redis
from django.conf import settings

import agents
from orchestration.sweeping import sweep_expired_leases
from realtime.protocol import Send
from streams import keys
from streams.enqueue import RUN_STEP_TASK, RUNS_QUEUE
from streams.fairness import DeficitRoundRobin, FairQueue
from streams.log import StreamStore
from streams.runs import MAX_REDELIVERIES, RunStore
from tests.store.conftest import CLIENT, Streams, execute_step, log_events, of_kind
from tests.store.test_leases import queued_steps


def accept(streams: Streams, tenant: str, count: int, weight: int = 1) -> list[str]:
    """`count` sends of the tenant (one event loop for all); their run ids in order."""

    async def send_all(store: StreamStore) -> list[str]:
        run_ids = []
        for _ in range(count):
            frame = Send(uuid.uuid4().hex, f"room-{tenant}", "echo", "hi", {}, None)
            appended = await store.accept_send(
                tenant, CLIENT, frame, agents.get_agent("echo"), weight=weight
            )
            assert appended.run_id is not None
            run_ids.append(appended.run_id)
        return run_ids

    return streams.run(send_all)


def tenant_of(r: redis.Redis, run_id: str | None) -> str:
    assert run_id is not None
    return (r.hget(keys.run(run_id), "tenant") or b"?").decode()


def picks(r: redis.Redis, count: int, lease_s: float = 5.0) -> list[str]:
    fair = FairQueue(r)
    return [tenant_of(r, fair.pick(lease_s).run_id) for _ in range(count)]


def test_a_flooding_tenant_does_not_hold_back_a_small_one(streams: Streams, r: redis.Redis) -> None:
    accept(streams, "a", 100)
    accept(streams, "b", 5)
    first = picks(r, 10)
    assert first.count("b") == 5
    assert "".join(name for name in first) == "ababababab"
    assert set(picks(r, 95)) == {"a"}
    assert FairQueue(r).pick(5.0).run_id is None
    assert not r.exists(keys.FAIR_RING, keys.fair_queue("a"), keys.fair_queue("b"))


def test_weights_three_to_one(streams: Streams, r: redis.Redis) -> None:
    accept(streams, "a", 60, weight=3)
    accept(streams, "b", 60, weight=1)
    order = picks(r, 40)
    assert "".join(order[:8]) == "aaabaaab"
    assert Counter(order) == {"a": 30, "b": 10}


def test_each_tenants_runs_are_picked_in_the_order_accepted(
    streams: Streams, r: redis.Redis
) -> None:
    a_runs = accept(streams, "a", 6, weight=2)
    b_runs = accept(streams, "b", 3)
    fair = FairQueue(r)
    picked = [fair.pick(5.0).run_id for _ in range(9)]
    assert [run for run in picked if run in a_runs] == a_runs
    assert [run for run in picked if run in b_runs] == b_runs


def test_the_script_picks_what_the_python_model_picks(streams: Streams, r: redis.Redis) -> None:
    chooser = random.Random(7)
    model = DeficitRoundRobin()
    weights = {"a": 1, "b": 2, "c": 5, "d": 1}
    fair = FairQueue(r)
    for _ in range(150):
        if chooser.random() < 0.55:
            tenant = chooser.choice(list(weights))
            [run_id] = accept(streams, tenant, 1, weights[tenant])
            model.push(tenant, run_id, weights[tenant])
        else:
            assert fair.pick(5.0).run_id == model.pick()
    while (expected := model.pick()) is not None:
        assert fair.pick(5.0).run_id == expected
    assert fair.pick(5.0).run_id is None


def test_a_pick_leases_the_run_and_the_claim_takes_the_lease_over(
    streams: Streams, r: redis.Redis, runs: RunStore
) -> None:
    [run_id] = accept(streams, "a", 1)
    assert FairQueue(r).pick(5.0).run_id == run_id
    fields = r.hmget(keys.run(run_id), "status", "step", "lease", "attempt")
    assert fields[:2] == [b"queued", b"0"] and fields[3] == b"0"
    assert r.zscore(keys.run_leases(keys.tenant_of_run(run_id)), run_id) == pytest.approx(
        float(fields[2] or 0)
    )
    run = runs.claim(run_id, 0)
    assert run is not None and run.attempt == 1
    assert r.hget(keys.run(run_id), "status") == b"running"
    # A pick that is claimed at once is never redelivered.
    assert sweep_expired_leases(runs) == 0


def test_a_worker_that_dies_between_pick_and_claim_loses_nothing(
    streams: Streams, r: redis.Redis, runs: RunStore
) -> None:
    [run_id] = accept(streams, "a", 1)
    r.delete(keys.celery_queue(RUNS_QUEUE))  # the ticket: taken by the worker that dies
    assert FairQueue(r).pick(0.0).run_id == run_id  # then it dies: its lease runs out
    assert sweep_expired_leases(runs) == 1
    assert r.hmget(keys.run(run_id), "status", "redeliveries") == [b"queued", b"1"]
    [(args, headers)] = queued_steps(r)
    assert (args, headers["task"]) == ([run_id, 0], RUN_STEP_TASK)
    assert sweep_expired_leases(runs) == 0  # once, however many sweeps
    execute_step(runs, *args)  # the redelivered step, as a worker runs it
    [done] = of_kind(log_events(r, "room-a", tenant="a"), "reply.done")
    assert (done["data"]["status"], done["data"]["text"]) == ("ok", "hi")


def test_picks_that_keep_dying_end_the_run(
    streams: Streams, r: redis.Redis, runs: RunStore
) -> None:
    [run_id] = accept(streams, "a", 1)
    assert FairQueue(r).pick(0.0).run_id == run_id
    dead = RunStore(r, lease_s=0.0)
    for _ in range(MAX_REDELIVERIES):
        assert sweep_expired_leases(runs) == 1
        assert dead.claim(run_id, 0) is not None  # the redelivered step's worker dies too
    assert sweep_expired_leases(runs) == 0
    [done] = of_kind(log_events(r, "room-a", tenant="a"), "reply.done")
    assert done["data"]["detail"] == {"reason": "worker_lost"}


def test_finished_and_overdue_runs_are_skipped(
    streams: Streams, r: redis.Redis, runs: RunStore
) -> None:
    cancelled, overdue, live = accept(streams, "a", 3)
    assert runs.finalize(cancelled, "cancelled", {"reason": "cancelled by client"})
    r.hset(keys.run(overdue), "deadline", "1.000")
    pick = FairQueue(r).pick(5.0)
    assert (pick.run_id, pick.skipped) == (live, 2)
    assert r.zscore(keys.run_leases(keys.tenant_of_run(overdue)), overdue) is None
    assert r.zscore(keys.run_leases(keys.tenant_of_run(cancelled)), cancelled) is None
    assert not r.exists(keys.FAIR_RING)


def test_every_run_has_a_ticket(streams: Streams, r: redis.Redis) -> None:
    accept(streams, "a", 7)
    accept(streams, "b", 3)
    tickets = r.llen(keys.celery_queue(RUNS_QUEUE))
    assert tickets == 10
    fair = FairQueue(r)
    assert len({fair.pick(5.0).run_id for _ in range(tickets)} - {None}) == 10
    # A spare ticket (a restored message, say) finds nothing and does nothing.
    assert fair.pick(5.0).run_id is None


def test_the_tenants_weight_goes_in_with_its_send(streams: Streams, r: redis.Redis) -> None:
    # The gateway passes the weight of the tenant's cached settings (TenantConfig.weight).
    frame = Send("m-1", "room", "echo", "hi", {}, None)
    streams.run(
        lambda store: store.accept_send("a", CLIENT, frame, agents.get_agent("echo"), weight=4)
    )
    assert r.hget(keys.fair_state("a"), "weight") == b"4"
    assert settings.SWITCHBOARD["FAIR_QUEUE"]


def test_a_picked_runs_retry_stays_with_the_run_and_queues_nothing(
    streams: Streams, r: redis.Redis, runs: RunStore
) -> None:
    [run_id] = accept(streams, "a", 1)
    r.hset(keys.run(run_id), "options", '{"fail": "error_once"}')
    r.delete(keys.celery_queue(RUNS_QUEUE))
    picked = FairQueue(r).pick(runs.lease_s)  # the ticket: picks the run
    assert picked.run_id == run_id
    # Its first call fails transiently; the runtime retries it after the backoff, in place:
    # no other ticket or message is queued for it.
    execute_step(runs, run_id, 0)
    assert queued_steps(r) == []
    [done] = of_kind(log_events(r, "room-a", tenant="a"), "reply.done")
    assert (done["data"]["status"], done["data"]["text"]) == ("ok", "hi")
