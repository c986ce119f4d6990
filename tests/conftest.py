"""Fixtures any test may use. Suite-specific ones live in each suite's own conftest.py."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest
from django.conf import settings

if TYPE_CHECKING:
    from project.redis_cluster import RedisCluster

from tests import rabbitmq


@pytest.fixture(autouse=True, scope="session")
def _static_files_without_collectstatic() -> Iterator[None]:
    """Pages rendered in-process (Django's test client) name static files as they are: the
    manifest storage needs `collectstatic`'s output, which only the browser tests' and
    `bin/dev start`'s gateways are given."""
    from django.test.utils import override_settings

    plain = {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}
    with override_settings(STORAGES={**settings.STORAGES, "staticfiles": plain}):
        yield


@pytest.fixture(autouse=True, scope="session")
def _check_script_slots() -> Iterator[None]:
    """Every Lua script call's keys must hash to one slot, as a Redis Cluster demands: the
    single-Redis suites check it on every call (streams/scripts.py)."""
    from django.test.utils import override_settings

    checked = {**settings.SWITCHBOARD, "CHECK_SCRIPT_SLOTS": True}
    with override_settings(SWITCHBOARD=checked):
        yield


# Tests get their own Redis database, flushed before use: never a deployment's.
DEFAULT_TEST_REDIS_URL = "redis://127.0.0.1:6379/15"


@pytest.fixture(scope="session")
def test_redis_url() -> str:
    """The Redis URL tests may flush and fill (SWITCHBOARD_TEST_REDIS_URL overrides)."""
    return os.environ.get("SWITCHBOARD_TEST_REDIS_URL") or DEFAULT_TEST_REDIS_URL


def neighbour_database(url: str, offset: int) -> str:
    """The same Redis, another database: suites that flush must not flush each other.

    Offsets from SWITCHBOARD_TEST_REDIS_URL's database, one per suite: integration 0,
    store -1 (tests/store/conftest.py), browser +1 (-2 or +2 instead of database 0,
    tests/browser/conftest.py), gateway -3 (+3 instead of database 0,
    tests/gateway/conftest.py), third-party servers -4 (tests/thirdparty/conftest.py), the
    integration suite on a Redis Cluster +5 (tests/integration/cluster/conftest.py), the
    move from one Redis to the cluster +6 and +7 (its test_move_to_cluster.py), the
    store suite's copy target -5 (tests/store/test_redis_copy.py)."""
    base, _, database = url.rpartition("/")
    number = int(database) if database.isdigit() else 0
    return f"{base}/{(number + offset) % 16}"


@pytest.fixture
def unique() -> Callable[[str], str]:
    """Make names no other test uses: `unique("room")` -> "room-3f2a9c1d"."""

    def make(prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex[:8]}"

    return make


# The RabbitMQ tests' switches (tests/rabbitmq.py, tests/integration/test_rabbitmq.py).
# SWITCHBOARD_TEST_BROKER=rabbitmq runs the integration suite's cluster with Celery on
# RabbitMQ: a variable of the tests' own, not CELERY_BROKER_URL, since Celery lets that one
# override every app's configuration, so in the test process itself it would send every
# in-process publish to the shared server's default vhost.
BROKER_VAR = "SWITCHBOARD_TEST_BROKER"
# The RabbitMQ server the tests use (each session in a vhost of its own).
AMQP_URL_VAR = "SWITCHBOARD_TEST_AMQP_URL"
# 1: also run the test that stops and starts the (shared) local RabbitMQ node's broker.


def rabbitmq_requested() -> bool:
    """Whether the integration suite's cluster is to run Celery on RabbitMQ."""
    return os.environ.get(BROKER_VAR, "").lower() in {"rabbitmq", "amqp"}


def rabbitmq_server_url() -> str:
    """The RabbitMQ server the tests use; any vhost it names is replaced by a session's."""
    return os.environ.get(AMQP_URL_VAR) or rabbitmq.DEFAULT_AMQP_URL


@pytest.fixture(scope="session")
def rabbitmq_session() -> Iterator[rabbitmq.Session]:
    """A vhost of this session's own on the tests' RabbitMQ (tests/rabbitmq.py), deleted
    with its queues at the end; skips, saying why, when no RabbitMQ answers and none can
    be started."""
    try:
        server = rabbitmq_server_url()
        rabbitmq.ensure_running(server)
        vhost, url = rabbitmq.create_vhost(server)
    except rabbitmq.RabbitMQUnavailable as missing:
        pytest.skip(f"RabbitMQ: {missing}")
    try:
        yield rabbitmq.Session(server, vhost, url)
    finally:
        rabbitmq.delete_vhost(vhost)


@pytest.fixture(scope="session")
def amqp_vhost_url(rabbitmq_session: rabbitmq.Session) -> str:
    """The AMQP URL of the session's own vhost."""
    return rabbitmq_session.url


# A Redis Cluster for the tests that need one (tests/redis_cluster, tests/store): the one
# at SWITCHBOARD_TEST_REDIS_CLUSTER_URL, or else 3 masters and 3 replicas started on
# loopback for the session (project/redis_cluster.py); skipped, saying why, only when no
# redis-server of version 7 or later is found.
REDIS_CLUSTER_URL_VAR = "SWITCHBOARD_TEST_REDIS_CLUSTER_URL"


def own_redis_cluster() -> Iterator[RedisCluster]:
    """A Redis Cluster started here for its fixture's scope (skipped when no redis-server
    7 or later is found)."""
    from project.redis_cluster import RedisCluster, available

    reason = available()
    if reason:
        pytest.skip(reason)
    with RedisCluster.start_new() as running:
        yield running


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """A Redis Cluster this session started, which tests may break (kill -9 a node)."""
    yield from own_redis_cluster()


@pytest.fixture(scope="session")
def redis_cluster_url(request: pytest.FixtureRequest) -> str:
    """Any node of a Redis Cluster with a replica per master: the tester's own, or the
    session's `redis_cluster`."""
    given = os.environ.get(REDIS_CLUSTER_URL_VAR)
    if given:
        return given
    running: RedisCluster = request.getfixturevalue("redis_cluster")
    return running.url
