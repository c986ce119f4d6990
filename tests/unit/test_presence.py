"""PresenceCounts (realtime/presence.py): a gateway's local connections per presence entry.

Only the first connection of a client on a stream joins in Redis and only the last one to go
leaves, so a client with several connections is one presence entry."""

from __future__ import annotations

from realtime.presence import REFRESH_BATCH, PresenceCounts, refresh_calls

ROOM = ("acme", "room", "alice")
HALL = ("acme", "hall", "alice")
BOB = ("acme", "room", "bob")
OTHER_TENANT = ("globex", "room", "alice")


def test_first_connection_joins_and_last_one_leaves() -> None:
    counts = PresenceCounts()
    assert counts.add(ROOM, "c1", "Alice") is True
    assert counts.add(ROOM, "c2", "Alice") is False
    assert counts.connections(ROOM) == 2
    assert counts.remove(ROOM, "c1") is False
    assert counts.holds(ROOM)
    assert counts.remove(ROOM, "c2") is True
    assert not counts.holds(ROOM)
    assert len(counts) == 0


def test_a_connection_subscribing_twice_counts_once() -> None:
    counts = PresenceCounts()
    assert counts.add(ROOM, "c1", "Alice") is True
    assert counts.add(ROOM, "c1", "Alice") is False
    assert counts.connections(ROOM) == 1
    assert counts.remove(ROOM, "c1") is True


def test_removing_what_was_never_added_does_nothing() -> None:
    counts = PresenceCounts()
    assert counts.remove(ROOM, "c1") is False
    counts.add(ROOM, "c1", "")
    assert counts.remove(ROOM, "c2") is False
    assert counts.remove(BOB, "c1") is False
    assert counts.holds(ROOM)
    assert counts.remove_connection("never") == []


def test_a_closing_connection_leaves_only_the_entries_it_was_last_of() -> None:
    counts = PresenceCounts()
    counts.add(ROOM, "c1", "Alice")
    counts.add(HALL, "c1", "Alice")
    counts.add(HALL, "c2", "Alice")
    counts.add(BOB, "c3", "Bob")
    assert counts.remove_connection("c1") == [ROOM]
    assert counts.holds(HALL) and counts.connections(HALL) == 1
    assert counts.holds(BOB)
    assert counts.remove_connection("c1") == []  # already forgotten
    assert sorted(counts.remove_connection("c2") + counts.remove_connection("c3")) == [
        HALL,
        BOB,
    ]
    assert len(counts) == 0


def test_tenants_and_streams_are_separate_entries() -> None:
    counts = PresenceCounts()
    assert counts.add(ROOM, "c1", "Alice") is True
    assert counts.add(OTHER_TENANT, "c2", "Alice") is True
    assert counts.add(HALL, "c1", "Alice") is True
    assert counts.by_stream() == {
        ("acme", "room"): ["alice"],
        ("globex", "room"): ["alice"],
        ("acme", "hall"): ["alice"],
    }


def test_the_first_connection_names_the_entry_until_it_is_gone() -> None:
    counts = PresenceCounts()
    counts.add(ROOM, "c1", "Alice")
    counts.add(ROOM, "c2", "Alice (phone)")
    assert counts.name(ROOM) == "Alice"
    counts.remove_connection("c1")
    counts.remove_connection("c2")
    assert counts.name(ROOM) == ""
    counts.add(ROOM, "c3", "Alice (phone)")
    assert counts.name(ROOM) == "Alice (phone)"


def test_by_stream_groups_every_client_of_a_stream() -> None:
    counts = PresenceCounts()
    counts.add(ROOM, "c1", "")
    counts.add(BOB, "c2", "")
    counts.add(BOB, "c3", "")
    grouped = counts.by_stream()
    assert sorted(grouped[("acme", "room")]) == ["alice", "bob"]
    assert len(counts) == 2


def test_refresh_calls_are_each_of_one_tenant_and_bounded() -> None:
    """A PRESENCE_REFRESH call touches one tenant's keys (one slot in a Redis Cluster) and
    at most REFRESH_BATCH clients; a bigger stream is split over calls."""
    crowd = [f"c{i}" for i in range(REFRESH_BATCH + 10)]
    streams = [
        ("acme", "a", ["alice"]),
        ("globex", "g", ["bob"]),
        ("acme", "b", ["carol", "dave"]),
        ("acme", "crowd", crowd),
    ]
    calls = refresh_calls(streams)
    for call in calls:
        assert len({tenant for tenant, _, _ in call}) == 1
        assert sum(len(clients) for _, _, clients in call) <= REFRESH_BATCH
    covered = sorted(
        (tenant, stream, client)
        for call in calls
        for tenant, stream, clients in call
        for client in clients
    )
    assert covered == sorted(
        (tenant, stream, client) for tenant, stream, clients in streams for client in clients
    )
    # acme: a and b together, then the crowd in two parts; globex apart.
    assert [[stream for _, stream, _ in call] for call in calls] == [
        ["a", "b"],
        ["crowd"],
        ["crowd"],
        ["g"],
    ]
