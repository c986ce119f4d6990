"""One per gateway process: the parts every connection of the process shares.

- `lifecycle`: admitted connections, and their drain on SIGTERM (realtime/lifecycle.py);
- `hub`: the process's pub/sub connection and in-memory fan-out (realtime/hub.py); it
  connects to Redis when the first stream is joined;
- `flusher`: the one task writing every socket's buffered frames (realtime/flusher.py);
- `checkpointer`: the task keeping open sessions' positions in Redis (realtime/sessions.py);
- `sweeper`: the gateway's own sweep of overdue runs (realtime/sweeper.py);
- `tenants`: the tenant watch, closing what an operator's change no longer admits
  (realtime/control.py);
- `streams`: the stream logs' store on the process's Redis client;
- `handshakes`: the line new connections wait in to be set up (realtime/handshakes.py).

Daphne gives an application no startup hook, so the tasks start with the first admitted
connection (`start`, on the gateway's event loop); a drain stops them after the last
connection has gone (`drain`). Connections find their node through `gateway_node()`;
tests give a consumer a node of their own.
"""

from __future__ import annotations

import asyncio
import logging

from project.conf import conf
from realtime.admission import retire_connection_registry
from realtime.control import TenantControl, tenant_control
from realtime.flusher import Flusher
from realtime.handshakes import HandshakeLine
from realtime.hub import Hub
from realtime.lifecycle import Lifecycle, install_daphne_drain
from realtime.sessions import Checkpointer, session_store
from realtime.sweeper import Sweeper
from streams.log import StreamStore
from streams.redis_clients import async_client, pubsub_client, pubsub_topology

logger = logging.getLogger(__name__)

# A drained process stops its tasks within this long, then stops whatever they were doing.
STOP_TIMEOUT_S = 1.0


class GatewayNode:
    def __init__(self, tenants: TenantControl | None = None) -> None:
        self.lifecycle = Lifecycle()
        self.hub = Hub(pubsub_client, pubsub_topology())
        self.flusher = Flusher()
        self.checkpointer = Checkpointer(session_store)
        self.sweeper = Sweeper()
        self.tenants = tenants if tenants is not None else tenant_control()
        self._streams: StreamStore | None = None
        self._handshakes: HandshakeLine | None = None
        self.started = False

    @property
    def streams(self) -> StreamStore:
        # Made when first used: the Redis client must be made after settings are final.
        if self._streams is None:
            self._streams = StreamStore(async_client())
        return self._streams

    @property
    def handshakes(self) -> HandshakeLine:
        if self._handshakes is None:
            config = conf()
            self._handshakes = HandshakeLine(config.handshake_concurrency, config.handshake_queue)
        return self._handshakes

    def start(self) -> None:
        """Start the process-wide tasks, once (each part also restarts its own task should
        it end). Called by every admitted connection: the first one starts them."""
        if self.started:
            return
        self.started = True
        self.flusher.start()
        self.checkpointer.start()
        self.sweeper.start()
        self.tenants.start()

    async def stop(self) -> None:
        """Stop the process-wide tasks and the hub's connection, for good: a drained
        lifecycle admits no connection that could need them again."""
        self.started = False
        stopping = asyncio.gather(
            retire_connection_registry(),
            self.sweeper.stop(),
            self.tenants.close(),
            self.checkpointer.stop(),
            self.flusher.stop(),
            self.hub.close(),
            return_exceptions=True,
        )
        try:
            await asyncio.wait_for(stopping, STOP_TIMEOUT_S)
        except TimeoutError:
            logger.warning("gateway tasks not stopped within %.1fs", STOP_TIMEOUT_S)

    async def drain(self, timeout_s: float) -> int:
        """Close every connection for restart, let their sessions be saved, then stop;
        returns how many connections were still open at the end."""
        try:
            return await self.lifecycle.drain(timeout_s)
        finally:
            await self.stop()

    def install_daphne_drain(self, timeout_s: float) -> None:
        """SIGTERM drains this node, then stops the reactor (under daphne only)."""
        install_daphne_drain(self.lifecycle, self.drain, timeout_s)


_node: GatewayNode | None = None


def gateway_node() -> GatewayNode:
    """This process's node."""
    global _node
    if _node is None:
        _node = GatewayNode()
    return _node
