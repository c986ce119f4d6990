"""Schedules: what each connection of a load run does, and when. Pure.

A run is a list of `ConnectionPlan`s, each a client id, when to connect, what to do at
which offset (send a frame, or drop the socket and reconnect with its session) and when to
close. Replays build them from a trace (`plans_from_trace`), synthetic scenarios from
parameters (loadtest/scenarios.py); the engine (loadtest/engine.py) plays them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Any

from loadtest.trace import Trace

MAX_MESSAGE_ID = 128  # the protocol's limit
MAX_STREAM = 200


@dataclass(frozen=True, slots=True)
class Action:
    at: float  # seconds from the start of the run
    frame: dict[str, Any] | None = None
    reconnect: bool = False  # drop the socket (no close frame) and come back with the session


@dataclass(slots=True)
class ConnectionPlan:
    client: str
    open_at: float
    actions: list[Action] = field(default_factory=list)
    # Closed here (or once its sends are answered, if later); None: after its last action.
    close_at: float | None = None
    source: str = ""  # the trace's connection label, or the scenario's role

    def frame_count(self) -> int:
        return sum(1 for action in self.actions if action.frame is not None)

    def end(self) -> float:
        times = [self.open_at, *(action.at for action in self.actions)]
        if self.close_at is not None:
            times.append(self.close_at)
        return max(times)


def message_id(run_id: str, copy: int, original: str) -> str:
    """A replayed message id: unique to the run and the copy (the server remembers ids per
    client for a day, so a second replay must not look like a retry of the first), and
    the same for a `send` and the `cancel` that names it."""
    candidate = f"{run_id}.{copy}.{original}"
    if len(candidate) <= MAX_MESSAGE_ID:
        return candidate
    digest = hashlib.blake2b(original.encode(), digest_size=16).hexdigest()
    return f"{run_id}.{copy}.{digest}"


def copy_stream(stream: str, copy: int, separate: bool) -> str:
    if not separate or copy == 0:
        return stream
    suffix = f".r{copy}"
    return stream[: MAX_STREAM - len(suffix)] + suffix


def rewrite_frame(
    frame: dict[str, Any], run_id: str, copy: int, separate_streams: bool
) -> dict[str, Any]:
    """A trace frame as copy `copy` of this run sends it: ids made unique, `prev` dropped
    (it names an event of the recorded deployment), streams suffixed when copies get
    their own."""
    out = {key: value for key, value in frame.items() if key != "prev"}
    if isinstance(out.get("id"), str):
        out["id"] = message_id(run_id, copy, out["id"])
    if isinstance(out.get("stream"), str):
        out["stream"] = copy_stream(out["stream"], copy, separate_streams)
    return out


def plans_from_trace(
    trace: Trace,
    scale: int = 1,
    run_id: str = "r",
    client_prefix: str = "replay",
    separate_streams: bool = False,
) -> list[ConnectionPlan]:
    """Each recorded connection `scale` times. Connections of one recorded client stay
    one client id per copy (`PREFIX-N`, N counting clients in order of appearance, copy by
    copy), so per-client limits and dedupe behave as recorded; ids differ across copies.
    Time starts at the first connection's first sight: the quiet lead before it (the
    recorder started, gateways had not yet looked at the switch) is not replayed."""
    if scale < 1:
        raise ValueError("scale must be at least 1")
    origin = min((connection.opened_at for connection in trace.connections), default=0.0)
    clients: dict[str, int] = {}
    for connection in trace.connections:
        clients.setdefault(connection.client, len(clients))
    plans = []
    for copy in range(scale):
        for connection in trace.connections:
            number = copy * len(clients) + clients[connection.client]
            plans.append(
                ConnectionPlan(
                    client=f"{client_prefix}-{number}",
                    open_at=connection.opened_at - origin,
                    actions=[
                        Action(t - origin, rewrite_frame(frame, run_id, copy, separate_streams))
                        for t, frame in connection.frames
                    ],
                    close_at=None
                    if connection.closed_at is None
                    else connection.closed_at - origin,
                    source=connection.label,
                )
            )
    return plans


def at_speed(plans: list[ConnectionPlan], speed: float) -> list[ConnectionPlan]:
    """The same plans played `speed` times faster (every offset divided by it)."""
    if speed <= 0:
        raise ValueError("speed must be positive")
    return [
        replace(
            plan,
            open_at=plan.open_at / speed,
            actions=[replace(action, at=action.at / speed) for action in plan.actions],
            close_at=None if plan.close_at is None else plan.close_at / speed,
        )
        for plan in plans
    ]


def prepare_frame(frame: dict[str, Any], last_seqs: dict[str, int]) -> dict[str, Any]:
    """A planned frame as sent now, given the last seq this connection saw per stream.
    Seqs in a trace are the recorded deployment's: a `subscribe` resumes from what this
    connection has seen (or subscribes live), a `receipt` marks at most that."""
    kind = frame.get("type")
    if kind == "subscribe" and "since" in frame:
        out = dict(frame)
        seen = last_seqs.get(frame.get("stream", ""))
        if seen is None:
            del out["since"]
        else:
            out["since"] = seen
        return out
    if kind == "receipt":
        out = dict(frame)
        seq = frame.get("seq")
        seen = last_seqs.get(frame.get("stream", ""), 0)
        out["seq"] = min(seq, seen) if isinstance(seq, int) else seen
        return out
    return frame


def total_frames(plans: list[ConnectionPlan]) -> int:
    return sum(plan.frame_count() for plan in plans)


def clients_of(plans: list[ConnectionPlan]) -> list[str]:
    return list(dict.fromkeys(plan.client for plan in plans))
