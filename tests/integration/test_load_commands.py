"""Load rehearsal end to end: `record_traffic` records what clients send to the cluster's
gateway, `replay_load` plays the trace back scaled and faster, `loadgen` generates a chat;
each report is checked (docs/operations.md)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from loadtest.trace import read_trace
from project.launcher import ROOT

from .conftest import TENANT, Connect, Switchboard
from .support import wait_until

pytestmark = pytest.mark.asyncio

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
COMMAND_TIMEOUT_S = 120


@pytest.fixture
def recorder(
    switchboard: Switchboard, tmp_path: Path
) -> Iterator[Callable[..., tuple[subprocess.Popen[str], Path]]]:
    """`recorder(*args)` starts `manage.py record_traffic --tenant acme --out TRACE ARGS` in
    the cluster's environment; the process is killed after the test if still running."""
    started: list[subprocess.Popen[str]] = []

    def start(*args: str) -> tuple[subprocess.Popen[str], Path]:
        trace = tmp_path / "trace.jsonl"
        proc = subprocess.Popen(
            [
                sys.executable,
                "manage.py",
                "record_traffic",
                "--tenant",
                TENANT,
                "--out",
                str(trace),
                *args,
            ],
            cwd=ROOT,
            env=switchboard.cluster.child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append(proc)
        return proc, trace

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def manage(switchboard: Switchboard, *args: str) -> str:
    """Run a management command in the cluster's environment; its output on failure."""
    result = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=switchboard.cluster.child_env(),
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
    )
    assert result.returncode == 0, f"{args[0]} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def lines(trace: Path) -> list[dict[str, Any]]:
    if not trace.exists():
        return []
    # A line still being written is not JSON yet: only whole lines count.
    return [
        json.loads(line)
        for line in trace.read_text().splitlines(keepends=True)
        if line.endswith("\n")
    ]


def assert_ordered(stats: dict[str, Any]) -> None:
    assert stats["count"] > 0
    assert stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["p99.9"] <= stats["max"], stats


