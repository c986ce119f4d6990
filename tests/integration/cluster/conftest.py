"""The integration suite again, on the engines a large deployment runs: the data plane on
a Redis Cluster of 3 masters and 3 replicas (REDIS_CLUSTER_URL, started here on loopback by
project/redis_cluster.py) and Celery on RabbitMQ (a virtual host of its own per session).

The modules here import a chosen set of the suite's own test functions (send, publish,
resume, presence, receipts, limits, cancel, agents, triggers): pytest runs them again with
this directory's `switchboard`, which overrides the suite's. Skipped, saying why, when no
redis-server of version 7 or later or no RabbitMQ is there.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
from collections.abc import Iterator
from urllib.parse import quote

import pytest
import redis
from redis.cluster import RedisCluster as RedisClusterClient

from project.redis_cluster import RedisCluster
from tests.conftest import neighbour_database, own_redis_cluster
from tests.integration.conftest import Switchboard, running_switchboard

RABBITMQ_HOST, RABBITMQ_PORT = "127.0.0.1", 5672
# SWITCHBOARD_TEST_RABBITMQ_URL: a broker of the tester's own (its virtual host used as
# given, never deleted); otherwise one made and deleted here on the local RabbitMQ.
RABBITMQ_URL_ENV = "SWITCHBOARD_TEST_RABBITMQ_URL"


class ClusterSwitchboard(Switchboard):
    """The process group on a Redis Cluster: tests that read keys read them through a
    cluster client (any key, wherever its slot lives)."""

    redis_cluster_url: str = ""

    def redis(self) -> redis.Redis:
        return RedisClusterClient.from_url(self.redis_cluster_url)  # type: ignore[return-value]


def _rabbitmq_answers() -> bool:
    try:
        with socket.create_connection((RABBITMQ_HOST, RABBITMQ_PORT), timeout=1):
            return True
    except OSError:
        return False


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="package")
def rabbitmq_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A RabbitMQ virtual host for this session alone, deleted afterwards: the suite's
    `amqp_vhost_url` (tests/conftest.py) where there is one, else one made here."""
    given = os.environ.get(RABBITMQ_URL_ENV)
    if given:
        yield given
        return
    try:
        yield request.getfixturevalue("amqp_vhost_url")
        return
    except pytest.FixtureLookupError:
        pass
    if not _rabbitmq_answers():
        pytest.skip(f"no RabbitMQ at {RABBITMQ_HOST}:{RABBITMQ_PORT} (or set {RABBITMQ_URL_ENV})")
    if shutil.which("rabbitmqctl") is None:
        pytest.skip(f"rabbitmqctl is needed to make a virtual host (or set {RABBITMQ_URL_ENV})")
    vhost = f"switchboard-cluster-test-{secrets.token_hex(5)}"
    _rabbitmqctl("add_vhost", vhost)
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield f"amqp://guest:guest@{RABBITMQ_HOST}:{RABBITMQ_PORT}/{quote(vhost, safe='')}"
    finally:
        _rabbitmqctl("delete_vhost", vhost)


@pytest.fixture(scope="package")
def redis_cluster() -> Iterator[RedisCluster]:
    """The package's own cluster: its failover tests kill masters."""
    yield from own_redis_cluster()


@pytest.fixture(scope="package")
def switchboard(
    request: pytest.FixtureRequest,
    test_redis_url: str,
    redis_cluster: RedisCluster,
    rabbitmq_url: str,
) -> Iterator[Switchboard]:
    def flush() -> None:
        for node in redis_cluster.masters_now():
            node.client().flushall()

    env = {
        "REDIS_CLUSTER_URL": redis_cluster.url,
        "CELERY_BROKER_URL": rabbitmq_url,
        # Every script call's keys must hash to one slot (streams/scripts.py).
        "SWITCHBOARD_CHECK_SCRIPT_SLOTS": "1",
    }
    # A single Redis is still given as REDIS_URL (a database of its own, +5 from the
    # suite's): whatever is not the data plane may use it; the streams must not.
    with running_switchboard(
        request,
        neighbour_database(test_redis_url, 5),
        env=env,
        broker_url=rabbitmq_url,
        flush=flush,
        board_class=ClusterSwitchboard,
    ) as board:
        assert isinstance(board, ClusterSwitchboard)
        board.redis_cluster_url = redis_cluster.url
        yield board
