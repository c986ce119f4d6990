"""Redis clients, one pool per process, sized and timed deliberately (see settings)."""

from __future__ import annotations

from typing import Any, cast

import redis
import redis.asyncio as aredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry

from project.conf import conf

_async_client: aredis.Redis | None = None
_sync_client: redis.Redis | None = None
_pubsub_client: aredis.Redis | None = None


def _pool_options(asynchronous: bool) -> dict[str, Any]:
    """A blocking pool waits for a free connection instead of raising MaxConnectionsError
    in a handshake burst (redis-py 8's pool cap); reads outlive its 5 s default timeout.

    A command that finds its pooled connection closed (Redis restarted) is tried again on
    a new one, a few times over about a second. That is safe for every write here: each
    is idempotent or guarded by a dedupe key, an owner fence or an offset. Timeouts are
    not retried: they already waited."""
    retry_class = AsyncRetry if asynchronous else Retry
    return {
        "retry": retry_class(ExponentialBackoff(cap=0.5, base=0.05), 4),
        "retry_on_error": [RedisConnectionError],
        "max_connections": conf().redis_max_connections,
        "timeout": 10,
        "socket_timeout": conf().redis_socket_timeout_s,
        "socket_connect_timeout": 5,
        "health_check_interval": 15,
    }


def _cluster_options(asynchronous: bool) -> dict[str, Any]:
    """The same spirit for a Redis Cluster client (REDIS_CLUSTER_URL), whose options differ:
    its `retry` is the cluster's own (on a connection error or timeout it refreshes the slot
    map and tries again, following a failover), and its pools are per node. The blocking
    client keeps a blocking pool per node; the asyncio cluster client has no blocking pool,
    so its per-node cap is what bounds it (past it a command raises, which the cap's size
    makes a misconfiguration, not load)."""
    retry_class = AsyncRetry if asynchronous else Retry
    options: dict[str, Any] = {
        "retry": retry_class(ExponentialBackoff(cap=0.5, base=0.05), 4),
        "max_connections": conf().redis_max_connections,
        "socket_timeout": conf().redis_socket_timeout_s,
        "socket_connect_timeout": 5,
        "health_check_interval": 15,
    }
    if not asynchronous:
        options["connection_pool_class"] = redis.BlockingConnectionPool
        options["timeout"] = 10
    return options


def async_client() -> aredis.Redis:
    """The event loop's client (gateways). In cluster mode a RedisCluster client, which
    answers the same commands (typed as the single client's: they share its command set)."""
    global _async_client
    if _async_client is None:
        if conf().redis_cluster:
            cluster = AsyncRedisCluster.from_url(
                conf().redis_cluster_url, **_cluster_options(asynchronous=True)
            )
            _async_client = cast(aredis.Redis, cluster)
            return _async_client
        pool = aredis.BlockingConnectionPool.from_url(
            conf().redis_url, **_pool_options(asynchronous=True)
        )
        _async_client = aredis.Redis(connection_pool=pool)
    return _async_client


def pubsub_client() -> aredis.Redis:
    """The hub's own client, which never retries: a lost pub/sub connection must surface,
    since the hub resubscribes and re-reads every stream's log after it (a transparent
    reconnect would come back subscribed to nothing and say nothing)."""
    global _pubsub_client
    if _pubsub_client is None:
        options = {
            **_pool_options(asynchronous=True),
            "retry": AsyncRetry(NoBackoff(), 0),
            "retry_on_error": [],
            "max_connections": 4,
        }
        pool = aredis.BlockingConnectionPool.from_url(conf().redis_url, **options)
        _pubsub_client = aredis.Redis(connection_pool=pool)
    return _pubsub_client


def sync_client() -> redis.Redis:
    """The blocking client (Celery workers, management commands); a RedisCluster client in
    cluster mode, like async_client."""
    global _sync_client
    if _sync_client is None:
        if conf().redis_cluster:
            cluster = RedisCluster.from_url(
                conf().redis_cluster_url, **_cluster_options(asynchronous=False)
            )
            _sync_client = cast(redis.Redis, cluster)
            return _sync_client
        pool = redis.BlockingConnectionPool.from_url(
            conf().redis_url, **_pool_options(asynchronous=False)
        )
        _sync_client = redis.Redis(connection_pool=pool)
    return _sync_client


def reset_after_fork() -> None:
    """A forked Celery child must not share its parent's sockets."""
    global _sync_client, _async_client, _pubsub_client
    _sync_client = None
    _async_client = None
    _pubsub_client = None


def as_text(reply: object) -> str:
    """A Redis string reply as text. Our clients keep replies as bytes (no
    decode_responses, so event JSON is passed through untouched); redis-py's types also
    allow str, and anything else here is a bug worth naming."""
    if isinstance(reply, bytes):
        return reply.decode()
    if isinstance(reply, str):
        return reply
    raise TypeError(f"expected a Redis string reply, got {type(reply).__name__}")
