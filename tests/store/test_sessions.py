"""Session records in Redis: owner checks, positions, lifetimes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
import redis
import redis.asyncio as aredis
from django.conf import settings

from realtime.sessions import (
    Checkpointer,
    PendingSave,
    SessionRefused,
    SessionStore,
    position_changes,
)
from streams import keys
from tests.store.conftest import count_pipelines

pytestmark = pytest.mark.asyncio

TTL = settings.SWITCHBOARD["SESSION_TTL_S"]


@pytest_asyncio.fixture
async def sessions(r: redis.Redis, store_redis_url: str) -> AsyncIterator[SessionStore]:
    client = aredis.Redis.from_url(store_redis_url)
    yield SessionStore(client)
    await client.aclose()


async def test_a_session_is_written_at_its_first_subscription_and_lives_while_connected(
    sessions: SessionStore, r: redis.Redis
) -> None:
    session = sessions.create()
    key = keys.session("acme", session)
    assert not r.exists(key)
    await sessions.subscribed("acme", session, "alice", "room", 0)
    assert r.hgetall(key) == {b"client": b"alice", b"s:room": b"0"}
    assert TTL < r.ttl(key) <= 2 * TTL


async def test_resume_returns_positions_and_refreshes_the_lifetime(
    sessions: SessionStore, r: redis.Redis
) -> None:
    session = sessions.create()
    await sessions.subscribed("acme", session, "alice", "room:1", 4)
    await sessions.save("acme", session, "alice", {"room:1": 9, "b": 0}, [], ttl_s=TTL)
    assert r.ttl(keys.session("acme", session)) <= TTL
    record, heads = await sessions.resume("acme", "alice", session)
    assert (record.client, record.positions, heads) == ("alice", {"room:1": 9, "b": 0}, {})
    assert r.ttl(keys.session("acme", session)) > TTL


async def test_streams_left_are_forgotten(sessions: SessionStore) -> None:
    session = sessions.create()
    await sessions.subscribed("acme", session, "alice", "first", 0)
    await sessions.save("acme", session, "alice", {"a": 1, "b": 2}, [])
    await sessions.unsubscribed("acme", session, "a")
    await sessions.save("acme", session, "alice", {}, ["b", "first"])
    record, _ = await sessions.resume("acme", "alice", session)
    assert record.positions == {}


@pytest.mark.parametrize(
    "tenant, client, code",
    [("acme", "mallory", "forbidden"), ("globex", "alice", "not_found")],
)
async def test_another_client_or_tenant_is_refused(
    sessions: SessionStore, tenant: str, client: str, code: str
) -> None:
    session = sessions.create()
    await sessions.subscribed("acme", session, "alice", "first", 0)
    with pytest.raises(SessionRefused) as refused:
        await sessions.resume(tenant, client, session)
    assert refused.value.code == code


async def test_an_expired_session_is_refused_not_recreated(
    sessions: SessionStore, r: redis.Redis
) -> None:
    session = sessions.create()
    await sessions.subscribed("acme", session, "alice", "first", 0)
    r.delete(keys.session("acme", session))
    with pytest.raises(SessionRefused) as refused:
        await sessions.resume("acme", "alice", session)
    assert refused.value.code == "not_found"
    # The refusal's EXPIRE must not have left a key behind either.
    assert not r.exists(keys.session("acme", session))


async def test_positions_alone_are_not_a_session(sessions: SessionStore, r: redis.Redis) -> None:
    """A stray position write (a checkpoint racing the key's expiry) has no owner: refused."""
    r.hset(keys.session("acme", "stray"), "s:a", 3)
    with pytest.raises(SessionRefused):
        await sessions.resume("acme", "alice", "stray")


async def test_resumes_made_together_share_a_round_trip_and_each_gets_its_own_answer(
    sessions: SessionStore, r: redis.Redis
) -> None:
    """A storm's resumes go to Redis in one pipeline; a refused one fails alone, and each
    gets the heads of the streams it asked about, read in the same round trip."""
    kept = sessions.create()
    await sessions.subscribed("acme", kept, "alice", "room", 3)
    r.set(keys.stream_seq("acme", "room"), 12)
    pipelines = count_pipelines(sessions.client)
    answers = await asyncio.gather(
        sessions.resume("acme", "alice", kept, ["room", "quiet"]),
        sessions.resume("acme", "mallory", kept, ["room"]),
        sessions.resume("acme", "alice", "never-was"),
        return_exceptions=True,
    )
    record, heads = answers[0]  # type: ignore[misc]
    assert (record.positions, heads) == ({"room": 3}, {"room": 12, "quiet": 0})
    assert isinstance(answers[1], SessionRefused) and answers[1].code == "forbidden"
    assert isinstance(answers[2], SessionRefused) and answers[2].code == "not_found"
    # Made in the same turn of the loop, before the first was sent: one pipeline for all.
    assert len(pipelines) == 1


class Connection:
    """What the checkpointer asks of a connection, with positions set by the test."""

    def __init__(self, session: str, positions: dict[str, int]) -> None:
        self.session = session
        self.positions = positions
        self.saved: dict[str, int] = {}
        self.refreshed_at = 0.0

    def session_changes(self, now: float) -> PendingSave | None:
        changed, gone = position_changes(self.saved, self.positions)
        refresh = now - self.refreshed_at > TTL / 3
        if not (changed or gone or refresh):
            return None
        return PendingSave("acme", self.session, "alice", changed, gone, refresh)

    def session_saved(self, save: PendingSave, now: float) -> None:
        self.saved.update(save.changed)
        if save.refresh:
            self.refreshed_at = now


async def test_the_checkpointer_writes_dirty_connections_and_all_on_a_full_pass(
    sessions: SessionStore, r: redis.Redis
) -> None:
    checkpointer = Checkpointer(lambda: sessions)
    busy, idle = Connection("busy", {"a": 1}), Connection("idle", {"b": 1})
    checkpointer.connections.update((busy, idle))
    assert await checkpointer.checkpoint() == 2  # the first pass is a full one
    assert r.hgetall(keys.session("acme", "idle")) == {b"client": b"alice", b"s:b": b"1"}

    busy.positions["a"], idle.positions["b"] = 5, 7
    checkpointer.dirty.add(busy)
    assert await checkpointer.checkpoint() == 1  # only what delivered since
    assert r.hget(keys.session("acme", "busy"), "s:a") == b"5"
    assert r.hget(keys.session("acme", "idle"), "s:b") == b"1"
    assert await checkpointer.checkpoint() == 0

    assert await checkpointer.checkpoint(full=True) == 1  # idle's change, found by a full pass
    assert r.hget(keys.session("acme", "idle"), "s:b") == b"7"


async def test_saves_of_many_sessions_and_tenants_are_written_as_the_single_commands_were(
    sessions: SessionStore, r: redis.Redis
) -> None:
    for n in range(3):
        r.hset(keys.session("acme", f"old-{n}"), mapping={"client": "alice", "s:gone": 1})
    saves: list[tuple[PendingSave, int | None]] = [
        # Positions changed, lifetime kept: the owner and positions written, no TTL set.
        (PendingSave("acme", "old-0", "alice", {"a": 4, "b": 2}, [], False), None),
        # Only a stream gone, lifetime kept: the field removed, nothing else written.
        (PendingSave("acme", "old-1", "alice", {}, ["gone"], False), None),
        # Nothing changed but the lifetime: the owner rewritten and the TTL set.
        (PendingSave("acme", "old-2", "alice", {}, ["gone"], True), TTL),
        # Another tenant's session in the same batch, and enough sessions for several calls.
        *(
            (PendingSave("globex", f"new-{n}", "bob", {"x": n}, [], True), 2 * TTL)
            for n in range(1100)
        ),
    ]
    assert await sessions.write(saves) == [None] * len(saves)
    assert r.hgetall(keys.session("acme", "old-0")) == {
        b"client": b"alice",
        b"s:gone": b"1",
        b"s:a": b"4",
        b"s:b": b"2",
    }
    assert r.ttl(keys.session("acme", "old-0")) == -1
    assert r.hgetall(keys.session("acme", "old-1")) == {b"client": b"alice"}
    assert r.hgetall(keys.session("acme", "old-2")) == {b"client": b"alice"}
    assert 0 < r.ttl(keys.session("acme", "old-2")) <= TTL
    for n in (0, 499, 500, 1099):
        key = keys.session("globex", f"new-{n}")
        assert r.hgetall(key) == {b"client": b"bob", b"s:x": str(n).encode()}
        assert TTL < r.ttl(key) <= 2 * TTL


async def test_a_checkpoint_that_fails_leaves_every_unwritten_connection_to_the_next(
    sessions: SessionStore, r: redis.Redis
) -> None:
    checkpointer = Checkpointer(lambda: sessions)
    checkpointer._next_full_pass = float("inf")  # only the dirty ones, as between full passes
    broken = Connection("broken", {"a": 1})
    r.set(keys.session("acme", "broken"), "not a hash")  # its write fails
    others = [Connection(f"other-{n}", {"a": 1}) for n in range(1200)]
    checkpointer.connections.update([broken, *others])
    checkpointer.dirty.update([broken, *others])
    with pytest.raises(redis.exceptions.ResponseError):
        await checkpointer.checkpoint()
    # The calls before the failing one were written and taken as saved...
    saved = [c for c in others if c.saved]
    assert all(r.hget(keys.session("acme", c.session), "s:a") == b"1" for c in saved)
    # ...and neither the failed call's sessions nor those not reached are lost: all dirty.
    assert checkpointer.dirty == {broken, *(c for c in others if not c.saved)}
    r.delete(keys.session("acme", "broken"))
    assert await checkpointer.checkpoint() == 1201 - len(saved)
    assert not checkpointer.dirty
    assert all(r.hget(keys.session("acme", c.session), "s:a") == b"1" for c in others)
