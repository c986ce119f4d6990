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

# Every Celery task and queue name of the project, defined here once: our scripts push
# messages naming them, orchestration/tasks.py and history/tasks.py register the tasks under
# them, project/celery.py declares and routes the queues.
RUNS_QUEUE = "switchboard.runs"
MAINTENANCE_QUEUE = "switchboard.maintenance"
# "Run this step of this run" (orchestration/steps.py).
RUN_STEP_TASK = "switchboard.run.step"
# A ticket: "run the first step of whichever queued run is fairly next" (fairness.py).
RUN_NEXT_TASK = "switchboard.run.next"
# "An agent's reply is done: start the agents subscribed to it" (orchestration/triggers.py).
TRIGGER_TASK = "switchboard.agents.trigger"
# "A client published an event: start the agents subscribed to it" (orchestration/triggers.py).
PUBLISHED_TRIGGER_TASK = "switchboard.agents.trigger_published"
# Maintenance, scheduled by beat: the run sweep and the conversation history's persister.
SWEEP_TASK = "switchboard.runs.sweep"
HISTORY_PERSIST_TASK = "switchboard.history.persist"
HISTORY_PURGE_TASK = "switchboard.history.purge"


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


# Through Celery itself (any broker), by task name: the tasks are registered by
# orchestration, which this package does not import. Celery applies the registered task's
# options and routes as it does for the task's own apply_async.


def _send(task_name: str, args: list[Any]) -> None:
    from celery import current_app

    current_app.send_task(task_name, args=args)


def enqueue_step(run_id: str, step: int) -> None:
    """Publish a run step through Celery itself (any broker)."""
    _send(RUN_STEP_TASK, [run_id, step])


def enqueue_ticket() -> None:
    """Publish one fair-queue ticket through Celery itself (any broker)."""
    _send(RUN_NEXT_TASK, [])


def enqueue_trigger(run_id: str, event_id: str) -> None:
    """Publish a subscription trigger through Celery itself (any broker)."""
    _send(TRIGGER_TASK, [run_id, event_id])


def enqueue_published_trigger(args: list[Any]) -> None:
    """Publish a published-event trigger through Celery itself (any broker)."""
    _send(PUBLISHED_TRIGGER_TASK, args)


# The task outbox (streams.keys.task_outbox): with a broker other than the streams' Redis, a
# script that writes work for a task records the task there, and it is published after.


def outbox_entry(task_name: str, args: list[Any]) -> str:
    """A task as the outbox holds it: JSON [task name, args, task id]; the id makes every
    entry distinct, and a republished task keeps it."""
    return orjson.dumps([task_name, args, str(uuid.uuid4())]).decode()


def publish_outbox_entry(entry: str | bytes) -> None:
    """Publish an outbox entry's task through Celery itself (any broker)."""
    from celery import current_app

    task_name, args, task_id = orjson.loads(entry)
    current_app.send_task(task_name, args=args, task_id=task_id)
