"""realtime/pages.py without a cluster: the JavaScript client is always served, the demo page
and its token endpoint only when SWITCHBOARD_DEMO_TENANT names a tenant (off by default).
The token endpoint itself is tested against a real gateway in tests/browser/test_assets.py."""

from __future__ import annotations

import os

import pytest
from django.conf import settings
from django.test import Client
from pytest_django.fixtures import Settings


@pytest.fixture
def demo(request: pytest.FixtureRequest, settings: Settings) -> None:
    """Sets the demo tenant setting to the test's parameter for one test."""
    settings.SWITCHBOARD = {**settings.SWITCHBOARD, "DEMO_TENANT": request.param}


def test_the_demo_is_off_by_default() -> None:
    if os.environ.get("SWITCHBOARD_DEMO_TENANT"):
        pytest.skip("SWITCHBOARD_DEMO_TENANT is set in this environment")
    assert settings.SWITCHBOARD["DEMO_TENANT"] == ""


def test_the_client_module_is_javascript_revalidated_by_etag() -> None:
    client = Client()
    response = client.get("/client/switchboard.js")
    assert response.status_code == 200
    assert response["Content-Type"] == "text/javascript; charset=utf-8"
    assert response["Cache-Control"] == "no-cache"
    assert b"export class SwitchboardClient" in response.content
    again = client.get("/client/switchboard.js", HTTP_IF_NONE_MATCH=response["ETag"])
    assert again.status_code == 304
    assert client.head("/client/switchboard.js").status_code == 200
    assert client.post("/client/switchboard.js").status_code == 405


@pytest.mark.parametrize("demo", [""], indirect=True)
@pytest.mark.parametrize("path", ["/demo/", "/demo/demo.js", "/demo/demo.css", "/demo/token"])
def test_without_the_setting_there_is_no_demo(demo: None, path: str) -> None:
    client = Client()
    assert client.get(path).status_code == 404
    assert client.post(path, {}, content_type="application/json").status_code in (404, 405)


@pytest.mark.parametrize("demo", ["demo"], indirect=True)
def test_the_demo_page_talks_only_to_its_own_origin(demo: None) -> None:
    response = Client().get("/demo/")
    assert response.status_code == 200
    assert response["Content-Type"] == "text/html; charset=utf-8"
    policy = response["Content-Security-Policy"]
    assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert b'src="/demo/demo.js"' in response.content
    assert Client().get("/demo/nothing.js").status_code == 404
