"""Gateway tests: the consumer driven in-process by channels' WebsocketCommunicator, against
a real Redis; no daphne, no worker, no other process. Seconds for the whole package.

Which Redis: three databases below SWITCHBOARD_TEST_REDIS_URL's (default 12; three above
should that be database 0, which `bin/dev start` uses), flushed before every test, so the
integration (offset 0), store (-1) and browser (+1, -2 or +2) suites' databases are never
touched. When nothing answers there an embedded Redis is started (project.launcher), as
for the store suite, and settings are pointed at it the same way (override_settings, so
project.conf and the key names follow).

One event loop for the package (`loop_scope="package"` on every test and async fixture):
the gateway's process-wide stores and Redis clients are bound to the loop they were first
used on. They are made anew when the package starts and dropped when it ends, so neither
another suite's nor this one's leak across.

Each test gets a node of its own (realtime/node.py: hub, flusher, checkpointer, sweeper,
tenant watch), stopped after it, and consumers built on it. Tenants come from the test
database (`transactional_db`: the tenant cache reads them on a worker thread).
"""

from __future__ import annotations

import asyncio
import importlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any
from urllib.parse import urlencode

import pytest
import pytest_asyncio
import redis
from channels.testing import WebsocketCommunicator
from django.test import override_settings

from project.celery import app as celery_app
from project.conf import conf
from project.launcher import Cluster
from realtime.consumer import GatewayConsumer
from realtime.control import TenantControl
from realtime.node import GatewayNode
from realtime.routing import GATEWAY_PATH
from streams import keys, redis_clients
from streams.redis_clients import pubsub_client
from tenants.config import tenant_cache
from tenants.models import Tenant
from tenants.tokens import issue_token
from tests.conftest import neighbour_database

TENANT = "gateway-tier"
# Fixed, so the process's tenant cache (kept across tests) agrees with each test's row.
SECRET = "gateway-tier-signing-secret-of-32-bytes-or-more"
# Long enough for a loaded 2-core machine, short enough that a hang fails in seconds.
WAIT_S = 5.0

# Process-wide objects that hold a Redis client (or connections' state) made on another
# database or event loop; the rest look their client up through streams.redis_clients.
_PROCESS_SINGLETONS = (
    ("realtime.sessions", "_store"),
    ("realtime.admission", "_rates"),
    ("realtime.admission", "_registry"),
    ("realtime.presence", "_tracker"),
)


def gateway_redis_url(test_redis_url: str) -> str:
    """Three below the integration suite's database, and never database 0."""
    for offset in (-3, 3):
        url = neighbour_database(test_redis_url, offset)
        if url.rpartition("/")[2] != "0":
            return url
    raise AssertionError("unreachable: -3 and +3 cannot both be database 0")


def _forget_process_clients() -> None:
    redis_clients.reset_after_fork()
    for module, name in _PROCESS_SINGLETONS:
        setattr(importlib.import_module(module), name, None)


@pytest.fixture(scope="package", autouse=True)
def gateway_redis(test_redis_url: str) -> Iterator[str]:
    cluster = Cluster(redis_url=gateway_redis_url(test_redis_url))
    url = cluster.ensure_redis()
    test_redis = override_settings(REDIS_URL=url, CELERY_BROKER_URL=url)
    saved_broker = celery_app.conf.broker_url
    try:
        test_redis.enable()
        celery_app.conf.broker_url = url
        _forget_process_clients()
        yield url
    finally:
        with redis.Redis.from_url(url) as client:
            client.flushdb()
        test_redis.disable()
        celery_app.conf.broker_url = saved_broker
        _forget_process_clients()
        cluster.stop()


@pytest.fixture
def r(gateway_redis: str) -> Iterator[redis.Redis]:
    """A plain client on the flushed test database."""
    client = redis.Redis.from_url(gateway_redis)
    client.flushdb()
    keys.forget_registered()  # the tenant registry went with the flush
    yield client
    client.close()


