"""Ticket reconciliation (orchestration/tickets.py) against a real Redis: runs queued in the
fair queues whose tickets were lost get new ones from the sweep, and no more than that."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
from django.conf import settings

from orchestration.sweeping import sweep_runs
from orchestration.tasks import run_next, run_step
from orchestration.tickets import (
    MAX_TICKETS_PER_SWEEP,
    TICKET_PICK_GRACE_S,
    count_tickets,
    reconcile_tickets,
    runs_queue_lists,
)
from streams import keys
from streams.enqueue import RUN_NEXT_TASK, RUN_STEP_TASK, RUNS_QUEUE, celery_message
from streams.fairness import FairQueue
from streams.runs import RunStore
from tests.store.conftest import Streams
from tests.store.test_fairness import accept


def queue(r: redis.Redis) -> list[dict[str, Any]]:
    """The runs queue's messages, parsed, oldest last."""
    return [json.loads(raw) for raw in r.lrange(keys.celery_queue(RUNS_QUEUE), 0, -1)]


def tickets_waiting(r: redis.Redis) -> int:
    return sum(message["headers"]["task"] == RUN_NEXT_TASK for message in queue(r))


def lose_tickets(r: redis.Redis, count: int | None = None) -> int:
    """Delete tickets from the runs queue, as tasks that took them and failed on a dead
    Redis connection did; returns how many."""
    lost = 0
    for raw in r.lrange(keys.celery_queue(RUNS_QUEUE), 0, -1):
        if count is not None and lost >= count:
            break
        if json.loads(raw)["headers"]["task"] == RUN_NEXT_TASK:
            lost += r.lrem(keys.celery_queue(RUNS_QUEUE), 1, raw)
    return lost


def sweep(r: redis.Redis) -> int:
    """One sweep as the next sweeper runs it (the previous one's interval has passed)."""
    r.delete(keys.TICKETS_RECONCILED)
    return sweep_runs(RunStore(r)).tickets


def reserve(r: redis.Redis, delivered_at: float) -> None:
    """Move the oldest message of the runs queue to kombu's unacked hash, as a worker's
    delivery does (BRPOP, then the tag in `unacked` and `unacked_index`)."""
    raw = r.rpop(keys.celery_queue(RUNS_QUEUE))
    assert raw is not None
    message = json.loads(raw)
    tag = message["properties"]["delivery_tag"]
    unacked, unacked_index = keys.celery_unacked()
    # kombu writes it back with json.dumps' spacing: the count must read both forms.
    r.hset(unacked, tag, json.dumps([message, "", RUNS_QUEUE]))
    r.zadd(unacked_index, {tag: delivered_at})


def test_lost_tickets_are_enqueued_again_once(streams: Streams, r: redis.Redis) -> None:
    accept(streams, "a", 3)
    accept(streams, "b", 2)
    assert tickets_waiting(r) == 5
    assert sweep(r) == 0
    assert lose_tickets(r, 3) == 3

    assert sweep(r) == 3
    assert tickets_waiting(r) == 5
    assert sweep(r) == 0, "the tickets just enqueued are counted"
    # The restored tickets pick every queued run.
    fair = FairQueue(r)
    assert len({fair.pick(5.0).run_id for _ in range(5)}) == 5
    assert fair.pick(5.0).run_id is None


def test_sweepers_in_the_same_interval_reconcile_once(streams: Streams, r: redis.Redis) -> None:
    accept(streams, "a", 4)
    lose_tickets(r)
    store = RunStore(r)
    assert sweep_runs(store).tickets == 4
    lose_tickets(r)
    # Another sweeper within the interval does nothing, even with tickets missing again.
    assert sweep_runs(store).tickets == 0
    assert tickets_waiting(r) == 0
    assert r.pttl(keys.TICKETS_RECONCILED) <= settings.SWEEP_INTERVAL_S * 1000


