"""No queued run without a ticket: the sweeper reconciles fair queues against tickets.

Each run waiting in a tenant's fair queue (streams/fairness.py) is owed one ticket, a
`switchboard.run.next` message in the runs queue; the worker that takes a ticket picks the
fairly-next run. Tickets are interchangeable, so what must hold is a count: tickets not yet
spent >= runs queued. A ticket can be lost without its run: a task that took it and then
failed on a dead Redis connection (a Redis restart under load) is acknowledged, or a worker
dies between kombu's BRPOP and its bookkeeping. Its run would then wait, with a worker idle,
until its deadline ends it `failed`.

So every sweep (orchestration/sweeping.py sweep_runs, by beat and every gateway) counts:

- the runs queued: the lengths of the fair queues of the registered tenants (each in its
  tenant's slot, so counted tenant by tenant, before the tickets);
- the tickets waiting in the runs queue's lists (one per kombu priority);
- the tickets a worker reserved in the last TICKET_PICK_GRACE_S, from kombu's `unacked`
  hash and its `unacked_index` (delivery tag -> delivery time): such a ticket may not have
  picked its run yet. An older one has either picked its run already (a late ack holds it
  there for the whole first step) or belongs to a worker that died and comes back only
  after the visibility timeout, too late to count on (these two in one read-only script
  over kombu's keys);

and enqueues the difference (`missing_tickets`). A spare ticket is harmless: the pick finds
no run and does nothing. Spares stay bounded: a sweep adds tickets only while fewer are
counted than runs are queued, tickets leave with the runs they pick, and only one
reconciliation runs per SWEEP_INTERVAL_S across all sweepers (a lock with that TTL), so two
sweepers never add the same tickets twice; the surplus at any time is at most the tickets
workers reserved more than the grace ago without starting them (their prefetch) plus those
in flight between BRPOP and kombu's bookkeeping. Each sweep adds at most
MAX_TICKETS_PER_SWEEP.

A run counted queued before its ticket was counted can only make the difference too small
for one sweep (a ticket pushed in between is counted, its run not), never too large: a
ticket taken in between is still counted as reserved.

The same sweep puts back in the ring a tenant with queued runs that is missing from it
(its sender died between its script and the ring's FAIR_JOIN: streams/fairness.py).

The count reads the broker's own keys, so it needs the broker to be the streams' single
Redis database (the default). With another broker (RabbitMQ, or another Redis; always on a
Redis Cluster) the task is published after the script that wrote its work, and what is in
Redis is the outbox: tickets are only wake-ups, and `wake_stale_runs` publishes tickets for
runs queued longer than SWITCHBOARD_OUTBOX_GRACE_S while no pick took a run for as long, at
most as many as such runs, fewer by the tickets the broker says are ready. So a ticket lost
with a crashed publisher (or a broker outage) delays its run by about the grace, never past
it to its deadline. A spare ticket is harmless (the pick finds nothing). A step's message
is covered by its publish lease instead (streams/runs.py hand_over, redeliver), and a
subscriber's trigger by the tenant's task outbox (`publish_stale_outbox`).
"""

from __future__ import annotations

import json
import logging
import time

import redis
from kombu.transport.redis import PRIORITY_STEPS, Channel

from project.conf import conf
from streams import keys, scripts
from streams.enqueue import (
    RUN_NEXT_TASK,
    RUNS_QUEUE,
    celery_message,
    enqueue_ticket,
    publish_outbox_entry,
)
from streams.fairness import reconcile_ring as reconcile_ring_of
from streams.redis_clients import as_text
from streams.registry import tenants

logger = logging.getLogger(__name__)

# A reserved ticket younger than this may not have picked its run yet, so it still counts.
TICKET_PICK_GRACE_S = 5.0
# Tickets one sweep enqueues at most: a wrong count can only cost this many spare picks.
MAX_TICKETS_PER_SWEEP = 500
# Messages the count reads per LRANGE/HMGET inside the script.
SCAN_CHUNK = 500
# How a ticket's headers name its task, in the compact JSON our scripts push
# (streams/enqueue.py) and the spaced JSON kombu writes. Quotes inside a JSON string
# are escaped, so no argument text a client chose can contain either.
TICKET_MARKS = tuple(f'"task":{space}"{RUN_NEXT_TASK}"' for space in ("", " "))


