"""Prometheus's own checker on what we ship and serve: `promtool check config` on
deploy/prometheus.yml, and `promtool check metrics` (the exposition format and Prometheus's
naming and help conventions) on a real scrape of the cluster's /metrics after traffic.

promtool comes from Debian's `prometheus` package: `bin/dev test` puts it in var/tools/
(extracted from the package, so no Prometheus server is installed or started); the tests
skip, saying so, without it."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from project.launcher import ROOT

from .conftest import METRICS_TOKEN, Connect, Switchboard

CONFIG = ROOT / "deploy" / "prometheus.yml"
# Where docker-compose.yml mounts the metrics token for Prometheus.
TOKEN_FILE = "/etc/prometheus/metrics-token"


def promtool() -> str:
    found = shutil.which("promtool") or ROOT / "var" / "tools" / "promtool"
    if not Path(found).exists():
        pytest.skip(
            "promtool is not installed (Debian's prometheus package; `bin/dev test` "
            "extracts it into var/tools/ when apt-get is available)"
        )
    return str(found)


def test_deploy_prometheus_config_is_valid(tmp_path: Path) -> None:
    # promtool checks that the credentials file exists: a copy of the config reads the
    # token from a file of the test's, as the compose file's Prometheus reads its mount.
    token = tmp_path / "metrics-token"
    token.write_text(METRICS_TOKEN)
    assert TOKEN_FILE in CONFIG.read_text()
    config = tmp_path / "prometheus.yml"
    config.write_text(CONFIG.read_text().replace(TOKEN_FILE, str(token)))
    result = subprocess.run(
        [promtool(), "check", "config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


@pytest.mark.asyncio
async def test_metrics_scrape_passes_promtool(
    switchboard: Switchboard, connect: Connect, unique: Callable[[str], str]
) -> None:
    tool = promtool()
    # Traffic first, so the run, frame and model-call series have samples.
    client = await connect()
    ack = await client.send(unique("lint"), "echo", "Hello", options={"chunks": 2})
    await client.reply(ack["id"])
    port = switchboard.cluster.gateway_ports[0]
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}
    )

    def scrape() -> bytes:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read()

    exposition = await asyncio.to_thread(scrape)
    assert b"switchboard_" in exposition
    result = await asyncio.to_thread(
        subprocess.run,
        [tool, "check", "metrics"],
        input=exposition,
        capture_output=True,
        timeout=60,
    )
    # Nothing printed: no parse error and no lint problem.
    assert result.returncode == 0, (result.stdout + result.stderr).decode()
    assert not (result.stdout + result.stderr).strip(), (result.stdout + result.stderr).decode()
