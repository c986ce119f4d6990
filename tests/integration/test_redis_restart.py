"""Redis restarting under a running Switchboard: with its data (append-only file) and
without. Gateways and workers reconnect by themselves; clients either lose nothing or are
told what was lost (history_expired), never left waiting.

These tests run their own Redis server and their own gateway and worker, since they
restart that server."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
import redis

from client.connection import SwitchboardClient, SwitchboardError
from client.reconnecting import ReconnectingClient
from project.launcher import Cluster, embedded_redis_binary, free_port, redis_answers, wait_until
from tenants.tokens import issue_token

from .conftest import CLUSTER_ENV, TENANT
from .support import assert_contiguous
from .support import wait_until as wait_until_async

pytestmark = pytest.mark.asyncio


class RestartableRedis:
    """A redis-server on a fixed port that a test can stop and start again, keeping its
    append-only file or not."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="switchboard-redis-restart-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                embedded_redis_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.dir),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: redis_answers(self.url), 15, "redis to answer")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)

    def restart(self, keep_data: bool, down_s: float = 0.0) -> None:
        """Stop the server and start it again, after `down_s` seconds of outage."""
        self.stop()
        if not keep_data:
            shutil.rmtree(self.dir)
            self.dir.mkdir()
        time.sleep(down_s)  # the outage itself, not a wait for anything
        self.start()


@dataclass
class Fixture:
    redis: RestartableRedis
    cluster: Cluster
    secret: str
    failed: bool = False

    def token(self, client: str) -> str:
        return issue_token(self.secret, TENANT, client, 3600, None, None)


@pytest.fixture(scope="module")
def restartable() -> Iterator[Fixture]:
    server = RestartableRedis()
    server.start()
    work = Path(tempfile.mkdtemp(prefix="switchboard-restart-"))
    cluster = Cluster(
        redis_url=server.url,
        gateways=1,
        workers=1,
        worker_concurrency=1,
        beat=False,
        env={
            **CLUSTER_ENV,
            "CELERY_BROKER_URL": server.url,
            "DATABASE_URL": f"sqlite:///{work / 'db.sqlite3'}",
        },
        log_dir=work / "logs",
    )
    fixture: Fixture | None = None
    try:
        cluster.migrate()
        cluster.manage("create_tenant", TENANT)
        secret = cluster.manage(
            "shell",
            "-v",
            "0",
            "-c",
            "from tenants.models import Tenant; "
            f"print(Tenant.objects.get(slug={TENANT!r}).signing_secret)",
        ).strip()
        cluster.start()
        fixture = Fixture(server, cluster, secret)
        yield fixture
    finally:
        if fixture is not None and fixture.failed:
            for name, proc in cluster.processes.items():
                print(f"----- {name} -----\n{proc.log_tail(200)}")
        cluster.stop()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(server.dir, ignore_errors=True)


@pytest_asyncio.fixture
async def client(restartable: Fixture) -> AsyncIterator[ReconnectingClient]:
    made = await ReconnectingClient.connect(
        restartable.cluster.gateway_url(0), restartable.token("restart-client"), max_backoff_s=0.5
    )
    yield made
    await made.close()


async def _restart(restartable: Fixture, keep_data: bool) -> None:
    await asyncio.to_thread(restartable.redis.restart, keep_data)


async def test_redis_restarting_with_its_data_loses_nothing(
    restartable: Fixture, client: ReconnectingClient
) -> None:
    stream = "kept"
    await client.subscribe(stream)
    before = [await client.publish(stream, {"n": n}) for n in range(3)]
    seen = [await client.next_event(stream) for _ in before]

    await _restart(restartable, keep_data=True)

    # The gateway's pool and pub/sub connection and the worker's broker connection all
    # come back on their own: publishing, live delivery and runs work again.
    after = [await client.publish(stream, {"n": n}, timeout=30) for n in range(3, 6)]
    assert after[0]["seq"] == before[-1]["seq"] + 1
    ack = await client.send(stream, "echo", "still here", timeout=30)
    deltas, done = await client.reply(ack["id"], timeout=30)
    assert done["data"]["status"] == "ok"
    events = seen[:]
    while events[-1]["seq"] < done["seq"]:
        events.append(await client.next_event(stream, timeout=15))
    assert_contiguous(events)
    assert [e["data"]["n"] for e in events if e["kind"] == "published"] == list(range(6))
    assert client.expired == []


