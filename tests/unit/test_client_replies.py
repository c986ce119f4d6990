"""Which reply events a client library files under one of its own sends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio
from websockets.asyncio.server import serve

from client.connection import (
    ReplyCollector,
    answers_own_send,
    assembled_text,
    reply_problems,
    since_last_restart,
)
from client.reconnecting import ReconnectingClient
from tests.unit.test_reconnecting_gap import ScriptedServer, receive, send, welcome


def reply(cause: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "reply.delta", "cause": cause, "data": {"run": "r1"}}


@pytest.mark.parametrize(
    ("cause", "client", "own"),
    [
        ({"client": "alice", "message": "m1", "prev": "e1"}, "alice", True),
        ({"client": "bob", "message": "m1", "prev": "e1"}, "alice", False),
        # A summariser reacting to alice's reply keeps her client and message id in its
        # cause, but it is not the reply to her send.
        (
            {"client": "alice", "message": "m1", "prev": "e2", "depth": 1, "chain": ["e1", "e2"]},
            "alice",
            False,
        ),
    ],
)
def test_answers_own_send(cause: dict[str, Any], client: str, own: bool) -> None:
    assert answers_own_send(reply(cause), client) is own


# --- reply.restart: the run's text so far is void, the reply starts again at offset 0 ----------

CAUSE = {"client": "alice", "message": "m1", "prev": "e1"}


def reply_event(seq: int, kind: str, **data: Any) -> dict[str, Any]:
    return {
        "type": "event",
        "stream": "room",
        "seq": seq,
        "id": f"e{seq}",
        "kind": kind,
        "from": "agent:echo",
        "cause": CAUSE,
        "ts": "2026-01-01T00:00:00Z",
        "data": {"run": "r1", **data},
    }


def delta(seq: int, offset: int, text: str) -> dict[str, Any]:
    return reply_event(seq, "reply.delta", offset=offset, text=text)


def restart(seq: int, attempt: int = 2) -> dict[str, Any]:
    return reply_event(seq, "reply.restart", attempt=attempt, reason="model_error")


def done(seq: int, text: str) -> dict[str, Any]:
    return reply_event(seq, "reply.done", status="ok", text=text, detail=None)


# A provider dropped its stream after "lorem lo" and answered differently on the retry.
RESTARTED = [
    delta(2, 0, "lorem "),
    delta(3, 6, "lo"),
    restart(4),
    delta(5, 0, "ipsum "),
    delta(6, 6, "dolor"),
]


def texts(deltas: list[dict[str, Any]]) -> str:
    return "".join(event["data"]["text"] for event in deltas)


async def collected(events: list[dict[str, Any]]) -> tuple[ReplyCollector, str]:
    collector = ReplyCollector()
    for event in events:
        collector.add(event)
    deltas, final = await collector.wait(1)
    return collector, texts(deltas) if final["data"]["text"] == texts(deltas) else "MISMATCH"


@pytest.mark.asyncio
async def test_a_restart_mid_reply_voids_the_deltas_before_it() -> None:
    collector, text = await collected([*RESTARTED, done(7, "ipsum dolor")])
    assert text == "ipsum dolor"
    assert [event["seq"] for event in collector.deltas] == [5, 6]
    assert [event["data"]["attempt"] for event in collector.restarts] == [2]
    assert collector.voided == 2


@pytest.mark.asyncio
async def test_a_restart_delivered_twice_does_not_void_what_followed_it() -> None:
    # A resume from a lagging checkpoint repeats seqs 4 to 6.
    repeated = [*RESTARTED, restart(4), delta(5, 0, "ipsum "), delta(6, 6, "dolor")]
    collector, text = await collected([*repeated, done(7, "ipsum dolor")])
    assert text == "ipsum dolor"
    assert len(collector.restarts) == 1


@pytest.mark.asyncio
async def test_restarts_in_a_row_and_a_restart_before_any_delta() -> None:
    events = [
        restart(2),
        delta(3, 0, "a"),
        restart(4, attempt=3),
        restart(5, attempt=4),
        delta(6, 0, "b"),
        done(7, "b"),
    ]
    collector, text = await collected(events)
    assert text == "b"
    assert [event["data"]["attempt"] for event in collector.restarts] == [2, 3, 4]


@pytest.mark.asyncio
async def test_events_without_seqs_are_taken_as_they_come() -> None:
    events = [{**event, "seq": None} for event in [*RESTARTED, done(7, "ipsum dolor")]]
    _, text = await collected(events)
    assert text == "ipsum dolor"


def test_since_last_restart_and_offset_checks_accept_the_reset_to_zero() -> None:
    assert texts(since_last_restart(RESTARTED)) == "ipsum dolor"
    assert texts(since_last_restart(RESTARTED[:2])) == "lorem lo"
    assert reply_problems(RESTARTED, done(7, "ipsum dolor")) == []
    # Without the restart, offset 0 after 8 characters is a broken reply.
    broken = [event for event in RESTARTED if event["kind"] != "reply.restart"]
    assert reply_problems(broken) == ["seq 5: offset 0, expected 8"]
    # The reply.done text must be the last attempt's, not a splice of the two.
    assert reply_problems(RESTARTED, done(7, "lorem loipsum dolor")) == [
        "the reply.done text is not the deltas' since the last restart"
    ]
    # A restart must start again at 0, not go on where the void attempt stopped.
    assert reply_problems([*RESTARTED[:3], delta(5, 8, "x")]) == ["seq 5: offset 8, expected 0"]


# --- the same through ReconnectingClient, across a reconnect -----------------------------------


@pytest_asyncio.fixture
async def server() -> AsyncIterator[ScriptedServer]:
    scripted = ScriptedServer()
    async with serve(scripted.handler, "127.0.0.1", 0) as running:
        port = running.sockets[0].getsockname()[1]
        scripted.url = f"ws://127.0.0.1:{port}/ws/v1/"
        yield scripted


@pytest.mark.asyncio
async def test_a_restart_caught_up_after_a_reconnect_gives_the_final_text(
    server: ScriptedServer,
) -> None:
    connecting = asyncio.create_task(
        ReconnectingClient.connect(server.url, "TOKEN", initial_backoff_s=0.001)
    )
    first = await server.next()
    await send(first, welcome(resumed=False))
    client = await connecting
    try:
        subscribing = asyncio.create_task(client.subscribe("room"))
        await receive(first, "subscribe")
        await send(first, {"type": "subscribed", "stream": "room", "head": 0, "recovered": False})
        await subscribing
        sending = asyncio.create_task(client.send("room", "echo", "hi", id="m1"))
        await receive(first, "send")
        await send(first, {"type": "ack", "id": "m1", "event_id": "e1", "seq": 1})
        await sending
        message = {**reply_event(1, "message", text="hi"), "from": "client:alice"}
        for event in [message, *RESTARTED[:2]]:  # "lorem lo", then the connection drops
            await send(first, event)
        await wait_for(lambda: client.last_seq("room") == 3)
        await first.close(1012, "restart")

        second = await server.next()
        await send(second, welcome(resumed=True))
        # A lagging checkpoint: the resume repeats seq 3, then what was missed.
        await send(second, {"type": "subscribed", "stream": "room", "head": 7, "recovered": True})
        await receive(second, "ping")
        await send(second, {"type": "pong"})
        for event in [RESTARTED[1], *RESTARTED[2:], restart(4), done(7, "ipsum dolor")]:
            await send(second, event)
        deltas, final = await client.reply("m1", timeout=10)
        assert texts(deltas) == final["data"]["text"] == "ipsum dolor"
        assert reply_problems(deltas, final) == []
        # The application sees each event once, the restart included.
        seen = [(await client.next_event("room"))["seq"] for _ in range(7)]
        assert seen == [1, 2, 3, 4, 5, 6, 7]
    finally:
        await client.close()


async def wait_for(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        while not condition():
            await asyncio.sleep(0.01)


# --- reply.snapshot: a compact catch-up's text so far, from its offset ------------------------


def snapshot(seq: int, offset: int, text: str) -> dict[str, Any]:
    return {
        **reply_event(seq, "reply.snapshot", offset=offset, text=text),
        "id": f"snapshot:e{seq}",
    }


@pytest.mark.asyncio
async def test_a_snapshot_then_live_deltas_make_the_final_text() -> None:
    events = [snapshot(4, 0, "lorem ipsum "), delta(6, 12, "dolor"), done(7, "lorem ipsum dolor")]
    collector, text = await collected(events)
    assert text == "lorem ipsum dolor"
    assert assembled_text(events[:2]) == "lorem ipsum dolor"
    assert reply_problems(events[:2], events[2]) == []


@pytest.mark.asyncio
async def test_a_snapshot_from_a_resume_position_continues_the_text_the_client_has() -> None:
    events = [delta(2, 0, "lorem "), snapshot(5, 6, "ipsum "), delta(6, 12, "dolor")]
    collector, text = await collected([*events, done(7, "lorem ipsum dolor")])
    assert text == "lorem ipsum dolor"
    assert assembled_text(events) == "lorem ipsum dolor"
    assert texts(since_last_restart(events)) == "lorem ipsum dolor"


@pytest.mark.asyncio
async def test_a_snapshot_from_offset_zero_replaces_a_voided_attempt() -> None:
    # The client saw the first attempt's "lorem lo"; the window held a restart.
    events = [*RESTARTED[:2], snapshot(5, 0, "ipsum "), delta(6, 6, "dolor")]
    collector, text = await collected([*events, done(7, "ipsum dolor")])
    assert text == "ipsum dolor"
    assert collector.voided == 2
    assert assembled_text(events) == "ipsum dolor"
    assert reply_problems(events, done(7, "ipsum dolor")) == []


def test_a_finished_reply_alone_is_its_text() -> None:
    assert assembled_text([done(9, "all of it")]) == "all of it"


@pytest.mark.asyncio
async def test_a_compact_catch_up_through_the_reconnecting_client(server: ScriptedServer) -> None:
    connecting = asyncio.create_task(
        ReconnectingClient.connect(server.url, "TOKEN", initial_backoff_s=0.001)
    )
    first = await server.next()
    await send(first, welcome(resumed=False))
    client = await connecting
    try:
        subscribing = asyncio.create_task(client.subscribe("room", since=0, compact=True))
        frame = await receive(first, "subscribe")
        assert (frame["since"], frame["compact"]) == (0, True)
        await send(first, {"type": "subscribed", "stream": "room", "head": 9, "recovered": True})
        await subscribing
        message = {**reply_event(1, "message", text="hi"), "from": "client:alice"}
        # Seqs 2..8 were r1's deltas and another run's reply.done at 9: the snapshot (seq 8)
        # follows the window's last event.
        other = {**done(9, "other"), "data": {"run": "r2", "status": "ok", "text": "other"}}
        for event in [message, other, snapshot(8, 0, "lorem ipsum "), delta(10, 12, "dolor")]:
            await send(first, event)
        seen = [await client.next_event("room") for _ in range(4)]
        assert [(e["seq"], e["kind"]) for e in seen] == [
            (1, "message"),
            (9, "reply.done"),
            (8, "reply.snapshot"),
            (10, "reply.delta"),
        ]
        assert client.last_seq("room") == 10
        assert assembled_text(seen[2:]) == "lorem ipsum dolor"
    finally:
        await client.close()


# --- tool calls: paired with their results, voided by a restart of their step ---------------


def test_a_collector_pairs_tool_calls_with_results_and_a_restart_voids_its_steps_calls() -> None:
    collector = ReplyCollector()
    events = [
        reply_event(1, "tool.call", call="c1", name="route", arguments={}, step=0),
        reply_event(2, "tool.result", call="c1", name="route", ok=True, text="billing", step=0),
        reply_event(3, "tool.call", call="c2", name="lookup", arguments={"k": "a"}, step=1),
        reply_event(4, "reply.restart", attempt=2, reason="retry", step=1),
        reply_event(5, "tool.call", call="c2", name="lookup", arguments={"k": "b"}, step=1),
        reply_event(
            6, "tool.result", call="c2", name="lookup", ok=False, text="x", error="timeout", step=1
        ),
        # A result whose call came before this client joined stands alone.
        reply_event(7, "tool.result", call="c9", name="late", ok=True, text="y", step=1),
    ]
    for event in events:
        collector.add(event)
    assert [(t["call"], t["name"], t["ok"], t["error"]) for t in collector.tools] == [
        ("c1", "route", True, None),
        ("c2", "lookup", False, "timeout"),
        ("c9", "late", True, None),
    ]
    assert collector.tools[1]["arguments"] == {"k": "b"}
    assert collector.tools[2]["arguments"] is None
    # A restart of step 0 (or one that names no step) voids every call.
    collector.add(reply_event(8, "reply.restart", attempt=3, reason="retry", step=0))
    assert collector.tools == []
