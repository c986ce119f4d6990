"""Browser tests: the demo page and the JavaScript client in headless Chromium (Debian's
`chromium` package, driven by Playwright's Python package; no browser is downloaded),
against a real Switchboard started through project/launcher.py, as `bin/dev start` does.

`bin/dev test` installs Debian's chromium when it is missing and it can (root, or sudo
without a password); without /usr/bin/chromium these tests skip, saying why.

The cluster has its own Redis database, next to the integration suite's (which uses
SWITCHBOARD_TEST_REDIS_URL's) and the store suite's (the one below it), so all three can run
in one pytest session; its own SQLite file, with the `demo` tenant; and the demo page on
(SWITCHBOARD_DEMO_TENANT). Screenshots go to test-artifacts/ at the repository's root.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode, urlsplit

import pytest
import redis

from project.launcher import ROOT, Cluster
from tests.conftest import neighbour_database

T = TypeVar("T")
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
DEMO_TENANT = "demo"
# Long enough for a loaded 2-core machine, short enough that a hang fails the test.
WAIT_MS = 20_000
CLUSTER_ENV = {
    "SWITCHBOARD_DEMO_TENANT": DEMO_TENANT,
    # Apart from the other suites' keys, should they ever share a database.
    "SWITCHBOARD_KEY_PREFIX": "sbbrowser",
    # A restarted gateway must not spend the default 5 s draining.
    "SWITCHBOARD_DRAIN_S": "0.5",
    "LOG_LEVEL": "INFO",
    # No model for the example agents (whatever this machine's environment says): the demo
    # page must mark them and show why their replies degrade.
    "SWITCHBOARD_OPENAI_MODEL": "",
    # The history persister runs (beat) often enough for a test to wait on it.
    "SWITCHBOARD_HISTORY_FLUSH_S": "0.5",
}
ADMIN_USER = "operator"
ADMIN_PASSWORD = "a-browser-test-password"


def browser_redis_url(test_redis_url: str) -> str:
    """A database next to the integration suite's (offset 0) and the store suite's (-1),
    and never database 0, which `bin/dev start` uses by default."""
    for offset in (1, -2, 2):
        url = neighbour_database(test_redis_url, offset)
        if url.rpartition("/")[2] != "0":
            return url
    raise AssertionError("unreachable: three offsets cannot all be database 0")


@dataclass
class DemoCluster:
    cluster: Cluster
    work: Path
    failed: bool = False  # a test failed: keep the logs

    @property
    def port(self) -> int:
        return self.cluster.gateway_ports[0]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restart_gateway(self) -> None:
        """SIGTERM the gateway (it drains, then closes its sockets with 1012) and start a
        new one on the same port, as a deploy does."""
        self.cluster.processes["gateway-0"].stop()
        self.cluster.start_gateway(0, self.port)

    def log_tails(self, lines: int = 40) -> str:
        return "\n".join(
            f"----- {name} ({proc.log_path}) -----\n{proc.log_tail(lines)}"
            for name, proc in self.cluster.processes.items()
        )


@pytest.fixture(scope="package")
def chromium_path() -> Path:
    if not CHROMIUM.exists():
        pytest.skip(
            f"{CHROMIUM} is missing: install Debian's chromium package (`apt-get install"
            " chromium`; `bin/dev test` does it when it runs as root or with sudo)"
        )
    return CHROMIUM


@pytest.fixture(scope="package")
def browser(chromium_path: Path) -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(chromium_path),
            headless=True,
            # Root in a container has no user namespace for Chromium's sandbox.
            args=["--no-sandbox", "--disable-dev-shm-usage"],
        )
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="package")
def demo_cluster(test_redis_url: str) -> Iterator[DemoCluster]:
    work = Path(tempfile.mkdtemp(prefix="switchboard-browser-"))
    cluster = Cluster(
        redis_url=browser_redis_url(test_redis_url),
        gateways=1,
        workers=1,
        worker_concurrency=2,
        beat=True,
        env={
            **CLUSTER_ENV,
            "DATABASE_URL": f"sqlite:///{work / 'db.sqlite3'}",
            # The admin's static files, collected as `bin/dev start` does.
            "SWITCHBOARD_STATIC_ROOT": str(work / "static"),
        },
        log_dir=work / "logs",
    )
    demo = DemoCluster(cluster, work)
    url = ""
    try:
        url = cluster.ensure_redis()
        # The atomic enqueue needs the broker to be this very database.
        cluster.env["CELERY_BROKER_URL"] = url
        redis.Redis.from_url(url).flushdb()
        cluster.migrate()
        cluster.collectstatic()
        cluster.manage("create_tenant", DEMO_TENANT)
        cluster.manage(
            "shell",
            "-c",
            "from django.contrib.auth.models import User; "
            f"User.objects.create_superuser({ADMIN_USER!r}, password={ADMIN_PASSWORD!r})",
        )
        cluster.start()
    except BaseException:
        print(demo.log_tails())
        cluster.stop()
        raise
    try:
        yield demo
    finally:
        cluster.stop()
        if url:
            with redis.Redis.from_url(url) as client:
                client.flushdb()
        if demo.failed:
            print(f"\nbrowser cluster logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    """asyncio.run in a thread of its own: once Playwright's sync API has started, this
    thread has an event loop running and asyncio.run refuses to start another."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


