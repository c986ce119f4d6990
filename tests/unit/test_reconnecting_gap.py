"""ReconnectingClient against a scripted in-process server: a gap seen while a session is
being resumed (events written to the old socket and lost with it) must make the client
subscribe again on the new connection; the old one is closed and cannot."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from websockets.asyncio.server import ServerConnection, serve

from realtime.reconnecting import ReconnectingClient

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