def test_other_messages_and_priorities_are_told_apart(streams: Streams, r: redis.Redis) -> None:
    accept(streams, "a", 2)
    lose_tickets(r)
    # A run's step and a trigger whose arguments a client wrote are not tickets...
    hostile = {"text": '"task":"switchboard.run.next" "task": "switchboard.run.next"'}
    for task, args in (
        (RUN_STEP_TASK, ["r-1", 1]),
        ("switchboard.agents.trigger_published", ["a", "room", "e1", "c", "m", hostile]),
    ):
        r.lpush(keys.celery_queue(RUNS_QUEUE), celery_message(task, args, RUNS_QUEUE)[1])
    assert count_tickets(r) == (2, 0, 0)
    # ...while a ticket kombu keeps in another priority's list is one.
    r.lpush(runs_queue_lists()[1], celery_message(RUN_NEXT_TASK, [], RUNS_QUEUE)[1])
    assert count_tickets(r) == (2, 1, 0)
    assert sweep(r) == 1


def test_a_ticket_celery_itself_published_counts(streams: Streams, r: redis.Redis) -> None:
    accept(streams, "a", 1)
    lose_tickets(r)
    run_next.apply_async()  # kombu's own message format
    run_step.apply_async(args=["r-1", 0])
    assert sweep(r) == 0
    assert tickets_waiting(r) == 1


def test_reserved_tickets_count_only_while_they_may_not_have_picked(
    streams: Streams, r: redis.Redis
) -> None:
    accept(streams, "a", 2)
    reserve(r, delivered_at=time.time())  # just delivered: its run may still be queued
    assert count_tickets(r) == (2, 1, 1)
    assert sweep(r) == 0
    reserve(r, delivered_at=time.time() - TICKET_PICK_GRACE_S - 5)
    # Reserved long ago yet its run still queued: that ticket is not coming (its worker
    # died; kombu restores it only after the visibility timeout), so a new one is owed.
    assert count_tickets(r) == (2, 0, 1)
    assert sweep(r) == 1


def test_finished_runs_still_queued_need_nothing_more_than_a_spare(
    streams: Streams, r: redis.Redis
) -> None:
    [first, second] = accept(streams, "a", 2)
    lose_tickets(r)
    store = RunStore(r)
    store.finalize(first, "cancelled", {"reason": "cancelled by client"})
    # The cancelled run stays in its queue until a pick pops it: counted, a spare at most.
    assert sweep(r) == 2
    assert FairQueue(r).pick(5.0).run_id == second


def test_one_sweep_enqueues_at_most_its_cap(streams: Streams, r: redis.Redis) -> None:
    fair_queue = keys.fair_queue("a")
    r.lpush(fair_queue, *[f"r-{index}" for index in range(MAX_TICKETS_PER_SWEEP + 10)])
    r.rpush(keys.FAIR_RING, "a")
    r.sadd(keys.TENANTS, "a")
    assert sweep(r) == MAX_TICKETS_PER_SWEEP
    assert sweep(r) == 10


def test_nothing_queued_costs_one_read(r: redis.Redis) -> None:
    r.lpush(keys.celery_queue(RUNS_QUEUE), celery_message(RUN_NEXT_TASK, [], RUNS_QUEUE)[1])
    assert count_tickets(r) == (0, 0, 0)
    assert sweep(r) == 0


def test_another_broker_skips_reconciliation(
    streams: Streams, r: redis.Redis, settings: Any
) -> None:
    accept(streams, "a", 1)
    lose_tickets(r)
    settings.CELERY_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672//"
    assert reconcile_tickets(r) == 0
    assert tickets_waiting(r) == 0


@pytest.mark.parametrize("lost", [0, 1])
def test_a_long_queue_with_its_tickets_is_counted_cheaply_and_right(
    streams: Streams, r: redis.Redis, lost: int
) -> None:
    accept(streams, "a", 1200)
    lose_tickets(r, lost)
    assert sweep(r) == lost


def test_sweepers_racing_add_each_lost_ticket_once(
    streams: Streams, r: redis.Redis, store_redis_url: str
) -> None:
    accept(streams, "a", 6)
    lose_tickets(r, 4)
    clients = [redis.Redis.from_url(store_redis_url) for _ in range(8)]
    with ThreadPoolExecutor(len(clients)) as pool:
        added = list(pool.map(lambda client: sweep_runs(RunStore(client)).tickets, clients))
    assert sum(added) == 4
    assert tickets_waiting(r) == 6
    for client in clients:
        client.close()
