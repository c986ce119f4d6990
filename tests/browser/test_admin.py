"""The Django admin in headless Chromium, as an operator meets it: styled (its CSS and
JavaScript served by the gateway from collectstatic's output), the login, the front page,
a tenant's page with its agent grants inline ("Add another" comes from the admin's
JavaScript), a stream's conversation history as a thread, and the live page. Each page
fails the test on any console error or failed request, and is saved as a screenshot."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from client.connection import SwitchboardClient
from tests.browser.conftest import (
    ADMIN_PASSWORD,
    ADMIN_USER,
    DEMO_TENANT,
    WAIT_MS,
    DemoCluster,
    run_async,
    save_screenshot,
    watch_for_problems,
)
from tests.browser.test_assets import fetch

TRANSPARENT = ("rgba(0, 0, 0, 0)", "transparent")


class Operator:
    """A logged-in admin user's browser tab, with what went wrong on it."""

    def __init__(self, page: Any, base_url: str) -> None:
        self.page = page
        self.base_url = base_url
        self.problems: list[str] = []
        watch_for_problems(page, self.problems)

    def open(self, path: str) -> Any:
        response = self.page.goto(self.base_url + path)
        assert response is not None and response.status == 200, (path, response)
        self.page.wait_for_load_state("load")
        assert_styled(self.page)
        return self.page

    def log_in(self) -> None:
        self.open("/admin/login/")
        self.page.fill("#id_username", ADMIN_USER)
        self.page.fill("#id_password", ADMIN_PASSWORD)
        self.page.click("input[type='submit']")
        self.page.wait_for_selector("#switchboard-operating", timeout=WAIT_MS)


def assert_styled(page: Any) -> None:
    """The admin's stylesheets loaded and apply: unstyled, its header has no background
    and the theme toggle is a bare button."""
    sheets = page.evaluate(
        "() => [...document.styleSheets].filter(s => s.href).map(s => [s.href, s.cssRules.length])"
    )
    assert sheets and all(rules > 0 for _, rules in sheets), sheets
    header = page.evaluate(
        "() => getComputedStyle(document.querySelector('#header')).backgroundColor"
    )
    assert header not in TRANSPARENT, f"the admin's header is unstyled ({header})"


@pytest.fixture
def operator(
    request: pytest.FixtureRequest, browser: Any, demo_cluster: DemoCluster
) -> Iterator[Operator]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    lines: list[str] = []
    page.on("console", lambda message: lines.append(f"{message.type}: {message.text}"))
    operator = Operator(page, demo_cluster.base_url)
    yield operator
    report = getattr(request.node, "browser_report_call", None)
    failed = report is not None and report.failed
    if failed:
        demo_cluster.failed = True
        save_screenshot(page, f"failed-{request.node.name}.png", full_page=True)
        print("----- console -----\n" + "\n".join(lines))
        print(demo_cluster.log_tails())
    context.close()
    if not failed:
        assert not operator.problems, f"console errors or failed requests: {operator.problems}"


def test_login_and_front_page_are_styled(operator: Operator) -> None:
    page = operator.open("/admin/login/")
    save_screenshot(page, "admin-login.png")
    operator.log_in()
    assert_styled(page)
    # The front page links to the live page and lists the apps.
    assert page.locator("#switchboard-operating a").inner_text() == "Live queues, workers and runs"
    assert page.locator("#content-main .app-tenants").count() == 1
    save_screenshot(page, "admin-index.png", full_page=True)


def test_tenant_page_adds_agent_grants_inline(operator: Operator) -> None:
    operator.log_in()
    page = operator.open("/admin/tenants/tenant/")
    page.click(f"a:text-is('{DEMO_TENANT}')")
    page.wait_for_selector("#tenant_form", timeout=WAIT_MS)
    assert_styled(page)
    # "Add another" exists only when the admin's inlines.js ran.
    add = page.locator(".add-row a")
    add.wait_for(timeout=WAIT_MS)
    rows = page.locator("tr.form-row.dynamic-agent_grants, tr.form-row[id^='agent_grants-']")
    before = page.locator("#agent_grants-group tbody tr.form-row:not(.empty-form)").count()
    add.click()
    after = page.locator("#agent_grants-group tbody tr.form-row:not(.empty-form)").count()
    assert after == before + 1, (before, after, rows.count())
    save_screenshot(page, "admin-tenant.png", full_page=True)


