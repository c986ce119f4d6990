"""ops/metrics.py without Redis: buckets, reading frames, the reply clock, and the
multiprocess aggregation of several real processes' files."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, multiprocess

from ops import metrics
from project.launcher import free_port
from realtime.protocol import PONG, Ping, Send, ack_frame, error_frame
from streams.events import dumps, event_parts
from streams.usage import Usage

ROOT = Path(__file__).resolve().parents[2]


def sample(name: str, **labels: str) -> float:
    """A sample of this (single-process) test process's default registry; 0 when absent."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def event(kind: str, ts: str | None = None, data: object = None, seq: int = 7) -> str:
    prefix, suffix = event_parts(
        stream="room-1",
        event_id="e" * 32,
        kind=kind,
        sender="agent:echo",
        cause={"client": "alice", "message": "m-1", "prev": None},
        data=data if data is not None else {"text": 'say "kind":"ack" and ,"ts":"x"'},
        ts=ts,
    )
    return prefix + str(seq) + suffix


@pytest.mark.parametrize(
    "buckets, low, high",
    [(metrics.LATENCY_BUCKETS, 0.005, 60.0), (metrics.DELIVERY_LAG_BUCKETS, 0.001, 30.0)],
)
def test_buckets_are_geometric_and_fine_enough_for_p999(
    buckets: tuple[float, ...], low: float, high: float
) -> None:
    assert buckets[0] == low and buckets[-1] == high
    assert 24 <= len(buckets) <= 30
    ratios = [later / earlier for earlier, later in itertools.pairwise(buckets)]
    # Strictly increasing, and no bucket wider than 60% of its lower bound anywhere in the
    # range: a p99.9 read from them is as precise at 20 ms as at 20 s.
    assert all(1.3 < ratio < 1.6 for ratio in ratios), ratios


def test_frame_kind_reads_event_kinds_and_frame_types() -> None:
    assert metrics.frame_kind(event("reply.done")) == "reply.done"
    assert metrics.frame_kind(event("reply.delta")) == "reply.delta"
    assert metrics.frame_kind(event("message")) == "message"
    assert metrics.frame_kind(ack_frame("m-1", "e1", 3, False)) == "ack"
    assert metrics.frame_kind(error_frame("rate_limited", "slow down", "m-1", 50)) == "error"
    assert metrics.frame_kind(PONG) == "pong"
    assert metrics.frame_kind(dumps({"type": "welcome", "client": "a"})) == "welcome"
    # The presence script's events (built in Lua, same field order).
    join = (
        '{"type":"event","stream":"room","id":"ab00000001","kind":"join","from":"client:a",'
        '"cause":{"client":"a","message":null,"prev":null},"ts":"2024-01-01T00:00:00.000Z",'
        '"data":{"client":"a","name":null}}'
    )
    assert metrics.frame_kind(join) == "join"


def test_frame_kind_never_mints_a_label() -> None:
    # A kind or type this version does not know, and text that is not a frame at all.
    assert metrics.frame_kind(event("custom.kind")) == "other"
    assert metrics.frame_kind(dumps({"type": "brand-new"})) == "other"
    assert metrics.frame_kind("not json") == "other"
    assert metrics.frame_kind('{"type":"event","stream":"x"}') == "other"


def test_frames_in_and_out_are_counted_by_type_and_kind() -> None:
    send_before = sample("switchboard_frames_in_total", type="send")
    ping_before = sample("switchboard_frames_in_total", type="ping")
    metrics.frame_in(Send("m-1", "room", "echo", "hi", {}, None))
    metrics.frame_in(Ping())
    metrics.frame_in(Ping())
    assert sample("switchboard_frames_in_total", type="send") == send_before + 1
    assert sample("switchboard_frames_in_total", type="ping") == ping_before + 2

    done_before = sample("switchboard_frames_out_total", kind="reply.done")
    ack_before = sample("switchboard_frames_out_total", kind="ack")
    fanned_out = event("reply.done")
    for _ in range(3):  # one event, three sockets: the same string each time
        metrics.frame_out(fanned_out)
    metrics.frame_out(ack_frame("m-1", "e1", 3, True))
    assert sample("switchboard_frames_out_total", kind="reply.done") == done_before + 3
    assert sample("switchboard_frames_out_total", kind="ack") == ack_before + 1


