"""Acks that wait for replicas: a write script followed by Redis `WAIT` on its connection.

Redis replicates asynchronously: a master that acknowledged a write and died before
sending it to a replica takes the write along when that replica is promoted. With
SWITCHBOARD_REPLICA_ACKS = N > 0, a client's `publish` or `send` is acked only once N
replicas hold it (docs/guarantees.md says what each setting promises).

`WAIT` counts the replicas that have everything *its own connection* wrote, so it is sent
right behind the script on the same connection, as one non-transactional pipeline: on a
single Redis redis-py's pipeline holds one connection; on a Redis Cluster both go down one
connection of the node that owns the script's slot (see `_on_slot_owner`).

A repeated message id (the client's retry after a lost ack or after a refusal here) writes
nothing, so a `WAIT` behind it would prove nothing about the first write: the repeat
re-sets the dedupe key's TTL instead (a write of that slot, so replicated after the
original one) and waits for that.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, TypeVar

import redis.asyncio as aredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from streams.scripts import Script

logger = logging.getLogger(__name__)

R = TypeVar("R")

AnyClient = aredis.Redis | AsyncRedisCluster


class NotReplicated(Exception):
    """The write is on the master, but fewer replicas than asked confirmed it in time (or
    the slot moved meanwhile): it is not acked, and may be lost by a failover. A retry with
    the same message id is safe (deduplicated) and waits again."""

    def __init__(self, wanted: int, confirmed: int) -> None:
        super().__init__(f"{confirmed} of {wanted} replicas confirmed the write in time")
        self.wanted = wanted
        self.confirmed = confirmed


# A command the cluster refused to run (moved slot, failover under way): not executed, so
# sent again once the slot map is read again.
_NOT_RUN = (MovedError, AskError, TryAgainError, ClusterDownError)
CLUSTER_ATTEMPTS = 3


async def _then_wait(
    client: AnyClient,
    key: str,
    commands: list[tuple[Any, ...]],
    replicas: int,
    timeout_ms: int,
) -> tuple[list[Any], int]:
    """Send `commands`, then `WAIT replicas timeout_ms`, down one connection of the node
    that owns `key`; answers the commands' results (errors as values) and the number of
    replicas that confirmed them."""
    waited = [*commands, ("WAIT", replicas, timeout_ms)]
    if isinstance(client, AsyncRedisCluster):
        results = await _on_slot_owner(client, key, waited)
    else:
        async with client.pipeline(transaction=False) as pipe:
            for command in waited:
                pipe.execute_command(*command)
            results = await pipe.execute(raise_on_error=False)
    *answers, confirmed = results
    if isinstance(confirmed, Exception):
        raise confirmed
    return list(answers), int(confirmed)


async def _on_slot_owner(
    client: AsyncRedisCluster, key: str, commands: list[tuple[Any, ...]]
) -> list[Any]:
    """`commands` pipelined on one connection of `key`'s master, by hand: redis-py's
    cluster pipeline re-sends a failed pipeline after re-reading the slot map, and on that
    second pass aims `WAIT` by its command flags, at other nodes, whose count would
    confirm nothing. Here a connection error is raised (the write may or may not have
    run: the caller's retry is deduplicated) and a refusal to run is retried."""
    for attempt in range(CLUSTER_ATTEMPTS):
        await client.initialize()  # the slot map (a no-op once read)
        node = client.get_node_from_key(key)
        if node is None:
            raise ClusterDownError(f"no master for the slot of {key!r}")
        connection = node.acquire_connection()
        try:
            await connection.send_packed_command(connection.pack_commands(commands))
            results: list[Any] = []
            for command in commands:
                try:
                    results.append(await node.parse_response(connection, command[0]))
                except ResponseError as error:
                    results.append(error)
        except (RedisConnectionError, RedisTimeoutError, OSError):
            await connection.disconnect()
            # As redis-py does after a connection error: the slot map is read again by the
            # next command (a failover may have moved the slot).
            await client.aclose()
            raise
        finally:
            node.release(connection)
        refused = next((r for r in results if isinstance(r, _NOT_RUN)), None)
        if refused is None or attempt == CLUSTER_ATTEMPTS - 1:
            return results
        if isinstance(refused, MovedError):
            await client.nodes_manager.move_slot(refused)
        else:
            await client.aclose()
            await asyncio.sleep(0.25)
    raise AssertionError("unreachable")  # pragma: no cover


async def run_replicated(
    call: Script[R], client: AnyClient, replicas: int, timeout_ms: int
) -> tuple[R, int]:
    """`call`'s answer and how many replicas (up to `replicas`, waiting at most
    `timeout_ms`) hold what it wrote. A script the node does not know yet (a new master
    after a failover) is loaded there and sent again: a script that did not run wrote
    nothing."""
    keys, args = call.keys(), call.args()
    script = call.LUA.on(client)  # type: ignore[arg-type]
    for attempt in range(2):
        answers, confirmed = await _then_wait(
            client,
            keys[0],
            [("EVALSHA", script.sha, len(keys), *keys, *args)],
            replicas,
            timeout_ms,
        )
        raw = answers[0]
        if isinstance(raw, NoScriptError) or (
            isinstance(raw, ResponseError) and str(raw).startswith("NOSCRIPT")
        ):
            if attempt == 0:
                await _load(client, keys[0], call.LUA.source_for(client))
                continue
        if isinstance(raw, Exception):
            raise raw
        return call.result(raw), confirmed
    raise AssertionError("unreachable")  # pragma: no cover


async def _load(client: AnyClient, key: str, source: str) -> None:
    if isinstance(client, AsyncRedisCluster):
        await client.initialize()
        node = client.get_node_from_key(key)
        await client.execute_command("SCRIPT LOAD", source, target_nodes=node)
    else:
        await client.script_load(source)


async def confirm_replicated(
    client: AnyClient, dedupe_key: str, dedupe_ttl_s: int, replicas: int, timeout_ms: int
) -> None:
    """For a repeated message id: wait until `replicas` replicas hold its first write (see
    the module's docstring). The dedupe key is re-set to its full TTL: a client retrying
    now is remembered at least as long as when it first sent. Raises NotReplicated."""
    _, confirmed = await _then_wait(
        client, dedupe_key, [("EXPIRE", dedupe_key, dedupe_ttl_s)], replicas, timeout_ms
    )
    if confirmed < replicas:
        raise NotReplicated(replicas, confirmed)
