"""No queued run without a ticket: the sweeper reconciles fair queues against tickets.

Each run waiting in a tenant's fair queue (streams/fairness.py) is owed one ticket, a
`switchboard.run.next` message in the runs queue; the worker that takes a ticket picks the
fairly-next run. Tickets are interchangeable, so what must hold is a count: tickets not yet
spent >= runs queued. A ticket can be lost without its run: a task that took it and then
failed on a dead Redis connection (a Redis restart under load) is acknowledged, or a worker
dies between kombu's BRPOP and its bookkeeping. Its run would then wait, with a worker idle,
until its deadline ends it `failed`.

So every sweep (orchestration/sweeping.py sweep_runs, by beat and every gateway) counts, in
one read-only script:

- the runs queued: the lengths of the fair queues of the tenants in the ring;
- the tickets waiting in the runs queue's lists (one per kombu priority);
- the tickets a worker reserved in the last TICKET_PICK_GRACE_S, from kombu's `unacked`
  hash and its `unacked_index` (delivery tag -> delivery time): such a ticket may not have
  picked its run yet. An older one has either picked its run already (a late ack holds it
  there for the whole first step) or belongs to a worker that died and comes back only
  after the visibility timeout, too late to count on;

and enqueues the difference (`missing_tickets`). A spare ticket is harmless: the pick finds
no run and does nothing. Spares stay bounded: a sweep adds tickets only while fewer are
counted than runs are queued, tickets leave with the runs they pick, and only one
reconciliation runs per SWEEP_INTERVAL_S across all sweepers (a lock with that TTL), so two
sweepers never add the same tickets twice; the surplus at any time is at most the tickets
workers reserved more than the grace ago without starting them (their prefetch) plus those
in flight between BRPOP and kombu's bookkeeping. Each sweep adds at most
MAX_TICKETS_PER_SWEEP.

The count reads the broker's own keys, so it needs the broker to be the streams' Redis
database (the default). With another broker (RabbitMQ, or another Redis) the queue cannot
be read beside the fair queues and reconciliation is skipped: a lost ticket's run then ends
at its deadline, as before.
"""

from __future__ import annotations

import logging
import time

import redis
from kombu.transport.redis import PRIORITY_STEPS, Channel

from project.conf import conf
from streams import keys, scripts
from streams.enqueue import RUN_NEXT_TASK, RUNS_QUEUE, celery_message

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

_skipped_logged = False


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


def count_tickets(client: redis.Redis, now: float | None = None) -> tuple[int, int, int]:
    """(runs queued, tickets waiting, tickets reserved within the grace), in one script."""
    unacked, unacked_index = keys.celery_unacked()
    now = time.time() if now is None else now  # kombu scores deliveries with its host's clock
    return scripts.CountTickets(
        ring=keys.FAIR_RING,
        unacked=unacked,
        unacked_index=unacked_index,
        queue_lists=runs_queue_lists(),
        queue_prefix=keys.fair_queue(""),
        reserved_since=f"{now - TICKET_PICK_GRACE_S:.3f}",
        chunk=SCAN_CHUNK,
        marks=TICKET_MARKS,
    ).run(client)


def reconcile_tickets(client: redis.Redis) -> int:
    """Enqueue a ticket for each queued run that has none; returns how many were enqueued.
    At most once per SWEEP_INTERVAL_S across all sweepers; skipped (0) with a broker that
    is not the streams' Redis."""
    global _skipped_logged
    if not conf().broker_in_streams_redis:
        if not _skipped_logged:
            _skipped_logged = True
            logger.info("ticket reconciliation off: the Celery broker is not the streams' Redis")
        return 0
    interval_ms = max(1, int(conf().sweep_interval_s * 1000))
    if not client.set(keys.TICKETS_RECONCILED, "1", nx=True, px=interval_ms):
        return 0  # another sweeper reconciled within the interval
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
