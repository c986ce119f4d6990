"""Traces: the JSON Lines files `record_traffic` writes and `replay_load` reads. Pure.

The first line is a header, `{"trace": {...}}` (version, tenant, sample rate, whether text
was redacted, when the recording started). Every other line is one thing a connection did,
`t` seconds after the recording started:

    {"t": 0.412, "conn": "5d0c…", "client": "a81f…", "event": "open", "resumed": false}
    {"t": 0.530, "conn": "5d0c…", "client": "a81f…", "frame": {"type": "send", …}}
    {"t": 2.118, "conn": "5d0c…", "client": "a81f…", "event": "close", "code": 1000}

`conn` and `client` are labels hashed with the recording's salt (not ids); a connection
already open when recording started has no `open` line and begins at its first frame.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

TRACE_VERSION = 1


@dataclass
class TraceConnection:
    """One recorded connection: when it opened, its frames in order, when it closed."""

    label: str
    client: str
    opened_at: float
    frames: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    closed_at: float | None = None
    close_code: int | None = None
    resumed: bool = False


@dataclass
class Trace:
    header: dict[str, Any]
    connections: list[TraceConnection]

    def frame_count(self, frame_type: str | None = None) -> int:
        return sum(
            1
            for connection in self.connections
            for _, frame in connection.frames
            if frame_type is None or frame.get("type") == frame_type
        )

    @property
    def duration_s(self) -> float:
        ends = [
            max([c.opened_at, c.closed_at or 0.0, *(t for t, _ in c.frames)])
            for c in self.connections
        ]
        return max(ends, default=0.0)


def header_line(
    tenant: str, sample: float, redact_text: bool, started_at: str, **extra: Any
) -> dict[str, Any]:
    return {
        "trace": {
            "version": TRACE_VERSION,
            "tenant": tenant,
            "sample": sample,
            "redact_text": redact_text,
            "started_at": started_at,
            **extra,
        }
    }


def trace_line(entry: dict[str, Any], started_at: float) -> dict[str, Any] | None:
    """A recorded entry (realtime/recording.py) as a trace line; None for what a trace
    does not hold. `started_at` is the recording's start (epoch seconds); a gateway clock
    slightly behind the recorder's must not give a negative time."""
    kind = entry.get("event")
    line: dict[str, Any] = {
        "t": round(max(0.0, float(entry["ts"]) - started_at), 3),
        "conn": entry["conn"],
        "client": entry.get("client", ""),
    }
    if kind == "frame":
        line["frame"] = entry["frame"]
    elif kind == "open":
        line["event"] = "open"
        line["resumed"] = bool(entry.get("resumed", False))
    elif kind == "close":
        line["event"] = "close"
        line["code"] = entry.get("code")
    else:
        return None
    return line


def dumps_line(line: dict[str, Any]) -> str:
    return orjson.dumps(line).decode() + "\n"


def read_trace(lines: Iterable[str]) -> Trace:
    """Parse a trace; ValueError names the first bad line. Connections come in the order
    they first appear; each one's frames in file order (sorted by time, stably)."""
    header: dict[str, Any] = {}
    connections: dict[str, TraceConnection] = {}
    for number, raw in enumerate(lines, 1):
        text = raw.strip()
        if not text:
            continue
        try:
            line = orjson.loads(text)
        except orjson.JSONDecodeError as error:
            raise ValueError(f"line {number}: not JSON ({error})") from None
        if not isinstance(line, dict):
            raise ValueError(f"line {number}: not a JSON object")
        if "trace" in line:
            header = line["trace"]
            version = header.get("version", TRACE_VERSION)
            if version != TRACE_VERSION:
                raise ValueError(f"line {number}: trace version {version} is not supported")
            continue
        try:
            t = float(line["t"])
            label = str(line["conn"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"line {number}: needs a numeric 't' and a 'conn'") from None
        connection = connections.get(label)
        if connection is None:
            connection = connections[label] = TraceConnection(
                label, str(line.get("client") or label), t
            )
        if "frame" in line:
            frame = line["frame"]
            if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
                raise ValueError(f"line {number}: 'frame' must be an object with a 'type'")
            connection.frames.append((t, frame))
        elif line.get("event") == "open":
            connection.opened_at = min(connection.opened_at, t)
            connection.resumed = bool(line.get("resumed", False))
        elif line.get("event") == "close":
            connection.closed_at = t
            code = line.get("code")
            connection.close_code = code if isinstance(code, int) else None
        else:
            raise ValueError(f"line {number}: neither a frame nor an open/close event")
    for connection in connections.values():
        connection.frames.sort(key=lambda item: item[0])
    return Trace(header, list(connections.values()))
