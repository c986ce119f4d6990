"""SWITCHBOARD_REPLICA_ACKS on a single Redis without replicas: a `publish` or `send` is
written but not acked (NotReplicated, answered `unavailable`), and its resend with the same
id is deduplicated and waits for the replicas again. The cluster case, with replicas and a
failover, is tests/redis_cluster/test_failover.py."""

from __future__ import annotations

import pytest
import redis
from pytest_django.fixtures import Settings

from streams import keys
from streams.replication import NotReplicated
from tests.store.conftest import CLIENT, TENANT, Streams


@pytest.fixture
def replica_acks(settings: Settings) -> None:
    settings.SWITCHBOARD = {
        **settings.SWITCHBOARD,
        "REPLICA_ACKS": 1,
        "REPLICA_ACK_TIMEOUT_MS": 20,
    }


@pytest.mark.usefixtures("replica_acks")
def test_a_publish_no_replica_confirms_is_written_not_acked_and_its_resend_waits_again(
    streams: Streams, r: redis.Redis
) -> None:
    with pytest.raises(NotReplicated) as short:
        streams.publish("room", "m-1", {"n": 1})
    assert (short.value.wanted, short.value.confirmed) == (1, 0)
    assert streams.read("room", 1, 10) == [1]
    # The resend finds it (deduplicated), and still is not acked without a replica.
    with pytest.raises(NotReplicated):
        streams.publish("room", "m-1", {"n": 1})
    assert streams.read("room", 1, 10) == [1]
    assert r.ttl(keys.client_message(TENANT, CLIENT, "m-1")) > 0


@pytest.mark.usefixtures("replica_acks")
def test_a_send_no_replica_confirms_is_written_once_and_not_acked(
    streams: Streams, r: redis.Redis
) -> None:
    for _ in range(2):
        with pytest.raises(NotReplicated):
            streams.send("room", "s-1", "hi")
    assert streams.read("room", 1, 10) == [1]


def test_without_replica_acks_a_publish_is_acked_on_the_masters_word(streams: Streams) -> None:
    assert streams.publish("room", "m-1", {"n": 1}).seq == 1
