"""ops/logcontext.py: ids bound in a context reach every record, in plain and JSON."""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import os
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

from ops import logcontext

T = TypeVar("T")


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.addFilter(logcontext.ContextFilter())

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def capture() -> Iterator[tuple[logging.Logger, Capture]]:
    logger = logging.getLogger("tests.logcontext")
    handler = Capture()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield logger, handler
    finally:
        logger.removeHandler(handler)


def fresh(work: Callable[[], T]) -> T:
    """Run in an empty context: ids another test bound in this thread do not count."""
    return contextvars.Context().run(work)


def ids_of(record: logging.LogRecord) -> dict[str, str]:
    return {name: getattr(record, name) for name in logcontext.FIELDS if hasattr(record, name)}


def test_a_record_logged_in_a_context_carries_its_ids(
    capture: tuple[logging.Logger, Capture],
) -> None:
    logger, handler = capture

    def work() -> None:
        logger.info("before")
        with logcontext.bound(tenant="acme", run="r1"):
            logcontext.update(event="e1")  # learnt inside the scope: reset with it
            logger.info("inside %s", "step")
        logger.info("after")

    fresh(work)
    before, inside, after = handler.records
    assert ids_of(before) == {} and before.log_context == ""
    assert ids_of(inside) == {"tenant": "acme", "run": "r1", "event": "e1"}
    assert inside.log_context == " [tenant=acme run=r1 event=e1]"
    assert ids_of(after) == {} and after.log_context == ""


def test_the_plain_format_shows_the_ids(capture: tuple[logging.Logger, Capture]) -> None:
    from django.conf import settings

    logger, handler = capture
    plain = settings.LOGGING["formatters"]["plain"]["format"]
    handler.setFormatter(logging.Formatter(plain.replace("%(asctime)s ", "")))

    def work() -> str:
        with logcontext.bound(tenant="acme", connection="c0ffee", client="alice"):
            logger.warning("slow consumer")
        return handler.format(handler.records[-1])

    pid = os.getpid()
    assert fresh(work) == (
        f"WARNING {pid} tests.logcontext: [tenant=acme connection=c0ffee client=alice] "
        "slow consumer"
    )
    # Without ids, the line is what it always was.
    fresh(lambda: logger.warning("plain"))
    assert handler.format(handler.records[-1]) == f"WARNING {pid} tests.logcontext: plain"


def test_the_json_formatter_writes_the_ids_as_fields(
    capture: tuple[logging.Logger, Capture],
) -> None:
    logger, handler = capture
    handler.setFormatter(logcontext.json_formatter())

    def work() -> str:
        with logcontext.bound(tenant="acme", connection="c0ffee", client="alice"):
            with logcontext.bound(run="r1", event="e1"):
                logger.error("step failed: %s", "boom")
        return handler.format(handler.records[-1])

    line = json.loads(fresh(work))
    assert {key: line[key] for key in ("level", "logger", "message")} == {
        "level": "ERROR",
        "logger": "tests.logcontext",
        "message": "step failed: boom",
    }
    assert {key: line[key] for key in logcontext.FIELDS} == {
        "tenant": "acme",
        "connection": "c0ffee",
        "client": "alice",
        "run": "r1",
        "event": "e1",
    }
    assert isinstance(line["process"], int) and line["timestamp"]
    assert "log_context" not in line


def test_an_explicit_extra_wins(capture: tuple[logging.Logger, Capture]) -> None:
    logger, handler = capture

    def work() -> None:
        with logcontext.bound(tenant="acme"):
            logger.info("other tenant", extra={"tenant": "globex"})

    fresh(work)
    assert handler.records[-1].tenant == "globex"


def test_tasks_started_under_a_connections_ids_do_not_log_them(
    capture: tuple[logging.Logger, Capture],
) -> None:
    """A process-wide task (the hub's reader, say) is started lazily from whichever
    connection needs it first: it must not log as that connection forever."""
    logger, handler = capture

    async def shared_reader() -> None:
        logger.info("reader")
        logcontext.bind(run="r9")  # a task may bind its own
        logger.info("reader's own")

    async def connection() -> None:
        logcontext.bind(tenant="acme", connection="c1", client="alice")
        logger.info("frame")
        await asyncio.get_running_loop().create_task(shared_reader())
        logger.info("frame again")

    fresh(lambda: asyncio.run(connection()))
    assert [(r.getMessage(), ids_of(r)) for r in handler.records] == [
        ("frame", {"tenant": "acme", "connection": "c1", "client": "alice"}),
        ("reader", {}),
        ("reader's own", {"run": "r9"}),
        ("frame again", {"tenant": "acme", "connection": "c1", "client": "alice"}),
    ]


def test_update_outside_a_bound_block_leaves_nothing_behind(
    capture: tuple[logging.Logger, Capture],
) -> None:
    """A step's code adds the run's tenant with `update`; called directly (a test, a shell)
    it must not leave ids in the caller's context."""
    logger, handler = capture

    def work() -> None:
        logcontext.update(tenant="acme")
        logger.info("direct call")

    fresh(work)
    assert ids_of(handler.records[-1]) == {}
