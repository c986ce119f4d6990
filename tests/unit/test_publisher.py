"""Publishing from an event loop with a broker other than the streams' Redis
(streams/enqueue.py BackgroundPublisher): never waits, stays bounded, and a failed publish
is logged and dropped (the work is in Redis, for the sweeper) instead of raised."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from streams.enqueue import RUN_STEP_TASK, BackgroundPublisher

ROOT = Path(__file__).resolve().parents[2]


class Broker:
    """A stand-in for Celery's send_task: records, can hang until released, can fail."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, list[Any]]] = []
        self.release = threading.Event()
        self.release.set()
        self.entered = threading.Event()
        self.failing = False

    def send(self, task_name: str, args: list[Any]) -> None:
        self.entered.set()
        self.release.wait(30)
        if self.failing:
            raise ConnectionError("broker down")
        self.sent.append((task_name, args))


def test_messages_are_published_in_order_by_the_thread() -> None:
    broker = Broker()
    publisher = BackgroundPublisher(broker.send, max_queued=10)
    for step in range(3):
        assert publisher.submit(RUN_STEP_TASK, ["r1.acme", step])
    assert publisher.flush(10)
    assert broker.sent == [(RUN_STEP_TASK, ["r1.acme", step]) for step in range(3)]
    assert (publisher.published, publisher.failed) == (3, 0)


def test_a_hung_broker_never_blocks_the_caller_and_the_queue_stays_bounded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = Broker()
    broker.release.clear()
    publisher = BackgroundPublisher(broker.send, max_queued=2)
    assert publisher.submit(RUN_STEP_TASK, ["r1.acme", 0])
    assert broker.entered.wait(10)  # the thread holds the first, stuck in the broker
    # Two fit behind it; the next ones are dropped at once, not waited for.
    assert publisher.submit(RUN_STEP_TASK, ["r2.acme", 0])
    assert publisher.submit(RUN_STEP_TASK, ["r3.acme", 0])
    with caplog.at_level(logging.WARNING, logger="streams.enqueue"):
        assert not publisher.submit(RUN_STEP_TASK, ["r4.acme", 0])
        assert not publisher.submit(RUN_STEP_TASK, ["r5.acme", 0])
    assert "publish queue full" in caplog.text and "left to the sweeper" in caplog.text
    broker.release.set()
    assert publisher.flush(10)
    assert [args[0] for _, args in broker.sent] == ["r1.acme", "r2.acme", "r3.acme"]
    assert publisher.failed == 2


def test_a_failed_publish_is_logged_and_what_follows_it_briefly_is_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = Broker()
    broker.failing = True
    publisher = BackgroundPublisher(broker.send, max_queued=10, pause_s=60)
    with caplog.at_level(logging.WARNING, logger="streams.enqueue"):
        publisher.submit(RUN_STEP_TASK, ["r1.acme", 0])
        publisher.submit(RUN_STEP_TASK, ["r2.acme", 0])
        assert publisher.flush(10)
    assert "publish failed" in caplog.text and "r1.acme" in caplog.text
    # The second was not tried against a broker that just failed: dropped, for the sweeper.
    assert "broker failed a moment ago" in caplog.text
    assert (publisher.published, publisher.failed) == (0, 2)


def test_after_the_pause_the_broker_is_tried_again() -> None:
    broker = Broker()
    broker.failing = True
    publisher = BackgroundPublisher(broker.send, max_queued=10, pause_s=0)
    publisher.submit(RUN_STEP_TASK, ["r1.acme", 0])
    assert publisher.flush(10)
    broker.failing = False
    publisher.submit(RUN_STEP_TASK, ["r2.acme", 0])
    assert publisher.flush(10)
    assert broker.sent == [(RUN_STEP_TASK, ["r2.acme", 0])]


def _settings_with_broker(url: str) -> dict[str, Any]:
    code = (
        "import json, django; django.setup(); from django.conf import settings as s; "
        "from project.celery import app; "
        "print(json.dumps([s.CELERY_BROKER_TRANSPORT_OPTIONS, s.CELERY_BROKER_HEARTBEAT, "
        "[q.queue_arguments for q in app.conf.task_queues]]))"
    )
    env = {
        **os.environ,
        "CELERY_BROKER_URL": url,
        "DJANGO_SETTINGS_MODULE": "project.settings",
        "CELERY_QUEUE_TYPE": "quorum" if url.startswith("amqp") else "classic",
    }
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    ).stdout
    options, heartbeat, arguments = json.loads(out.strip().splitlines()[-1])
    return {"options": options, "heartbeat": heartbeat, "arguments": arguments}


def test_an_amqp_broker_gets_publisher_confirms_and_none_of_the_redis_options() -> None:
    amqp = _settings_with_broker("amqp://guest:guest@127.0.0.1:5672/switchboard")
    assert amqp["options"] == {"confirm_publish": True}
    assert amqp["heartbeat"] > 0
    assert amqp["arguments"] == [{"x-queue-type": "quorum"}] * 2
    redis = _settings_with_broker("redis://127.0.0.1:6379/0")
    assert "confirm_publish" not in redis["options"]
    assert redis["options"]["visibility_timeout"] > 0
    assert redis["arguments"] == [None, None]