def missing_tickets(
    queued: int, waiting: int, reserved: int, cap: int = MAX_TICKETS_PER_SWEEP
) -> int:
    """Tickets to enqueue so every queued run has one: the runs queued beyond the tickets
    counted (waiting in the queue, or reserved recently by a worker), at most `cap`."""
    return max(0, min(cap, queued - waiting - reserved))


def runs_queue_lists() -> list[str]:
    """The Redis lists kombu keeps the runs queue in: one per priority step (priority 0,
    every message we send, is the queue's own name)."""
    base = keys.celery_queue(RUNS_QUEUE)
    options = conf().broker_transport_options
    separator = options.get("sep", Channel.sep)
    steps = options.get("priority_steps", PRIORITY_STEPS)
    return [base if step == 0 else f"{base}{separator}{step}" for step in steps]


def queued_runs(client: redis.Redis) -> dict[str, int]:
    """Runs waiting in each registered tenant's fair queue (those with any)."""
    slugs = tenants(client)
    if not slugs:
        return {}
    with client.pipeline(transaction=False) as pipe:
        for slug in slugs:
            pipe.llen(keys.fair_queue(slug))
        depths = pipe.execute()
    return {slug: int(depth) for slug, depth in zip(slugs, depths, strict=True) if depth}


def count_tickets(client: redis.Redis, now: float | None = None) -> tuple[int, int, int]:
    """(runs queued, tickets waiting, tickets reserved within the grace): the runs first,
    tenant by tenant, then the tickets in one script over kombu's keys."""
    queued = sum(queued_runs(client).values())
    unacked, unacked_index = keys.celery_unacked()
    now = time.time() if now is None else now  # kombu scores deliveries with its host's clock
    waiting, reserved = scripts.CountTickets(
        unacked=unacked,
        unacked_index=unacked_index,
        queue_lists=runs_queue_lists(),
        queued=queued,
        reserved_since=f"{now - TICKET_PICK_GRACE_S:.3f}",
        chunk=SCAN_CHUNK,
        marks=TICKET_MARKS,
    ).run(client)
    return queued, waiting, reserved


def reconcile_ring(client: redis.Redis) -> int:
    """Put back in the ring every tenant with queued runs that is missing from it; returns
    how many were missing."""
    repaired = 0
    for slug in queued_runs(client):
        if reconcile_ring_of(client, slug):
            repaired += 1
            logger.warning("tenant with queued runs was missing from the fair ring tenant=%s", slug)
    return repaired


def reconcile_tickets(client: redis.Redis) -> int:
    """Enqueue a ticket for each queued run that has none (with another broker: publish
    wake-ups for runs left waiting, `wake_stale_runs`); returns how many were enqueued.
    At most once per SWEEP_INTERVAL_S across all sweepers."""
    interval_ms = max(1, int(conf().sweep_interval_s * 1000))
    if not client.set(keys.TICKETS_RECONCILED, "1", nx=True, px=interval_ms):
        return 0  # another sweeper reconciled within the interval
    reconcile_ring(client)
    if not conf().broker_in_streams_redis:
        publish_stale_outbox(client)
        return wake_stale_runs(client)
    queued, waiting, reserved = count_tickets(client)
    missing = missing_tickets(queued, waiting, reserved)
    if missing:
        # LPUSH like ACCEPT_SEND: behind the tickets already waiting (kombu BRPOPs the right).
        tickets = [celery_message(RUN_NEXT_TASK, [], RUNS_QUEUE)[1] for _ in range(missing)]
        client.lpush(keys.celery_queue(RUNS_QUEUE), *tickets)
        logger.warning(
            "queued runs without a ticket: enqueued %s tickets (queued=%s waiting=%s reserved=%s)",
            missing,
            queued,
            waiting,
            reserved,
        )
    return missing


