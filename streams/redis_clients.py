"""Redis clients, one pool per process, sized and timed deliberately (see settings)."""

from __future__ import annotations

import asyncio
from contextvars import ContextVar
from typing import Any, cast

import redis
import redis.asyncio as aredis
from redis.asyncio.cluster import ClusterPipeline
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.cluster import RedisCluster
from redis.connection import parse_url
from redis.driver_info import DriverInfo
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry

from project.conf import conf

_async_client: aredis.Redis | None = None
_sync_client: redis.Redis | None = None
_pubsub_client: aredis.Redis | None = None
_pubsub_topology: ClusterTopology | None = None


def redis_cluster_url() -> str:
    """REDIS_CLUSTER_URL: any node of the Redis Cluster the data plane is on; empty for a
    single Redis at REDIS_URL."""
    return conf().redis_cluster_url


# What every connection tells Redis about its client (CLIENT SETINFO), built once: redis-py
# otherwise builds it per new connection, reading its own version from the installed
# package's metadata each time, which was a tenth of a gateway's CPU in a reconnect storm
# (a burst of handshakes grows the pool by hundreds of connections at once).
_DRIVER_INFO = DriverInfo()


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
        "timeout": conf().redis_pool_wait_s,
        "socket_timeout": conf().redis_socket_timeout_s,
        "socket_connect_timeout": 5,
        "health_check_interval": 15,
        "driver_info": _DRIVER_INFO,
    }


def _cluster_options(asynchronous: bool) -> dict[str, Any]:
    """The same spirit for a Redis Cluster client (REDIS_CLUSTER_URL), whose options differ:
    its `retry` is the cluster's own (on a connection error or timeout it refreshes the slot
    map and tries again, following a failover), and its pools are per node. The blocking
    client keeps a blocking pool per node; the asyncio cluster client has no blocking pool,
    so its commands wait for a place below the cap instead (BoundedAsyncRedisCluster)."""
    retry_class = AsyncRetry if asynchronous else Retry
    options: dict[str, Any] = {
        "retry": retry_class(ExponentialBackoff(cap=0.5, base=0.05), 4),
        "max_connections": conf().redis_max_connections,
        "socket_timeout": conf().redis_socket_timeout_s,
        "socket_connect_timeout": 5,
        "health_check_interval": 15,
        "driver_info": _DRIVER_INFO,
    }
    if not asynchronous:
        options["connection_pool_class"] = redis.BlockingConnectionPool
        options["timeout"] = conf().redis_pool_wait_s
    return options


# Set while a pipeline's execute holds one of a bounded cluster client's places: its
# redirected commands, sent again one by one inside it, must not wait for a second place
# (a full client would then wait on itself). Single commands never set it: nothing runs
# inside them that could ask again.
_holding_place: ContextVar[bool] = ContextVar("switchboard_holding_cluster_place", default=False)


