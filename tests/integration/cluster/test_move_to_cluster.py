"""Moving a deployment from one Redis to a Redis Cluster with `manage.py copy_data_plane`
(orchestration/management/commands/copy_data_plane.py): a process group on one Redis (its
Celery broker too), stopped, its data plane copied, and a process group on the cluster
(RabbitMQ the broker) carries on where the first stopped. A client resumes its session
with exactly what it missed, a send already answered stays a duplicate, and the streams'
seqs continue.

Both groups use a key prefix of their own, so the package's group on the same cluster
(conftest.py) neither sees nor disturbs them, and a RabbitMQ virtual host of their own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest
import redis
from redis.cluster import RedisCluster as RedisClusterClient

from client.connection import SwitchboardClient
from project.launcher import ROOT
from project.redis_cluster import RedisCluster
from tests import rabbitmq
from tests.conftest import neighbour_database, rabbitmq_server_url
from tests.integration.conftest import TENANT, running_switchboard
from tests.integration.support import assert_contiguous, collect_run
from tests.integration.test_resume import drain_events

pytestmark = pytest.mark.asyncio

PREFIX = "sbmove"


def copy_data_plane(source_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The command, run as an operator runs it, configured as the first group was."""
    return subprocess.run(
        [sys.executable, "manage.py", "copy_data_plane", *args],
        cwd=ROOT,
        env={**os.environ, "REDIS_URL": source_url, "SWITCHBOARD_KEY_PREFIX": PREFIX},
        capture_output=True,
        text=True,
        timeout=120,
    )


def delete_prefix(redis_cluster: RedisCluster) -> None:
    for node in redis_cluster.masters_now():
        client = node.client()
        for name in client.scan_iter(match=f"{PREFIX}:*", count=1000):
            client.delete(name)


@pytest.fixture
def clean_cluster(redis_cluster: RedisCluster) -> Iterator[RedisCluster]:
    delete_prefix(redis_cluster)
    yield redis_cluster
    delete_prefix(redis_cluster)


@pytest.fixture
def own_vhost(rabbitmq_url: str) -> Iterator[str]:
    """A virtual host apart from the package group's: its workers must not take these
    runs' messages (they would look for them under the other prefix)."""
    vhost, url = rabbitmq.create_vhost(rabbitmq_server_url(), prefix="switchboard-move")
    try:
        yield url
    finally:
        rabbitmq.delete_vhost(vhost)


async def test_a_deployment_moved_to_a_cluster_carries_on_where_it_stopped(
    request: pytest.FixtureRequest,
    test_redis_url: str,
    clean_cluster: RedisCluster,
    own_vhost: str,
    unique: Callable[[str], str],
) -> None:
    stream, reader_id, writer_id = unique("moved"), unique("reader"), unique("writer")
    single_url = neighbour_database(test_redis_url, 6)
    env = {"SWITCHBOARD_KEY_PREFIX": PREFIX}

    with running_switchboard(request, single_url, env=env) as before:
        reader = await SwitchboardClient.connect(before.url, before.token(reader_id))
        await reader.subscribe(stream)
        writer = await SwitchboardClient.connect(before.url, before.token(writer_id))
        published = [await writer.publish(stream, {"n": n}) for n in range(3)]
        sent = await writer.send(stream, "echo", "before the move")
        answered = await collect_run(reader, stream, sent["id"])
        seen = [event for event in answered if event.get("seq") is not None]
        await reader.close()
        # Published after the reader left: what its session must get on the cluster.
        missed = [await writer.publish(stream, {"n": n}) for n in range(3, 6)]
        await writer.close()

        # While the group runs, the copy is refused: its gateway still writes.
        refused = copy_data_plane(single_url, "--to", clean_cluster.url)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "gateway process(es) with a live lease" in refused.stderr

    copied = copy_data_plane(single_url, "--to", clean_cluster.url)
    assert copied.returncode == 0, copied.stdout + copied.stderr
    assert "copied " in copied.stdout
    cluster_client = RedisClusterClient.from_url(clean_cluster.url)
    assert int(cluster_client.get(f"{PREFIX}:s:{{{TENANT}}}:{stream}:seq")) == missed[-1]["seq"]

    # A second copy to the same cluster would mix two deployments: refused.
    again = copy_data_plane(single_url, "--to", clean_cluster.url)
    assert again.returncode == 1 and "already holds keys" in again.stderr

    cluster_env = {
        **env,
        "REDIS_CLUSTER_URL": clean_cluster.url,
        "CELERY_BROKER_URL": own_vhost,
    }
    with running_switchboard(
        request, neighbour_database(test_redis_url, 7), env=cluster_env, broker_url=own_vhost
    ) as after:
        assert not redis.Redis.from_url(after.redis_url).keys(f"{PREFIX}:s:*")
        resumed = await SwitchboardClient.connect(
            after.url, after.token(reader_id), session=reader.session
        )
        assert resumed.welcome["resumed"] is True
        caught_up = await drain_events(resumed, stream, missed[-1]["seq"])
        assert [event["seq"] for event in caught_up] == [ack["seq"] for ack in missed]

        writer = await SwitchboardClient.connect(after.url, after.token(writer_id))
        # The send answered before the move is still known: a duplicate, not a new run.
        repeated = await writer.send(stream, "echo", "before the move", id=sent["id"])
        assert (repeated["duplicate"], repeated["seq"]) == (True, sent["seq"])
        # A new send takes the next seq and is answered by the cluster's worker.
        fresh = await writer.send(stream, "echo", "after the move")
        assert fresh["seq"] == missed[-1]["seq"] + 1
        live = await collect_run(resumed, stream, fresh["id"], timeout=30)
        assert live[-1]["data"]["status"] == "ok"

        everything = seen + caught_up + [e for e in live if e.get("seq") is not None]
        assert everything[0]["seq"] == published[0]["seq"]
        assert_contiguous(everything)
        assert resumed.seq_anomalies == []
        await writer.close()
        await resumed.close()
