"""Tests against a real Redis Cluster of 3 masters and 3 replicas, started on loopback by
project/redis_cluster.py for the session (`redis_cluster`, tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from project.redis_cluster import RedisCluster


@pytest.fixture
def healed_redis_cluster(redis_cluster: RedisCluster) -> Iterator[RedisCluster]:
    """The session's Redis Cluster, with every node killed by the test started again (as
    a replica of whoever took over) and the cluster ok again afterwards."""
    yield redis_cluster
    for node in list(redis_cluster.nodes.values()):
        if not node.alive():
            redis_cluster.restart(node)
    redis_cluster.wait_ok(timeout=60)
    redis_cluster.wait_synced()