def stale_runs(client: redis.Redis, now: float, grace_s: float) -> int:
    """Runs queued in the fair queues of tenants whose oldest queued run is older than
    `grace_s`: the runs a lost ticket may be keeping waiting."""
    stale = 0
    for slug in queued_runs(client):
        count, oldest = scripts.OldestQueued(
            fair_queue_key=keys.fair_queue(slug), run_prefix=keys.run_prefix(slug)
        ).run(client)
        if oldest is not None and now - oldest > grace_s:
            stale += count
    return stale


def broker_ready_tickets() -> int | None:
    """Messages ready in the runs queue, as the broker says (None when it cannot say)."""
    from celery import current_app

    try:
        with current_app.connection_for_write() as connection:
            declared = connection.default_channel.queue_declare(queue=RUNS_QUEUE, passive=True)
        return int(declared.message_count)
    except Exception:
        logger.info("could not read the runs queue's depth from the broker", exc_info=True)
        return None


def wake_stale_runs(client: redis.Redis, now: float | None = None) -> int:
    """With a broker other than the streams' Redis: publish wake-up tickets for runs queued
    longer than the outbox grace while no pick took a run for as long (their tickets were
    lost between the script and the publish); returns how many. At most once per grace
    across all sweepers."""
    grace_s = conf().outbox_grace_s
    now = time.time() if now is None else now
    picked = client.get(keys.FAIR_PICKED)
    if picked is not None and now - float(picked) < grace_s:
        return 0  # workers are taking runs: tickets are flowing
    stale = stale_runs(client, now, grace_s)
    if not stale:
        return 0
    if not client.set(keys.TICKETS_WOKEN, "1", nx=True, px=max(1, int(grace_s * 1000))):
        return 0  # another sweeper woke them within the grace
    ready = broker_ready_tickets() or 0
    missing = missing_tickets(stale, ready, 0)
    for _ in range(missing):
        enqueue_ticket()
    if missing:
        logger.warning(
            "runs waiting past the outbox grace: published %s wake-up tickets (stale=%s ready=%s)",
            missing,
            stale,
            ready,
        )
    return missing


# Outbox entries one sweep publishes at most per tenant.
OUTBOX_BATCH = 100


def publish_stale_outbox(client: redis.Redis, now: float | None = None) -> int:
    """Publish the tasks left in the tenants' task outboxes (streams.keys.task_outbox) past
    the outbox grace: their writer died between its script and its publish. Each is
    removed once published; a task published twice is harmless (a trigger starts its
    subscriber once per event). Returns how many."""
    grace_s = conf().outbox_grace_s
    now = time.time() if now is None else now
    published = 0
    for slug in tenants(client):
        outbox = keys.task_outbox(slug)
        for found in client.zrangebyscore(outbox, "-inf", now - grace_s, 0, OUTBOX_BATCH):
            entry = as_text(found)
            publish_outbox_entry(entry)
            client.zrem(outbox, entry)
            published += 1
    if published:
        logger.warning("tasks left in the outbox past its grace: published %s", published)
    return published


def _is_ticket(message: bytes | str) -> bool:
    text = message.decode(errors="replace") if isinstance(message, bytes) else message
    return any(mark in text for mark in TICKET_MARKS)


def run_messages_in_redis(client: redis.Redis) -> int:
    """Messages of the runs queue, other than tickets, that kombu holds in this single
    Redis (waiting, or delivered and not acknowledged): steps handed over, triggers. Zero
    when this Redis is not the broker. Tickets are left out: they are only wake-ups, and a
    deployment on another broker replaces lost ones (`wake_stale_runs`)."""
    found = 0
    for name in runs_queue_lists():
        for start in range(0, int(client.llen(name)), SCAN_CHUNK):
            chunk = client.lrange(name, start, start + SCAN_CHUNK - 1)
            found += sum(1 for message in chunk if not _is_ticket(message))
    unacked, _ = keys.celery_unacked()
    for _, entry in client.hscan_iter(unacked, count=SCAN_CHUNK):
        try:
            message, _exchange, routing_key = json.loads(entry)
            task = message["headers"]["task"]
        except (ValueError, TypeError, KeyError):
            continue  # not kombu's: not ours to judge
        if routing_key == RUNS_QUEUE and task != RUN_NEXT_TASK:
            found += 1
    return found
