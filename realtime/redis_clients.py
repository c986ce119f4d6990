"""Redis clients, one pool per process, sized and timed deliberately (see settings)."""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aredis
from django.conf import settings

_async_client: aredis.Redis | None = None
_sync_client: redis.Redis | None = None


def _pool_options() -> dict[str, Any]:
    """A blocking pool waits for a free connection instead of raising MaxConnectionsError
    in a handshake burst (redis-py 8's pool cap); reads outlive its 5 s default timeout."""
    return {
        "max_connections": settings.REDIS_MAX_CONNECTIONS,
        "timeout": 10,
        "socket_timeout": settings.REDIS_SOCKET_TIMEOUT_S,
        "socket_connect_timeout": 5,
        "health_check_interval": 15,
    }


def async_client() -> aredis.Redis:
    """The event loop's client (gateways)."""
    global _async_client
    if _async_client is None:
        pool = aredis.BlockingConnectionPool.from_url(settings.REDIS_URL, **_pool_options())
        _async_client = aredis.Redis(connection_pool=pool)
    return _async_client


def sync_client() -> redis.Redis:
    """The blocking client (Celery workers, management commands)."""
    global _sync_client
    if _sync_client is None:
        pool = redis.BlockingConnectionPool.from_url(settings.REDIS_URL, **_pool_options())
        _sync_client = redis.Redis(connection_pool=pool)
    return _sync_client


def reset_after_fork() -> None:
    """A forked Celery child must not share its parent's sockets."""
    global _sync_client, _async_client
    _sync_client = None
    _async_client = None
