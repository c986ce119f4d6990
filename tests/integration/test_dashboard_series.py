"""The Grafana dashboard has data from the first scrape: every `switchboard_*` series it
queries is on a freshly started cluster's /metrics before any client has connected
(zero-valued for the known tenants, backends, frame types and codes), so no panel says
"No data" and no `absent()` alert fires after a deploy.

The cluster is its own, started for this test alone: the suite's shared one has had
traffic. It uses the suite's Redis database under a key prefix of its own, removed after.
"""

from __future__ import annotations

import json
import re
import tempfile
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from project.launcher import ROOT, Cluster

from .conftest import METRICS_TOKEN

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "switchboard.json"
TENANT = "fresh"
SERIES = re.compile(r"\bswitchboard_[a-z0-9_]+")


def dashboard_series() -> set[str]:
    """Every series name the dashboard's queries use."""
    queries: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "query") and isinstance(value, str):
                    queries.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(json.loads(DASHBOARD.read_text()))
    return {name for query in queries for name in SERIES.findall(query)}


@pytest.fixture(scope="module")
def fresh_cluster(test_redis_url: str) -> Iterator[Cluster]:
    work = Path(tempfile.mkdtemp(prefix="switchboard-fresh-"))
    prefix = f"sbfresh{uuid.uuid4().hex[:8]}"
    cluster = Cluster(
        redis_url=test_redis_url,
        gateways=1,
        workers=1,
        worker_concurrency=1,
        env={
            "SWITCHBOARD_KEY_PREFIX": prefix,
            "DATABASE_URL": f"sqlite:///{work / 'db.sqlite3'}",
            "SWITCHBOARD_METRICS_TOKEN": METRICS_TOKEN,
        },
        log_dir=work / "logs",
    )
    try:
        cluster.migrate()
        cluster.manage("create_tenant", TENANT)
        cluster.start()
        yield cluster
    except BaseException:
        for proc in cluster.processes.values():
            print(f"----- {proc.name} -----\n{proc.log_tail()}")
        raise
    finally:
        cluster.stop()
        with redis.Redis.from_url(test_redis_url) as client:
            for key in client.scan_iter(f"{prefix}:*", count=1000):
                client.delete(key)


def scrape_names(cluster: Cluster) -> dict[str, list[dict[str, str]]]:
    """Series name -> the label sets of its samples, from the first scrape."""
    url = f"http://127.0.0.1:{cluster.gateway_ports[0]}/metrics"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    names: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            names.setdefault(sample.name, []).append(sample.labels)
    return names


def test_every_series_the_dashboard_uses_is_there_from_the_first_scrape(
    fresh_cluster: Cluster,
) -> None:
    wanted = dashboard_series()
    assert len(wanted) >= 19, sorted(wanted)  # the dashboard was read
    scraped = scrape_names(fresh_cluster)
    missing = sorted(name for name in wanted if name not in scraped)
    assert not missing, f"on the dashboard, absent from a fresh /metrics: {missing}"

    # The per-tenant ones exist for the tenant already there, at zero.
    for name in (
        "switchboard_connections",
        "switchboard_acks_total",
        "switchboard_refusals_total",
        "switchboard_send_to_reply_done_seconds_bucket",
        "switchboard_fair_queue_depth",
    ):
        assert any(labels.get("tenant") == TENANT for labels in scraped[name]), name
    # The example agents call the openai backend: its model-call series are there.
    assert {"backend": "openai", "outcome": "ok"} in scraped["switchboard_model_calls_total"]
