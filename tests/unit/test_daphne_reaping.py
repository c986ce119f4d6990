"""realtime/daphne_tuning.py: daphne's connections reaped when they change, with its rules;
its socket timeouts as the gateway sets them, checked in slices."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from realtime.daphne_tuning import (
    SlicedRounds,
    check_application,
    check_timeouts_slice,
    reap_marked,
    set_socket_timeouts,
    spread_timeout_walk,
)


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


def test_each_item_is_taken_once_a_round_in_even_slices() -> None:
    rounds: SlicedRounds[int] = SlicedRounds(4)
    items = list(range(10))
    taken = [rounds.next_slice(items) for _ in range(4)]
    assert [len(part) for part in taken] == [3, 3, 3, 1]
    assert sorted(sum(taken, [])) == items
    # A round is a snapshot: what arrived meanwhile is in the next one, whole.
    items.append(10)
    assert rounds.next_slice(items) == [0, 1, 2]
    assert sorted(sum((rounds.next_slice(items) for _ in range(3)), [0, 1, 2])) == items


def test_a_round_of_nothing_or_fewer_items_than_slices() -> None:
    rounds: SlicedRounds[str] = SlicedRounds(20)
    assert rounds.next_slice([]) == []
    assert [rounds.next_slice("ab") for _ in range(3)] == [["a"], ["b"], ["a"]]


class CheckedProtocol:
    def __init__(self) -> None:
        self.checks = 0

    def check_timeouts(self) -> None:
        self.checks += 1


def test_every_connection_is_checked_once_per_round_and_one_gone_is_skipped() -> None:
    """The slices of daphne's timeout walk: the same checks, a slice at a time."""
    server = FakeServer()
    protocols = [CheckedProtocol() for _ in range(7)]
    server.connections = {protocol: {} for protocol in protocols}
    rounds: SlicedRounds[Any] = SlicedRounds(3)
    check_timeouts_slice(server, rounds)
    assert sum(protocol.checks for protocol in protocols) == 3
    gone = next(protocol for protocol in protocols if not protocol.checks)
    del server.connections[gone]
    check_timeouts_slice(server, rounds)
    check_timeouts_slice(server, rounds)
    assert gone.checks == 0
    assert all(protocol.checks == 1 for protocol in protocols if protocol is not gone)


def test_daphnes_own_timeout_walk_takes_a_slice_each_tenth_of_its_period(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On daphne's Server: one call checks a twentieth of the sockets and comes back in
    0.1 s (its own walk checked them all and came back in 2 s)."""
    from daphne.server import Server
    from twisted.internet import reactor

    spread_timeout_walk()
    scheduled: list[tuple[float, Any]] = []
    monkeypatch.setattr(reactor, "callLater", lambda delay, call: scheduled.append((delay, call)))
    server = Server(application=None, endpoints=["tcp:port=0:interface=127.0.0.1"])
    protocols = [CheckedProtocol() for _ in range(40)]
    server.connections = {protocol: {} for protocol in protocols}
    server.timeout_checker()
    assert sum(protocol.checks for protocol in protocols) == 2
    assert scheduled == [(0.1, server.timeout_checker)]
