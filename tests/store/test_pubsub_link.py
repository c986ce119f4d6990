"""The hub's pub/sub connection (realtime/pubsub_link.py) on a real Redis: replies handed on
from the socket's read callback, not from a task a turn of the loop later; every way it
ends says why; and the hub gives up a link whose PING goes unanswered (a fake server that
stops answering, as a half-dead connection does) and connects again."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import hiredis
import pytest
import pytest_asyncio
import redis.asyncio as aredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from realtime import hub as hub_module
from realtime.hub import Hub
from realtime.pubsub_link import PubSubLink
from streams import keys
from tests.integration.support import wait_until

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def client(store_redis_url: str) -> AsyncIterator[aredis.Redis]:
    connection = aredis.Redis.from_url(store_redis_url)
    yield connection
    await connection.aclose()


async def until(condition: Callable[[], bool], what: str) -> None:
    async def check() -> bool:
        return condition()

    await wait_until(check, 10, what)


class Heard:
    def __init__(self) -> None:
        self.replies: list[Any] = []
        self.in_task: list[bool] = []

    def __call__(self, reply: Any) -> None:
        self.replies.append(reply)
        self.in_task.append(asyncio.current_task() is not None)


async def test_replies_are_handed_on_in_the_read_callback(client: aredis.Redis) -> None:
    heard = Heard()
    link = await PubSubLink.open(client, heard)
    try:
        link.send("SUBSCRIBE", "link-test")
        await until(lambda: len(heard.replies) == 1, "the subscription confirmed")
        for n in range(3):
            await client.publish("link-test", f"m{n}")
        await until(lambda: len(heard.replies) == 4, "three messages")
        assert heard.replies == [
            [b"subscribe", b"link-test", 1],
            *([b"message", b"link-test", f"m{n}".encode()] for n in range(3)),
        ]
        # No task ran them: each was handed on by the socket's read callback itself.
        assert heard.in_task == [False] * 4
        link.send("PING")
        await until(lambda: len(heard.replies) == 5, "the pong")
        assert heard.replies[-1] in ([b"pong", b""], b"PONG")  # RESP2, RESP3
        assert link.replies == 5
    finally:
        link.close()
    assert link.closed.done() and link.closed.exception() is None
    with pytest.raises(RedisConnectionError):
        link.send("PING")


async def test_a_killed_connection_ends_the_link_with_a_connection_error(
    client: aredis.Redis,
) -> None:
    link = await PubSubLink.open(client, Heard())
    link.send("CLIENT", "SETNAME", "link-to-kill")
    link.send("SUBSCRIBE", "link-test")
    killed = 0

    async def kill() -> bool:
        nonlocal killed
        killed += int(await client.client_kill_filter(_type="pubsub", skipme=True))
        return killed > 0

    await wait_until(kill, 5, "the link's connection killed by the server")
    with pytest.raises(RedisConnectionError):
        await asyncio.wait_for(link.closed, 5)


async def test_an_error_reply_ends_the_link_with_it(client: aredis.Redis) -> None:
    link = await PubSubLink.open(client, Heard())
    link.send("NO-SUCH-COMMAND")
    with pytest.raises(ResponseError, match="unknown command"):
        await asyncio.wait_for(link.closed, 5)


async def test_what_on_reply_raises_ends_the_link(client: aredis.Redis) -> None:
    def refuse(reply: Any) -> None:
        raise ValueError("cannot take it")

    link = await PubSubLink.open(client, refuse)
    link.send("SUBSCRIBE", "link-test")
    with pytest.raises(ValueError, match="cannot take it"):
        await asyncio.wait_for(link.closed, 5)


class GoesQuiet:
    """A fake Redis that answers the connection's set-up and subscriptions, then never
    answers a PING: a connection that is up but whose other end no longer answers."""

    def __init__(self) -> None:
        self.connections = 0
        self.pings = 0
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        parser = hiredis.Reader()
        subscribed = 0
        while data := await reader.read(65536):
            parser.feed(data)
            while (command := parser.gets()) is not False:
                name = command[0].upper()
                if name == b"PING":
                    self.pings += 1  # and no answer
                elif name in (b"SUBSCRIBE", b"SSUBSCRIBE"):
                    for channel in command[1:]:
                        subscribed += 1
                        writer.write(b"*3\r\n$9\r\nsubscribe\r\n")
                        writer.write(b"$%d\r\n%s\r\n:%d\r\n" % (len(channel), channel, subscribed))
                else:
                    writer.write(b"+OK\r\n")
        writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        for writer in self.writers:
            writer.close()
        self.server.close()
        await self.server.wait_closed()


async def test_the_hub_gives_up_a_link_whose_ping_goes_unanswered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(hub_module, "IDLE_PING_S", 0.2)
    quiet = GoesQuiet()
    port = await quiet.start()
    fake = aredis.Redis(host="127.0.0.1", port=port)
    hub = Hub(lambda: fake)

    class Listener:
        losses = 0

        def on_event(self, seq: int, event: str) -> None: ...

        def on_unsequenced(self, event: str, sender: str | None) -> None: ...

        def on_possible_loss(self) -> None:
            self.losses += 1

    listener = Listener()
    try:
        await hub.join("acme", "room", listener)
        assert keys.stream_channel("acme", "room")
        # Quiet, pinged, unanswered for as long again: connected anew, and the listener
        # told it may have missed events while the link was dead.
        await until(lambda: quiet.connections >= 2, "a new connection")
        await until(lambda: listener.losses >= 1, "the listener told")
        assert quiet.pings >= 1
    finally:
        await hub.close()
        await fake.aclose()
        await quiet.stop()
