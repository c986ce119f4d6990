"""Requests that arrive together go to Redis together: one pipeline per burst.

A reconnect storm ends thousands of connections in the same second, and each wants a
small write (its connection count released, its session's last positions). Sent one by
one they cost a round trip, a pooled connection and the client CPU of a command each,
and grow the Redis pool by hundreds of connections. `Batches` sends the first request
at once and gathers every request that arrives while a batch is in flight into the next:
a lone request waits for nothing, a burst costs a few pipelines. No timer, no I/O here:
the caller's `send` does the writing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

# One pipeline holds at most this many requests; the rest go in the next.
MAX_BATCH = 500


class Batches(Generic[Item, Result]):
    def __init__(
        self, send: Callable[[list[Item]], Awaitable[Sequence[Result | BaseException]]]
    ) -> None:
        """`send(items)` writes a batch and returns each item's result or exception."""
        self._send = send
        self._waiting: list[tuple[Item, asyncio.Future[Result]]] = []
        self._sender: asyncio.Task[None] | None = None

    def submit(self, item: Item) -> asyncio.Future[Result]:
        """The item's result, once its batch is written."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        self._waiting.append((item, future))
        if self._sender is None or self._sender.done():
            self._sender = loop.create_task(self._send_all())
        return future

    async def _send_all(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting[:MAX_BATCH], self._waiting[MAX_BATCH:]
            try:
                results: Sequence[Result | BaseException] = await self._send(
                    [item for item, _ in batch]
                )
            except Exception as error:  # noqa: BLE001 - every waiter of the batch gets it
                results = [error] * len(batch)
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():  # its caller gave up waiting
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
