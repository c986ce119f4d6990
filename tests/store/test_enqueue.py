"""The Celery message our Lua scripts push (streams/enqueue.py) against Celery itself.

The gateway writes a run's first task message without kombu, so nothing else would notice
a kombu or Celery upgrade that changes the message format. These tests compare it, field by
field, with what kombu pushes for the same task into the same Redis, and hand it to Celery's
own worker-side decoding and execution.
"""

from __future__ import annotations

import ast
import base64
import copy
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery.worker.request import Request
from pytest_django.fixtures import Settings

from orchestration import dispatch
from orchestration.tasks import (
    run_next,
    run_step,
    trigger_published_subscribers,
    trigger_subscribers,
)
from project.celery import app as celery_app
from streams import keys, redis_clients
from streams.enqueue import (
    RUN_NEXT_TASK,
    RUN_STEP_TASK,
    RUNS_QUEUE,
    celery_message,
    enqueue_published_trigger,
    enqueue_step,
    enqueue_ticket,
    enqueue_trigger,
)
from streams.events import new_run_id
from streams.runs import RunStore
from tests.store.conftest import Streams, log_events, of_kind
from workers import runtime

# Differ per message or per process by design; everything else must be identical.
VOLATILE_HEADERS = {"id", "root_id", "origin", "argsrepr", "ignore_result"}
VOLATILE_PROPERTIES = {"correlation_id", "delivery_tag", "reply_to"}
EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def body_of(message: dict[str, Any]) -> Any:
    assert message["properties"]["body_encoding"] == "base64"
    return json.loads(base64.b64decode(message["body"]))


def comparable(message: dict[str, Any]) -> dict[str, Any]:
    message = copy.deepcopy(message)
    message.pop("body")  # compared decoded: JSON whitespace is not the format
    for name in VOLATILE_HEADERS:
        message["headers"].pop(name)
    for name in VOLATILE_PROPERTIES:
        message["properties"].pop(name)
    return message


def pop_queued(r: redis.Redis) -> dict[str, Any]:
    queue = keys.celery_queue(RUNS_QUEUE)
    assert r.llen(queue) == 1
    raw = r.rpop(queue)
    assert raw is not None
    return json.loads(raw)


def kombu_message(
    r: redis.Redis, url: str, args: list[Any], task: str = RUN_STEP_TASK
) -> dict[str, Any]:
    """What Celery and kombu themselves push for this task onto this queue."""
    with celery_app.connection_for_write(url) as connection:
        celery_app.send_task(task, args=args, queue=RUNS_QUEUE, connection=connection)
    return pop_queued(r)


def assert_same_format(ours: dict[str, Any], theirs: dict[str, Any], args: list[Any]) -> None:
    assert body_of(ours) == body_of(theirs) == [args, {}, EMBED]
    # Celery copies a registered task's own limits into the message; ours leaves them to
    # the worker, which then applies the same task limits (see the execution test below).
    assert ours["headers"].pop("timelimit") == [None, None]
    assert theirs["headers"].pop("timelimit") in (
        [None, None],
        [run_step.time_limit, run_step.soft_time_limit],
    )
    for message in (ours, theirs):
        headers = message["headers"]
        assert headers["id"] == headers["root_id"] == message["properties"]["correlation_id"]
        # Celery writes no arguments as "()", ours as "[]": both read back as none.
        assert list(ast.literal_eval(headers["argsrepr"])) == args
    ours, theirs = comparable(ours), comparable(theirs)
    # Section by section, so a failure names the header or property that changed.
    assert ours.pop("headers") == theirs.pop("headers")
    assert ours.pop("properties") == theirs.pop("properties")
    assert ours == theirs


@pytest.fixture
def worker_runtime() -> Iterator[None]:
    """A task executed here hands its step to this process's model-call runtime, as in a
    worker; the runtime is stopped after the test and the next one builds its own."""
    yield
    side = dispatch._side
    if side is not None:
        side.runtime.stop()
    dispatch._side = None
    runtime.reset_after_fork()
    redis_clients.reset_after_fork()


def reply_done(r: redis.Redis, stream: str = "room") -> dict[str, Any]:
    """The run's reply.done, waited for: the task returns once its step is claimed, and
    the step goes on on the runtime's loop."""
    deadline = time.monotonic() + 10
    while not (dones := of_kind(log_events(r, stream), "reply.done")):
        assert time.monotonic() < deadline, "the step never finished"
        time.sleep(0.01)
    [done] = dones
    return done


def test_celery_message_matches_kombus(r: redis.Redis, store_redis_url: str) -> None:
    args = [new_run_id("acme"), 0]
    task_id, text = celery_message(RUN_STEP_TASK, args, RUNS_QUEUE)
    ours = json.loads(text)
    assert ours["headers"]["id"] == task_id
    assert ours["headers"]["ignore_result"] is True  # results are never read
    assert_same_format(ours, kombu_message(r, store_redis_url, args), args)


@pytest.mark.parametrize("fair", [True, False], ids=["ticket", "step"])
def test_message_pushed_with_an_accepted_send_matches_kombus(
    streams: Streams,
    r: redis.Redis,
    store_redis_url: str,
    settings: Settings,
    fair: bool,
) -> None:
    settings.SWITCHBOARD = {**settings.SWITCHBOARD, "FAIR_QUEUE": fair}
    appended = streams.send("room", "m-1", "hello")
    ours = pop_queued(r)
    args: list[Any] = [] if fair else [appended.run_id, 0]
    task = RUN_NEXT_TASK if fair else RUN_STEP_TASK
    assert ours["headers"]["task"] == task
    assert_same_format(ours, kombu_message(r, store_redis_url, args, task), args)