def _say_hello(demo_cluster: DemoCluster, stream: str, text: str) -> None:
    """One echo run on `stream` through the real gateway, with a demo token."""
    status, _, body = fetch(
        demo_cluster.base_url + "/demo/token", "POST", {"client": "history-writer"}
    )
    assert status == 200, body
    token = json.loads(body)["token"]

    async def run() -> None:
        client = await SwitchboardClient.connect(
            f"ws://127.0.0.1:{demo_cluster.port}/ws/v1/", token
        )
        try:
            ack = await client.send(stream, "echo", text, options={"chunks": 2})
            await client.reply(ack["id"], timeout=WAIT_MS / 1000)
        finally:
            await client.close()

    run_async(run())


def test_history_reads_as_a_thread(
    operator: Operator, demo_cluster: DemoCluster, unique: Callable[[str], str]
) -> None:
    stream = unique("history")
    text = "a message the history keeps"
    _say_hello(demo_cluster, stream, text)
    operator.log_in()
    page = operator.open("/admin/history/historyentry/")
    # The persister (beat, every 0.5 s here) moves the finished run into the database.
    deadline = time.monotonic() + WAIT_MS / 1000
    link = page.locator(f"a:text-is('{stream}')")
    while link.count() == 0:
        assert time.monotonic() < deadline, "the run never reached the history"
        page.reload()
        page.wait_for_load_state("load")
    link.first.click()
    page.wait_for_selector("ol.thread", timeout=WAIT_MS)
    assert_styled(page)
    turn = page.locator("ol.thread > li").first
    assert turn.locator("p.said").first.inner_text() == text
    reply = turn.locator(".reply")
    assert reply.locator(".agent").inner_text() == "echo"
    assert reply.locator(".status").inner_text() == "ok"
    assert reply.locator(".latency").inner_text().endswith(" s")
    assert reply.locator("p.said").inner_text() == text
    # The reply's token usage, as its reply.done carried it (the simulated backend reports
    # a quarter of the characters each way).
    tokens = 2 * -(-len(text) // 4)
    assert reply.locator(".tokens").inner_text() == f"{tokens} tokens"
    save_screenshot(page, "admin-history-thread.png", full_page=True)


def test_live_page_renders_and_refreshes(operator: Operator) -> None:
    operator.log_in()
    page = operator.open("/admin/tenants/tenant/live/")
    page.wait_for_selector("#live-queues table, #live-queues p", timeout=WAIT_MS)
    # Its first refresh from live/data/ succeeds (a failure is shown in #live-errors).
    with page.expect_response(lambda r: "/live/data/" in r.url, timeout=WAIT_MS) as answer:
        pass
    assert answer.value.status == 200
    assert page.locator("#live-errors").is_hidden()
    save_screenshot(page, "admin-live.png", full_page=True)


def live_tenants(page: Any) -> list[dict[str, str]]:
    """The live page's tenants table, one dict per row by column header."""
    return page.evaluate(
        """() => {
          const table = document.querySelector('#live-tenants table');
          if (!table) { return []; }
          const heads = [...table.tHead.rows[0].cells].map(c => c.textContent.trim());
          return [...table.tBodies[0].rows].map(row => Object.fromEntries(
            [...row.cells].map((c, i) => [heads[i], c.textContent.trim()])));
        }"""
    )


def test_live_page_shows_each_tenants_tokens_against_its_budgets(
    operator: Operator, demo_cluster: DemoCluster, unique: Callable[[str], str]
) -> None:
    demo_cluster.cluster.manage(
        "shell",
        "-c",
        "from tenants.models import Tenant; "
        f"Tenant.objects.filter(slug={DEMO_TENANT!r}).update("
        "daily_token_budget=1000000, monthly_token_budget=0)",
    )
    _say_hello(demo_cluster, unique("tokens"), "a message whose reply uses tokens")
    operator.log_in()
    page = operator.open("/admin/tenants/tenant/live/")
    page.wait_for_selector("#live-tenants table", timeout=WAIT_MS)
    [row] = [row for row in live_tenants(page) if row["Tenant"] == DEMO_TENANT]
    used, _, budget = row["Tokens today / budget"].partition(" / ")
    assert int(used) > 0 and budget == "1000000", row
    month = row["Tokens this month / budget"]
    assert month.endswith(" (no budget)") and int(month.split()[0]) >= int(used), row
    save_screenshot(page, "admin-live-tokens.png", full_page=True)
