"""What makes the data plane run on a Redis Cluster, checked on the single Redis: every
script call stays in one hash slot, the fair ring's split calls cannot strand a queued run,
and with a broker other than the streams' Redis whatever was written is eventually
started (the outbox: wake-up tickets and publish leases)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import redis

from agents import Agent, Step
from orchestration.sweeping import sweep_expired_leases, sweep_runs
from orchestration.tickets import publish_stale_outbox, reconcile_tickets, wake_stale_runs
from streams import keys, scripts
from streams.fairness import FairQueue, join_call
from streams.runs import RunStore
from tests.store.conftest import Streams, execute_step
from tests.store.test_fairness import accept
from tests.store.test_leases import QUEUE, dead, field, started

AMQP = "amqp://guest:guest@127.0.0.1:5672//"


def test_a_cross_slot_call_is_refused_before_it_reaches_redis(r: redis.Redis) -> None:
    call = scripts.SaveOutput(run_key="x", owner="o", field="out.0", output="", fell_back="")
    assert call.keys() == ["x"]
    two = scripts.TakeTokens(buckets=["{a}b", "{b}b"], cost=1, limits=[1.0, 1, 1.0, 1])
    with pytest.raises(scripts.CrossSlot):
        two.run(r)
    # Celery's queue is exempt while it is in this Redis, and replaced when it is not.
    join = join_call("acme", 1, "")
    assert join.keys()[2] == keys.celery_queue("switchboard.runs")


def test_with_another_broker_celerys_keys_are_never_named(r: redis.Redis, settings: Any) -> None:
    settings.CELERY_BROKER_URL = AMQP
    join = join_call("acme", 1, "")
    assert join.keys() == [keys.FAIR_RING, keys.FAIR_EPOCHS, keys.FAIR_RING]


def test_every_key_of_a_run_shares_its_tenants_slot(streams: Streams, r: redis.Redis) -> None:
    [run_id] = accept(streams, "acme", 1)
    assert keys.tenant_of_run(run_id) == "acme"
    tagged = [
        keys.run(run_id),
        keys.run_text(run_id),
        keys.run_deadlines("acme"),
        keys.run_leases("acme"),
        keys.fair_queue("acme"),
        keys.fair_state("acme"),
        keys.history_outbox("acme"),
        keys.recent_problems("acme"),
        keys.stream_log("acme", "room"),
        keys.session("acme", "s1"),
        keys.rate_client("acme", "alice"),
        keys.stream_channel("acme", "room"),
    ]
    assert len({redis.crc.key_slot(key.encode()) for key in tagged}) == 1
    assert r.sismember(keys.TENANTS, "acme")


def test_a_send_racing_the_pick_that_emptied_the_queue_keeps_its_tenant_in_the_ring(
    streams: Streams, r: redis.Redis
) -> None:
    [first] = accept(streams, "a", 1)
    # A worker's pick, in its three calls: the head, then the tenant's pop...
    assert r.lindex(keys.FAIR_RING, 0) == b"a"
    popped = scripts.FairPop(
        fair_queue_key=keys.fair_queue("a"),
        fair_state_key=keys.fair_state("a"),
        leases_key=keys.run_leases("a"),
        run_prefix=keys.run_prefix("a"),
        lease_s=5.0,
    ).run(r)
    assert (popped.run_id, popped.live, popped.left) == (first, True, 0)
    # ...and before its settle, a send finds the queue empty and joins the ring again.
    [second] = accept(streams, "a", 1)
    settle = scripts.FairSettle(
        ring=keys.FAIR_RING,
        deficits=keys.FAIR_DEFICITS,
        epochs=keys.FAIR_EPOCHS,
        picked=keys.FAIR_PICKED,
        tenant="a",
        live=1,
        left=popped.left,
        epoch=popped.epoch,
        weight=popped.weight,
    )
    assert settle.run(r) is False  # the join's later epoch keeps the tenant in
    assert r.lrange(keys.FAIR_RING, 0, -1) == [b"a"]
    assert FairQueue(r).pick(5.0).run_id == second
    assert r.llen(keys.FAIR_RING) == 0


def test_a_sender_dying_before_the_join_is_repaired_by_the_sweep(
    streams: Streams, r: redis.Redis
) -> None:
    [run_id] = accept(streams, "a", 1)
    # As if the join never ran: the tenant's queue holds the run, the ring does not.
    r.delete(keys.FAIR_RING, keys.FAIR_EPOCHS)
    r.delete(keys.celery_queue("switchboard.runs"))
    assert FairQueue(r).pick(5.0).run_id is None
    r.delete(keys.TICKETS_RECONCILED)
    assert sweep_runs(RunStore(r)).tickets == 1  # the ring repaired, the ticket replaced
    assert r.lrange(keys.FAIR_RING, 0, -1) == [b"a"]
    assert FairQueue(r).pick(5.0).run_id == run_id


def test_with_another_broker_runs_left_waiting_get_wake_up_tickets(
    streams: Streams, r: redis.Redis, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    published: list[str] = []
    monkeypatch.setattr("orchestration.tickets.enqueue_ticket", lambda: published.append("t"))
    monkeypatch.setattr("orchestration.tickets.broker_ready_tickets", lambda: 0)
    monkeypatch.setattr("streams.log.enqueue_first_task", lambda run_id: None)  # a crash
    settings.CELERY_BROKER_URL = AMQP
    accept(streams, "a", 2)
    accept(streams, "b", 1)
    grace = settings.SWITCHBOARD["OUTBOX_GRACE_S"]
    now = float(r.hget(keys.run(accept(streams, "c", 1)[0]), "created") or 0)
    # Within the grace nothing is published: the publish after the script may be on its way.
    assert wake_stale_runs(r, now=now) == 0
    later = now + grace + 1
    assert wake_stale_runs(r, now=later) == 4
    # At most once per grace across sweepers, and never while workers are taking runs.
    assert wake_stale_runs(r, now=later) == 0
    r.delete(keys.TICKETS_WOKEN)
    r.set(keys.FAIR_PICKED, int(later))
    assert wake_stale_runs(r, now=later + 1) == 0
    assert len(published) == 4
    # A sweep with another broker wakes instead of counting kombu's keys.
    r.delete(keys.TICKETS_RECONCILED, keys.FAIR_PICKED, keys.TICKETS_WOKEN)
    monkeypatch.setattr("orchestration.tickets.broker_ready_tickets", lambda: 3)
    monkeypatch.setattr("orchestration.tickets.time.time", lambda: later)
    assert reconcile_tickets(r) == 1  # four stale runs, three tickets ready


def test_with_another_broker_a_handed_over_step_holds_a_publish_lease_until_it_is_out(
    streams: Streams,
    r: redis.Redis,
    settings: Any,
    monkeypatch: pytest.MonkeyPatch,
    register_agent: Callable[..., Agent],
) -> None:
    agent = register_agent("two", Step(backend="simulated"), Step(backend="simulated"))
    run_id = started(streams, agent=agent.name, chunks=2)
    r.delete(QUEUE)
    settings.CELERY_BROKER_URL = AMQP
    published: list[tuple[str, int]] = []
    monkeypatch.setattr(
        "streams.runs.enqueue_step", lambda run, step: published.append((run, step))
    )
    store = RunStore(r)
    execute_step(store, run_id, 0, 0)
    # Published, then the lease dropped: nothing for the sweep to publish again.
    assert published == [(run_id, 1)]
    assert field(r, run_id, "status") == "queued" and field(r, run_id, "lease") is None
    assert r.zscore(keys.run_leases("acme"), run_id) is None
    assert r.llen(QUEUE) == 0  # the broker is elsewhere: nothing pushed here


def test_with_another_broker_a_step_whose_publish_was_lost_is_published_again(
    streams: Streams, r: redis.Redis, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id = started(streams)
    settings.CELERY_BROKER_URL = AMQP
    settings.SWITCHBOARD = {**settings.SWITCHBOARD, "OUTBOX_GRACE_S": 0.0}
    published: list[tuple[str, int]] = []
    monkeypatch.setattr(
        "streams.runs.enqueue_step", lambda run, step: published.append((run, step))
    )
    run = dead(r).claim(run_id, 0)
    assert run is not None
    # The lost owner's step is redelivered: published after the script, lease dropped.
    assert sweep_expired_leases(RunStore(r)) == 1
    assert published == [(run_id, 0)]
    assert field(r, run_id, "status") == "queued" and field(r, run_id, "lease") is None
    # A publisher that died between the script and the publish leaves the publish lease;
    # once it runs out the lease sweep publishes the step again.
    handed = scripts.HandOver(
        run_key=keys.run(run_id),
        leases_key=keys.run_leases("acme"),
        queue_key=keys.run(run_id),
        owner=RunStore(r).claim(run_id, 0).owner,  # type: ignore[union-attr]
        run_id=run_id,
        message="",
        publish_lease_s=30.0,
    ).run(r)
    assert handed.done and handed.lease
    assert sweep_expired_leases(RunStore(r)) == 0  # the publisher may still be at it
    # Its lease runs out (set back rather than waited for).
    r.hset(keys.run(run_id), "lease", "1.000")
    r.zadd(keys.run_leases("acme"), {run_id: 1.0})
    assert sweep_expired_leases(RunStore(r)) == 1
    assert published == [(run_id, 0), (run_id, 0)]


def test_with_another_broker_a_trigger_left_in_the_outbox_is_published_by_the_sweep(
    streams: Streams, r: redis.Redis, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from streams.enqueue import TRIGGER_TASK, outbox_entry

    settings.CELERY_BROKER_URL = AMQP
    published: list[Any] = []
    monkeypatch.setattr(
        "orchestration.tickets.publish_outbox_entry", lambda entry: published.append(entry)
    )
    accept(streams, "acme", 1)  # registers the tenant
    entry = outbox_entry(TRIGGER_TASK, ["r" + "0" * 32 + ".acme", "e1"])
    written = float(r.time()[0])
    r.zadd(keys.task_outbox("acme"), {entry: written})
    grace = settings.SWITCHBOARD["OUTBOX_GRACE_S"]
    assert publish_stale_outbox(r, now=written) == 0  # its writer may still publish it
    assert publish_stale_outbox(r, now=written + grace + 1) == 1
    assert [json.loads(item) for item in published] == [json.loads(entry)]
    assert r.zcard(keys.task_outbox("acme")) == 0
