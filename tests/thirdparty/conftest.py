"""Checks against real third-party model servers, run when one is available here.

llama.cpp's OpenAI-compatible server (from llama-cpp-python) serving a tiny random-weight
model made on the spot (make_tiny_gguf.py), and a real Switchboard (gateway and worker
processes, project/launcher.py) whose "openai" backend points at it.

llama-cpp-python is a C++ build of several minutes, so it is not a test dependency: set
SWITCHBOARD_LLAMA_PYTHON to a Python that has `llama_cpp` (with its server extra) and
`gguf`, or run the tests in one. Otherwise every test here skips before starting anything.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
import redis

from client.connection import SwitchboardClient
from project.launcher import Cluster, free_port, wait_until
from tenants.tokens import issue_token
from tests.conftest import neighbour_database

LLAMA_PYTHON_ENV = "SWITCHBOARD_LLAMA_PYTHON"
MODEL_MAKER = Path(__file__).with_name("make_tiny_gguf.py")
# The server's model name; llama-cpp-python serves its one model whatever name is asked.
MODEL_ALIAS = "tiny-random"
CONTEXT_TOKENS = 1024
TENANT = "acme"
KEY_PREFIX = "sbllama"
# Of SWITCHBOARD_TEST_REDIS_URL's database: one no other suite flushes (tests/conftest.py).
REDIS_DATABASE_OFFSET = -4
SKIP_REASON = (
    f"no llama_cpp: set {LLAMA_PYTHON_ENV} to a Python with llama-cpp-python[server] and gguf "
    "installed (docs/agents.md, 'Checking against llama.cpp')"
)


def llama_python_or_none() -> str | None:
    named = os.environ.get(LLAMA_PYTHON_ENV, "").strip()
    if named:
        return named
    if importlib.util.find_spec("llama_cpp") is not None:
        return sys.executable
    return None


@pytest.fixture(scope="session")
def llama_python() -> str:
    python = llama_python_or_none()
    if python is None:
        pytest.skip(SKIP_REASON)
    return python


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


@dataclass
class LlamaServer:
    base_url: str  # ends in /v1, as SWITCHBOARD_OPENAI_BASE_URL expects
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="session")
def llama_server(llama_python: str) -> Iterator[LlamaServer]:
    """llama-cpp-python's server on a free port, serving the tiny model, with the chat
    format that offers tools (chatml-function-calling)."""
    work = Path(tempfile.mkdtemp(prefix="switchboard-llama-"))
    model = work / "tiny.gguf"
    subprocess.run([llama_python, str(MODEL_MAKER), str(model)], check=True, timeout=60)
    port = free_port()
    log_path = work / "llama-server.log"
    with open(log_path, "ab") as log:
        server = subprocess.Popen(
            [
                llama_python,
                "-m",
                "llama_cpp.server",
                "--model",
                str(model),
                "--model_alias",
                MODEL_ALIAS,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--n_ctx",
                str(CONTEXT_TOKENS),
                "--chat_format",
                "chatml-function-calling",
                "--verbose",
                "False",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_until(
            lambda: _answers(f"{base_url}/models") or server.poll() is not None,
            60,
            "llama.cpp server",
        )
        if server.poll() is not None:
            raise RuntimeError(f"llama.cpp server exited:\n{log_path.read_text()[-3000:]}")
        yield LlamaServer(base_url, log_path)
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)
        shutil.rmtree(work, ignore_errors=True)


@dataclass
class Board:
    cluster: Cluster
    db_path: Path

    @property
    def url(self) -> str:
        return self.cluster.gateway_url(0)

    def token(self, client: str) -> str:
        with sqlite3.connect(self.db_path) as db:
            (secret,) = db.execute(
                "SELECT signing_secret FROM realtime_tenant WHERE slug = ?", (TENANT,)
            ).fetchone()
        return issue_token(secret, TENANT, client, 3600)

    def log_tails(self, lines: int = 40) -> str:
        return "\n".join(
            f"----- {name} -----\n{proc.log_tail(lines)}"
            for name, proc in self.cluster.processes.items()
        )


@pytest.fixture(scope="session")
def llama_switchboard(llama_server: LlamaServer, test_redis_url: str) -> Iterator[Board]:
    """A gateway and a worker whose "openai" backend is the llama.cpp server."""
    work = Path(tempfile.mkdtemp(prefix="switchboard-llama-it-"))
    db_path = work / "db.sqlite3"
    cluster = Cluster(
        redis_url=neighbour_database(test_redis_url, REDIS_DATABASE_OFFSET),
        gateways=1,
        workers=1,
        env={
            "DATABASE_URL": f"sqlite:///{db_path}",
            "SWITCHBOARD_KEY_PREFIX": KEY_PREFIX,
            "SWITCHBOARD_OPENAI_BASE_URL": llama_server.base_url,
            "SWITCHBOARD_OPENAI_MODEL": MODEL_ALIAS,
            "SWITCHBOARD_OPENAI_API_KEY_ENV": "",
            "SWITCHBOARD_MODEL_SOFT_LIMIT_S": "20",
            "SWITCHBOARD_MODEL_MAX_RETRIES": "0",
            "SWITCHBOARD_EXTRA_APPS": "tests.thirdparty.agents_app",
            "LOG_LEVEL": "INFO",
        },
        log_dir=work / "logs",
    )
    board = Board(cluster, db_path)
    try:
        url = cluster.ensure_redis()
        cluster.env["CELERY_BROKER_URL"] = url
        redis.Redis.from_url(url).flushdb()
        cluster.migrate()
        cluster.manage("create_tenant", TENANT)
        cluster.start()
    except BaseException:
        print(board.log_tails())
        cluster.stop()
        raise
    try:
        yield board
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)


Connect = Callable[[], Awaitable[SwitchboardClient]]


@pytest_asyncio.fixture
async def connect(llama_switchboard: Board, unique: Callable[[str], str]) -> AsyncIterator[Connect]:
    clients: list[SwitchboardClient] = []

    async def open_client() -> SwitchboardClient:
        token = llama_switchboard.token(unique("client"))
        client = await SwitchboardClient.connect(llama_switchboard.url, token)
        clients.append(client)
        return client

    yield open_client
    for client in clients:
        await client.close()