# Screenshots written this session, listed at the end of the run.
SAVED: list[Path] = []


def save_screenshot(page: Any, name: str, **options: Any) -> Path:
    """Screenshot the page into test-artifacts/ and list it in the run's summary."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), **options)
    SAVED.append(path)
    return path


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if SAVED:
        terminalreporter.section("browser test artifacts")
        for path in SAVED:
            terminalreporter.write_line(f"screenshot: {path}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    setattr(item, f"browser_report_{report.when}", report)
    return report


OpenPage = Callable[..., Any]


@pytest.fixture
def open_page(
    request: pytest.FixtureRequest, browser: Any, demo_cluster: DemoCluster
) -> Iterator[OpenPage]:
    """`open_page(stream, client=None, name=None)` opens the demo page in a new browser
    context (its own storage: another person) and waits until it is subscribed. When the
    test fails, each page's screenshot and console and the cluster's logs are kept."""
    contexts: list[Any] = []
    consoles: dict[int, list[str]] = {}
    problems: list[str] = []

    def open_demo(stream: str, client: str | None = None, name: str | None = None) -> Any:
        context = browser.new_context(viewport={"width": 1280, "height": 820})
        contexts.append(context)
        page = context.new_page()
        lines = consoles.setdefault(len(contexts), [])
        page.on("console", lambda message: lines.append(f"{message.type}: {message.text}"))
        page.on("pageerror", lambda error: lines.append(f"pageerror: {error}"))
        watch_for_problems(page, problems)

        def on_websocket(ws: Any) -> None:
            # Every frame, to tell a client's mistake from a server's when a test fails.
            lines.append("websocket opened")
            ws.on("framesent", lambda payload: lines.append(f"> {str(payload)[:300]}"))
            ws.on("framereceived", lambda payload: lines.append(f"< {str(payload)[:300]}"))
            ws.on("close", lambda _: lines.append("websocket closed"))

        page.on("websocket", on_websocket)
        query = {"stream": stream, **({"client": client} if client else {})}
        if name:
            query["name"] = name
        page.goto(f"{demo_cluster.base_url}/demo/?{urlencode(query)}")
        page.wait_for_selector("body[data-subscribed='true']", timeout=WAIT_MS)
        return page

    # `open_page.allow(REGEX)`: a problem the test causes on purpose (a gateway restart's
    # refused reconnects) does not fail it.
    allowed: list[str] = []
    open_demo.allow = allowed.append  # type: ignore[attr-defined]
    yield open_demo
    unexpected = [p for p in problems if not any(re.search(a, p) for a in allowed)]
    report = getattr(request.node, "browser_report_call", None)
    failed = report is not None and report.failed
    if failed:
        demo_cluster.failed = True
        for index, context in enumerate(contexts, 1):
            for page in context.pages:
                name = f"failed-{request.node.name}-{index}.png"
                path = save_screenshot(page, name, full_page=True)
                print(f"screenshot of the failed page: {path}")
        for index, lines in consoles.items():
            print(f"----- console and frames of page {index} -----\n" + "\n".join(lines))
        print(demo_cluster.log_tails())
    for context in contexts:
        context.close()
    if not failed:
        assert not unexpected, f"console errors or failed requests: {unexpected}"


def _is_favicon(url: str) -> bool:
    name = urlsplit(url).path.rpartition("/")[2]
    return name.startswith("favicon.")


def watch_for_problems(page: Any, problems: list[str]) -> None:
    """Record what a person would see go wrong: console errors, uncaught exceptions,
    requests that failed or were answered with an error status."""
    page.on(
        "console",
        lambda message: message.type == "error" and problems.append(f"console: {message.text}"),
    )
    page.on("pageerror", lambda error: problems.append(f"uncaught: {error}"))

    def failed(request: Any) -> None:
        if request.failure == "net::ERR_ABORTED" and _is_favicon(request.url):
            # Chromium fetches the tab's icon after the page's load and cancels it when
            # the page is left (a click that navigates at once): nothing a person sees.
            # An icon that is missing is still an error status, caught below.
            return
        problems.append(f"request failed: {request.url} ({request.failure})")

    page.on("requestfailed", failed)
    page.on(
        "response",
        lambda response: (
            response.status >= 400 and problems.append(f"HTTP {response.status}: {response.url}")
        ),
    )
