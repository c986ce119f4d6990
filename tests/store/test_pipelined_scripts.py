"""Pipelined script calls on a single Redis (streams/scripts.py run_pipelined_async, the way
admissions, releases, presence and resumes are batched): one round trip per batch once the
scripts are known, and a server that forgot them (restarted, SCRIPT FLUSH) still answers
every call. The same on a Redis Cluster: tests/redis_cluster/test_scripts.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
import redis
import redis.asyncio as aredis
from redis.asyncio.client import Pipeline

from streams import scripts

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def client(r: redis.Redis, store_redis_url: str) -> AsyncIterator[aredis.Redis]:
    connection = aredis.Redis.from_url(store_redis_url)
    yield connection
    await connection.aclose()


def calls(count: int) -> list[scripts.ReleaseRecording]:
    return [scripts.ReleaseRecording(switch=f"sb:rec:t{n}", recording="r1") for n in range(count)]


async def test_a_batch_answers_every_call_after_the_server_forgot_its_scripts(
    client: aredis.Redis, r: redis.Redis
) -> None:
    r.set("sb:rec:t1", "r1")
    r.script_flush()
    results = await scripts.run_pipelined_async(client, calls(3))
    assert results == [False, True, False]
    assert not r.exists("sb:rec:t1")
    r.set("sb:rec:t2", "r1")
    assert await scripts.run_pipelined_async(client, calls(3)) == [False, False, True]


async def test_a_batch_of_known_scripts_is_one_round_trip(
    client: aredis.Redis, r: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    await scripts.run_pipelined_async(client, calls(2))  # the script known from here on
    asked: list[tuple[Any, ...]] = []
    immediate = Pipeline.immediate_execute_command

    async def counting(self: Pipeline, *args: Any, **options: Any) -> Any:
        asked.append(args)  # redis-py's SCRIPT EXISTS before a pipeline's scripts
        return await immediate(self, *args, **options)

    monkeypatch.setattr(Pipeline, "immediate_execute_command", counting)
    assert await scripts.run_pipelined_async(client, calls(5)) == [False] * 5
    assert asked == []