async def test_record_replay_and_loadgen_reports(
    switchboard: Switchboard,
    connect: Connect,
    recorder: Callable[..., tuple[subprocess.Popen[str], Path]],
    unique: Callable[[str], str],
    tmp_path: Path,
) -> None:
    proc, trace = recorder("--sample", "1", "--duration", "120")

    async def started() -> bool:
        # The header is written once the switch is on.
        return bool(lines(trace)) or proc.poll() is not None

    await wait_until(started, 60, "record_traffic to start")
    assert proc.poll() is None, proc.communicate()
    assert "trace" in lines(trace)[0]

    # Gateways look at the switch at most once a second, when frames come: ping until one
    # is recorded.
    probe = await connect()

    async def probe_recorded() -> bool:
        await probe.ping()
        return any("frame" in line for line in lines(trace))

    await wait_until(probe_recorded, 15, "the gateway to record", interval=0.1)

    room = unique("room")
    alice = await connect(client=unique("alice"))
    bob = await connect(client=unique("bob"))
    await alice.subscribe(room)
    await bob.subscribe(room)
    ack = await alice.send(room, "echo", "hello load", options={"chunks": 2})
    await alice.reply(ack["id"])
    await bob.publish(room, {"n": 1})
    ack2 = await bob.send(room, "echo", "second message")
    await bob.reply(ack2["id"])
    hidden = [alice.session, bob.session, alice.client, bob.client, ack["id"], ack2["id"]]
    await alice.close()
    await bob.close()

    def mine() -> list[dict[str, Any]]:
        found = [line for line in lines(trace) if "conn" in line]  # not the header
        conns = {line["conn"] for line in found if line.get("frame", {}).get("stream") == room}
        return [line for line in found if line["conn"] in conns]

    async def all_recorded() -> bool:
        recorded = mine()
        frames = [line for line in recorded if "frame" in line]
        closes = [line for line in recorded if line.get("event") == "close"]
        return len(frames) == 5 and len(closes) == 2

    await wait_until(all_recorded, 15, "the clients' frames in the trace")
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert "recorded" in stdout

    # The trace: both sessions whole, in order, with timing, and nothing secret.
    text = trace.read_text()
    for secret in hidden:
        assert secret and secret not in text
    parsed = read_trace(text.splitlines())
    assert parsed.header["tenant"] == TENANT and parsed.header["sample"] == 1
    sessions = [c for c in parsed.connections if any(f.get("stream") == room for _, f in c.frames)]
    assert sorted([f["type"] for _, f in c.frames] for c in sessions) == [
        ["subscribe", "publish", "send"],
        ["subscribe", "send"],
    ]
    for session in sessions:
        times = [t for t, _ in session.frames]
        assert times == sorted(times)
        assert session.opened_at <= times[0]
        assert session.closed_at is not None and session.closed_at >= times[-1]
    texts = {f["text"] for c in sessions for t, f in c.frames if f["type"] == "send"}
    assert texts == {"hello load", "second message"}
    recorded_sends = parsed.frame_count("send")
    assert recorded_sends >= 2

    # Replayed twice over, four times faster: every send acknowledged and answered.
    report_path, plot_path = tmp_path / "replay.json", tmp_path / "replay.png"
    output = manage(
        switchboard,
        "replay_load",
        str(trace),
        "--url",
        switchboard.url,
        "--tenant",
        TENANT,
        "--scale",
        "2",
        "--speed",
        "4",
        "--out",
        str(report_path),
        "--plot",
        str(plot_path),
    )
    assert "reply latency" in output
    report = json.loads(report_path.read_text())
    counts = report["counts"]
    assert counts["sends"] == 2 * recorded_sends
    assert counts["acks_by_type"]["send"] == 2 * recorded_sends
    assert counts["replies"] == 2 * recorded_sends
    assert counts["frames_sent"] == counts["frames_planned"] == 2 * parsed.frame_count()
    assert counts["unanswered_acks"] == counts["unanswered_replies"] == 0
    assert report["rate_limited"]["total"] == 0 and report["errors"]["total"] == 0
    assert_ordered(report["latency_ms"]["ack"])
    assert_ordered(report["latency_ms"]["reply"])
    assert report["throughput"]["frames_per_s"] > 0
    assert plot_path.read_bytes().startswith(PNG_MAGIC)

    # A short synthetic chat through the same engine.
    chat_path = tmp_path / "chat.json"
    manage(
        switchboard,
        "loadgen",
        "--scenario",
        "chat",
        "--url",
        switchboard.url,
        "--tenant",
        TENANT,
        "--clients",
        "3",
        "--duration",
        "2",
        "--rate",
        "2",
        "--ramp",
        "0.2",
        "--out",
        str(chat_path),
        "--no-progress",
    )
    chat = json.loads(chat_path.read_text())["counts"]
    assert chat["sends"] > 0
    assert chat["replies"] == chat["acks_by_type"]["send"] == chat["sends"]
    assert chat["unanswered_replies"] == 0
    assert json.loads(chat_path.read_text())["rate_limited"]["total"] == 0

    # The seed's night in small: two shards on one schedule (as bench/seed_night.py runs
    # them), each over two gateway URLs (the same gateway twice); every reader checks
    # every seq through a storm of resumes.
    start_at = time.time() + 5
    shards = []
    for shard in ("0/2", "1/2"):
        out, raw = tmp_path / f"night-{shard[0]}.json", tmp_path / f"night-{shard[0]}-raw.json"
        command = [
            *(sys.executable, "manage.py", "loadgen", "--scenario", "night"),
            *("--url", f"{switchboard.url},{switchboard.url}", "--tenant", TENANT),
            *("--clients", "12", "--streams", "2", "--duration", "6", "--ramp", "0.5"),
            *("--settle", "1", "--send-share", "2.5", "--storm-share", "0.5"),
            *("--shard", shard, "--start-at", str(start_at), "--out", str(out)),
            *("--raw", str(raw), "--no-progress"),
        ]
        shards.append(
            (subprocess.Popen(command, cwd=ROOT, env=switchboard.cluster.child_env()), out, raw)
        )
    for proc, _, _ in shards:
        assert proc.wait(COMMAND_TIMEOUT_S) == 0
    reports = [json.loads(out.read_text()) for _, out, _ in shards]
    raws = [json.loads(raw.read_text()) for _, _, raw in shards]
    for night in reports:
        assert night["seqs"]["lost"] == 0 and night["seqs"]["duplicates"] == 0
        assert night["counts"]["resumed"] == night["counts"]["reconnects"]
        assert night["seqs"]["caught_up"] == night["counts"]["reconnects"]
        assert night["errors"]["total"] == 0 and night["counts"]["unanswered_replies"] == 0
    assert sum(night["counts"]["reconnects"] for night in reports) == 6  # half of 12
    assert sum(len(raw["reply"]) for raw in raws) == 3  # 12 x 2.5 a minute x 6 s
    assert sum(len(raw["event_lag"]) for raw in raws) > 0
