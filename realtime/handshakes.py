"""The handshake line: how many new connections a gateway process sets up at once.

Setting a connection up (token, admission, session, the resumed streams' catch-up) is a
few milliseconds of the process's one event loop and several Redis round trips. When
thousands arrive at once (a network blip, a gateway restart: a reconnect storm), doing
them all at once puts thousands of handshake steps in the loop's ready queue ahead of
every event for the connections already open, so delivery stalls for seconds, and the
burst grows the Redis pool by hundreds of connections. Taking them `concurrency` at a time
keeps the loop's queue short (delivery goes on between handshakes) and the pool small; the
total work is the same. And while the loop runs late (`LoopLag`: the process is short of
CPU, as every process is in a storm on a small machine), a handshake that would start
beside another waits for the loop to catch up: the connections already open come first,
and those coming back wait a little longer (at least one handshake always goes on).

The line is bounded: past `max_waiting` a newcomer is turned away at once (closed 1012,
which clients answer by reconnecting with backoff and jitter), and one whose client gave
up while it waited is dropped at its turn without any work.

No I/O here: the consumer asks, the line answers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ops import metrics

# The loop's lateness past which a handshake does not start beside another, and how often
# the loop is checked: small against the 250 ms a delivery may take in all.
BEHIND_S = 0.025
CHECK_S = 0.01


class LineFull(Exception):
    """The line holds `max_waiting` handshakes already."""


class LoopLag:
    """How late the event loop wakes a task that sleeps CHECK_S at a time: a process whose
    loop is busy or whose CPU is taken runs late. Started by the first `behind()`."""

    def __init__(self) -> None:
        self.late_s = 0.0
        self._task: asyncio.Task[None] | None = None

    def behind(self) -> bool:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._watch())
        return self.late_s > BEHIND_S

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(CHECK_S)
            self.late_s = max(0.0, loop.time() - before - CHECK_S)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None


class HandshakeLine:
    def __init__(
        self, concurrency: int, max_waiting: int, behind: Callable[[], bool] | None = None
    ) -> None:
        self.concurrency = max(1, concurrency)
        self.max_waiting = max(0, max_waiting)
        self._turns = asyncio.Semaphore(self.concurrency)
        self._behind = behind or (lambda: False)
        self.waiting = 0
        self.active = 0

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
        try:
            while self.active and self._behind():
                await asyncio.sleep(CHECK_S)
        except BaseException:
            self._turns.release()
            raise
        self.active += 1

    def leave(self) -> None:
        self.active -= 1
        self._turns.release()
