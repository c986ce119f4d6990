"""The Artillery scenario (loadtest/artillery/) against the real cluster: every user gets
its token, its messages acked and answered, and a session the gateway refuses (4029, one
client id past its connection cap) is counted as refused, not as a success.

Needs `npm ci` in loadtest/artillery, which `bin/dev test` runs when npm is there
(docs/operations.md); skips, saying so, without it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from project.launcher import ROOT

from .conftest import LIMITED_TENANTS, TENANT, Switchboard

ARTILLERY_DIR = ROOT / "loadtest" / "artillery"
ARTILLERY = ARTILLERY_DIR / "node_modules" / ".bin" / "artillery"


def run_artillery(
    switchboard: Switchboard, tenant: str, report: Path, phases: list[dict], variables: dict
) -> dict[str, float]:
    if not ARTILLERY.exists() or shutil.which("node") is None:
        pytest.skip(
            "Artillery is not installed (bin/dev test installs it when npm is there): "
            "cd loadtest/artillery && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci"
        )
    target = switchboard.url.replace("ws://", "http://").removesuffix("/ws/v1/")
    env = {
        "SWITCHBOARD_TENANT": tenant,
        "SWITCHBOARD_SIGNING_SECRET": switchboard.secret(tenant),
        # Artillery asks to send anonymous usage data otherwise.
        "ARTILLERY_DISABLE_TELEMETRY": "true",
    }
    result = subprocess.run(
        [
            str(ARTILLERY),
            "run",
            "--target",
            target,
            "--overrides",
            json.dumps({"config": {"phases": phases}}),
            "--variables",
            json.dumps(variables),
            "--output",
            str(report),
            "switchboard.yml",
        ],
        cwd=ARTILLERY_DIR,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(report.read_text())["aggregate"]["counters"]


def test_each_user_chats_and_is_measured(switchboard: Switchboard, tmp_path: Path) -> None:
    counters = run_artillery(
        switchboard,
        TENANT,
        tmp_path / "chat.json",
        [{"duration": 2, "arrivalRate": 3}],
        {"messages": 2, "think_ms": 100},
    )
    users = counters["vusers.created"]
    assert users >= 4
    assert counters["vusers.completed"] == users and counters.get("vusers.failed", 0) == 0
    assert counters["switchboard.sent"] == counters["switchboard.acked"] == 2 * users
    assert counters["switchboard.reply_done.ok"] == 2 * users


def test_refused_sessions_are_counted_as_refused(switchboard: Switchboard, tmp_path: Path) -> None:
    # This tenant allows 2 connections per client; all users share one client id.
    tenant = "capped"
    assert tenant in LIMITED_TENANTS
    cap = LIMITED_TENANTS[tenant]["max_connections_per_client"]
    counters = run_artillery(
        switchboard,
        tenant,
        tmp_path / "capped.json",
        [{"duration": 1, "arrivalCount": cap + 3}],
        {"client": "one-client", "messages": 1, "think_ms": 2000},
    )
    assert counters["switchboard.close.4029"] >= 1
    assert counters["vusers.failed"] == counters["switchboard.close.4029"]
    assert counters["errors.refused: close 4029"] == counters["switchboard.close.4029"]