def test_refusals_carry_the_code_the_client_saw() -> None:
    cases = {
        "messages": "rate_limited",
        "runs_in_flight": "rate_limited",
        "queued_runs": "overloaded",
        "connections": "4029",
    }
    for reason, code in cases.items():
        labels = {"tenant": "unit-refusals", "code": code, "reason": reason}
        before = sample("switchboard_refusals_total", **labels)
        metrics.refused("unit-refusals", reason)
        assert sample("switchboard_refusals_total", **labels) == before + 1


def test_a_spent_token_budget_is_counted_as_budget_exhausted() -> None:
    labels = {"tenant": "unit-refusals", "code": "budget_exhausted", "reason": "token_budget"}
    before = sample("switchboard_refusals_total", **labels)
    metrics.refused("unit-refusals", "token_budget")
    assert sample("switchboard_refusals_total", **labels) == before + 1


def test_tokens_are_counted_per_tenant_agent_model_and_kind() -> None:
    labels = {"tenant": "unit-tokens", "agent": "echo", "model": "m-1"}
    prompt = sample("switchboard_tokens_total", kind="prompt", **labels)
    completion = sample("switchboard_tokens_total", kind="completion", **labels)
    metrics.tokens_used("unit-tokens", "echo", "m-1", Usage(12, 5))
    metrics.tokens_used("unit-tokens", "echo", "m-1", Usage(3, 0, estimated=True))
    assert sample("switchboard_tokens_total", kind="prompt", **labels) == prompt + 15
    assert sample("switchboard_tokens_total", kind="completion", **labels) == completion + 5


def test_the_model_label_is_the_calls_model_else_the_backends_and_bounded() -> None:
    assert metrics.model_label("openai", "gpt-x") == "gpt-x"
    assert metrics.model_label("simulated", "") == "simulated"
    assert len(metrics.model_label("openai", "m" * 500)) == metrics.MODEL_LABEL_CHARS


def test_token_series_exist_at_zero_for_each_tenant_and_agent_model() -> None:
    metrics.initialise_series(["unit-zero-tokens"], [], [("echo", "simulated")])
    for kind in metrics.TOKEN_KINDS:
        labels = {"tenant": "unit-zero-tokens", "agent": "echo", "model": "simulated"}
        assert sample("switchboard_tokens_total", kind=kind, **labels) == 0


def test_event_lag_is_read_from_the_event_ts() -> None:
    stamp = "2024-05-06T07:08:09.250Z"
    at = datetime(2024, 5, 6, 7, 8, 9, 250_000, tzinfo=UTC).timestamp()
    assert metrics.event_lag_s(event("message", ts=stamp), at + 1.5) == pytest.approx(1.5)
    # A clock ahead of ours is no lag; no ts, or one that does not parse, is no sample.
    assert metrics.event_lag_s(event("message", ts=stamp), at - 3) == 0.0
    assert metrics.event_lag_s('{"type":"event","stream":"x"}', at) is None
    assert metrics.event_lag_s(event("message", ts="yesterday"), at) is None

    before = sample("switchboard_delivery_lag_seconds_count")
    metrics.event_delivered(event("message"))  # ts: now
    assert sample("switchboard_delivery_lag_seconds_count") == before + 1


def test_reply_clock_times_each_send_to_its_own_reply_done() -> None:
    tenant = "unit-replies"
    clock = metrics.ReplyClock()
    before = sample("switchboard_send_to_reply_done_seconds_count", tenant=tenant)
    started = time.monotonic()
    clock.sent("r-1", started)
    clock.sent("r-2", started)
    clock.sent(None, started)  # a send that started no run is not waited for
    assert set(clock.started) == {"r-1", "r-2"}

    # Deltas, another run's reply.done and other frames leave the clock alone.
    clock.delivered(
        tenant,
        [
            event("reply.delta", data={"run": "r-1", "offset": 0, "text": "hi"}),
            event("reply.done", data={"run": "r-9", "status": "ok", "text": "x"}),
            ack_frame("m-1", "e1", 3, False),
        ],
    )
    assert set(clock.started) == {"r-1", "r-2"}
    assert sample("switchboard_send_to_reply_done_seconds_count", tenant=tenant) == before

    done = event("reply.done", data={"run": "r-1", "status": "ok", "text": "hi"})
    clock.delivered(tenant, [done])
    clock.delivered(tenant, [done])  # seen again (a repair): timed once
    assert set(clock.started) == {"r-2"}
    assert sample("switchboard_send_to_reply_done_seconds_count", tenant=tenant) == before + 1


