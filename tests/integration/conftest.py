"""One real Switchboard for the integration suite: Redis, a daphne gateway and a Celery
worker as separate processes (project/launcher.py), driven over real sockets.

The "openai" backend of the cluster talks to a fake OpenAI-compatible provider
(tests/fakes/openai_server.py) run by this process, so tests can read every call it got;
the test-only agents of tests/integration/agents_app are installed beside the examples.

With SWITCHBOARD_TEST_BROKER=rabbitmq the cluster's Celery broker is RabbitMQ (a vhost of
the session's own, tests/rabbitmq.py) instead of the streams' Redis database.

Tenants live in the cluster's own SQLite file. pytest-django's test database is in memory
and the cluster's processes cannot see it, so nothing here goes through it: tenants are
made by the management commands, and tokens are signed with secrets read from that file.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import redis

from client.connection import SwitchboardClient
from project.launcher import Cluster, Proc
from tenants.tokens import issue_token
from tests.conftest import rabbitmq_requested
from tests.fakes.openai_server import FakeOpenAIServer

# Short limits so failure paths finish in seconds; tests read them from here.
SOFT_LIMIT_S = 1.5
RUN_DEADLINE_S = 8
KEY_PREFIX = "sbtest"
# The fake provider's default model: the prompt streamed back in 4 pieces 150 ms apart, so
# each piece is its own reply.delta (pieces further apart than DELTA_FLUSH_MS, 50 ms, are
# not coalesced).
PROVIDER_MODEL = "stream?pieces=4&delay_ms=150"
# API keys the provider must see: the backend's (by variable name, as in production) and
# one a tenant's agent grant names instead.
PROVIDER_KEY_ENV = "SWITCHBOARD_TEST_PROVIDER_KEY"
PROVIDER_KEY = "sk-switchboard-test-provider"
TENANT_KEY_ENV = "SWITCHBOARD_TEST_TENANT_KEY"
TENANT_KEY = "sk-switchboard-test-tenant"
METRICS_TOKEN = "switchboard-test-metrics-token"
CLUSTER_ENV = {
    # Every script call's keys must share a slot, as on a Redis Cluster (streams/scripts.py).
    "SWITCHBOARD_CHECK_SCRIPT_SLOTS": "1",
    # Not the default prefix, so the key-isolation test proves the setting is honoured.
    "SWITCHBOARD_KEY_PREFIX": KEY_PREFIX,
    "SWITCHBOARD_MODEL_SOFT_LIMIT_S": str(SOFT_LIMIT_S),
    "SWITCHBOARD_MODEL_RETRY_BACKOFF_S": "0.05",
    "SWITCHBOARD_MODEL_MAX_RETRIES": "3",
    # Tenant changes (disabling one) must reach the gateway within a test.
    "SWITCHBOARD_TENANT_CACHE_S": "0.3",
    # A run nobody can finish is ended by beat's sweeper at its deadline: keep both short.
    "SWITCHBOARD_RUN_DEADLINE_S": str(RUN_DEADLINE_S),
    "SWITCHBOARD_SWEEP_INTERVAL_S": "0.5",
    "SWITCHBOARD_RUN_LEASE_S": "1",
    # With a broker other than the streams' Redis (RabbitMQ), work whose message was lost
    # (a gateway killed before its publishing thread sent it) is woken by the sweep after
    # this grace: well within the runs' deadline, or they end `failed` first.
    "SWITCHBOARD_OUTBOX_GRACE_S": "1",
    # Tests publish far faster than a client may by default (20/s); tenants' default rates
    # are raised so that only the LIMITED_TENANTS below are rate limited.
    "SWITCHBOARD_CLIENT_MESSAGES_PER_S": "100000",
    "SWITCHBOARD_CLIENT_BURST": "100000",
    "SWITCHBOARD_TENANT_MESSAGES_PER_S": "100000",
    "SWITCHBOARD_TENANT_BURST": "100000",
    "SWITCHBOARD_CLIENT_RECEIPTS_PER_S": "100000",
    "SWITCHBOARD_CLIENT_RECEIPT_BURST": "100000",
    "LOG_LEVEL": "INFO",
    # The "openai" backend; its base URL (the fake's port) is added by the fixture.
    "SWITCHBOARD_OPENAI_MODEL": PROVIDER_MODEL,
    "SWITCHBOARD_OPENAI_API_KEY_ENV": PROVIDER_KEY_ENV,
    PROVIDER_KEY_ENV: PROVIDER_KEY,
    TENANT_KEY_ENV: TENANT_KEY,
    # Test-only agents (tests/integration/agents_app/agents.py).
    "SWITCHBOARD_EXTRA_APPS": "tests.integration.agents_app",
    # /metrics answers only this bearer token (tests/integration/test_metrics.py).
    "SWITCHBOARD_METRICS_TOKEN": METRICS_TOKEN,
}

TENANT = "acme"  # where most tests run
OTHER_TENANT = "globex"  # same stream names, must see nothing of TENANT
SMALL_TENANT = "tiny"  # stream_retention 5, for history_expired
DOOMED_TENANT = "doomed"  # disabled by a test
SMALL_RETENTION = 5
# Tiny flow-control limits (tests/integration/test_limits.py), one tenant per kind of bound
# so their counts and buckets never meet.
LIMITED_TENANTS = {
    "strict": {
        "client_messages_per_s": 1,
        "client_burst": 3,
        "tenant_messages_per_s": 1,
        "tenant_burst": 5,
    },
    "busy": {"max_runs_in_flight_per_connection": 2, "max_queued_runs": 3},
    "crowded": {"max_connections": 3, "max_connections_per_client": 2},
    "capped": {"max_connections": 2, "max_connections_per_client": 2},
}
# Fair scheduling (tests/integration/test_fairness.py): a tenant whose flood must be
# accepted (its per-connection and burst bounds raised) and a quiet one, both weight 1.
FLOOD_TENANT, QUIET_TENANT = "flood", "quiet"
LIMITED_TENANTS[FLOOD_TENANT] = {"max_runs_in_flight_per_connection": 100, "client_burst": 100}
LIMITED_TENANTS[QUIET_TENANT] = {"weight": 1}
# Hostile input (tests/integration/test_hostile.py): a few subscriptions and a short token
# lifetime; a slow receipt rate; the simulated backend's faults allowed by the tenant.
NARROW_TENANT, FRUGAL_TENANT, REHEARSAL_TENANT = "narrow", "frugal", "rehearsal"
LIMITED_TENANTS[NARROW_TENANT] = {
    "max_subscriptions_per_connection": 3,
    "max_token_lifetime_s": 7200,
}
LIMITED_TENANTS[FRUGAL_TENANT] = {
    "client_receipts_per_s": 1,
    "client_receipt_burst": 3,
    "client_messages_per_s": 1,
    "client_burst": 3,
}
LIMITED_TENANTS[REHEARSAL_TENANT] = {"fault_injection": True}
# Resume positions (tests/integration/test_resume.py): a frame limit a URL can exceed (a
# 64 KiB one is beyond what daphne reads of a request), and one connection, so a refusal
# that came after admission would say 4029 instead.
POSITIONS_TENANT = "tight"
LIMITED_TENANTS[POSITIONS_TENANT] = {"max_frame_bytes": 1024, "max_connections": 1}

_TENANT_SETUP = f"""
import json
from tenants.models import Tenant
for slug in {[OTHER_TENANT, SMALL_TENANT, DOOMED_TENANT, *LIMITED_TENANTS]!r}:
    Tenant.objects.get_or_create(slug=slug)
