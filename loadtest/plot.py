"""The report's PNG: latency percentiles and throughput over the run (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display: works on servers and in CI

import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend


def _curve(
    ax: Any, buckets: list[dict[str, Any]], width: float, name: str, label: str, style: str
) -> None:
    # Each interval's percentile drawn at its middle; intervals without samples left out.
    points = [(b["t"] + width / 2, b[name]) for b in buckets if b[name] is not None]
    if points:
        ax.plot([t for t, _ in points], [v for _, v in points], style, label=label)


def write_plot(report: dict[str, Any], path: Path) -> None:
    """Percentile curves (p50, p99) over time of ack, reply, delivery (fan-out) and
    connect latency, and frames and replies per second below them."""
    timeline = report["timeline"]
    width = timeline["bucket_s"]
    # Ack and reply always (an empty panel says the run had none); fan-out's delivery and
    # the connects when the run had them.
    kinds = ["ack", "reply"] + [
        kind
        for kind in ("delivery", "connect")
        if kind in timeline and report["latency_ms"].get(kind, {}).get("count")
    ]
    fig, grid = plt.subplots(
        len(kinds) + 1, 1, figsize=(10, 2.6 * (len(kinds) + 1)), sharex=True, squeeze=False
    )
    axes = [row[0] for row in grid]
    for ax, kind in zip(axes, kinds, strict=False):
        _curve(ax, timeline[kind], width, "p50", f"{kind} p50", "-o")
        _curve(ax, timeline[kind], width, "p99", f"{kind} p99", "-s")
        stats = report["latency_ms"].get(kind, {})
        overall = (
            f"overall p50 {stats['p50']} ms, p99 {stats['p99']} ms, n={stats['count']}"
            if stats.get("count")
            else "no samples"
        )
        ax.set_title(f"{kind} latency ({overall})", fontsize=9)
        ax.set_ylabel("ms")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(loc="upper left", fontsize=8)
    ax = axes[-1]
    # Steps over each interval: the last value repeated closes the last interval.
    edges = [index * width for index in range(len(timeline["frames_per_s"]) + 1)]
    for name, label in (("frames_per_s", "frames sent/s"), ("replies_per_s", "replies/s")):
        values = timeline[name]
        ax.step(edges, [*values, values[-1]], where="post", label=label)
    ax.set_ylabel("per second")
    ax.set_xlabel(f"seconds since start ({width:g} s intervals)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    title = report.get("command", "load run")
    fig.suptitle(f"{title}: {report.get('url', '')} tenant {report.get('tenant', '')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