def test_reply_clock_is_bounded() -> None:
    clock = metrics.ReplyClock()
    for index in range(metrics.ReplyClock.MAX_WAITING + 10):
        clock.sent(f"r-{index}", 0.0)
    assert len(clock.started) == metrics.ReplyClock.MAX_WAITING


def test_model_calls_count_and_time_each_outcome() -> None:
    labels = {"backend": "unit-backend", "outcome": "timeout"}
    before = sample("switchboard_model_calls_total", **labels)
    metrics.model_call("unit-backend", "timeout", 1.5)
    assert sample("switchboard_model_calls_total", **labels) == before + 1
    assert sample("switchboard_model_call_seconds_count", **labels) == before + 1
    # 1.5 s falls in the first bucket at or above it, and not in the one below.
    assert sample("switchboard_model_call_seconds_bucket", le="1.85", **labels) == before + 1
    assert sample("switchboard_model_call_seconds_bucket", le="1.31", **labels) == 0


def test_without_a_multiprocess_directory_the_process_serves_its_own() -> None:
    metrics.acked("unit-exposition", duplicate=True)
    registry = metrics.exposition_registry(with_state=False)
    value = registry.get_sample_value(
        "switchboard_acks_total", {"tenant": "unit-exposition", "duplicate": "true"}
    )
    assert value is not None and value >= 1


CHILD = """
import os, sys
from project.launcher import free_port
from ops import metrics
from realtime.protocol import Ping
for _ in range(int(sys.argv[1])):
    metrics.connection_opened("acme")
    metrics.frame_in(Ping())
metrics.model_call("simulated", "ok", 0.25)
if sys.argv[2] == "crash":
    os._exit(0)  # no atexit: like a SIGKILL, its gauges stay until the directory is cleared
"""


def test_the_host_sums_every_process_and_drops_the_gauges_of_those_that_exit(
    tmp_path: Path,
) -> None:
    env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
        "DJANGO_SETTINGS_MODULE": "project.settings",
    }
    for connections, ending in ((2, "crash"), (3, "exit")):
        subprocess.run(
            [sys.executable, "-c", CHILD, str(connections), ending], cwd=ROOT, env=env, check=True
        )
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(tmp_path))

    # Counters and histograms: both processes, summed.
    assert registry.get_sample_value("switchboard_frames_in_total", {"type": "ping"}) == 5
    ok = {"backend": "simulated", "outcome": "ok"}
    assert registry.get_sample_value("switchboard_model_call_seconds_count", ok) == 2
    assert registry.get_sample_value("switchboard_model_calls_total", ok) == 2
    # The gauge: only the process that did not mark itself dead.
    assert registry.get_sample_value("switchboard_connections", {"tenant": "acme"}) == 2


def test_the_dashboard_loads_and_asks_only_for_series_that_exist() -> None:
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/switchboard.json").read_text())
    expressions = [
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", ())
    ]
    assert expressions
    source = Path(metrics.__file__).read_text()
    used = {
        re.sub(r"_(total|bucket|count|sum)$", "", name)
        for expr in expressions
        for name in re.findall(r"\bswitchboard_\w+", expr)
    }
    missing = {name for name in used if f'"{name}"' not in source}
    assert not missing, f"the dashboard asks for series ops/metrics.py never exports: {missing}"
    # Every panel's data source is the dashboard's variable, so it loads in any Grafana.
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_the_worker_exporter_serves_the_metrics_without_the_redis_state() -> None:
    metrics.model_call("unit-exporter", "ok", 0.1)
    server = metrics.start_worker_exporter(free_port(), "127.0.0.1")
    assert server is not None
    try:
        port = server.server_address[1]
        # The same port again (a second worker of the host): logged, nothing raised.
        assert metrics.start_worker_exporter(port, "127.0.0.1") is None
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    assert 'switchboard_model_calls_total{backend="unit-exporter",outcome="ok"}' in text
    assert "switchboard_state_up" not in text  # gateways export the cluster's state
