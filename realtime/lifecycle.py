"""Graceful drain of a gateway process, in the manner of uvicorn's Server.shutdown().

Each gateway process has one `Lifecycle`, held by its node (realtime/node.py): every
admitted connection is in it, and so is the work a drain must let finish.

On SIGTERM the process stops admitting sockets (new ones are closed with 1012 at once),
closes every open socket with 1012 "service restart" so clients reconnect elsewhere and
resume, waits up to SWITCHBOARD["DRAIN_S"] for them to go, then stops the reactor. A
second SIGTERM (or SIGINT) stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

logger = logging.getLogger(__name__)


def age_limit_s(max_age_s: float, draw: Callable[[], float]) -> float:
    """When a socket is closed for its age: up to a tenth before `max_age_s`, drawn per
    socket (`draw` in [0, 1)), so sockets opened together are not closed together."""
    return max_age_s * (1.0 - 0.1 * draw())


class Drainable(Protocol):
    def close_for_restart(self) -> None: ...


class Lifecycle:
    def __init__(self) -> None:
        self.connections: set[Drainable] = set()
        self.draining = False
        # Work a drain must let finish (sessions being saved, closes waiting on them).
        self._pending: set[asyncio.Future[Any]] = set()

    def track(self, work: Coroutine[Any, Any, Any] | asyncio.Future[Any]) -> None:
        future = asyncio.ensure_future(work)
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)

    def admit(self, connection: Drainable) -> bool:
        if self.draining:
            return False
        self.connections.add(connection)
        return True

    def forget(self, connection: Drainable) -> None:
        self.connections.discard(connection)

    async def drain(self, timeout_s: float) -> int:
        """Close every socket for restart; returns how many were still open at the end."""
        self.draining = True
        open_at_start = len(self.connections)
        for connection in list(self.connections):
            connection.close_for_restart()
        deadline = time.monotonic() + timeout_s
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self._pending:
            await asyncio.wait(list(self._pending), timeout=max(0.1, deadline - time.monotonic()))
        logger.info(
            "drained gateway: %s connections closed, %s left after %.1fs",
            open_at_start - len(self.connections),
            len(self.connections),
            timeout_s,
        )
        return len(self.connections)


def install_daphne_drain(
    lifecycle: Lifecycle, drain: Callable[[float], Awaitable[object]], timeout_s: float
) -> None:
    """Replace Twisted's SIGTERM handler (stop at once) with drain-then-stop: `drain` is the
    process's (realtime/node.py: the lifecycle's drain, then the process-wide tasks)."""
    if "daphne.server" not in sys.modules:
        return  # importing the reactor anywhere else would install the wrong one
    from twisted.internet import reactor

    def install() -> None:
        loop = asyncio.get_event_loop()

        def stop_now(*_: object) -> None:
            reactor.callFromThread(reactor.stop)  # type: ignore[attr-defined]

        async def drain_then_stop() -> None:
            try:
                await drain(timeout_s)
            finally:
                reactor.stop()  # type: ignore[attr-defined]

        def on_term(*_: object) -> None:
            if lifecycle.draining:
                stop_now()
                return
            logger.info("SIGTERM: draining %s connections", len(lifecycle.connections))
            loop.call_soon_threadsafe(lambda: loop.create_task(drain_then_stop()))

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, lambda *_: stop_now() if lifecycle.draining else on_term())

    reactor.callWhenRunning(install)  # type: ignore[attr-defined]