Tenant.objects.filter(slug={SMALL_TENANT!r}).update(stream_retention={SMALL_RETENTION})
for slug, limits in {LIMITED_TENANTS!r}.items():
    Tenant.objects.filter(slug=slug).update(**limits)
print(json.dumps(sorted(Tenant.objects.values_list("slug", flat=True))))
"""


@dataclass
class Switchboard:
    """The running cluster as the tests see it."""

    cluster: Cluster
    db_path: Path
    key_prefix: str
    # The fake model provider the cluster's "openai" backend calls.
    provider: FakeOpenAIServer

    @property
    def url(self) -> str:
        return self.cluster.gateway_url(0)

    @property
    def redis_url(self) -> str:
        assert self.cluster.redis_url
        return self.cluster.redis_url

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url)

    def secret(self, tenant: str) -> str:
        with sqlite3.connect(self.db_path) as db:
            row = db.execute(
                "SELECT signing_secret FROM realtime_tenant WHERE slug = ?", (tenant,)
            ).fetchone()
        if row is None:
            raise LookupError(f"no tenant {tenant!r}")
        return row[0]

    def token(
        self,
        client: str,
        tenant: str = TENANT,
        ttl_s: int = 3600,
        streams: list[str] | None = None,
        name: str | None = None,
    ) -> str:
        return issue_token(self.secret(tenant), tenant, client, ttl_s, streams, name)

    def shell(self, code: str) -> str:
        """Run Python in a Django shell of the cluster (its env, its database)."""
        return self.cluster.manage("shell", "-v", "0", "-c", code)

    def log(self, name: str) -> str:
        """Everything a process of the cluster ("worker-0", "gateway-0", ...) logged so far."""
        return self.cluster.processes[name].log_path.read_text(errors="replace")

    def log_tails(self, lines: int = 40) -> str:
        return "\n".join(
            f"----- {name} ({proc.log_path}) -----\n{proc.log_tail(lines)}"
            for name, proc in self.cluster.processes.items()
        )


@contextmanager
def running_switchboard(
    request: pytest.FixtureRequest,
    redis_url: str,
    *,
    env: dict[str, str] | None = None,
    broker_url: str | None = None,
    flush: Callable[[], None] | None = None,
    board_class: type[Switchboard] | None = None,
    worker_concurrency: int = 2,
) -> Iterator[Switchboard]:
    """The suite's process group, its tenants made, until the block ends. By default on
    the single Redis at `redis_url`, which is the Celery broker too (flushed first); other
    suites (tests/integration/cluster) add `env`, name another broker, flush their own
    data plane and read it through their own `board_class`."""
    work = Path(tempfile.mkdtemp(prefix="switchboard-it-"))
    db_path = work / "db.sqlite3"
    # Up before the cluster: its processes read the provider's URL at start.
    provider = FakeOpenAIServer().start()
    cluster = Cluster(
        redis_url=redis_url,
        gateways=1,
        workers=1,
        worker_concurrency=worker_concurrency,
        beat=True,
        env={
            **CLUSTER_ENV,
            "DATABASE_URL": f"sqlite:///{db_path}",
            "SWITCHBOARD_OPENAI_BASE_URL": provider.base_url,
            # The fake speaks Anthropic's Messages API too, on /v1/messages.
            "SWITCHBOARD_ANTHROPIC_BASE_URL": provider.base_url,
            **(env or {}),
        },
        log_dir=work / "logs",
    )
    board = (board_class or Switchboard)(cluster, db_path, KEY_PREFIX, provider)
    try:
        url = cluster.ensure_redis()
        if broker_url:
            cluster.env["CELERY_BROKER_URL"] = broker_url
        elif rabbitmq_requested():
            # RabbitMQ as the broker: Redis is the outbox, messages are wake-ups.
            broker = request.getfixturevalue("rabbitmq_session")
            cluster.env["CELERY_BROKER_URL"] = broker.url
        else:
            # The atomic enqueue needs the broker to be this very database.
            cluster.env["CELERY_BROKER_URL"] = url
        redis.Redis.from_url(url).flushdb()
        if flush is not None:
            flush()
        cluster.migrate()
        assert cluster.manage("create_tenant", TENANT) == f"tenant {TENANT} created"
        slugs = json.loads(board.shell(_TENANT_SETUP).splitlines()[-1])
        assert set(slugs) >= {TENANT, OTHER_TENANT, SMALL_TENANT, DOOMED_TENANT, *LIMITED_TENANTS}
        cluster.start()
    except BaseException:
        print(board.log_tails())
        cluster.stop()
        provider.stop()
        raise
    try:
        yield board
    finally:
        cluster.stop()
        provider.stop()
        if request.session.testsfailed:
            print(f"\nintegration cluster logs and database kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="session")
def switchboard(request: pytest.FixtureRequest, test_redis_url: str) -> Iterator[Switchboard]:
    with running_switchboard(request, test_redis_url) as board:
        yield board


@pytest.fixture
def provider(switchboard: Switchboard) -> FakeOpenAIServer:
    """The fake OpenAI-compatible provider behind the cluster's "openai" backend."""
    return switchboard.provider


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture(autouse=True)
def _process_logs_on_failure(
    request: pytest.FixtureRequest, switchboard: Switchboard
) -> Iterator[None]:
    """A failing test shows what the server processes said (captured output, teardown)."""
    yield
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        print(switchboard.log_tails())


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `run_last` inspect what the whole suite left behind."""
    items.sort(key=lambda item: item.get_closest_marker("run_last") is not None)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "run_last: run after every other test of the session")


Connect = Callable[..., Awaitable[SwitchboardClient]]


@pytest_asyncio.fixture
async def connect(switchboard: Switchboard, unique: Callable[[str], str]) -> AsyncIterator[Connect]:
    """`await connect()` opens a client of TENANT with a fresh client id; keyword
    arguments: client, tenant, streams, name, token (used as given) and the client's
    connect options. Every client is closed after the test."""
    clients: list[SwitchboardClient] = []

    async def open_client(
        client: str | None = None,
        tenant: str = TENANT,
        streams: list[str] | None = None,
        name: str | None = None,
        token: str | None = None,
        **options: Any,
    ) -> SwitchboardClient:
        if token is None:
            token = switchboard.token(
                client or unique("client"), tenant, streams=streams, name=name
            )
        opened = await SwitchboardClient.connect(switchboard.url, token, **options)
        clients.append(opened)
        return opened

    yield open_client
    for opened in clients:
        await opened.close()


StartGateway = Callable[..., tuple[str, Proc]]


@pytest.fixture
def start_gateway(switchboard: Switchboard) -> Iterator[StartGateway]:
    """`start_gateway(**env)` starts one more gateway process (1, 2, ...), with `env` added
    to the cluster's environment, and returns (its URL, its process); every gateway started
    is stopped after the test."""
    cluster = switchboard.cluster
    started: list[Proc] = []

    def start(**env: str) -> tuple[str, Proc]:
        saved = dict(cluster.env)
        cluster.env.update(env)
        index = len(cluster.gateway_ports)
        try:
            proc = cluster.start_gateway(index)
        finally:
            cluster.env.clear()
            cluster.env.update(saved)
        started.append(proc)
        return cluster.gateway_url(index), proc

    try:
        yield start
    finally:
        for proc in started:
            if proc.alive():
                proc.stop()
            cluster.processes.pop(proc.name, None)
        del cluster.gateway_ports[1:]


@contextmanager
def replaced_worker(switchboard: Switchboard, concurrency: int = 2, **env: str) -> Iterator[Proc]:
    """worker-0 swapped for a worker with `env` added (and `concurrency` pool threads) for
    the block, so it alone takes the runs; worker-0 is back afterwards."""
    cluster = switchboard.cluster
    cluster.processes["worker-0"].stop()
    saved_env, saved_concurrency = dict(cluster.env), cluster.worker_concurrency
    cluster.env.update(env)
    cluster.worker_concurrency = concurrency
    try:
        proc = cluster.start_worker(0)
    finally:
        cluster.env.clear()
        cluster.env.update(saved_env)
        cluster.worker_concurrency = saved_concurrency
    try:
        yield proc
    finally:
        for name in [name for name in cluster.processes if name.startswith("worker-")]:
            cluster.processes.pop(name).stop()
        cluster.start_worker(0)
