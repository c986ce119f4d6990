"""The JavaScript example of docs/clients.md, run as written in Chromium: a page of the
gateway's origin with the example's HTML, its token endpoint answered with a demo token.
It must stream the reply into the page, log `ok Hello!`, and log no error."""

from __future__ import annotations

import json
import re
from typing import Any

from project.launcher import ROOT
from tests.browser.conftest import WAIT_MS, DemoCluster, save_screenshot, watch_for_problems
from tests.browser.test_assets import fetch


def html_example() -> str:
    text = (ROOT / "docs" / "clients.md").read_text()
    return re.search(r"^```html\n(.*?)^```", text, re.DOTALL | re.MULTILINE).group(1)


def test_clients_javascript_example_runs_as_written(
    browser: Any, demo_cluster: DemoCluster
) -> None:
    status, _, body = fetch(demo_cluster.base_url + "/demo/token", "POST", {"client": "reader"})
    assert status == 200
    token = json.loads(body)["token"]
    context = browser.new_context()
    page = context.new_page()
    problems: list[str] = []
    watch_for_problems(page, problems)
    logged: list[str] = []
    page.on("console", lambda message: logged.append(message.text))
    base = demo_cluster.base_url
    # The example fetches its token from the application ("/my-app/switchboard-token").
    page.route(f"{base}/my-app/switchboard-token", lambda route: route.fulfill(body=token))
    try:
        # A page of the gateway's own origin (served by it, so Chromium lets it reach the
        # gateway's loopback address), then the example as its document.
        page.goto(f"{base}/healthz")
        page.set_content(
            "<!doctype html><html><head><link rel='icon' href='data:,'></head>"
            f"<body>{html_example()}</body></html>"
        )
        page.wait_for_function(
            "() => document.getElementById('reply').textContent === 'Hello!'", timeout=WAIT_MS
        )
        if "ok Hello!" not in logged:
            page.wait_for_event("console", lambda m: m.text == "ok Hello!", timeout=WAIT_MS)
        # The subscription's handler logged the stream's events: the message first.
        assert any(line.startswith("1 message") for line in logged), logged
        assert not problems, problems
        save_screenshot(page, "docs-clients-example.png")
    except BaseException:
        print("console:", logged, "problems:", problems)
        raise
    finally:
        context.close()