async def test_a_redis_restart_under_steady_sends_costs_a_pause_not_replies(
    restartable: Fixture, client: ReconnectingClient
) -> None:
    """Runs in flight while Redis is down wait for it (their writes are retried, their soft
    limit times only the model) and queued runs keep their tickets: every run ends ok."""
    stream = "steady"
    await client.subscribe(stream)
    acks: list[dict[str, object]] = []
    options = {"latency_ms": 200, "chunks": 3, "chunk_delay_ms": 100}

    async def send_steadily() -> None:
        for n in range(30):
            acks.append(await client.send(stream, "echo", f"steady {n}", options, timeout=30))
            await asyncio.sleep(0.05)  # the client's pace

    sender = asyncio.create_task(send_steadily())
    await wait_until_async(
        lambda: asyncio.sleep(0, result=len(acks) >= 10), 30, "the first sends accepted"
    )
    await asyncio.to_thread(restartable.redis.restart, True, 1.5)
    await sender

    statuses = []
    for ack in acks:
        deltas, done = await client.reply(str(ack["id"]), timeout=30)
        statuses.append(done["data"]["status"])
        assert done["data"]["text"] == "".join(d["data"]["text"] for d in deltas)
    assert statuses == ["ok"] * 30, statuses
    assert len({ack["id"] for ack in acks}) == 30


async def test_redis_restarting_empty_tells_clients_what_was_lost(
    restartable: Fixture, client: ReconnectingClient
) -> None:
    stream = "lost"
    await client.subscribe(stream)
    acks = [await client.publish(stream, {"n": n}) for n in range(3)]
    for _ in acks:
        await client.next_event(stream)

    await _restart(restartable, keep_data=False)

    # The gateway notices the stream went back to 0 and says so instead of waiting for a
    # seq 4 that will never come.
    async with asyncio.timeout(20):
        while not client.expired:
            await asyncio.sleep(0.05)
    [expired] = client.expired
    assert (expired["code"], expired["stream"], expired["head"]) == ("history_expired", stream, 0)

    # Live again from the new beginning; a send still gets its one reply.
    fresh = await client.publish(stream, {"n": "new"}, timeout=30)
    assert fresh["seq"] == 1
    event = await client.next_event(stream, timeout=15)
    assert (event["seq"], event["data"]) == (1, {"n": "new"})
    ack = await client.send(stream, "echo", "after the loss", timeout=30)
    _, done = await client.reply(ack["id"], timeout=30)
    assert done["data"]["status"] == "ok"

    # The live connection writes its session back (owner and positions), so a later
    # reconnect still resumes it.
    r = redis.Redis.from_url(restartable.redis.url)
    key = f"{CLUSTER_ENV['SWITCHBOARD_KEY_PREFIX']}:sess:{{{TENANT}}}:{client.session}"
    await wait_until_async(
        lambda: asyncio.to_thread(lambda: r.hget(key, "client") == b"restart-client"),
        10,
        "the session written back",
    )
    assert int(r.hget(key, f"s:{stream}") or -1) >= 1


@pytest.fixture(autouse=True)
def _logs_on_failure(request: pytest.FixtureRequest, restartable: Fixture) -> Iterator[None]:
    yield
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        restartable.failed = True


async def test_a_frame_while_redis_is_away_is_answered_unavailable_and_applies_once_later(
    restartable: Fixture,
) -> None:
    """Redis out of reach is not a bug: `unavailable` (503) with a wait, not `internal`, and
    the same id sent again once it is back applies once."""
    client = await SwitchboardClient.connect(
        restartable.cluster.gateway_url(0), restartable.token("away-client")
    )
    try:
        await client.subscribe("away")
        await asyncio.to_thread(restartable.redis.stop)
        try:
            with pytest.raises(SwitchboardError) as refused:
                await client.publish("away", {"n": 1}, id="away-1", timeout=30)
            assert refused.value.code == "unavailable", refused.value
            assert refused.value.retry_after_ms
        finally:
            await asyncio.to_thread(restartable.redis.start)
        ack = await client.publish("away", {"n": 1}, id="away-1", timeout=30)
        again = await client.publish("away", {"n": 1}, id="away-1", timeout=30)
        assert (again["seq"], again["duplicate"]) == (ack["seq"], True)
    finally:
        await client.close()
