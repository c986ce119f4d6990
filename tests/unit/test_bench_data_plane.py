"""bench.data_plane's pure parts: the redis-benchmark command line, the parsing of its
report, and the gateway's script calls it turns into one (no Redis, no processes)."""

from __future__ import annotations

import pytest
from django.test import override_settings

from bench.data_plane import (
    RANDOM,
    UNIQUE,
    ScriptCall,
    benchmark_argv,
    operation_calls,
    parse_benchmark_output,
)

REPORT = """\
Cluster has 3 master nodes:\r\n
EVALSHA abc 1 k: rps=61000.0 (overall: 60000.0) avg_msec=6.000 (overall: 6.100)\r
====== EVALSHA abc 1 k ======
  400000 requests completed in 5.41 seconds
  50 parallel clients

Latency by percentile distribution:
0.000% <= 0.127 milliseconds (cumulative count 32)
50.000% <= 5.135 milliseconds (cumulative count 200128)
99.805% <= 14.455 milliseconds (cumulative count 399216)
99.902% <= 15.535 milliseconds (cumulative count 399608)
99.951% <= 16.567 milliseconds (cumulative count 399804)
100.000% <= 18.647 milliseconds (cumulative count 400000)

Cumulative distribution of latencies:
0.000% <= 0.103 milliseconds (cumulative count 0)
100.000% <= 19.103 milliseconds (cumulative count 400000)

Summary:
  throughput summary: 73937.15 requests per second
  latency summary (msec):
          avg       min       p50       p95       p99       max
        5.174     0.120     5.135     9.903    12.583    18.647
"""


def test_report_parsed() -> None:
    out = parse_benchmark_output(REPORT)
    assert out["requests"] == 400_000 and out["seconds"] == 5.41
    assert out["per_s"] == 73937.15
    assert (out["p50"], out["p99"], out["max"]) == (5.135, 12.583, 18.647)
    # The first bucket of the percentile distribution at or above 99.9%.
    assert out["p99.9"] == 15.535


def test_report_without_summary_is_refused() -> None:
    with pytest.raises(ValueError, match="without"):
        parse_benchmark_output("Error: Connection refused\n")


def test_argv_calls_the_script_with_its_keys_then_its_arguments() -> None:
    call = ScriptCall("append_event.lua", ("sb:s:{tag}:x:seq", "sb:s:{tag}:x:log"), ("a", "1"))
    argv = benchmark_argv("redis-benchmark", 7600, "f00", call, 1000, 50, 8, 1, cluster=True)
    assert argv[-7:] == ["EVALSHA", "f00", "2", "sb:s:{tag}:x:seq", "sb:s:{tag}:x:log", "a", "1"]
    assert argv[argv.index("-n") + 1] == "1000" and "--cluster" in argv
    assert argv[argv.index("-r") + 1] == str(2**31 - 1)
    single = benchmark_argv("redis-benchmark", 6379, "f00", call, 1000, 50, 8, 1, cluster=False)
    assert "--cluster" not in single


@override_settings(CELERY_BROKER_URL="memory://")
def test_calls_are_the_gateways_with_placeholders() -> None:
    take, append = operation_calls("publish")
    assert (take.name, append.name) == ("take_tokens.lua", "append_event.lua")
    # Every key in the tenant's slot, named by redis-benchmark's cluster placeholder.
    assert all("{tag}" in key for key in take.keys + append.keys)
    dedupe = append.keys[2]
    assert dedupe.endswith(UNIQUE)
    take, accept = operation_calls("send")
    assert accept.name == "accept_send.lua"
    assert all("{tag}" in key for key in accept.keys)
    # A new run and a new message id for every call; no Celery message (broker apart).
    run_key = accept.keys[3]
    assert UNIQUE in run_key and accept.keys[2].endswith(UNIQUE)
    assert RANDOM in accept.keys[6]  # its own runs-in-flight set
    assert accept.args[9] == ""  # celery_message
