"""What a load run measured, and the report made of it. Pure.

The engine fills a `Measurements` (raw samples, each with the time it was taken, and
counters); `build_report` turns it into the JSON the commands print and write, and
`timeline` into the per-interval percentiles the plot draws. Percentiles are nearest-rank
(bench/common.py uses the same definition), in milliseconds.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

PERCENTILES = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9))
# Plot buckets: the smallest of these widths giving at most MAX_BUCKETS buckets.
BUCKET_WIDTHS_S = (0.25, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1800, 3600)
MAX_BUCKETS = 120

Sample = tuple[float, float]  # (seconds since the run started, latency in ms)


@dataclass
class Measurements:
    duration_s: float = 0.0
    ack: list[Sample] = field(default_factory=list)  # send/publish -> ack
    reply: list[Sample] = field(default_factory=list)  # send -> its reply.done
    delivery: list[Sample] = field(default_factory=list)  # publish -> a subscriber's copy
    connect: list[Sample] = field(default_factory=list)  # handshake -> welcome
    # How late each frame left its schedule (one sample per frame sent: also the send times).
    lag: list[Sample] = field(default_factory=list)
    frames_planned: int = 0
    frames_skipped: int = 0  # never sent: their connection was gone
    frames_by_type: Counter[str] = field(default_factory=Counter)
    acks_by_type: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    errors: Counter[str] = field(default_factory=Counter)  # error frames by code
    rate_limited: Counter[str] = field(default_factory=Counter)  # those with status 429
    reply_status: Counter[str] = field(default_factory=Counter)
    # reply.restart events of the sends' own runs: model output voided and streamed again.
    reply_restarts: int = 0
    connections_planned: int = 0
    connections_opened: int = 0
    connect_failures: Counter[str] = field(default_factory=Counter)  # by reason
    server_closes: Counter[str] = field(default_factory=Counter)  # by close code
    reconnects: int = 0
    resumed: int = 0
    unanswered_acks: int = 0
    unanswered_replies: int = 0
    # With the engine's check_seqs: each stream event's receipt minus its ts, resumed
    # connections' drop -> caught up, seq gaps and repeats per stream per connection.
    event_lag: list[Sample] = field(default_factory=list)  # receipt at the socket
    # Of those, the ones whose receive stamp is their own: not merged by the kernel into a
    # later segment's stamp while their reader was late (loadtest/wire.py). For the others,
    # the soonest they can have come: with the own ones, a lower bound of every lag.
    event_lag_own: list[Sample] = field(default_factory=list)
    event_lag_merged_soonest: list[Sample] = field(default_factory=list)
    # The same deliveries as this process read them: its own loop's lateness added.
    event_lag_read: list[Sample] = field(default_factory=list)
    # Events published while their reader was cut off, and while its resume was being let
    # in (handshake begun, welcome not yet received): both reach it through the resume.
    away_lag: list[Sample] = field(default_factory=list)
    rejoining_lag: list[Sample] = field(default_factory=list)
    caught_up: list[Sample] = field(default_factory=list)
    events: int = 0  # stream events received (with a seq), duplicates left out
    presence_events: int = 0  # join/leave received
    seq_lost: int = 0  # seqs skipped between two received events
    seq_lost_at_end: int = 0  # seqs after a connection's last one, up to the head seen
    seq_duplicates: int = 0
    interrupted: bool = False  # ended early (SIGTERM): what was measured until then
    # How late the load generator's own event loop woke (check_seqs): its share of lags.
    loop_lag: list[Sample] = field(default_factory=list)


def percentile(sorted_values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return None
    # Rounded first: 99.9 / 100 * 1000 is 999.0000000000001 in floating point.
    rank = max(1, math.ceil(round(p / 100 * len(sorted_values), 9)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """count, p50, p90, p99, p99.9, max and mean (ms, None when there are no values)."""
    ordered = sorted(values)
    summary: dict[str, Any] = {"count": len(ordered)}
    for name, p in PERCENTILES:
        summary[name] = _ms(percentile(ordered, p))
    summary["max"] = _ms(ordered[-1] if ordered else None)
    summary["mean"] = _ms(sum(ordered) / len(ordered) if ordered else None)
    return summary


def bucket_width(duration_s: float) -> float:
    for width in BUCKET_WIDTHS_S:
        if duration_s / width <= MAX_BUCKETS:
            return float(width)
    return float(BUCKET_WIDTHS_S[-1])


def _bucket_count(duration_s: float, width: float) -> int:
    return max(1, math.ceil(duration_s / width))


def timeline(samples: Sequence[Sample], duration_s: float, width: float) -> list[dict[str, Any]]:
    """Per interval of `width` seconds: its start, how many samples ended in it, and their
    p50 and p99 (None for an interval without samples)."""
    buckets: list[list[float]] = [[] for _ in range(_bucket_count(duration_s, width))]
    for t, value in samples:
        index = min(len(buckets) - 1, max(0, int(t // width)))
        buckets[index].append(value)
    out = []
    for index, values in enumerate(buckets):
        values.sort()
        out.append(
            {
                "t": round(index * width, 3),
                "count": len(values),
                "p50": _ms(percentile(values, 50)),
                "p99": _ms(percentile(values, 99)),
            }
        )
    return out


def rates(times: Sequence[float], duration_s: float, width: float) -> list[float]:
    """Events per second in each interval of `width` seconds."""
    counts = [0] * _bucket_count(duration_s, width)
    for t in times:
        counts[min(len(counts) - 1, max(0, int(t // width)))] += 1
    return [round(count / width, 2) for count in counts]


def build_report(m: Measurements, meta: dict[str, Any]) -> dict[str, Any]:
    """The run's report: `meta` (what was run: command, URL, tenant, speed, scale...)
    followed by latencies, throughput, errors and counts."""
    width = bucket_width(m.duration_s)
    # Rates over at least one plot interval, so a run shorter than one never reports an
    # overall rate above its peak interval's.
    duration = max(m.duration_s, width)
    sends = m.frames_by_type.get("send", 0)
    frames_sent = sum(m.frames_by_type.values())
    report: dict[str, Any] = dict(meta)
    report["duration_s"] = round(m.duration_s, 3)
    if m.interrupted:
        report["interrupted"] = True
    report["latency_ms"] = {
        "ack": summarize([v for _, v in m.ack]),
        "reply": summarize([v for _, v in m.reply]),
    }
    if m.delivery:
        report["latency_ms"]["delivery"] = summarize([v for _, v in m.delivery])
    if m.connect:
        report["latency_ms"]["connect"] = summarize([v for _, v in m.connect])
    if m.event_lag:
        report["latency_ms"]["event_lag"] = summarize([v for _, v in m.event_lag])
        report["latency_ms"]["event_lag_own"] = summarize([v for _, v in m.event_lag_own])
        report["latency_ms"]["event_lag_soonest"] = summarize(
            [v for _, v in m.event_lag_own] + [v for _, v in m.event_lag_merged_soonest]
        )
        report["latency_ms"]["event_lag_read"] = summarize([v for _, v in m.event_lag_read])
    if m.away_lag:
        report["latency_ms"]["away_lag"] = summarize([v for _, v in m.away_lag])
    if m.rejoining_lag:
        report["latency_ms"]["rejoining_lag"] = summarize([v for _, v in m.rejoining_lag])
    if m.caught_up:
        report["latency_ms"]["caught_up"] = summarize([v for _, v in m.caught_up])
    if m.loop_lag:
        report["latency_ms"]["generator_loop_lag"] = summarize([v for _, v in m.loop_lag])
    report["schedule_lag_ms"] = summarize([v for _, v in m.lag])
    per_interval = rates([t for t, _ in m.lag], m.duration_s, width)
    report["throughput"] = {
        "frames_per_s": round(frames_sent / duration, 2),
        "acks_per_s": round(len(m.ack) / duration, 2),
        "replies_per_s": round(len(m.reply) / duration, 2),
        "peak_frames_per_s": max(per_interval, default=0.0),
    }
    if m.delivery:
        report["throughput"]["deliveries_per_s"] = round(len(m.delivery) / duration, 2)
    report["errors"] = {"total": sum(m.errors.values()), "by_code": dict(sorted(m.errors.items()))}
    report["rate_limited"] = {
        "total": sum(m.rate_limited.values()),
        "by_code": dict(sorted(m.rate_limited.items())),
    }
    report["counts"] = {
        "connections_planned": m.connections_planned,
        "connections_opened": m.connections_opened,
        "connect_failures": dict(sorted(m.connect_failures.items())),
        "closed_by_server": dict(sorted(m.server_closes.items())),
        "reconnects": m.reconnects,
        "resumed": m.resumed,
        "frames_planned": m.frames_planned,
        "frames_sent": frames_sent,
        "frames_skipped": m.frames_skipped,
        "frames_by_type": dict(sorted(m.frames_by_type.items())),
        "sends": sends,
        "publishes": m.frames_by_type.get("publish", 0),
        "acks": len(m.ack),
        "acks_by_type": dict(sorted(m.acks_by_type.items())),
        "duplicates": m.duplicates,
        "replies": len(m.reply),
        "reply_status": dict(sorted(m.reply_status.items())),
        "reply_restarts": m.reply_restarts,
        "deliveries": len(m.delivery),
        "unanswered_acks": m.unanswered_acks,
        "unanswered_replies": m.unanswered_replies,
    }
    if m.events or m.presence_events:
        report["seqs"] = {
            "events": m.events,
            "presence_events": m.presence_events,
            "lost": m.seq_lost + m.seq_lost_at_end,
            "lost_between": m.seq_lost,
            "lost_at_end": m.seq_lost_at_end,
            "duplicates": m.seq_duplicates,
            "caught_up": len(m.caught_up),
        }
    report["timeline"] = {
        "bucket_s": width,
        "frames_per_s": per_interval,
        "replies_per_s": rates([t for t, _ in m.reply], m.duration_s, width),
        "ack": timeline(m.ack, m.duration_s, width),
        "reply": timeline(m.reply, m.duration_s, width),
    }
    if m.delivery:
        report["timeline"]["delivery"] = timeline(m.delivery, m.duration_s, width)
    if m.connect:
        report["timeline"]["connect"] = timeline(m.connect, m.duration_s, width)
    if m.event_lag:
        report["timeline"]["event_lag"] = timeline(m.event_lag, m.duration_s, width)
    return report


def raw_samples(m: Measurements) -> dict[str, Any]:
    """The samples and counters of a run, for merging the shards of one run played by
    several processes (`loadgen --raw`): each latency as [t, ms] pairs, rounded."""
    out: dict[str, Any] = {}
    for name in (
        "ack",
        "reply",
        "connect",
        "lag",
        "event_lag",
        "event_lag_own",
        "event_lag_merged_soonest",
        "event_lag_read",
        "away_lag",
        "rejoining_lag",
        "caught_up",
        "delivery",
        "loop_lag",
    ):
        out[name] = [[round(t, 3), round(v, 2)] for t, v in getattr(m, name)]
    for name in (
        "frames_planned",
        "frames_skipped",
        "duplicates",
        "reply_restarts",
        "connections_planned",
        "connections_opened",
        "reconnects",
        "resumed",
        "unanswered_acks",
        "unanswered_replies",
        "events",
        "presence_events",
        "seq_lost",
        "seq_lost_at_end",
        "seq_duplicates",
        "interrupted",
    ):
        out[name] = getattr(m, name)
    for name in (
        "frames_by_type",
        "acks_by_type",
        "errors",
        "rate_limited",
        "reply_status",
        "connect_failures",
        "server_closes",
    ):
        out[name] = dict(getattr(m, name))
    out["duration_s"] = m.duration_s
    return out


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def describe(report: dict[str, Any]) -> str:
    """The report's headline figures, a few lines for a terminal."""
    lines = []
    for name, stats in report["latency_ms"].items():
        lines.append(
            f"{name} latency: p50 {_fmt(stats['p50'])} ms, p90 {_fmt(stats['p90'])} ms,"
            f" p99 {_fmt(stats['p99'])} ms, p99.9 {_fmt(stats['p99.9'])} ms,"
            f" max {_fmt(stats['max'])} ms (n={stats['count']})"
        )
    throughput = report["throughput"]
    counts = report["counts"]
    lines.append(
        f"throughput: {throughput['frames_per_s']} frames/s (peak"
        f" {throughput['peak_frames_per_s']}), {throughput['replies_per_s']} replies/s over"
        f" {report['duration_s']} s"
    )
    lines.append(
        f"frames: {counts['frames_sent']} sent of {counts['frames_planned']} planned;"
        f" {counts['acks']} acks, {counts['replies']} replies"
        f" ({counts.get('reply_restarts', 0)} restarted);"
        f" unanswered: {counts['unanswered_acks']} acks, {counts['unanswered_replies']} replies"
    )
    lines.append(
        f"connections: {counts['connections_opened']} opened of"
        f" {counts['connections_planned']}, {counts['reconnects']} reconnects"
        f" ({counts['resumed']} resumed), failures {counts['connect_failures'] or 'none'},"
        f" closed by server {counts['closed_by_server'] or 'none'}"
    )
    lines.append(
        f"errors: {report['errors']['by_code'] or 'none'};"
        f" 429s: {report['rate_limited']['by_code'] or 'none'}"
    )
    seqs = report.get("seqs")
    if seqs:
        lines.append(
            f"seqs: {seqs['events']} events checked, {seqs['lost']} lost,"
            f" {seqs['duplicates']} duplicates; {seqs['presence_events']} join/leave;"
            f" {seqs['caught_up']} resumed connections caught up"
        )
    return "\n".join(lines)
