"""Celery task messages written by our own Lua scripts, atomically with the data they act on.

A `send` is acknowledged only once its message event, its run record and its first task are
in Redis together (see streams/lua/accept_send.lua); publishing through kombu after the
append would leave a window where a gateway crash loses an accepted run, and costs the
gateway's event loop about a millisecond per message. This builds the same Celery protocol 2
message kombu's Redis transport would LPUSH; tests/test_enqueue.py compares the two field by
field, so a kombu upgrade that changes the format fails the suite rather than production.
"""

from __future__ import annotations

import base64
import os
import socket
import uuid
from typing import Any

import orjson

ORIGIN = f"gen{os.getpid()}@{socket.gethostname()}"
# A ticket: "run the first step of whichever queued run is fairly next" (fairness.py).
RUN_NEXT_TASK = "switchboard.run.next"
# "An agent's reply is done: start the agents subscribed to it" (triggers.py).
TRIGGER_TASK = "switchboard.agents.trigger"
# "A client published an event: start the agents subscribed to it" (triggers.py).
PUBLISHED_TRIGGER_TASK = "switchboard.agents.trigger_published"


def celery_message(
    task_name: str, args: list[Any], queue: str, retries: int = 0
) -> tuple[str, str]:
    """Return (task_id, message JSON) for a task with JSON args on a Redis-transport queue.

    `retries` is what the task sees as `request.retries`: a redelivered step keeps counting
    its model retries instead of starting the budget again.
    """
    task_id = str(uuid.uuid4())
    body = orjson.dumps(
        [args, {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    )
    message = {
        "body": base64.b64encode(body).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": task_name,
            "id": task_id,
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": retries,
            "timelimit": [None, None],
            "root_id": task_id,
            "parent_id": None,
            "argsrepr": repr(args),
            "kwargsrepr": "{}",
            "origin": ORIGIN,
            "ignore_result": True,
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
        },
        "properties": {
            "correlation_id": task_id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    return task_id, orjson.dumps(message).decode()


def broker_is_redis_at(broker_url: str, redis_url: str) -> bool:
    """True when Celery's broker is the very Redis database the streams live in."""
    return broker_url.rstrip("/") == redis_url.rstrip("/")


def enqueue_step(run_id: str, step: int) -> None:
    """Publish a run step through Celery itself (any broker)."""
    from orchestration.tasks import run_step

    run_step.apply_async(args=[run_id, step])


def enqueue_ticket() -> None:
    """Publish one fair-queue ticket through Celery itself (any broker)."""
    from orchestration.tasks import run_next

    run_next.apply_async()


def enqueue_trigger(run_id: str, event_id: str) -> None:
    """Publish a subscription trigger through Celery itself (any broker)."""
    from orchestration.tasks import trigger_subscribers

    trigger_subscribers.apply_async(args=[run_id, event_id])


def enqueue_published_trigger(args: list[Any]) -> None:
    """Publish a published-event trigger through Celery itself (any broker)."""
    from orchestration.tasks import trigger_published_subscribers

    trigger_published_subscribers.apply_async(args=args)
