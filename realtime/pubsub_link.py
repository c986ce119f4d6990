"""One pub/sub connection whose replies are handed on from the socket's own read callback.

Read through redis-py's PubSub, a notification reaches its sockets two turns of the event
loop after it arrives: the read callback feeds a stream reader and wakes the reading task,
which runs in the next turn, after everything else that turn made ready. In a reconnect
storm a turn of a gateway's loop is up to 100-250 ms of the storm's connects and closes
(switchboard_loop_long_turn_seconds), so every delivery paid about two of them. Here the
bytes are parsed (hiredis, which also packs the commands written) and each reply handed
to `on_reply` in the read callback itself: one turn fewer for every delivery, which is
most of the storm's lag.

redis-py still makes the connection (address, TLS, AUTH, client name: the pool's own
options); the link then takes over its transport and writes commands itself. A link is
used for pub/sub only, and closed, never reused, once it fails: `closed` holds why.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import hiredis
import redis.asyncio as aredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

logger = logging.getLogger(__name__)

Reply = Any  # a hiredis reply: a list for pub/sub, hiredis.ReplyError for an error


class PubSubLink(asyncio.Protocol):
    """A pub/sub connection, its replies handed to `on_reply` as they are parsed.

    `on_reply` runs inside the read callback: it must not block, and what it raises ends
    the link (`closed` then holds the error), as a lost connection does."""

    def __init__(self, on_reply: Callable[[Reply], None]) -> None:
        self._on_reply = on_reply
        self._parser = hiredis.Reader()
        self._transport: asyncio.Transport | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Read by the hub's reader; marked retrieved here too, so that a link failing after
        # its reader stopped (the hub closed) leaves no "never retrieved" warning.
        self.closed.add_done_callback(_retrieve)
        self.replies = 0  # how many have come: a quiet link is pinged

    @classmethod
    async def open(cls, client: aredis.Redis, on_reply: Callable[[Reply], None]) -> PubSubLink:
        """Connect as `client`'s pool would (its options), then take the connection over."""
        connection = client.connection_pool.make_connection()
        await connection.connect()
        reader, writer = connection._reader, connection._writer
        assert reader is not None and writer is not None
        link = cls(on_reply)
        transport: Any = writer.transport
        # The connection object lets go of the socket: from here on it is the link's. The
        # writer is kept: a stream writer closes its transport when it is collected.
        connection._reader = connection._writer = None
        link._writer = writer
        transport.set_protocol(link)
        link._transport = transport
        leftover = bytes(reader._buffer)  # nothing is expected after the handshake
        if leftover:
            link.data_received(leftover)
        if transport.is_closing():
            link.connection_lost(None)
        return link

    def send(self, *args: str | bytes | int) -> None:
        """Write one command; its answer comes to `on_reply` like any other reply."""
        self.send_many([args])

    def send_many(self, commands: list[tuple[str | bytes | int, ...]]) -> None:
        """Write several commands at once (a resubscription after a reconnect)."""
        transport = self._transport
        if transport is None or transport.is_closing() or self.closed.done():
            raise RedisConnectionError("the pub/sub connection is closed")
        transport.write(b"".join(hiredis.pack_command(command) for command in commands))

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        if not self.closed.done():
            self.closed.set_result(None)

    def fail(self, error: BaseException) -> None:
        """End the link because of `error`, which `closed` then raises."""
        if not self.closed.done():
            self.closed.set_exception(error)
        if self._transport is not None:
            self._transport.abort()

    # --- asyncio.Protocol ----------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        try:
            parser.feed(data)
            while True:
                reply = parser.gets()
                if reply is False:
                    return
                self.replies += 1
                if isinstance(reply, hiredis.ReplyError):
                    raise ResponseError(str(reply))
                self._on_reply(reply)
        except Exception as error:  # noqa: BLE001 - handed to the reader through `closed`
            self.fail(error)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_exception(
                RedisConnectionError(f"pub/sub connection lost: {exc or 'closed by the server'}")
            )

    def eof_received(self) -> bool:
        return False  # close the transport: a pub/sub connection has no half-closed use


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()
