"""What the gateway serves over HTTP for browsers: the JavaScript client and the demo page
(content types, caching), and the demo token endpoint (a token of the demo tenant only)."""

from __future__ import annotations

import gzip
import json
import re
import urllib.error
import urllib.request
from typing import Any

import pytest

from client.connection import SwitchboardClient
from tests.browser.conftest import DEMO_TENANT, DemoCluster, run_async


def fetch(
    url: str, method: str = "GET", body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/client/switchboard.js", "text/javascript"),
        ("/demo/", "text/html"),
        ("/demo/demo.js", "text/javascript"),
        ("/demo/demo.css", "text/css"),
    ],
)
def test_assets_have_their_content_type_and_revalidate(
    demo_cluster: DemoCluster, path: str, content_type: str
) -> None:
    status, headers, body = fetch(demo_cluster.base_url + path)
    assert status == 200 and body
    assert headers["Content-Type"].startswith(content_type)
    assert headers["Cache-Control"] == "no-cache"
    etag = headers["ETag"]
    status, headers, body = fetch(demo_cluster.base_url + path, headers={"If-None-Match": etag})
    assert status == 304 and body == b""


def test_unknown_demo_asset_is_404(demo_cluster: DemoCluster) -> None:
    status, _, _ = fetch(demo_cluster.base_url + "/demo/settings.py")
    assert status == 404


def test_demo_token_is_a_short_lived_token_of_the_demo_tenant(demo_cluster: DemoCluster) -> None:
    status, headers, body = fetch(
        demo_cluster.base_url + "/demo/token", "POST", {"client": "zoe", "name": "Zoë"}
    )
    assert status == 200, body
    assert headers["Cache-Control"] == "no-store"
    assert "Access-Control-Allow-Origin" not in headers  # no other site may read it
    grant = json.loads(body)
    assert grant["tenant"] == DEMO_TENANT and grant["client"] == "zoe"
    assert grant["agents"][0] == "echo"
    # The example agents have no model in this cluster; echo needs none.
    assert grant["unavailable"]["assistant"] == "model not configured"
    assert "echo" not in grant["unavailable"]

    async def connect() -> dict[str, Any]:
        url = f"ws://127.0.0.1:{demo_cluster.port}/ws/v1/"
        client = await SwitchboardClient.connect(url, grant["token"])
        await client.close()
        return client.welcome

    welcome = run_async(connect())
    assert welcome["tenant"] == DEMO_TENANT and welcome["client"] == "zoe"

    # Without a client id it makes one up.
    status, _, body = fetch(demo_cluster.base_url + "/demo/token", "POST", {})
    assert status == 200 and json.loads(body)["client"].startswith("guest-")


@pytest.mark.parametrize(
    ("method", "body", "status"),
    [
        ("GET", None, 405),
        ("POST", {"client": "no spaces allowed"}, 400),
        ("POST", {"client": "x" * 41}, 400),
        ("POST", ["not", "an", "object"], 400),
        ("POST", {"name": "n" * 61}, 400),
    ],
)
def test_demo_token_refuses_bad_requests(
    demo_cluster: DemoCluster, method: str, body: Any, status: int
) -> None:
    got, _, answer = fetch(demo_cluster.base_url + "/demo/token", method, body)
    assert got == status, answer
    assert json.loads(answer)["status"] == status


def test_admin_static_files_have_hashed_names_cached_for_a_year(
    demo_cluster: DemoCluster,
) -> None:
    status, _, body = fetch(demo_cluster.base_url + "/admin/login/")
    assert status == 200
    html = body.decode()
    found = re.search(r'href="(/static/admin/css/base\.[0-9a-f]{12}\.css)"', html)
    assert found, "the admin's stylesheet is linked by its content-hashed name"
    status, headers, css = fetch(demo_cluster.base_url + found.group(1))
    assert status == 200 and css
    assert headers["Content-Type"].startswith("text/css")
    assert (
        "immutable" in headers["Cache-Control"] and "max-age=315360000" in headers["Cache-Control"]
    )
    status, headers, compressed = fetch(
        demo_cluster.base_url + found.group(1), headers={"Accept-Encoding": "gzip"}
    )
    assert status == 200 and headers.get("Content-Encoding") == "gzip"
    assert gzip.decompress(compressed) == css
    # HEAD, revalidation and byte ranges, as browsers and proxies use them.
    url = demo_cluster.base_url + found.group(1)
    status, headers, body = fetch(url, "HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) == len(css)
    status, _, body = fetch(url, headers={"If-None-Match": headers["ETag"]})
    assert status == 304 and body == b""
    status, headers, body = fetch(url, headers={"Range": "bytes=0-9"})
    assert status == 206 and body == css[:10]
    # Names without the hash are served too, briefly cached.
    status, headers, _ = fetch(demo_cluster.base_url + "/static/admin/css/base.css")
    assert status == 200 and "immutable" not in headers["Cache-Control"]
    status, _, _ = fetch(demo_cluster.base_url + "/static/admin/css/nothing-here.css")
    assert status == 404
