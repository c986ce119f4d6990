"""The process's one writer task: drains every socket whose outbound buffer has frames.

Daphne's `send` hands a frame to Twisted without suspending, so draining sockets one after
another from a single task costs no latency, and fanning an event out to 10,000 sockets
creates no task per socket. Each socket is written by this task alone, in buffer order.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

logger = logging.getLogger(__name__)


class Flushable(Protocol):
    def flush_now(self) -> bool: ...

    async def flush(self) -> None: ...


class Flusher:
    def __init__(self) -> None:
        self._dirty: dict[Flushable, None] = {}  # insertion-ordered set
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the writer task (again, should it have ended); on the gateway's loop."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def mark(self, connection: Flushable) -> None:
        self._dirty[connection] = None
        self.start()
        self._wakeup.set()

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._dirty:
                batch = list(self._dirty)
                self._dirty.clear()
                for connection in batch:
                    try:
                        if not connection.flush_now():
                            await connection.flush()
                    except Exception:
                        logger.exception("writing to a connection failed")
