"""Store tests: the Lua scripts, run records and Celery messages against a real Redis.

Which Redis: the database just below SWITCHBOARD_TEST_REDIS_URL's (default 14), flushed before
every test. When nothing answers there, an embedded Redis is started for these tests
(project.launcher), so they never skip.

Pointing Django at it: pytest-django loads project.settings in its own
pytest_load_initial_conftests hook, before any conftest.py is imported, so setting REDIS_URL
in the environment from here (module level or pytest_configure) comes too late for the
settings to read it. The package fixture below therefore overrides the loaded settings with
the test Redis instead (REDIS_URL and CELERY_BROKER_URL, through override_settings, so
project.conf and the key names built from it follow), plus what was built from them before:
the Celery app's broker and the cached clients of streams.redis_clients. `REDIS_URL=...
pytest` in the environment works as well.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
import pytest_asyncio
import redis
import redis.asyncio as aredis
from django.conf import settings
from django.test import override_settings

import agents
from agents import Agent, PythonStep, Step
from orchestration.inflight import InFlight
from orchestration.steps import StepOutcome
from orchestration.steps import execute_step as execute_step_async
from project.celery import app as celery_app
from project.launcher import Cluster
from realtime.protocol import Publish, Send
from streams import keys, redis_clients
from streams.log import Appended, StreamStore
from streams.runs import AsyncRunStore, RunStore
from tests.conftest import neighbour_database

T = TypeVar("T")

TENANT = "acme"
CLIENT = "alice"


@pytest.fixture(scope="package", autouse=True)
def store_redis_url(test_redis_url: str) -> Iterator[str]:
    # The database below the integration suite's: its cluster runs while these flush.
    cluster = Cluster(redis_url=neighbour_database(test_redis_url, -1))
    url = cluster.ensure_redis()
    test_redis = override_settings(REDIS_URL=url, CELERY_BROKER_URL=url)
    saved_broker = celery_app.conf.broker_url
    try:
        test_redis.enable()
        celery_app.conf.broker_url = url
        redis_clients.reset_after_fork()
        yield url
    finally:
        # Leave the test database empty for whoever uses it next.
        with redis.Redis.from_url(url) as client:
            client.flushdb()
        test_redis.disable()
        celery_app.conf.broker_url = saved_broker
        redis_clients.reset_after_fork()
        cluster.stop()


@pytest.fixture
def r(store_redis_url: str) -> Iterator[redis.Redis]:
    """A plain client on the flushed test database, to look at what the scripts wrote."""
    client = redis.Redis.from_url(store_redis_url)
    client.flushdb()
    keys.forget_registered()  # the tenant registry went with the flush
    yield client
    client.close()


class Streams:
    """The gateway's async StreamStore, driven from sync tests: one event loop per call."""

    def __init__(self, url: str) -> None:
        self.url = url

    def run(self, work: Callable[[StreamStore], Awaitable[T]]) -> T:
        async def main() -> T:
            client = aredis.Redis.from_url(self.url)
            try:
                return await work(StreamStore(client))
            finally:
                await client.aclose()

        return asyncio.run(main())

    def publish(
        self,
        stream: str,
        message_id: str,
        data: Any = None,
        *,
        tenant: str = TENANT,
        client: str = CLIENT,
        retention: int | None = None,
    ) -> Appended:
        frame = Publish(message_id, stream, data)
        return self.run(lambda store: store.publish(tenant, client, frame, retention))

    def send(
        self,
        stream: str,
        message_id: str,
        text: str,
        *,
        agent: str = "echo",
        options: dict[str, Any] | None = None,
        prev: str | None = None,
        tenant: str = TENANT,
        client: str = CLIENT,
    ) -> Appended:
        frame = Send(message_id, stream, agent, text, options or {}, prev)
        definition = agents.get_agent(agent)
        return self.run(lambda store: store.accept_send(tenant, client, frame, definition))

    def read(self, stream: str, first: int, last: int, tenant: str = TENANT) -> list[int]:
        events = self.run(lambda store: store.read(tenant, stream, first, last))
        return [seq for seq, _ in events]


@pytest.fixture
def streams(r: redis.Redis, store_redis_url: str) -> Streams:
    return Streams(store_redis_url)


@pytest.fixture
def runs(r: redis.Redis) -> RunStore:
    return RunStore(r)


def execute_step(store: RunStore, run_id: str, step: int, retries: int = 0) -> StepOutcome:
    """One step as a worker's runtime runs it (orchestration/steps.py), on an event loop of
    its own, with what a worker runs beside it: the lease renewal and the stop listener."""

    async def main() -> StepOutcome:
        url = settings.REDIS_URL
        client = aredis.Redis.from_url(url)
        listener_client = aredis.Redis.from_url(url)
        async_store = AsyncRunStore(client, lease_s=store.lease_s)
        inflight = InFlight(async_store)
        services = [
            asyncio.create_task(inflight.keep_leases()),
            asyncio.create_task(inflight.listen(listener_client)),
        ]
        try:
            # Subscribed before the step starts, so a stop published at once is heard.
            await asyncio.sleep(0.05)
            return await asyncio.create_task(
                execute_step_async(async_store, inflight, run_id, step, retries)
            )
        finally:
            for service in services:
                service.cancel()
            await asyncio.gather(*services, return_exceptions=True)
            await client.aclose()
            await listener_client.aclose()

    return asyncio.run(main())


def count_pipelines(client: aredis.Redis) -> list[tuple[Any, ...]]:
    """Spy on `client`: the returned list grows by one for each pipeline it opens (how
    requests made together are shown to share a round trip)."""
    opened: list[tuple[Any, ...]] = []
    make = client.pipeline

    def counted(*args: Any, **kwargs: Any) -> Any:
        opened.append(args)
        return make(*args, **kwargs)

    client.pipeline = counted  # type: ignore[method-assign]
    return opened


def log_events(r: redis.Redis, stream: str, tenant: str = TENANT) -> list[dict[str, Any]]:
    """The stream's retained events, parsed; each entry's id must be its event's seq."""
    events = []
    for entry_id, fields in r.xrange(keys.stream_log(tenant, stream)):
        event = json.loads(fields[b"e"])
        assert entry_id.decode() == f"{event['seq']}-0"
        events.append(event)
    return events


def of_kind(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [event for event in events if event["kind"] == kind]


@pytest.fixture
def register_agent(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Agent]:
    """Register an agent for one test only."""
    monkeypatch.setattr(agents, "_registry", dict(agents._registry))

    def register(
        name: str, *steps: Step | PythonStep, deadline_s: float = 30.0, **extra: Any
    ) -> Agent:
        steps = steps or (Step(backend="simulated"),)
        return agents.register(Agent(name=name, steps=steps, deadline_s=deadline_s, **extra))

    return register


@pytest_asyncio.fixture
async def cluster(redis_cluster_url: str) -> AsyncIterator[aredis.RedisCluster]:
    """A plain asyncio client of the Redis Cluster the cluster tests run on."""
    client = aredis.RedisCluster.from_url(redis_cluster_url)
    await client.initialize()
    yield client
    await client.aclose()
