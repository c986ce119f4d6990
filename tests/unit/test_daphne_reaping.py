"""realtime/daphne_tuning.py: daphne's connections reaped when they change, with its rules;
its socket timeouts as the gateway sets them."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from realtime.daphne_tuning import check_application, reap_marked, set_socket_timeouts


class FakeServer:
    """What daphne's Server holds for the check: its connections and close timeout."""

    application_close_timeout = 10

    def __init__(self) -> None:
        self.connections: dict[Any, dict[str, Any]] = {}
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True


class FakeProtocol:
    def __init__(self) -> None:
        self.handled: list[BaseException] = []

    def handle_exception(self, exception: BaseException) -> None:
        self.handled.append(exception)


def test_daphnes_rules_reap_cancel_and_forget() -> None:
    loop = asyncio.new_event_loop()
    try:
        server = FakeServer()
        running, closing, finished, failed, stuck = (FakeProtocol() for _ in range(5))
        done = loop.create_future()
        done.set_result(None)
        error = loop.create_future()
        error.set_exception(ValueError("boom"))
        still_closing = loop.create_future()
        hanging = loop.create_future()
        server.connections = {
            running: {"application_instance": loop.create_future()},
            closing: {"application_instance": still_closing, "disconnected": time.time()},
            finished: {"application_instance": done, "disconnected": time.time()},
            failed: {"application_instance": error},
            stuck: {"application_instance": hanging, "disconnected": time.time() - 60},
        }
        again = {p: check_application(server, p, d) for p, d in list(server.connections.items())}
        # Open and running: kept, and nothing to look at again until it changes.
        assert "application_instance" in server.connections[running] and not again[running]
        # Closed, its application still ending (within the timeout): looked at again.
        assert not still_closing.cancelled() and again[closing]
        # Closed and finished: forgotten.
        assert finished not in server.connections and not again[finished]
        # Open, its application failed: the error answered, the instance reaped.
        assert failed.handled and "application_instance" not in server.connections[failed]
        # Closed long ago and still running: cancelled (a future is done at once, so it is
        # reaped and forgotten in the same check, as daphne does).
        assert hanging.cancelled() and stuck not in server.connections
        assert not server.stopped
    finally:
        loop.close()


def test_only_marked_connections_are_checked_and_those_still_ending_stay_marked() -> None:
    loop = asyncio.new_event_loop()
    try:
        server = FakeServer()
        unmarked, ending, ended, gone = (FakeProtocol() for _ in range(4))
        finished = loop.create_future()
        finished.set_result(None)
        server.connections = {
            # Closed with its application done, but not marked: left for its mark.
            unmarked: {"application_instance": finished, "disconnected": time.time()},
            ending: {"application_instance": loop.create_future(), "disconnected": time.time()},
            ended: {"application_instance": finished, "disconnected": time.time()},
        }
        marked = {ending, ended, gone}  # gone: forgotten already
        reap_marked(server, marked)
        assert marked == {ending}
        assert set(server.connections) == {unmarked, ending}
    finally:
        loop.close()


def test_daphne_pings_as_configured_and_sets_no_age_limit_of_its_own() -> None:
    """Daphne's default closes every socket after 24 h, without a close code
    (SWITCHBOARD_WS_MAX_AGE_S is the gateway's own, spread-out limit)."""
    from daphne.server import Server

    server = Server(application=None, endpoints=["tcp:port=0:interface=127.0.0.1"])
    assert server.websocket_timeout == 86400  # what daphne would do
    set_socket_timeouts(server, 20.0, 30.0)
    assert (server.ping_interval, server.ping_timeout) == (20.0, 30.0)
    assert server.websocket_timeout == -1
