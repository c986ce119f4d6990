"""Synthetic load scenarios for `manage.py loadgen`, as schedules for the engine. Pure.

- **chat**: clients spread over a few streams, each sending to the `echo` agent at a
  steady rate (with jitter), like people in rooms talking to an assistant.
- **storm**: many clients connect at once, subscribe, and are dropped in waves (the
  socket cut without a close frame, as a network blip or a dead gateway does); each
  reconnects at once with its session, so every wave is a reconnect storm with resume.
- **fanout**: subscribers on one stream and one publisher; the report adds the delivery
  latency from each publish to each subscriber's copy of it.
- **night**: the seed's night. Clients connect over the ramp, each subscribed to one of
  `streams` streams (so present on it); after the ramp, each minute `send_share` of them
  (picked at random) send once to the agent, whose reply streams, and the rest read;
  midway, `storm_share` of them drop at once (within `wave_spread_s`) and resume with
  their session and positions. The engine checks every reader's seqs (losses,
  duplicates), delivery lag and reconnect-to-caught-up time (`check_seqs`).

Randomness comes from a seeded `random.Random`, so a scenario is the same run after run.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from loadtest.schedule import Action, ConnectionPlan

SCENARIOS = ("chat", "storm", "fanout", "night")


@dataclass(frozen=True, slots=True)
class ScenarioOptions:
    clients: int = 20
    duration_s: float = 10.0
    # chat: messages per second per client; fanout: publishes per second (one publisher)
    rate: float = 0.5
    streams: int = 4  # chat and storm: streams the clients spread over
    ramp_s: float = 1.0  # connections open spread over this long
    drops: int = 2  # storm: reconnect waves
    wave_spread_s: float = 0.5  # storm: how far apart the reconnects of one wave are
    agent: str = "echo"
    text_chars: int = 40
    options: dict[str, Any] | None = None  # chat: the send's options, e.g. {"chunks": 3}
    payload_chars: int = 100  # fanout: size of each publish's data
    seed: int = 0
    run_id: str = "g"
    client_prefix: str = "loadgen"
    send_share: float = 0.01  # night: share of the clients sending, each minute
    storm_share: float = 0.1  # night: share of the clients dropped and resumed midway
    # night: quiet after the ramp before the first send (the crowd's joins are announced
    # and delivered), and after the last send before everyone closes (replies finish).
    settle_s: float = 15.0


def _text(rng: random.Random, chars: int) -> str:
    words = ("load", "replay", "switchboard", "echo", "latency", "stream", "agent", "reply")
    out = ""
    while len(out) < chars:
        out += rng.choice(words) + " "
    return out[:chars].strip() or "x"


def chat(o: ScenarioOptions) -> list[ConnectionPlan]:
    rng = random.Random(o.seed)
    plans = []
    interval = 1.0 / o.rate if o.rate > 0 else float("inf")
    for n in range(o.clients):
        stream = f"loadgen-chat-{n % max(1, o.streams)}"
        open_at = o.ramp_s * n / max(1, o.clients)
        actions = [Action(open_at, {"type": "subscribe", "stream": stream})]
        at = open_at + rng.uniform(0, min(interval, o.duration_s))
        sent = 0
        while at < o.duration_s:
            frame: dict[str, Any] = {
                "type": "send",
                "id": f"{o.run_id}.{n}.{sent}",
                "stream": stream,
                "agent": o.agent,
                "text": _text(rng, o.text_chars),
            }
            if o.options:
                frame["options"] = o.options
            actions.append(Action(at, frame))
            sent += 1
            at += interval * rng.uniform(0.5, 1.5)
        plans.append(
            ConnectionPlan(f"{o.client_prefix}-{n}", open_at, actions, o.duration_s, "chat")
        )
    return plans


def storm(o: ScenarioOptions) -> list[ConnectionPlan]:
    rng = random.Random(o.seed)
    waves = [o.duration_s * (w + 1) / (o.drops + 1) for w in range(o.drops)]
    plans = []
    for n in range(o.clients):
        stream = f"loadgen-storm-{n % max(1, o.streams)}"
        open_at = rng.uniform(0, o.ramp_s)
        actions = [Action(open_at, {"type": "subscribe", "stream": stream})]
        for wave in waves:
            at = max(open_at, wave + rng.uniform(0, o.wave_spread_s))
            actions.append(Action(at, reconnect=True))
            # Proves the resumed connection is served (the answer comes after the
            # restored subscriptions, see docs/protocol.md).
            actions.append(Action(at, {"type": "ping"}))
        plans.append(
            ConnectionPlan(f"{o.client_prefix}-{n}", open_at, actions, o.duration_s, "storm")
        )
    return plans


def fanout(o: ScenarioOptions) -> list[ConnectionPlan]:
    rng = random.Random(o.seed)
    stream = f"loadgen-fanout-{o.run_id}"
    plans = []
    for n in range(o.clients):
        open_at = o.ramp_s * n / max(1, o.clients)
        plans.append(
            ConnectionPlan(
                f"{o.client_prefix}-{n}",
                open_at,
                [Action(open_at, {"type": "subscribe", "stream": stream})],
                # Past the last publish, so the last one still reaches everyone.
                o.duration_s + 1.0,
                "subscriber",
            )
        )
    # The publisher starts once every subscriber has had time to subscribe.
    first = o.ramp_s + 0.5
    interval = 1.0 / o.rate if o.rate > 0 else float("inf")
    actions = []
    at, sent = first, 0
    while at < o.duration_s:
        data = {"n": sent, "text": _text(rng, o.payload_chars)}
        frame = {"type": "publish", "id": f"{o.run_id}.pub.{sent}", "stream": stream, "data": data}
        actions.append(Action(at, frame))
        sent += 1
        at += interval
    plans.append(ConnectionPlan(f"{o.client_prefix}-pub", 0.0, actions, o.duration_s, "publisher"))
    return plans


def night(o: ScenarioOptions) -> list[ConnectionPlan]:
    """The seed's night (module doc): sends and the storm come `settle_s` after the ramp,
    within `duration_s`; everyone closes `settle_s` after it (replies and catch-ups done)."""
    rng = random.Random(o.seed)
    streams = max(1, o.streams)
    start = o.ramp_s + o.settle_s
    end = start + o.duration_s
    plans = []
    for n in range(o.clients):
        open_at = o.ramp_s * n / max(1, o.clients)
        subscribe = {"type": "subscribe", "stream": f"night-{n % streams}"}
        plans.append(
            ConnectionPlan(
                f"{o.client_prefix}-{n}", open_at, [Action(open_at, subscribe)], end + o.settle_s
            )
        )
    sent = [0] * o.clients
    for minute in range(math.ceil(o.duration_s / 60)):
        window = min(60.0, o.duration_s - minute * 60)
        count = min(o.clients, round(o.clients * o.send_share * window / 60))
        for n in rng.sample(range(o.clients), count):
            frame: dict[str, Any] = {
                "type": "send",
                "id": f"{o.run_id}.{n}.{sent[n]}",
                "stream": f"night-{n % streams}",
                "agent": o.agent,
                "text": _text(rng, o.text_chars),
            }
            if o.options:
                frame["options"] = o.options
            sent[n] += 1
            plans[n].actions.append(Action(start + minute * 60 + rng.uniform(0, window), frame))
    storm_at = start + o.duration_s / 2
    for n in rng.sample(range(o.clients), min(o.clients, round(o.clients * o.storm_share))):
        at = storm_at + rng.uniform(0, o.wave_spread_s)
        # The ping's pong comes after the restored subscriptions and their catch-up.
        plans[n].actions += [Action(at, reconnect=True), Action(at, {"type": "ping"})]
    for plan in plans:
        plan.actions.sort(key=lambda action: action.at)  # stable: the ping stays after
        plan.source = (
            "sender"
            if any(a.frame and a.frame["type"] == "send" for a in plan.actions)
            else "reader"
        )
    return plans


def build(name: str, options: ScenarioOptions) -> list[ConnectionPlan]:
    if name == "chat":
        return chat(options)
    if name == "storm":
        return storm(options)
    if name == "fanout":
        return fanout(options)
    if name == "night":
        return night(options)
    raise ValueError(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")
