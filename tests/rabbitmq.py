"""A real RabbitMQ for the tests that run Celery on it: found, started, and split into vhosts.

RabbitMQ is a shared server (bin/dev test starts or installs it, as it does chromium), so a
test session never uses an existing vhost: it makes its own, named after a random id, and
deletes it (with its queues) at the end. Vhosts and queue counts go through `rabbitmqctl`,
which talks to the local node: a RabbitMQ elsewhere (SWITCHBOARD_TEST_AMQP_URL, read by
tests/conftest.py with the other switches) needs rabbitmqctl to reach it too.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
# Debian installs the server's commands under /usr/sbin, often not on a user's PATH.
SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin")


@dataclass(frozen=True)
class Session:
    """A test session's vhost: `url` names it; `server_url` is the server's URL as given."""

    server_url: str
    vhost: str
    url: str


class RabbitMQUnavailable(Exception):
    """No RabbitMQ answers and none could be started: the test skips and says this."""


def _command(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for directory in SBIN_DIRS:
        path = os.path.join(directory, name)
        if os.access(path, os.X_OK):
            return path
    return None


def answers(url: str, timeout_s: float = 2.0) -> bool:
    """Whether something accepts TCP connections at the URL's host and port."""
    parts = urlsplit(url)
    try:
        socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or 5672), timeout_s
        ).close()
    except OSError:
        return False
    return True


def ensure_running(url: str, timeout_s: float = 60.0) -> None:
    """Start Debian's rabbitmq-server (detached) when it is installed and nothing answers
    at `url`; RabbitMQUnavailable when that is not possible."""
    if answers(url):
        return
    server = _command("rabbitmq-server")
    if server is None:
        raise RabbitMQUnavailable(
            f"nothing answers at {url} and rabbitmq-server is not installed "
            "(bin/dev test installs it where allowed)"
        )
    subprocess.run([server, "-detached"], check=False, capture_output=True, timeout=60)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if answers(url):
            return
        time.sleep(0.5)  # an Erlang node boots in seconds: poll its port
    raise RabbitMQUnavailable(f"rabbitmq-server started but nothing answers at {url}")


def ctl(*args: str, timeout_s: float = 120.0) -> str:
    """Run rabbitmqctl against the local node; its stdout."""
    command = _command("rabbitmqctl")
    if command is None:
        raise RabbitMQUnavailable("rabbitmqctl is not installed")
    result = subprocess.run(
        [command, *args], check=True, capture_output=True, text=True, timeout=timeout_s
    )
    return result.stdout


def with_vhost(url: str, vhost: str) -> str:
    """`url` naming `vhost` (AMQP URLs carry the vhost, URL-quoted, as their path)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + quote(vhost, safe=""), "", ""))


def user_of(url: str) -> str:
    return urlsplit(url).username or "guest"


def create_vhost(url: str, prefix: str = "switchboard-test") -> tuple[str, str]:
    """A new vhost on the server, all permissions to the URL's user; (vhost, its URL)."""
    vhost = f"{prefix}-{uuid.uuid4().hex[:10]}"
    ctl("add_vhost", vhost)
    ctl("set_permissions", "-p", vhost, user_of(url), ".*", ".*", ".*")
    return vhost, with_vhost(url, vhost)


def delete_vhost(vhost: str) -> None:
    """Delete a vhost made by `create_vhost`, its queues and messages with it."""
    try:
        ctl("delete_vhost", vhost)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, RabbitMQUnavailable) as error:
        # Said, not raised: the tests are over; the vhost is to delete by hand.
        print(f"RabbitMQ vhost {vhost} not deleted: {error}", file=sys.stderr)


def queue_counts(vhost: str) -> dict[str, tuple[int, int]]:
    """Each queue of the vhost: (messages ready, messages delivered and unacknowledged)."""
    out = ctl(
        "list_queues",
        "-p",
        vhost,
        "--quiet",
        "--no-table-headers",
        "name",
        "messages_ready",
        "messages_unacknowledged",
    )
    counts: dict[str, tuple[int, int]] = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
            counts[fields[0]] = (int(fields[1]), int(fields[2]))
    return counts


class PrivateNode:
    """A RabbitMQ node of a test's own (Debian's rabbitmq-server, another node name, port
    and data directory): a test may stop and start it without touching the shared one."""

    def __init__(self, port: int, dist_port: int) -> None:
        self.port = port
        self.dist_port = dist_port  # Erlang distribution (rabbitmqctl talks to it)
        self.name = f"sbtest{port}@localhost"
        self.dir = Path(tempfile.mkdtemp(prefix="switchboard-rabbitmq-node-"))
        self.url = f"amqp://guest:guest@127.0.0.1:{port}/"

    def _env(self) -> dict[str, str]:
        return {
            **os.environ,
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_PID_FILE": str(self.dir / "pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            # Its own listener: the machine's rabbitmq.conf names the shared node's port.
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
        }

    def start(self, timeout_s: float = 90.0) -> None:
        server = _command("rabbitmq-server")
        if server is None:
            raise RabbitMQUnavailable("rabbitmq-server is not installed")
        for sub in ("mnesia", "log"):
            (self.dir / sub).mkdir(exist_ok=True)
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")
        if os.geteuid() == 0:
            # Debian's script runs the server as its own user when started by root.
            for path in [self.dir, *self.dir.rglob("*")]:
                shutil.chown(path, "rabbitmq", "rabbitmq")
        subprocess.run(
            [server, "-detached"], env=self._env(), check=False, capture_output=True, timeout=60
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if answers(self.url):
                return
            time.sleep(0.5)  # an Erlang node boots in seconds: poll its port
        raise RabbitMQUnavailable(f"a private RabbitMQ node did not answer on {self.port}")

    def ctl(self, *args: str) -> str:
        return ctl("-n", self.name, *args)

    def stop_app(self) -> None:
        """Stop the broker application (the Erlang node stays up): durable queues and
        persistent messages are kept for start_app."""
        self.ctl("stop_app")

    def start_app(self, timeout_s: float = 60.0) -> None:
        self.ctl("start_app")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not answers(self.url):
            time.sleep(0.2)  # start_app returns before the listener is up, at times

    def stop(self) -> None:
        try:
            self.ctl("stop")
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, RabbitMQUnavailable):
            pid_file = self.dir / "pid"
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
                except (ValueError, ProcessLookupError):
                    pass
        shutil.rmtree(self.dir, ignore_errors=True)