@pytest.mark.parametrize("args", [["r1", 0], ['r"quoted\\', 12], ["ré🎉", 1]])
def test_argsrepr_reads_back_as_the_args(args: list[Any]) -> None:
    _, text = celery_message(RUN_STEP_TASK, args, RUNS_QUEUE)
    message = json.loads(text)
    assert ast.literal_eval(message["headers"]["argsrepr"]) == args
    assert body_of(message)[0] == args


class RecordingPool:
    """Stands in for Celery's worker pool: records what the request asks it to run."""

    soft_timeout: float | None = None
    timeout: float | None = None

    def apply_async(self, target: Any, **options: Any) -> None:
        self.soft_timeout = options["soft_timeout"]
        self.timeout = options["timeout"]


@pytest.mark.parametrize("fair", [True, False], ids=["ticket", "step"])
def test_celery_worker_decodes_and_runs_the_pushed_message(
    streams: Streams,
    r: redis.Redis,
    store_redis_url: str,
    settings: Settings,
    worker_runtime: None,
    fair: bool,
) -> None:
    settings.SWITCHBOARD = {**settings.SWITCHBOARD, "FAIR_QUEUE": fair}
    appended = streams.send("room", "m-1", 'héllo "wörld" 🎉', options={"chunks": 3})
    assert appended.run_id is not None
    # Taken off the queue by kombu's Redis transport, as a worker's consumer takes it.
    with celery_app.connection_for_read(store_redis_url) as connection:
        message = connection.default_channel.basic_get(RUNS_QUEUE, no_ack=True)
    assert message is not None
    args: list[Any] = [] if fair else [appended.run_id, 0]
    task, name = (run_next, RUN_NEXT_TASK) if fair else (run_step, RUN_STEP_TASK)
    assert message.decode() == [args, {}, EMBED]
    assert message.headers["task"] == name

    # The worker's request object parses protocol 2 exactly as for a kombu-sent message.
    request = Request(message, app=celery_app, task=task)
    assert (request.name, request.args, request.kwargs) == (name, args, {})
    assert request.id == message.headers["id"]
    assert request.delivery_info["routing_key"] == RUNS_QUEUE
    assert request.request_dict["retries"] == 0

    # Handed to a pool, it runs under the task's own soft and hard limits.
    pool = RecordingPool()
    request.execute_using_pool(pool)
    assert (pool.soft_timeout, pool.timeout) == (task.soft_time_limit, task.time_limit)
    assert pool.soft_timeout is not None and pool.timeout is not None

    # And executes it through Celery's tracer: the run streams and completes.
    request.execute()
    done = reply_done(r)
    events = log_events(r, "room")
    assert done["data"]["status"] == "ok"
    assert done["data"]["text"] == 'héllo "wörld" 🎉'
    # Three pieces at once: the first is appended on its own, the other two coalesced.
    deltas = [event["data"]["text"] for event in of_kind(events, "reply.delta")]
    assert len(deltas) == 2 and "".join(deltas) == 'héllo "wörld" 🎉'


def test_a_redelivered_step_message_carries_its_retries_to_celery(
    streams: Streams, r: redis.Redis, store_redis_url: str, worker_runtime: None
) -> None:
    appended = streams.send("room", "m-1", "again", options={"chunks": 2})
    assert appended.run_id is not None
    r.delete(keys.celery_queue(RUNS_QUEUE))
    lost = RunStore(r, lease_s=0.0).claim(appended.run_id, 0, retries=2)  # a dead worker's
    assert lost is not None
    assert RunStore(r).redeliver(appended.run_id).outcome == "redelivered"
    with celery_app.connection_for_read(store_redis_url) as connection:
        message = connection.default_channel.basic_get(RUNS_QUEUE, no_ack=True)
    assert message is not None
    request = Request(message, app=celery_app, task=run_step)
    assert (request.name, request.args) == (RUN_STEP_TASK, [appended.run_id, 0])
    assert request.request_dict["retries"] == 2
    request.execute()
    done = reply_done(r)
    assert (done["data"]["status"], done["data"]["text"]) == ("ok", "again")


@pytest.mark.parametrize(
    ("publish", "task", "args"),
    [
        (lambda: enqueue_step("run-1", 2), run_step, ["run-1", 2]),
        (enqueue_ticket, run_next, []),
        (lambda: enqueue_trigger("run-1", "event-1"), trigger_subscribers, ["run-1", "event-1"]),
        (
            lambda: enqueue_published_trigger(["acme", "room", "event-1", "bob", "p-1", {}]),
            trigger_published_subscribers,
            ["acme", "room", "event-1", "bob", "p-1", {}],
        ),
    ],
)
def test_publishing_by_task_name_queues_what_the_task_itself_would(
    r: redis.Redis, store_redis_url: str, publish: Any, task: Any, args: list[Any]
) -> None:
    # With another broker than the streams' Redis, streams/enqueue.py publishes through
    # Celery by name (it does not import orchestration): the same message, on the same
    # queue, with the same options as the registered task's own apply_async.
    publish()
    by_name = pop_queued(r)
    task.apply_async(args=args)
    own = pop_queued(r)
    assert by_name["headers"]["task"] == own["headers"]["task"] == task.name
    assert body_of(by_name) == body_of(own) == [args, {}, EMBED]
    assert comparable(by_name) == comparable(own)
