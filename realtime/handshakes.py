"""The handshake line: how many new connections a gateway process sets up at once.

Setting a connection up (token, admission, session, the resumed streams' catch-up) is a
few milliseconds of the process's one event loop and several Redis round trips. When
thousands arrive at once (a network blip, a gateway restart: a reconnect storm), doing
them all at once puts thousands of handshake steps in the loop's ready queue ahead of
every event for the connections already open, so delivery stalls for seconds, and the
burst grows the Redis pool by hundreds of connections. Taking them `concurrency` at a time
keeps the loop's queue short (delivery goes on between handshakes) and the pool small; the
total work is the same. The line is bounded: past `max_waiting` a newcomer is turned away
at once (closed 1012, which clients answer by reconnecting with backoff and jitter), and
one whose client gave up while it waited is dropped at its turn without any work.

Pure asyncio, no I/O: the consumer asks, the line answers.
"""

from __future__ import annotations

import asyncio

from ops import metrics


class LineFull(Exception):
    """The line holds `max_waiting` handshakes already."""


class HandshakeLine:
    def __init__(self, concurrency: int, max_waiting: int) -> None:
        self.concurrency = max(1, concurrency)
        self.max_waiting = max(0, max_waiting)
        self._turns = asyncio.Semaphore(self.concurrency)
        self.waiting = 0

    async def enter(self) -> None:
        """Wait for a turn (LineFull at once when the line is full). Pair with `leave`."""
        if self._turns.locked() or self.waiting:
            if self.waiting >= self.max_waiting:
                raise LineFull()
            self.waiting += 1
            metrics.handshakes_waiting(1)
            try:
                await self._turns.acquire()
            finally:
                self.waiting -= 1
                metrics.handshakes_waiting(-1)
        else:
            await self._turns.acquire()

    def leave(self) -> None:
        self._turns.release()
