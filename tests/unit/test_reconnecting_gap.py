"""ReconnectingClient against a scripted in-process server: a resume names the client's own
positions; a gap seen while a session is being resumed (events written to the old socket
and lost with it) must make the client subscribe again on the new connection; the old one
is closed and cannot."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import pytest_asyncio
from websockets.asyncio.server import ServerConnection, serve

from client.reconnecting import ReconnectingClient

pytestmark = pytest.mark.asyncio


class ScriptedServer:
    """Each accepted connection is handed to the test, which plays the gateway."""

    def __init__(self) -> None:
        self.connections: asyncio.Queue[ServerConnection] = asyncio.Queue()
        self.url = ""

    async def handler(self, ws: ServerConnection) -> None:
        await self.connections.put(ws)
        await ws.wait_closed()

    async def next(self) -> ServerConnection:
        return await asyncio.wait_for(self.connections.get(), 10)


@pytest_asyncio.fixture
async def server() -> AsyncIterator[ScriptedServer]:
    scripted = ScriptedServer()
    async with serve(scripted.handler, "127.0.0.1", 0) as running:
        port = running.sockets[0].getsockname()[1]
        scripted.url = f"ws://127.0.0.1:{port}/ws/v1/"
        yield scripted


async def send(ws: ServerConnection, frame: dict[str, Any]) -> None:
    await ws.send(json.dumps(frame))


async def receive(ws: ServerConnection, kind: str) -> dict[str, Any]:
    """The next frame of this type the client sends (others are skipped)."""
    async with asyncio.timeout(10):
        while True:
            frame = json.loads(await ws.recv())
            if frame["type"] == kind:
                return frame


def welcome(resumed: bool) -> dict[str, Any]:
    return {
        "type": "welcome",
        "client": "alice",
        "tenant": "demo",
        "session": "s1",
        "resumed": resumed,
        "heartbeat_s": 25,
        "limits": {},
    }


def event(seq: int) -> dict[str, Any]:
    return {
        "type": "event",
        "stream": "room",
        "seq": seq,
        "id": f"e{seq}",
        "kind": "published",
        "from": "client:bob",
        "cause": {"client": "bob", "message": f"m{seq}", "prev": None},
        "ts": "2026-01-01T00:00:00Z",
        "data": {"n": seq},
    }


async def test_a_gap_seen_while_resuming_resubscribes_on_the_new_connection(
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
        await send(first, event(1))
        assert (await client.next_event("room"))["seq"] == 1
        await first.close(1012, "restart")

        second = await server.next()
        await send(second, welcome(resumed=True))
        # The session restores past seq 1: seqs 2 and 3 went out on the old socket and were lost.
        await send(second, {"type": "subscribed", "stream": "room", "head": 4, "recovered": True})
        await send(second, event(4))
        await receive(second, "ping")
        await send(second, {"type": "pong"})
        resubscribe = await receive(second, "subscribe")
        assert resubscribe == {"type": "subscribe", "stream": "room", "since": 1}
        await send(second, {"type": "subscribed", "stream": "room", "head": 4, "recovered": True})
        for seq in (2, 3, 4):
            await send(second, event(seq))
        assert [(await client.next_event("room"))["seq"] for _ in range(3)] == [2, 3, 4]
    finally:
        await client.close()


def positions_of(ws: ServerConnection) -> dict[str, int] | None:
    """The `positions` a connection's URL carried, decoded (None: none)."""
    query = parse_qs(urlsplit(ws.request.path).query)
    if "positions" not in query:
        return None
    raw = query["positions"][0]
    assert "=" not in raw and "+" not in raw and "/" not in raw  # base64url, no padding
    return json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))


async def test_a_resume_sends_the_last_seq_the_application_got_on_each_held_stream(
    server: ScriptedServer,
) -> None:
    connecting = asyncio.create_task(
        ReconnectingClient.connect(server.url, "TOKEN", initial_backoff_s=0.001)
    )
    first = await server.next()
    assert positions_of(first) is None  # nothing to resume yet
    await send(first, welcome(resumed=False))
    client = await connecting
    try:
        subscribing = asyncio.create_task(client.subscribe("room"))
        await receive(first, "subscribe")
        await send(first, {"type": "subscribed", "stream": "room", "head": 0, "recovered": False})
        await subscribing
        for seq in (1, 2):
            await send(first, event(seq))
        assert [(await client.next_event("room"))["seq"] for _ in range(2)] == [1, 2]
        # A subscribe the server never answered: the session may not hold it.
        pending = asyncio.create_task(client.subscribe("pending", timeout=30))
        await receive(first, "subscribe")
        await first.close(1012, "restart")

        second = await server.next()
        assert positions_of(second) == {"room": 2}
        await send(second, welcome(resumed=True))
        await send(second, {"type": "subscribed", "stream": "room", "head": 3, "recovered": True})
        await send(second, event(3))
        await receive(second, "ping")
        await send(second, {"type": "pong"})
        assert (await client.next_event("room"))["seq"] == 3
        pending.cancel()
    finally:
        await client.close()


async def test_refused_positions_drop_the_session_and_resubscribe_from_the_last_seq(
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
        await send(first, event(1))
        assert (await client.next_event("room"))["seq"] == 1
        await first.close(1012, "restart")

        second = await server.next()
        assert positions_of(second) == {"room": 1}
        await send(
            second,
            {
                "type": "error",
                "id": None,
                "code": "bad_request",
                "status": 400,
                "detail": "position 1 of stream 'room' is beyond its head (0)",
                "session": "s1",
                "stream": "room",
                "head": 0,
            },
        )
        await second.close(4003, "beyond its head")

        third = await server.next()
        assert positions_of(third) is None
        assert "session" not in parse_qs(urlsplit(third.request.path).query)
        await send(third, welcome(resumed=False))
        assert await receive(third, "subscribe") == {
            "type": "subscribe",
            "stream": "room",
            "since": 1,
        }
        assert client.refused_sessions[-1]["code"] == "bad_request"
    finally:
        await client.close()