@pytest.fixture
def tenant(transactional_db: None) -> Tenant:
    return Tenant.objects.create(slug=TENANT, signing_secret=SECRET)


@pytest_asyncio.fixture(loop_scope="package")
async def node(r: redis.Redis) -> AsyncIterator[GatewayNode]:
    tenants = TenantControl(tenant_cache, pubsub_client, conf().tenant_check_s)
    made = GatewayNode(tenants=tenants)
    yield made
    await made.stop()


class Socket:
    """One client connection to an in-process consumer, speaking JSON frames."""

    def __init__(self, communicator: WebsocketCommunicator) -> None:
        self.communicator = communicator
        self.closed: dict[str, Any] | None = None  # the server's close, once received

    async def send(self, frame: dict[str, Any]) -> None:
        await self.communicator.send_to(text_data=json.dumps(frame))

    async def send_text(self, text: str) -> None:
        await self.communicator.send_to(text_data=text)

    async def receive(self) -> dict[str, Any]:
        """The next frame; AssertionError if the server closed instead."""
        output = await self.communicator.receive_output(WAIT_S)
        if output["type"] == "websocket.close":
            self.closed = output
            raise AssertionError(f"closed by the server: {output}")
        assert output["type"] == "websocket.send", output
        return json.loads(output["text"])

    async def next_of(self, kind: str, stream: str | None = None) -> dict[str, Any]:
        """The next frame of type `kind`, passing over others: presence's join and leave
        events, and anything else a test does not look at."""
        while True:
            frame = await self.receive()
            if frame["type"] == kind and (stream is None or frame.get("stream") == stream):
                return frame

    async def events(self, stream: str, count: int) -> list[dict[str, Any]]:
        """The stream's next `count` sequenced events (presence's unsequenced ones passed)."""
        found: list[dict[str, Any]] = []
        while len(found) < count:
            frame = await self.next_of("event", stream)
            if frame.get("seq") is not None:
                found.append(frame)
        return found

    async def close_frame(self) -> dict[str, Any]:
        """The server's close (any frames before it are returned in `before`)."""
        before: list[dict[str, Any]] = []
        while True:
            output = await self.communicator.receive_output(WAIT_S)
            if output["type"] == "websocket.close":
                self.closed = output
                return {**output, "before": before}
            before.append(json.loads(output["text"]))

    async def nothing_more(self) -> bool:
        return await self.communicator.receive_nothing(timeout=0.05)

    async def disconnect(self) -> None:
        await self.communicator.disconnect()


Connect = Callable[..., Awaitable[Socket]]


@pytest_asyncio.fixture(loop_scope="package")
async def connect(node: GatewayNode, tenant: Tenant) -> AsyncIterator[Connect]:
    """Open a socket: `await connect("alice")` (token for `alice`), `query=` adds or
    replaces query parameters (`token=None` sends none); returns once it is accepted."""
    opened: list[Socket] = []
    app = GatewayConsumer.as_asgi(node=node)

    async def open_socket(client: str = "alice", **query: Any) -> Socket:
        params = {"token": issue_token(SECRET, TENANT, client), **query}
        path = GATEWAY_PATH + "?" + urlencode({k: v for k, v in params.items() if v is not None})
        communicator = WebsocketCommunicator(app, path)
        accepted, _ = await communicator.connect(WAIT_S)
        assert accepted, "the gateway accepts, then closes with a reason, when it refuses"
        socket = Socket(communicator)
        opened.append(socket)
        return socket

    yield open_socket
    for socket in opened:
        if socket.closed is None:
            await socket.disconnect()
        else:
            # Closed by the server: the consumer still waits for the disconnect message.
            await socket.communicator.send_input({"type": "websocket.disconnect", "code": 1000})
            await socket.communicator.wait(WAIT_S)


async def wait_until(condition: Callable[[], bool], timeout: float = WAIT_S) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)