class BoundedAsyncRedisCluster(AsyncRedisCluster):
    """The asyncio cluster client with two of its edges filed off.

    Its per-node pools do not wait for a free connection: past `max_connections` a command
    raises MaxConnectionsError, which a burst (hundreds of sockets closing at once, each
    leaving presence) reaches. Commands and pipelines here wait up to `wait_s` for one of
    `max_connections` places instead, and past it fail as the single-Redis blocking pool
    does (`pool_exhausted` is true of the error), which keeps every node's pool under its
    cap: a command uses one connection, a pipeline at most one per node. And its first
    commands, sent concurrently before the slot map is read, can fail inside redis-py (a
    connection not yet made); the map is read once, first, under a lock."""

    def __init__(self, *args: Any, wait_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._places = asyncio.Semaphore(kwargs.get("max_connections", 100))
        self._wait_s = wait_s
        self._first_map = asyncio.Lock()
        self._mapped = False

    async def wait_for_place(self) -> bool:
        """Take one place; False, taking none, inside a pipeline's execute (its place)."""
        if not self._mapped:
            async with self._first_map:
                if not self._mapped:
                    await self.initialize()
                    self._mapped = True
        if _holding_place.get():
            return False
        if self._places.locked():
            try:
                async with asyncio.timeout(self._wait_s):
                    await self._places.acquire()
            except TimeoutError as waited:
                raise RedisConnectionError("No connection available.") from waited
        else:
            await self._places.acquire()
        return True

    def release_place(self) -> None:
        self._places.release()

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        taken = await self.wait_for_place()
        try:
            return await super().execute_command(*args, **kwargs)
        finally:
            if taken:
                self.release_place()

    def pipeline(
        self, transaction: Any | None = None, shard_hint: Any | None = None
    ) -> ClusterPipeline:
        if shard_hint:
            return super().pipeline(transaction, shard_hint)  # which refuses it
        # redis-py's stubs leave an attribute abstract that its ClusterPipeline sets itself.
        return _BoundedClusterPipeline(self, transaction)  # type: ignore[abstract]


class _BoundedClusterPipeline(ClusterPipeline):
    """A pipeline of a BoundedAsyncRedisCluster: its execute holds one place throughout."""

    cluster_client: BoundedAsyncRedisCluster

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> Any:
        client = self.cluster_client
        taken = await client.wait_for_place()
        holding = _holding_place.set(True)
        try:
            return await super().execute(raise_on_error, allow_redirections)
        finally:
            _holding_place.reset(holding)
            if taken:
                client.release_place()


def pool_exhausted(error: BaseException) -> bool:
    """Whether `error` is a blocking pool giving up its wait for a free connection
    (REDIS_POOL_WAIT_S): the command was never sent, so the caller may refuse the work
    as overloaded, with nothing half done."""
    return (
        isinstance(error, RedisConnectionError)
        and isinstance(error.__cause__, asyncio.TimeoutError)
        and "No connection available" in str(error)
    )


def async_client() -> aredis.Redis:
    """The event loop's client (gateways). In cluster mode a RedisCluster client, which
    answers the same commands (typed as the single client's: they share its command set)."""
    global _async_client
    if _async_client is None:
        if conf().redis_cluster:
            cluster = BoundedAsyncRedisCluster.from_url(
                conf().redis_cluster_url,
                wait_s=conf().redis_pool_wait_s,
                **_cluster_options(asynchronous=True),
            )
            _async_client = cast(aredis.Redis, cluster)
            return _async_client
        pool = aredis.BlockingConnectionPool.from_url(
            conf().redis_url, **_pool_options(asynchronous=True)
        )
        _async_client = aredis.Redis(connection_pool=pool)
    return _async_client


def _pubsub_options() -> dict[str, Any]:
    return {
        **_pool_options(asynchronous=True),
        "retry": AsyncRetry(NoBackoff(), 0),
        "retry_on_error": [],
        "max_connections": 4,
    }


def pubsub_client() -> aredis.Redis:
    """The client of classic pub/sub (tenant control, worker stop), which never retries: a
    lost pub/sub connection must surface, since its listener subscribes again (and the
    hub re-reads every stream's log) after it; a transparent reconnect would come back
    subscribed to nothing and say nothing.

    In a Redis Cluster a classic PUBLISH reaches every node, so this client connects to any
    node that answers, the first of those known that does (see pubsub_topology)."""
    global _pubsub_client
    if _pubsub_client is None:
        url = redis_cluster_url()
        if url:
            topology = pubsub_topology()
            assert topology is not None
            options = {**_pubsub_options(), **_node_options(url)}
            base = options.pop("connection_class", aredis.Connection)
            options["connection_class"] = type(
                f"AnyNode{base.__name__}", (_AnyNodeConnection, base), {}
            )
            options["topology"] = topology
            pool = aredis.BlockingConnectionPool(**options)
        else:
            pool = aredis.BlockingConnectionPool.from_url(conf().redis_url, **_pubsub_options())
        _pubsub_client = aredis.Redis(connection_pool=pool)
    return _pubsub_client


def pubsub_topology() -> ClusterTopology | None:
    """In a Redis Cluster, the hub's view of it: which master a sharded channel is heard
    from, and a pub/sub client per node (realtime/hub.py). None on a single Redis."""
    global _pubsub_topology
    url = redis_cluster_url()
    if not url:
        return None
    if _pubsub_topology is None:
        _pubsub_topology = ClusterTopology(url)
    return _pubsub_topology


def _node_options(url: str) -> dict[str, Any]:
    """The URL's connection options (password, TLS...) for a client of one node: a cluster
    node has database 0 only."""
    options = dict(parse_url(url))
    for name in ("host", "port", "db", "path"):
        options.pop(name, None)
    return options


class ClusterTopology:
    """A Redis Cluster's slot map (a RedisCluster client, used for nothing else) and one
    plain client per node, which never retries (see pubsub_client): the hub's shards."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._cluster = aredis.RedisCluster.from_url(
            url,
            socket_connect_timeout=5,
            socket_timeout=conf().redis_socket_timeout_s,
            driver_info=_DRIVER_INFO,
        )
        self._ready = False
        self._clients: dict[str, aredis.Redis] = {}

    async def _initialized(self) -> aredis.RedisCluster:
        if not self._ready:
            await self._cluster.initialize()
            self._ready = True
        return self._cluster

    async def owner(self, channel: bytes) -> str:
        cluster = await self._initialized()
        node = cluster.get_node_from_key(channel)  # type: ignore[arg-type]
        assert node is not None
        return str(node.name)

    async def refresh(self) -> None:
        if not self._ready:
            await self._initialized()
            return
        await self._cluster.nodes_manager.initialize()

    def addresses(self) -> list[str]:
        """Every node known (the URL's first until the slot map is read), masters first."""
        found: list[str] = []
        if self._ready:
            nodes = self._cluster.get_nodes()
            found = [node.name for node in nodes if node.server_type == "primary"]
            found += [node.name for node in nodes if node.name not in found]
        parsed = parse_url(self.url)
        seed = f"{parsed.get('host', '127.0.0.1')}:{parsed.get('port', 6379)}"
        return found if seed in found else [*found, seed]

    def client(self, address: str) -> aredis.Redis:
        client = self._clients.get(address)
        if client is None:
            host, _, port = address.rpartition(":")
            pool = aredis.BlockingConnectionPool(
                host=host, port=int(port), **{**_pubsub_options(), **_node_options(self.url)}
            )
            client = self._clients[address] = aredis.Redis(connection_pool=pool)
        return client


class _AnyNodeConnection(aredis.Connection):
    """Connects to the first node of a Redis Cluster that answers, in the order
    ClusterTopology.addresses gives; when none does, reads the slot map again for the
    next attempt."""

    def __init__(self, *, topology: ClusterTopology, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._topology = topology

    async def _connect(self) -> None:
        failure: BaseException | None = None
        for address in self._topology.addresses():
            host, _, port = address.rpartition(":")
            self.host, self.port = host, int(port)
            try:
                await super()._connect()
                return
            except (OSError, TimeoutError) as error:
                failure = error
        try:
            await self._topology.refresh()
        except Exception:  # noqa: BLE001 - the connect error below is what the caller sees
            pass
        raise failure or OSError("no node of the Redis Cluster is known")


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
    global _sync_client, _async_client, _pubsub_client, _pubsub_topology
    _sync_client = None
    _async_client = None
    _pubsub_client = None
    _pubsub_topology = None


def as_text(reply: object) -> str:
    """A Redis string reply as text. Our clients keep replies as bytes (no
    decode_responses, so event JSON is passed through untouched); redis-py's types also
    allow str, and anything else here is a bug worth naming."""
    if isinstance(reply, bytes):
        return reply.decode()
    if isinstance(reply, str):
        return reply
    raise TypeError(f"expected a Redis string reply, got {type(reply).__name__}")
