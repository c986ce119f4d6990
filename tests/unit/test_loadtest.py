"""Load replay's pure parts (loadtest/): traces, schedules, scenarios and reports; and the
engine against a small in-process stand-in for the gateway."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve

from loadtest.engine import Engine, EngineOptions
from loadtest.management.commands.loadgen import select_part
from loadtest.report import (
    Measurements,
    bucket_width,
    build_report,
    describe,
    percentile,
    rates,
    summarize,
    timeline,
)
from loadtest.scenarios import ScenarioOptions, build, chat, fanout, night, storm
from loadtest.schedule import (
    MAX_MESSAGE_ID,
    Action,
    ConnectionPlan,
    at_speed,
    clients_of,
    message_id,
    plans_from_trace,
    prepare_frame,
    total_frames,
)
from loadtest.trace import dumps_line, header_line, read_trace, trace_line

SAMPLE_TRACE = Path(__file__).resolve().parents[2] / "loadtest" / "sample_trace.jsonl"


def _lines(*lines: dict[str, Any]) -> list[str]:
    return [dumps_line(line) for line in lines]


TRACE = _lines(
    header_line("acme", 1.0, False, "2026-01-01T00:00:00Z"),
    {"t": 1.0, "conn": "c1", "client": "u1", "event": "open", "resumed": False},
    {"t": 1.1, "conn": "c1", "client": "u1", "frame": {"type": "subscribe", "stream": "room"}},
    {
        "t": 1.5,
        "conn": "c1",
        "client": "u1",
        "frame": {"type": "send", "id": "m1", "stream": "room", "agent": "echo", "text": "hi"},
    },
    {"t": 2.0, "conn": "c2", "client": "u2", "frame": {"type": "ping"}},
    {"t": 2.5, "conn": "c1", "client": "u1", "frame": {"type": "cancel", "id": "m1"}},
    {"t": 3.0, "conn": "c1", "client": "u1", "event": "close", "code": 1000},
    {"t": 3.5, "conn": "c3", "client": "u1", "frame": {"type": "ping"}},
)


# --- traces ----------------------------------------------------------------------------


def test_read_trace_groups_lines_by_connection() -> None:
    trace = read_trace(TRACE)
    assert trace.header["tenant"] == "acme"
    assert [c.label for c in trace.connections] == ["c1", "c2", "c3"]
    c1 = trace.connections[0]
    assert (c1.opened_at, c1.closed_at, c1.close_code) == (1.0, 3.0, 1000)
    assert [frame["type"] for _, frame in c1.frames] == ["subscribe", "send", "cancel"]
    # A connection already open when recording started begins at its first frame.
    assert trace.connections[1].opened_at == 2.0
    assert trace.frame_count() == 5 and trace.frame_count("send") == 1
    assert trace.duration_s == 3.5


def test_read_trace_names_the_bad_line() -> None:
    with pytest.raises(ValueError, match="line 2"):
        read_trace([TRACE[0], "{not json"])
    with pytest.raises(ValueError, match="line 1"):
        read_trace(['{"t": 1, "conn": "c", "frame": {"no": "type"}}'])
    with pytest.raises(ValueError, match="version"):
        read_trace(['{"trace": {"version": 99}}'])


def test_trace_line_from_recorded_entries() -> None:
    frame = {"type": "ping"}
    base = {"rec": "r", "conn": "c", "client": "u"}
    assert trace_line({**base, "event": "frame", "ts": 101.2345, "frame": frame}, 100.0) == {
        "t": 1.234,
        "conn": "c",
        "client": "u",
        "frame": frame,
    }
    opened = trace_line({**base, "event": "open", "ts": 99.0, "resumed": True}, 100.0)
    assert opened == {"t": 0.0, "conn": "c", "client": "u", "event": "open", "resumed": True}
    closed = trace_line({**base, "event": "close", "ts": 100.5, "code": 4008}, 100.0)
    assert closed is not None and closed["code"] == 4008
    assert trace_line({**base, "event": "other", "ts": 100.5}, 100.0) is None


def test_the_sample_trace_parses_and_uses_the_echo_agent() -> None:
    trace = read_trace(SAMPLE_TRACE.read_text().splitlines())
    assert len(trace.connections) >= 3
    assert 20 <= trace.frame_count() <= 100
    sends = [f for c in trace.connections for _, f in c.frames if f["type"] == "send"]
    assert sends and all(f["agent"] == "echo" for f in sends)


# --- schedules -------------------------------------------------------------------------


def test_plans_scale_clients_and_ids_and_start_at_the_first_connection() -> None:
    trace = read_trace(TRACE)
    plans = plans_from_trace(trace, scale=2, run_id="run1")
    assert len(plans) == 6
    # Two recorded clients (u1 with two connections, u2): replay-0..1 for copy 0, 2..3 for 1.
    assert [p.client for p in plans] == [
        "replay-0",
        "replay-1",
        "replay-0",
        "replay-2",
        "replay-3",
        "replay-2",
    ]
    assert clients_of(plans) == ["replay-0", "replay-1", "replay-2", "replay-3"]
    first = plans[0]
    assert first.open_at == 0.0 and first.close_at == 2.0  # 1.0 and 3.0 less the origin
    assert [a.at for a in first.actions] == pytest.approx([0.1, 0.5, 1.5])
    send, cancel = first.actions[1].frame, first.actions[2].frame
    assert send is not None and cancel is not None
    assert send["id"] == cancel["id"] == "run1.0.m1"  # the cancel still names its send
    copy_send = plans[3].actions[1].frame
    assert copy_send is not None and copy_send["id"] == "run1.1.m1"
    assert copy_send["stream"] == "room"  # shared by default
    assert total_frames(plans) == 10


def test_separate_streams_and_dropped_prev() -> None:
    lines = _lines(
        {
            "t": 0,
            "conn": "c",
            "frame": {"type": "send", "id": "m", "stream": "s", "agent": "echo", "text": "x"},
        },
        {"t": 1, "conn": "c", "frame": {"type": "publish", "id": "p", "stream": "s", "data": 1}},
    )
    lines[0] = lines[0].replace('"text":"x"', '"text":"x","prev":"e1"')
    plans = plans_from_trace(read_trace(lines), scale=3, run_id="r", separate_streams=True)
    streams = [[a.frame["stream"] for a in p.actions if a.frame] for p in plans]
    assert streams == [["s", "s"], ["s.r1", "s.r1"], ["s.r2", "s.r2"]]
    assert all("prev" not in (a.frame or {}) for p in plans for a in p.actions)


def test_long_message_ids_stay_within_the_protocol_limit() -> None:
    long_id = "m" * MAX_MESSAGE_ID
    rewritten = message_id("run", 7, long_id)
    assert len(rewritten) <= MAX_MESSAGE_ID and rewritten.startswith("run.7.")
    assert rewritten == message_id("run", 7, long_id)
    assert rewritten != message_id("run", 8, long_id)


def test_at_speed_divides_every_offset() -> None:
    plan = ConnectionPlan("c", 2.0, [Action(4.0, {"type": "ping"})], close_at=8.0)
    fast = at_speed([plan], 4.0)[0]
    assert (fast.open_at, fast.actions[0].at, fast.close_at) == (0.5, 1.0, 2.0)
    assert plan.open_at == 2.0  # the input is left alone
    with pytest.raises(ValueError):
        at_speed([plan], 0)


def test_prepare_frame_uses_this_connections_seqs() -> None:
    subscribe = {"type": "subscribe", "stream": "s", "since": 500}
    assert prepare_frame(subscribe, {}) == {"type": "subscribe", "stream": "s"}
    assert prepare_frame(subscribe, {"s": 7})["since"] == 7
    receipt = {"type": "receipt", "stream": "s", "seq": 500}
    assert prepare_frame(receipt, {"s": 7})["seq"] == 7
    assert prepare_frame(receipt, {})["seq"] == 0
    assert prepare_frame({"type": "receipt", "stream": "s", "seq": 3}, {"s": 7})["seq"] == 3
    ping = {"type": "ping"}
    assert prepare_frame(ping, {}) is ping


# --- scenarios -------------------------------------------------------------------------


def test_chat_sends_steadily_within_the_duration() -> None:
    options = ScenarioOptions(clients=6, duration_s=10, rate=1.0, streams=2, run_id="g")
    plans = chat(options)
    assert len(plans) == 6 and len(clients_of(plans)) == 6
    sends = [a for p in plans for a in p.actions if a.frame and a.frame["type"] == "send"]
    assert 40 <= len(sends) <= 80  # about 6 clients x 10 s x 1/s
    assert all(0 <= a.at < 10 for a in sends)
    ids = [a.frame["id"] for a in sends if a.frame]
    assert len(set(ids)) == len(ids)
    assert {a.frame["stream"] for a in sends if a.frame} == {"loadgen-chat-0", "loadgen-chat-1"}
    assert chat(options) == plans  # seeded: the same run every time


def test_storm_drops_every_client_in_waves() -> None:
    plans = storm(ScenarioOptions(clients=10, duration_s=9, drops=2, ramp_s=0.5))
    for plan in plans:
        reconnects = [a.at for a in plan.actions if a.reconnect]
        assert len(reconnects) == 2
        assert 3 <= reconnects[0] <= 3.5 and 6 <= reconnects[1] <= 6.5
        assert plan.actions[0].frame == {
            "type": "subscribe",
            "stream": plan.actions[0].frame["stream"],
        }


def test_fanout_publishes_after_subscribers_are_in() -> None:
    plans = fanout(ScenarioOptions(clients=5, duration_s=4, rate=2, ramp_s=1, run_id="x"))
    subscribers, publisher = plans[:-1], plans[-1]
    assert len(subscribers) == 5 and publisher.source == "publisher"
    last_subscribe = max(p.actions[0].at for p in subscribers)
    publishes = [a for a in publisher.actions if a.frame]
    assert [a.at for a in publishes] == [1.5, 2.0, 2.5, 3.0, 3.5]
    assert min(a.at for a in publishes) > last_subscribe
    assert all(p.close_at is not None and p.close_at > publishes[-1].at for p in subscribers)
    with pytest.raises(ValueError):
        build("nope", ScenarioOptions())


def test_night_sends_each_minute_and_drops_a_share_midway() -> None:
    options = ScenarioOptions(
        clients=1000, duration_s=120, streams=10, ramp_s=5, settle_s=5, run_id="n"
    )
    plans = night(options)
    assert len(plans) == 1000 and night(options) == plans  # seeded
    assert {p.actions[0].frame["stream"] for p in plans if p.actions[0].frame} == {
        f"night-{n}" for n in range(10)
    }
    assert all(p.actions[0].at <= 5 and p.close_at == 5 + 5 + 120 + 5 for p in plans)
    sends = [a for p in plans for a in p.actions if a.frame and a.frame["type"] == "send"]
    assert len(sends) == 20  # 1% of the clients in each of two minutes
    assert all(10 <= a.at < 130 for a in sends)
    assert sum(1 for a in sends if a.at < 70) == 10
    ids = [a.frame["id"] for a in sends if a.frame]
    assert len(set(ids)) == len(ids)
    dropped = [p for p in plans if any(a.reconnect for a in p.actions)]
    assert len(dropped) == 100
    for plan in dropped:
        index = next(i for i, a in enumerate(plan.actions) if a.reconnect)
        assert 70 <= plan.actions[index].at <= 70.5
        assert plan.actions[index + 1].frame == {"type": "ping"}  # answered once restored
    assert {p.source for p in plans} == {"sender", "reader"}


def test_the_night_splits_into_the_clients_the_storm_drops_and_the_others() -> None:
    plans = night(ScenarioOptions(clients=1000, duration_s=60, streams=10, run_id="n"))
    reconnecting = select_part(plans, "reconnecting")
    steady = select_part(plans, "steady")
    assert len(reconnecting) == 100 and len(steady) == 900
    assert all(any(a.reconnect for a in p.actions) for p in reconnecting)
    assert not any(a.reconnect for p in steady for a in p.actions)
    assert {p.client for p in reconnecting} | {p.client for p in steady} == {
        p.client for p in plans
    }
    assert select_part(plans, "all") == plans


# --- reports ---------------------------------------------------------------------------


def test_percentiles_are_nearest_rank_and_ordered() -> None:
    values = [float(v) for v in range(1, 1001)]
    assert percentile(values, 50) == 500
    assert percentile(values, 99.9) == 999
    assert percentile([], 50) is None
    stats = summarize(list(reversed(values)))
    assert stats["count"] == 1000
    assert stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["p99.9"] <= stats["max"]
    assert stats["max"] == 1000 and stats["mean"] == 500.5
    assert summarize([])["p50"] is None


def test_buckets_and_rates() -> None:
    assert bucket_width(5) == 0.25
    assert bucket_width(100) == 1
    assert bucket_width(3600) == 30
    buckets = timeline([(0.1, 5.0), (0.2, 7.0), (2.5, 1.0)], duration_s=3, width=1)
    assert [b["count"] for b in buckets] == [2, 0, 1]
    assert buckets[0]["p50"] == 5.0 and buckets[0]["p99"] == 7.0
    assert buckets[1]["p50"] is None
    assert rates([0.1, 0.2, 0.3, 1.5, 9.0], duration_s=2, width=1) == [3.0, 2.0]


def test_build_report_counts_errors_and_429s_by_code() -> None:
    m = Measurements(duration_s=4.0)
    m.ack = [(0.5, 2.0), (1.5, 4.0), (2.5, 30.0)]
    m.reply = [(0.6, 10.0), (1.6, 20.0)]
    m.lag = [(0.4, 0.0), (1.4, 1.0), (2.4, 0.0), (2.45, 3.0)]
    m.frames_by_type = Counter(send=3, ping=1)
    m.acks_by_type = Counter(send=3)
    m.errors = Counter(rate_limited=2, overloaded=1, forbidden=1)
    m.rate_limited = Counter(rate_limited=2, overloaded=1)
    m.reply_status = Counter(ok=2)
    m.frames_planned = 5
    m.frames_skipped = 1
    m.unanswered_replies = 1
    report = build_report(m, {"command": "test"})
    assert report["command"] == "test"
    assert report["latency_ms"]["ack"]["p50"] == 4.0
    assert report["latency_ms"]["reply"]["max"] == 20.0
    assert "delivery" not in report["latency_ms"]
    assert report["errors"] == {
        "total": 4,
        "by_code": {"forbidden": 1, "overloaded": 1, "rate_limited": 2},
    }
    assert report["rate_limited"]["total"] == 3
    assert report["counts"]["sends"] == 3 and report["counts"]["frames_sent"] == 4
    assert report["counts"]["unanswered_replies"] == 1
    assert report["throughput"]["frames_per_s"] == 1.0
    assert report["timeline"]["bucket_s"] == 0.25
    assert len(report["timeline"]["ack"]) == 16
    json.dumps(report)  # it is written as JSON
    text = describe(report)
    assert "ack latency: p50 4.0 ms" in text and "rate_limited" in text


# --- the engine against a stand-in gateway -----------------------------------------------


class FakeGateway:
    """Enough of the protocol for the engine: welcome, acks, an echo reply per send after
    a delay, `published` events to every socket, and `rate_limited` for ids starting "x"."""

    def __init__(self, reply_delay_s: float = 0.05, max_in_flight: int = 2) -> None:
        self.reply_delay_s = reply_delay_s
        self.max_in_flight = max_in_flight
        self.sockets: set[ServerConnection] = set()
        self.most_in_flight = 0
        self.seq = 0

    async def handler(self, ws: ServerConnection) -> None:
        client = ws.request.path.split("token=")[1].split("&")[0]  # the fake token is the id
        self.sockets.add(ws)
        in_flight = 0
        limits = {"max_runs_in_flight_per_connection": self.max_in_flight}
        await ws.send(json.dumps({"type": "welcome", "session": "s", "limits": limits}))

        async def reply(frame: dict[str, Any]) -> None:
            nonlocal in_flight
            await asyncio.sleep(self.reply_delay_s)
            in_flight -= 1
            # Each reply restarts once (a retried model call), which the engine counts.
            await self.event(
                ws, frame["stream"], "reply.restart", client, frame["id"], {"attempt": 2}
            )
            await self.event(
                ws, frame["stream"], "reply.done", client, frame["id"], {"status": "ok"}
            )

        tasks = set()
        try:
            async for text in ws:
                frame = json.loads(text)
                if frame["type"] in ("send", "publish") and frame["id"].startswith("x"):
                    error = {
                        "type": "error",
                        "id": frame["id"],
                        "code": "rate_limited",
                        "status": 429,
                    }
                    await ws.send(json.dumps(error))
                    continue
                if frame["type"] == "send":
                    in_flight += 1
                    self.most_in_flight = max(self.most_in_flight, in_flight)
                    await ws.send(json.dumps({"type": "ack", "id": frame["id"], "seq": 1}))
                    task = asyncio.get_running_loop().create_task(reply(frame))
                    tasks.add(task)
                elif frame["type"] == "publish":
                    await ws.send(json.dumps({"type": "ack", "id": frame["id"], "seq": 1}))
                    for other in list(self.sockets):
                        await self.event(
                            other, frame["stream"], "published", client, frame["id"], {}
                        )
        finally:
            self.sockets.discard(ws)

    async def event(
        self, ws: ServerConnection, stream: str, kind: str, client: str, message: str, data: Any
    ) -> None:
        self.seq += 1
        event = {
            "type": "event",
            "stream": stream,
            "seq": self.seq,
            "kind": kind,
            "cause": {"client": client, "message": message},
            "data": data,
        }
        try:
            await ws.send(json.dumps(event))
        except Exception:  # noqa: BLE001 - a socket that closed meanwhile
            pass


def _send(at: float, message: str) -> Action:
    frame = {"type": "send", "id": message, "stream": "s", "agent": "echo", "text": "hi"}
    return Action(at, frame)


async def _play(gateway: FakeGateway, plans: list[ConnectionPlan]) -> Measurements:
    async with serve(gateway.handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        tokens = {client: client for client in clients_of(plans)}
        engine = Engine(
            f"ws://127.0.0.1:{port}/ws/v1/",
            tokens,
            EngineOptions(drain_timeout_s=10, start_delay_s=0.05),
        )
        return await engine.run(plans)


def test_engine_measures_acks_replies_and_deliveries_and_bounds_runs_in_flight() -> None:
    gateway = FakeGateway(max_in_flight=2)
    plans = [
        # Five sends at once: the engine keeps at most the welcome's two in flight.
        ConnectionPlan("a", 0.0, [_send(0.0, f"m{n}") for n in range(5)] + [_send(0.01, "x1")]),
        ConnectionPlan(
            "b",
            0.0,
            [Action(0.05, {"type": "publish", "id": "p1", "stream": "s", "data": {}})],
            close_at=0.2,
        ),
    ]
    m = asyncio.run(_play(gateway, plans))
    assert gateway.most_in_flight == 2
    assert len(m.ack) == 6 and len(m.reply) == 5
    assert m.reply_status == Counter(ok=5)
    assert m.reply_restarts == 5
    assert m.rate_limited == Counter(rate_limited=1) and m.errors == Counter(rate_limited=1)
    assert len(m.delivery) == 2  # the publish reached both sockets
    assert m.frames_by_type == Counter(send=6, publish=1)
    assert m.unanswered_acks == 0 and m.unanswered_replies == 0
    assert m.connections_opened == 2 and len(m.connect) == 2
    assert all(value >= 0 for _, value in m.ack + m.reply + m.delivery + m.lag)
    report = build_report(m, {})
    stats = report["latency_ms"]["reply"]
    assert stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["p99.9"] <= stats["max"]


def test_engine_counts_what_a_dead_gateway_never_answered() -> None:
    plans = [ConnectionPlan("a", 0.0, [_send(0.0, "m1")])]

    async def play() -> Measurements:
        async def silent(ws: ServerConnection) -> None:
            await ws.send(json.dumps({"type": "welcome", "session": "s", "limits": {}}))
            async for _ in ws:
                pass  # never answers

        async with serve(silent, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            engine = Engine(
                f"ws://127.0.0.1:{port}/ws/v1/",
                {"a": "a"},
                EngineOptions(drain_timeout_s=0.2, start_delay_s=0.01),
            )
            return await engine.run(plans)

    m = asyncio.run(play())
    assert m.unanswered_acks == 1 and m.unanswered_replies == 1
    assert not m.ack and not m.reply


def test_engine_counts_refused_connections_and_skips_their_frames() -> None:
    plans = [ConnectionPlan("a", 0.0, [Action(0.0, {"type": "ping"})] * 2)]

    async def play() -> Measurements:
        async def refuse(ws: ServerConnection) -> None:
            await ws.close(4001, "bad signature")

        async with serve(refuse, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            engine = Engine(f"ws://127.0.0.1:{port}/ws/v1/", {"a": "a"})
            return await engine.run(plans)

    m = asyncio.run(play())
    assert m.connections_opened == 0
    assert m.connect_failures == Counter({"close 4001": 3})  # tried, then gave up
    assert m.frames_skipped == 2


class SeqGateway:
    """A stream whose events skip seq 3 and repeat seq 4, a join without seq, and a resume
    that replays from the positions the client sent: seq 5 was published while the client
    was away, seq 6 while its resume was being let in (before its welcome)."""

    def __init__(self) -> None:
        self.positions: list[dict[str, int]] = []

    async def handler(self, ws: ServerConnection) -> None:
        import base64
        from urllib.parse import parse_qs, urlsplit

        query = parse_qs(urlsplit(ws.request.path).query)
        resumed = "session" in query
        missed: list[dict[str, Any]] = []
        if resumed:
            missed = [self.event(5, ago_s=1.0), self.event(6)]
            await asyncio.sleep(0.05)  # the welcome comes after seq 6 was stamped
        await ws.send(
            json.dumps({"type": "welcome", "session": "s1", "resumed": resumed, "limits": {}})
        )
        if resumed:
            encoded = query["positions"][0]
            positions = json.loads(base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)))
            self.positions.append(positions)
            for event in missed:
                if event["seq"] > positions["s"]:
                    await ws.send(json.dumps(event))
        async for text in ws:
            frame = json.loads(text)
            if frame["type"] == "subscribe":
                for seq in (1, 2, 4, 4):
                    await ws.send(json.dumps(self.event(seq)))
                join = self.event(0) | {"kind": "join"}
                del join["seq"]
                await ws.send(json.dumps(join))
            elif frame["type"] == "ping":
                await ws.send(json.dumps({"type": "pong"}))

    @staticmethod
    def event(seq: int, ago_s: float = 0.0) -> dict[str, Any]:
        from datetime import UTC, datetime, timedelta

        ts = (datetime.now(UTC) - timedelta(seconds=ago_s)).isoformat(timespec="milliseconds")
        return {"type": "event", "stream": "s", "seq": seq, "kind": "message", "ts": ts}


def test_engine_checks_seqs_times_lag_and_the_catch_up_of_a_resume() -> None:
    gateway = SeqGateway()
    plans = [
        ConnectionPlan(
            "a",
            0.0,
            [
                Action(0.0, {"type": "subscribe", "stream": "s"}),
                Action(0.2, reconnect=True),
                Action(0.2, {"type": "ping"}),
            ],
            close_at=0.4,
        )
    ]

    async def play() -> Measurements:
        async with serve(gateway.handler, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            url = f"ws://127.0.0.1:{port}/ws/v1/"
            engine = Engine(
                [url, url],
                {"a": "a"},
                EngineOptions(drain_timeout_s=1, start_delay_s=0.01, check_seqs=True),
            )
            return await engine.run(plans)

    m = asyncio.run(play())
    assert gateway.positions == [{"s": 4}]  # the resume says what was processed
    assert m.seq_lost == 1 and m.seq_duplicates == 1 and m.seq_lost_at_end == 0
    assert m.events == 5 and m.presence_events == 1  # seqs 1, 2, 4, 5, 6; the join
    # Live deliveries apart from what the resume brought: missed while away, and while
    # being let back in.
    assert len(m.event_lag) == 3 and all(0 <= lag < 5000 for _, lag in m.event_lag)
    assert [round(lag, -3) for _, lag in m.away_lag] == [1000.0]
    assert len(m.rejoining_lag) == 1 and m.rejoining_lag[0][1] >= 40
    assert len(m.caught_up) == 1 and m.resumed == 1
    assert m.loop_lag  # the generator's own loop was watched
    report = build_report(m, {})
    assert report["seqs"]["lost"] == 1 and report["seqs"]["duplicates"] == 1
    assert "event_lag" in report["latency_ms"] and "caught_up" in report["latency_ms"]
    assert "1 lost, 1 duplicates" in describe(report)


def test_urls_are_checked_and_reported_without_their_query() -> None:
    from loadtest.runner import public_url, url_problem

    assert url_problem("ws://127.0.0.1:8000/ws/v1/") is None
    assert url_problem("wss://example.test/ws/v1/") is None
    assert url_problem("http://127.0.0.1:8000/ws/v1/") is not None
    assert url_problem("ws:///ws/v1/") is not None
    assert public_url("ws://h:1/ws/v1/?token=secret") == "ws://h:1/ws/v1/"
    assert url_problem("ws://h:1/ws/v1/,ws://h:2/ws/v1/") is None
    assert url_problem("ws://h:1/ws/v1/,http://h:2/") is not None
    assert public_url("ws://h:1/a/?token=x,ws://h:2/a/?token=y") == "ws://h:1/a/,ws://h:2/a/"


# --- the minimal client ------------------------------------------------------------------


def test_wire_client_reads_every_frame_shape_answers_pings_and_keeps_the_close_code() -> None:
    from loadtest.wire import connect

    got: list[bytes] = []
    echoed: list[str] = []

    async def handler(ws: ServerConnection) -> None:
        await ws.send("small")
        await ws.send("m" * 300)  # 16-bit length
        await ws.send("L" * 70_000)  # 64-bit length
        await ws.send(["frag", "mented"])  # a fragmented message
        await ws.send(b"\x01\x02")
        await asyncio.wait_for(await ws.ping(), 5)  # answered by the client's pong
        echoed.append(str(await ws.recv()))
        await ws.close(4001, "bad signature")

    async def play() -> int | None:
        async with serve(handler, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            closed = asyncio.Event()
            conn = await connect(
                f"ws://127.0.0.1:{port}/ws/v1/?token=t",
                lambda payload, *_: got.append(payload),
                lambda _: closed.set(),
            )
            while len(got) < 5:
                await asyncio.sleep(0.01)
            conn.send("hello")
            await asyncio.wait_for(closed.wait(), 5)
            return conn.close_code

    assert asyncio.run(play()) == 4001
    assert got == [b"small", b"m" * 300, b"L" * 70_000, b"fragmented", b"\x01\x02"]
    assert echoed == ["hello"]  # a masked client frame the server could read


def test_wire_client_reports_a_refused_handshake() -> None:
    from websockets.http11 import Response

    from loadtest.wire import HandshakeRefused, connect

    def refuse(connection: ServerConnection, request: Any) -> Response:
        return connection.respond(403, "no\n")

    async def play() -> None:
        async with serve(lambda ws: ws.close(), "127.0.0.1", 0, process_request=refuse) as server:
            port = server.sockets[0].getsockname()[1]
            await connect(f"ws://127.0.0.1:{port}/", lambda *_: None)

    with pytest.raises(HandshakeRefused) as refused:
        asyncio.run(play())
    assert refused.value.status == 403


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_TIMESTAMP as Linux has it")
def test_wire_client_stamps_a_message_when_it_reached_the_socket_not_when_it_was_read() -> None:
    """A load generator's loop that is late must not add its lateness to the lag: the
    message's stamp is the kernel's, taken while this loop could not read. Two messages that
    waited in the socket together share the later one's stamp: the first is told it came
    at the soonest when the last read that found the socket empty began."""
    from loadtest.wire import connect

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    go, sent = threading.Event(), threading.Event()
    sent_at: list[float] = []
    apart_s = 0.05  # between the two messages: what the first's stamp must not have

    def gateway() -> None:
        conn, _ = listener.accept()
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(4096)
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
            go.wait(5)
            sent_at.append(time.time())
            conn.sendall(b"\x81\x05first")
            while time.time() < sent_at[0] + apart_s:  # the gap under test, not a wait
                pass
            sent_at.append(time.time())
            conn.sendall(b"\x81\x06second")
            sent.set()
            conn.recv(1)  # until the client goes

    server = threading.Thread(target=gateway, daemon=True)
    server.start()
    got: list[tuple[bytes, float, float]] = []

    async def play() -> float:
        arrived = asyncio.Event()

        def on_message(payload: bytes, received_at: float, earliest: float) -> None:
            got.append((payload, received_at, earliest))
            if len(got) == 2:
                arrived.set()

        conn = await connect(f"ws://127.0.0.1:{port}/", on_message)
        go.set()
        assert sent.wait(5)  # the loop is held: the bytes wait in the socket
        held_until = time.time()
        await asyncio.wait_for(arrived.wait(), 5)
        conn.abort()
        return held_until

    held_until = asyncio.run(play())
    server.join(5)
    listener.close()
    assert [payload for payload, _, _ in got] == [b"first", b"second"]
    (_, first_stamp, first_earliest), (_, second_stamp, second_earliest) = got
    assert sent_at[1] - 0.001 <= second_stamp <= held_until
    assert second_earliest == second_stamp  # its stamp is its own
    # The kernel merged the first into the second's segment: its stamp is from after it
    # arrived, and its soonest is from before it was sent.
    assert first_stamp == second_stamp >= sent_at[0] + apart_s - 0.001
    assert 0 < first_earliest <= sent_at[0]
