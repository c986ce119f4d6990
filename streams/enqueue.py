"""Celery task messages written by our own Lua scripts, atomically with the data they act on.

A `send` is acknowledged only once its message event, its run record and its first task are
in Redis together (see streams/lua/accept_send.lua); publishing through kombu after the
append would leave a window where a gateway crash loses an accepted run, and costs the
gateway's event loop about a millisecond per message. This builds the same Celery protocol 2
message kombu's Redis transport would LPUSH; tests/test_enqueue.py compares the two field by
field, so a kombu upgrade that changes the format fails the suite rather than production.
"""

from __future__ import annotations

import atexit
import base64
import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import orjson

logger = logging.getLogger(__name__)

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

# A broker that takes a message but never confirms it (RabbitMQ under memory or disk alarm
# blocks publishers) fails the publish after this instead of holding the caller.
CONFIRM_TIMEOUT_S = 5.0


def _send(task_name: str, args: list[Any]) -> None:
    from celery import current_app

    current_app.send_task(task_name, args=args, confirm_timeout=CONFIRM_TIMEOUT_S)


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


# --- Publishing from an event loop ---------------------------------------------------------
#
# With a broker other than the streams' Redis, what an event loop (a gateway's, a worker's
# model-call runtime) wrote to Redis is the outbox and its Celery message only a wake-up, so
# the loop must neither wait for the broker nor depend on it: it hands the message to one
# publishing thread per process through a bounded queue and goes on (the client's ack is
# sent once Redis took the write). A publish that fails (broker down, unconfirmed), or
# finds the queue full, is logged and dropped: the work is in Redis, and the sweeper
# publishes wake-ups for queued work left unclaimed past a grace (docs/guarantees.md).

# Messages waiting for the publishing thread at most: a broker that stalls costs this much
# memory and no more; past it messages are dropped to the sweeper.
PUBLISH_QUEUE_MAX = 10_000
# After a failed publish the thread drops what it takes for this long instead of trying
# each (each try can take several connection timeouts): the queue drains while the broker
# is away, and the first publish after the pause tries again.
PUBLISH_PAUSE_S = 2.0
# A drop is logged once per this many seconds, with the count since the last log.
DROP_LOG_EVERY_S = 10.0


class BackgroundPublisher:
    """One thread publishing Celery messages handed to it without waiting (`submit`)."""

    def __init__(
        self,
        send: Callable[[str, list[Any]], None] = _send,
        max_queued: int = PUBLISH_QUEUE_MAX,
        pause_s: float = PUBLISH_PAUSE_S,
    ) -> None:
        self._send = send
        self._max_queued = max_queued
        self._pause_s = pause_s
        self._queue: queue.Queue[tuple[str, list[Any]]] = queue.Queue(max_queued)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._paused_until = 0.0
        self._dropped = 0  # since the last drop log
        self._drop_logged_at = 0.0
        self.published = 0
        self.failed = 0  # tried and failed, or dropped during a pause or on a full queue

    def submit(self, task_name: str, args: list[Any]) -> bool:
        """Queue a message for the publishing thread; False (logged, left to the sweeper)
        when the queue is full. Never blocks."""
        self._ensure_thread()
        try:
            self._queue.put_nowait((task_name, args))
        except queue.Full:
            self._drop(task_name, args, "publish queue full")
            return False
        return True

    @property
    def started(self) -> bool:
        """Whether this process has submitted anything (its thread runs)."""
        return self._thread is not None and self._pid == os.getpid()

    def flush(self, timeout_s: float) -> bool:
        """Wait until every submitted message was published or dropped, at most
        `timeout_s`; True when the queue emptied."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._queue.unfinished_tasks == 0:
                return True
            time.sleep(0.01)
        return self._queue.unfinished_tasks == 0

    def _ensure_thread(self) -> None:
        if self._thread is not None and self._pid == os.getpid():
            return
        with self._lock:
            if self._pid != os.getpid():
                # A forked child (a prefork pool process): the parent's thread is not here.
                self._queue = queue.Queue(self._max_queued)
                self._thread = None
                self._pid = os.getpid()
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="celery-publisher", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        while True:
            task_name, args = self._queue.get()
            try:
                self._publish(task_name, args)
            finally:
                self._queue.task_done()

    def _publish(self, task_name: str, args: list[Any]) -> None:
        if time.monotonic() < self._paused_until:
            self._drop(task_name, args, "broker failed a moment ago")
            return
        try:
            self._send(task_name, args)
        except Exception:
            self._paused_until = time.monotonic() + self._pause_s
            self.failed += 1
            logger.warning(
                "publish failed; the work is in Redis and left to the sweeper task=%s args=%s",
                task_name,
                args,
                exc_info=True,
            )
        else:
            self.published += 1

    def _drop(self, task_name: str, args: list[Any], why: str) -> None:
        self.failed += 1
        self._dropped += 1
        now = time.monotonic()
        if now - self._drop_logged_at >= DROP_LOG_EVERY_S:
            logger.warning(
                "publish dropped (%s); left to the sweeper: %s since the last such log, "
                "latest task=%s args=%s",
                why,
                self._dropped,
                task_name,
                args,
            )
            self._drop_logged_at = now
            self._dropped = 0


_publisher = BackgroundPublisher()
# DRAIN_FLUSH_S: a process that exits cleanly (a gateway or worker drained for a deploy)
# first gives what it handed over a moment to reach the broker; past it, the sweeper.
DRAIN_FLUSH_S = 3.0


@atexit.register
def _flush_at_exit() -> None:
    if _publisher.started:
        _publisher.flush(DRAIN_FLUSH_S)


def publisher() -> BackgroundPublisher:
    """This process's publishing thread."""
    return _publisher


def publish_soon(task_name: str, args: list[Any]) -> bool:
    """Publish a task from an event loop without waiting (see BackgroundPublisher)."""
    return _publisher.submit(task_name, args)


def enqueue_step_soon(run_id: str, step: int) -> None:
    """`enqueue_step` from an event loop: queued for the publishing thread."""
    publish_soon(RUN_STEP_TASK, [run_id, step])


def enqueue_ticket_soon() -> None:
    """`enqueue_ticket` from an event loop: queued for the publishing thread."""
    publish_soon(RUN_NEXT_TASK, [])


def enqueue_trigger_soon(run_id: str, event_id: str) -> None:
    """`enqueue_trigger` from an event loop: queued for the publishing thread."""
    publish_soon(TRIGGER_TASK, [run_id, event_id])


def enqueue_published_trigger_soon(args: list[Any]) -> None:
    """`enqueue_published_trigger` from an event loop: queued for the publishing thread."""
    publish_soon(PUBLISHED_TRIGGER_TASK, args)


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
