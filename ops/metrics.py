"""Prometheus metrics: every series Switchboard exports is defined here, named `switchboard_*`.

Labels stay low-cardinality: tenant, type/kind (fixed sets), code/reason, backend, outcome.
Never a client id, stream name, message or run id: each distinct value is a series kept by
every process and by Prometheus forever.

Several processes per host (daphne gateways, Celery's pool children, beat) each count
their own share. With PROMETHEUS_MULTIPROC_DIR set (prometheus_client's own variable, read
by it when it is first imported), every process writes its values to files of its own in
that directory and `/metrics` of any gateway sums the files of the whole host
(MultiProcessCollector): counters and histograms add up, and the gauges below are
"livesum", the sum over processes still alive. A process that exits marks itself dead
(`mark_process_dead`: at exit, and in Celery's pool children when they stop) so its gauges
leave the sum; one killed with SIGKILL leaves its gauges behind until the directory is
cleared, which whoever starts the host's processes does first (project/launcher.py,
the compose file's tmpfs). Without the variable each process serves only its own values.

Cluster-wide state (queue depths, runs in flight) is read from Redis at scrape time by
`RedisStateCollector`, on gateways only: no process counts it, and the hot path gains no
Redis call. Every gateway reports the same values, so dashboards take `max`, not `sum`.

Hot-path cost: one counter increment per frame in or out (a few hundred nanoseconds, a
write to a memory-mapped file in multiprocess mode); the kind of a frame going out is read
from its first bytes, once per event however many sockets it is fanned out to.
"""

from __future__ import annotations

import atexit
import hmac
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from typing import Any
from wsgiref.simple_server import WSGIServer

import orjson
import redis
from django.http import HttpRequest, HttpResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from redis.exceptions import RedisError

from ops.amqp_queues import is_amqp, read_amqp_queues
from project.conf import conf
from streams import keys
from streams.registry import tenants as registered_tenants
from streams.usage import Usage

logger = logging.getLogger(__name__)


def geometric_buckets(low: float, high: float, count: int) -> tuple[float, ...]:
    """`count` histogram bounds from `low` to `high`, each a constant factor above the last
    (rounded to 3 significant digits), so every decade has the same resolution: a quantile
    read anywhere between them is off by at most one bucket's width."""
    ratio = (high / low) ** (1 / (count - 1))
    return tuple(float(f"{low * ratio**index:.3g}") for index in range(count))


# 5 ms to 60 s in 28 steps of ~1.42x: fine enough that histogram_quantile(0.999, ...) of a
# reply (run deadline 30 s by default) or a model call is within ~40% of the true value.
LATENCY_BUCKETS = geometric_buckets(0.005, 60.0, 28)
# Event ts → socket. Event timestamps have millisecond precision, so nothing below 1 ms.
DELIVERY_LAG_BUCKETS = geometric_buckets(0.001, 30.0, 24)

# --- gateways ------------------------------------------------------------------------------

CONNECTIONS = Gauge(
    "switchboard_connections",
    "WebSockets open and admitted (past auth and the connection caps), per tenant.",
    ["tenant"],
    multiprocess_mode="livesum",
)
SUBSCRIPTIONS = Gauge(
    "switchboard_subscriptions",
    "Stream subscriptions of open connections, per tenant.",
    ["tenant"],
    multiprocess_mode="livesum",
)
WORKER_CALLS_IN_FLIGHT = Gauge(
    "switchboard_worker_calls_in_flight",
    "Model-call steps held by worker processes' runtimes (workers/runtime.py), summed over "
    "the host's live workers; each process holds at most SWITCHBOARD_WORKER_MAX_CALLS.",
    multiprocess_mode="livesum",
)
TENANT_CACHE_ENTRIES = Gauge(
    "switchboard_tenant_cache_entries",
    "Tenants cached by gateway processes (tenants/config.py): kind=tenant for tenants "
    "found, kind=missing for slugs that name no tenant; each kind is bounded per process.",
    ["kind"],
    multiprocess_mode="livesum",
)
TENANT_LOOKUPS = Counter(
    "switchboard_tenant_lookups",
    "Database reads of a tenant by a gateway's or worker's tenant cache, by result "
    "(found, missing): at most one per slug per SWITCHBOARD_TENANT_CACHE_S and process.",
    ["result"],
)
FRAMES_IN = Counter(
    "switchboard_frames_in",
    "Client frames parsed, by frame type (frames that do not parse count as error answers).",
    ["type"],
)
FRAMES_OUT = Counter(
    "switchboard_frames_out",
    "Frames handed to connections (written, or queued in their outbox), by event kind for "
    "stream events and by frame type otherwise.",
    ["kind"],
)
ACKS = Counter(
    "switchboard_acks",
    "send and publish frames acknowledged, per tenant; duplicate=true: a resent message id "
    "answered from its dedupe record, nothing appended (a dedupe hit).",
    ["tenant", "duplicate"],
)
ERROR_ANSWERS = Counter(
    "switchboard_error_answers",
    "error frames answered to client frames, by error code.",
    ["code"],
)
REFUSALS = Counter(
    "switchboard_refusals",
    "Work refused by a flow-control bound, per tenant: code is what the client got "
    "(rate_limited, overloaded or budget_exhausted, all 429, or the close code 4029), reason "
    "which bound.",
    ["tenant", "code", "reason"],
)
HANDSHAKES_WAITING = Gauge(
    "switchboard_handshakes_waiting",
    "WebSocket handshakes waiting for their turn to be set up (a gateway process takes "
    "SWITCHBOARD_HANDSHAKE_CONCURRENCY at a time).",
    multiprocess_mode="livesum",
)
DAPHNE_CONNECTIONS = Gauge(
    "switchboard_daphne_connections",
    "Connections daphne tracks in gateway processes: open ones, and closed ones whose "
    "application has not ended yet. Growing while switchboard_connections does not: closed "
    "connections are not being reaped.",
    multiprocess_mode="livesum",
)
HANDSHAKES_DROPPED = Counter(
    "switchboard_handshakes_dropped",
    "Handshakes not set up: reason=line_full (closed 1012 at once: SWITCHBOARD_HANDSHAKE_QUEUE "
    "were waiting) or client_left (the client gave up while it waited).",
    ["reason"],
)
ACCEPT_PAUSES = Counter(
    "switchboard_accept_pauses",
    "Times a gateway process stopped taking new connections for a moment because it had "
    "taken SWITCHBOARD_ACCEPT_BURST faster than SWITCHBOARD_ACCEPT_RATE_PER_S (the rest "
    "wait in the kernel's accept queue). Rising outside reconnect storms: raise the rate or "
    "add gateway processes.",
)
LOOP_LONG_TURNS = Histogram(
    "switchboard_loop_long_turn_seconds",
    "Turns of a gateway process's event loop that ran 10 ms or more, by how long: every "
    "delivery of the process that came in during one waited for the rest of it.",
    buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
SLOW_CONSUMER_CLOSES = Counter(
    "switchboard_slow_consumer_closes",
    "Connections closed with 4008 because their outbound buffer filled, per tenant.",
    ["tenant"],
)
SEND_TO_REPLY_DONE = Histogram(
    "switchboard_send_to_reply_done_seconds",
    "From a gateway receiving a send to it handing that run's reply.done to the sending "
    "connection, per tenant.",
    ["tenant"],
    buckets=LATENCY_BUCKETS,
)
DELIVERY_LAG = Histogram(
    "switchboard_delivery_lag_seconds",
    "From a stream event's ts (when it was appended) to a gateway having handed it to all "
    "its subscribed connections; once per event per gateway process. Across hosts it "
    "includes their clock difference.",
    buckets=DELIVERY_LAG_BUCKETS,
)

GC_PAUSES = Histogram(
    "switchboard_gc_pause_seconds",
    "Garbage collections of gateway and worker processes, by generation (0 youngest, 2 the "
    "whole heap): each stops every connection or held model call of its process while it runs.",
    ["generation"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)

# --- workers -------------------------------------------------------------------------------

MODEL_CALL_SECONDS = Histogram(
    "switchboard_model_call_seconds",
    "Duration of model calls (a backend's stream, first byte to last), by backend and outcome.",
    ["backend", "outcome"],
    buckets=LATENCY_BUCKETS,
)
MODEL_CALLS = Counter(
    "switchboard_model_calls",
    "Model calls by backend and outcome: ok; error (failed, will be retried); fallback "
    "(failed, not retried: the next model of the step's chain or the step's fallback "
    "answers); timeout (passed its soft limit); cancelled (the run stopped needing it).",
    ["backend", "outcome"],
)
MODEL_OUTCOMES = ("ok", "error", "fallback", "timeout", "cancelled")
MODEL_FAILOVERS = Counter(
    "switchboard_model_failovers",
    "Times a step left a model for the next of its fallback models, by the backend it left "
    "and why: model_error, timeout, rate_limited.",
    ["backend", "reason"],
)
# Agents are the code's and models the code's or an operator's override (the admin), never
# a client's: bounded like the tenants. A model name is cut to this many characters.
MODEL_LABEL_CHARS = 64
TOKENS = Counter(
    "switchboard_tokens",
    "Tokens used by model calls (as the provider reported them, else estimated: "
    "streams/usage.py), per tenant, agent, model and kind (prompt or completion).",
    ["tenant", "agent", "model", "kind"],
)
TOKEN_KINDS = ("prompt", "completion")

# The bound each refusal reason belongs to, as the client saw it (console/live.py
# names the same reasons for the admin's live page).
REFUSAL_CODES = {
    "messages": "rate_limited",
    "runs_in_flight": "rate_limited",
    "queued_runs": "overloaded",
    "connections": "4029",
    "subscriptions": "rate_limited",
    "receipts": "rate_limited",
    "token_budget": "budget_exhausted",
    "redis_pool": "overloaded",
}
# Labels of frames going out: anything else (a kind a later version adds) is "other", so a
# frame can never mint a series.
OUT_KINDS = frozenset(
    {
        "message",
        "published",
        "reply.delta",
        "reply.restart",
        "reply.done",
        "tool.call",
        "tool.result",
        "join",
        "leave",
        "welcome",
        "ack",
        "error",
        "subscribed",
        "unsubscribed",
        "presence",
        "pong",
    }
)
_EVENT_PREFIX = '{"type":"event"'
_TYPE_PREFIX = '{"type":"'
_KIND_KEY = '"kind":"'
_TS_KEY = ',"ts":"'


def frame_kind(frame: str) -> str:
    """The event kind of a stream event, the type of any other server frame, from the text.

    Events are built with type, stream, seq and id first (streams/events.py, the presence
    script), and no stream name or id may hold a quote, so the first `"kind":"` is the
    event's own."""
    if frame.startswith(_EVENT_PREFIX):
        start = frame.find(_KIND_KEY, len(_EVENT_PREFIX))
        if start < 0:
            return "other"
        start += len(_KIND_KEY)
        kind = frame[start : frame.find('"', start)]
    elif frame.startswith(_TYPE_PREFIX):
        start = len(_TYPE_PREFIX)
        kind = frame[start : frame.find('"', start)]
    else:
        return "other"
    return kind if kind in OUT_KINDS else "other"


# Children of labelled metrics cached per label value: .labels() takes a lock and builds a
# key each time, several times the cost of the increment itself.
_frames_in: dict[type, Any] = {}
_frames_out: dict[str, Any] = {}
# Per tenant (tenants are those of verified tokens, so as many as the deployment has):
# counted at every connect, close, subscribe and unsubscribe, a thousand a second in a storm.
_connections: dict[str, Any] = {}
_subscriptions: dict[str, Any] = {}
# One event is pushed to every subscribed socket as the very same string: its kind is read
# once per fan-out, not once per socket.
_last_out: str | None = None
_last_out_kind = "other"


def frame_in(frame: object) -> None:
    child = _frames_in.get(type(frame))
    if child is None:
        child = _frames_in[type(frame)] = FRAMES_IN.labels(type(frame).__name__.lower())
    child.inc()


def cached_frame_kind(frame: str) -> str:
    global _last_out, _last_out_kind
    if frame is not _last_out:
        _last_out_kind = frame_kind(frame)
        _last_out = frame
    return _last_out_kind


def frame_out(frame: str) -> None:
    kind = cached_frame_kind(frame)
    child = _frames_out.get(kind)
    if child is None:
        child = _frames_out[kind] = FRAMES_OUT.labels(kind)
    child.inc()


def _tenant_child(cache: dict[str, Any], metric: Any, tenant: str) -> Any:
    child = cache.get(tenant)
    if child is None:
        child = cache[tenant] = metric.labels(tenant)
    return child


def connection_opened(tenant: str) -> None:
    _tenant_child(_connections, CONNECTIONS, tenant).inc()


def connection_closed(tenant: str) -> None:
    _tenant_child(_connections, CONNECTIONS, tenant).dec()


def subscribed(tenant: str) -> None:
    _tenant_child(_subscriptions, SUBSCRIPTIONS, tenant).inc()


def unsubscribed(tenant: str) -> None:
    _tenant_child(_subscriptions, SUBSCRIPTIONS, tenant).dec()


def tenant_cache_loaded(found: bool, tenants: int, missing: int) -> None:
    """A tenant cache read the database; it now holds `tenants` and `missing` entries."""
    TENANT_LOOKUPS.labels("found" if found else "missing").inc()
    TENANT_CACHE_ENTRIES.labels("tenant").set(tenants)
    TENANT_CACHE_ENTRIES.labels("missing").set(missing)


def acked(tenant: str, duplicate: bool) -> None:
    ACKS.labels(tenant, "true" if duplicate else "false").inc()


def error_answered(code: str) -> None:
    ERROR_ANSWERS.labels(code).inc()


def refused(tenant: str, reason: str) -> None:
    """One refusal; `reason` as realtime/throttles.py's ThrottleCounter counts it."""
    REFUSALS.labels(tenant, REFUSAL_CODES.get(reason, "other"), reason).inc()


def handshakes_waiting(change: int) -> None:
    HANDSHAKES_WAITING.inc(change)


def daphne_connections(count: int) -> None:
    DAPHNE_CONNECTIONS.set(count)


def handshake_dropped(reason: str) -> None:
    HANDSHAKES_DROPPED.labels(reason).inc()


def accepts_paused() -> None:
    ACCEPT_PAUSES.inc()


def long_loop_turn(seconds: float) -> None:
    LOOP_LONG_TURNS.observe(seconds)


def gc_paused(generation: int, seconds: float) -> None:
    GC_PAUSES.labels(str(generation)).observe(seconds)


def slow_consumer_closed(tenant: str) -> None:
    SLOW_CONSUMER_CLOSES.labels(tenant).inc()


def event_lag_s(event: str, now: float) -> float | None:
    """Seconds from the event's ts to `now` (epoch), or None when it has no ts."""
    start = event.find(_TS_KEY)
    if start < 0:
        return None
    start += len(_TS_KEY)
    try:
        stamp = datetime.fromisoformat(event[start : event.find('"', start)]).timestamp()
    except ValueError:
        return None
    # Another host's clock may be ahead: a negative lag is no lag.
    return max(0.0, now - stamp)


def event_delivered(event: str) -> None:
    """An event was handed to every local subscriber (the hub, once per event)."""
    lag = event_lag_s(event, time.time())
    if lag is not None:
        DELIVERY_LAG.observe(lag)


class ReplyClock:
    """One connection's sends awaiting their reply.done: run id -> when the send arrived.

    Looked at only while it holds something, so the fan-out to sockets that sent nothing
    costs one truthiness test."""

    # Runs in flight per connection are bounded far below this (the tenant's limit); the
    # cap only keeps a connection that never reads its replies from growing it.
    MAX_WAITING = 256

    __slots__ = ("started",)

    def __init__(self) -> None:
        self.started: dict[str, float] = {}

    def sent(self, run_id: str | None, started: float) -> None:
        if run_id and len(self.started) < self.MAX_WAITING:
            self.started[run_id] = started

    def delivered(self, tenant: str, frames: Iterable[str]) -> None:
        for frame in frames:
            if cached_frame_kind(frame) != "reply.done":
                continue
            try:
                run_id = orjson.loads(frame)["data"]["run"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                continue
            started = self.started.pop(run_id, None)
            if started is not None:
                SEND_TO_REPLY_DONE.labels(tenant).observe(time.monotonic() - started)


def worker_calls_in_flight(change: int) -> None:
    """A worker's runtime took (+1) or ended (-1) a model-call step."""
    WORKER_CALLS_IN_FLIGHT.inc(change)


def model_call(backend: str, outcome: str, seconds: float) -> None:
    """One model call ended (orchestration/steps.py); `outcome` is one of MODEL_OUTCOMES."""
    MODEL_CALLS.labels(backend, outcome).inc()
    MODEL_CALL_SECONDS.labels(backend, outcome).observe(seconds)


def model_failover(backend: str, reason: str) -> None:
    """A step left a model of `backend` for the next of its fallback models (steps.py)."""
    MODEL_FAILOVERS.labels(backend, reason).inc()


def model_label(backend: str, model: str) -> str:
    """The `model` label of a call: the model it asked for, else its backend's configured
    model (SWITCHBOARD_OPENAI_MODEL, ...), else the backend's name; cut to a bound."""
    if not model:
        config = conf()
        model = {"openai": config.openai_model, "anthropic": config.anthropic_model}.get(
            backend, ""
        )
    return (model or backend)[:MODEL_LABEL_CHARS]


def tokens_used(tenant: str, agent: str, model: str, usage: Usage) -> None:
    """One model call's tokens (orchestration/steps.py); `model` as model_label gives it."""
    if usage.prompt_tokens:
        TOKENS.labels(tenant, agent, model, "prompt").inc(usage.prompt_tokens)
    if usage.completion_tokens:
        TOKENS.labels(tenant, agent, model, "completion").inc(usage.completion_tokens)


# --- series that exist before anything touches them --------------------------------------

# In multiprocess mode a labelled series is exported only once some process has used it,
# so after a start a dashboard would show "No data" and `absent()` alerts would fire until
# traffic came. Every series whose labels are known in advance is created at zero instead,
# by the process that serves the scrape: tenant series for the first this many enabled
# tenants (by slug), re-read every KNOWN_TENANTS_REFRESH_S so new tenants appear too.
KNOWN_TENANTS_MAX = 200
KNOWN_TENANTS_REFRESH_S = 60.0
# Client frame types (realtime/protocol.py's parsers) and error codes.
FRAME_TYPES = (
    "send",
    "publish",
    "subscribe",
    "unsubscribe",
    "receipt",
    "cancel",
    "presence",
    "ping",
)
ERROR_CODES = (
    "bad_request",
    "forbidden",
    "not_found",
    "history_expired",
    "too_large",
    "rate_limited",
    "overloaded",
    "budget_exhausted",
    "internal",
)


def initialise_series(
    tenants: Iterable[str],
    backends: Iterable[str],
    agent_models: Iterable[tuple[str, str]] = (),
) -> None:
    """Create, at zero, every series of these label values (idempotent: an existing one
    keeps its value). `agent_models`: (agent, model label) of the agents' model steps,
    whose token series each tenant gets (a tenant's model override appears once used)."""
    agent_models = list(agent_models)
    for frame_type in FRAME_TYPES:
        FRAMES_IN.labels(frame_type)
    for kind in (*OUT_KINDS, "other"):
        FRAMES_OUT.labels(kind)
    for code in ERROR_CODES:
        ERROR_ANSWERS.labels(code)
    for backend in backends:
        for outcome in MODEL_OUTCOMES:
            MODEL_CALLS.labels(backend, outcome)
            MODEL_CALL_SECONDS.labels(backend, outcome)
    for tenant in tenants:
        CONNECTIONS.labels(tenant)
        SUBSCRIPTIONS.labels(tenant)
        ACKS.labels(tenant, "false")
        ACKS.labels(tenant, "true")
        for reason, code in REFUSAL_CODES.items():
            REFUSALS.labels(tenant, code, reason)
        SLOW_CONSUMER_CLOSES.labels(tenant)
        SEND_TO_REPLY_DONE.labels(tenant)
        for agent, model in agent_models:
            for kind in TOKEN_KINDS:
                TOKENS.labels(tenant, agent, model, kind)


def known_tenants() -> list[str]:
    # Looked up through Django's registry: the tenants app reports its cache here, so this
    # module does not import it back.
    from django.apps import apps

    Tenant = apps.get_model("tenants", "Tenant")
    enabled = Tenant.objects.filter(enabled=True).order_by("slug")
    return list(enabled.values_list("slug", flat=True)[:KNOWN_TENANTS_MAX])


def known_backends() -> list[str]:
    """The model backends the registered agents' steps call."""
    from agents import Step, agent_names, get_agent

    return sorted(
        {
            step.backend
            for name in agent_names()
            for step in get_agent(name).steps
            if isinstance(step, Step)
        }
    )


def known_agent_models() -> list[tuple[str, str]]:
    """(agent, model label) of every model step of the registered agents."""
    from agents import Step, agent_names, get_agent

    return sorted(
        {
            (name, model_label(step.backend, step.model))
            for name in agent_names()
            for step in get_agent(name).steps
            if isinstance(step, Step)
        }
    )


_initialised_at: float | None = None


def initialise_known_series() -> list[str]:
    """initialise_series for the tenants in the database and the agents' backends, at
    most once every KNOWN_TENANTS_REFRESH_S in this process; returns the tenants."""
    global _initialised_at, _known_tenants
    now = time.monotonic()
    if _initialised_at is None or now - _initialised_at >= KNOWN_TENANTS_REFRESH_S:
        try:
            _known_tenants = known_tenants()
        except Exception:
            # The scrape must still answer when the database does not.
            logger.warning("metrics: tenants not read for zero-valued series", exc_info=True)
        initialise_series(_known_tenants, known_backends(), known_agent_models())
        _initialised_at = now
    return _known_tenants


_known_tenants: list[str] = []


# --- cluster state, read from Redis at scrape time -----------------------------------------

# A scrape reads at most this many tenants of the fair ring, and exports the deepest of
# them one series each: bounded whatever the number of tenants.
FAIR_RING_READ = 1000
FAIR_TENANTS_EXPORTED = 20
# A scrape must answer within Prometheus' scrape timeout (10 s by default) even when Redis
# does not.
STATE_TIMEOUT_S = 2.0


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


class RedisStateCollector:
    """Queue depths and runs in flight, read from Redis when Prometheus scrapes."""

    def __init__(
        self,
        client: redis.Redis,
        broker: redis.Redis | None,
        queue_names: Callable[[], list[str]],
        idle_tenants: Callable[[], list[str]] = list,
        amqp_url: str = "",
    ) -> None:
        self.client = client
        self.broker = broker  # Celery's broker, when it is Redis
        self.amqp_url = amqp_url  # Celery's broker, when it is RabbitMQ (AMQP)
        self.queue_names = queue_names
        self.idle_tenants = idle_tenants  # tenants to show at depth 0 when few wait

    def describe(self) -> list[Metric]:
        # Registering must not read Redis (prometheus_client calls collect otherwise).
        return []

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "switchboard_state_up",
            "1 when this scrape read the queue and run gauges from Redis, 0 when it could not.",
        )
        try:
            families = self._read()
        except (RedisError, OSError) as error:
            logger.warning("metrics: Redis state not read: %s", error)
            up.add_metric([], 0)
            yield up
            return
        yield from families
        up.add_metric([], 1)
        yield up

    def _read(self) -> list[Metric]:
        slugs = registered_tenants(self.client)
        with self.client.pipeline(transaction=False) as pipe:
            pipe.llen(keys.FAIR_RING)
            pipe.lrange(keys.FAIR_RING, 0, FAIR_RING_READ - 1)
            # Run deadlines and leases are indexed per tenant (streams/keys.py).
            for slug in slugs:
                pipe.zcard(keys.run_deadlines(slug))
                pipe.zcard(keys.run_leases(slug))
            ring_length, ring, *counts = pipe.execute()
        unfinished, leased = sum(counts[0::2]), sum(counts[1::2])
        tenants = [_text(slug) for slug in ring]
        with self.client.pipeline(transaction=False) as pipe:
            for slug in tenants:
                pipe.llen(keys.fair_queue(slug))
            lengths = [int(length) for length in pipe.execute()] if tenants else []
        families: list[Metric] = [
            GaugeMetricFamily(
                "switchboard_runs_unfinished",
                "Runs accepted and not finished (queued, waiting for a step, or running).",
                value=int(unfinished),
            ),
            GaugeMetricFamily(
                "switchboard_runs_leased",
                "Runs whose step a worker holds (picked or claimed), expired leases included until "
                "the sweeper redelivers them.",
                value=int(leased),
            ),
            GaugeMetricFamily(
                "switchboard_fair_queue_tenants",
                "Tenants with runs waiting in their fair queue.",
                value=int(ring_length),
            ),
            GaugeMetricFamily(
                "switchboard_fair_queue_runs",
                f"Runs waiting in fair queues (of the first {FAIR_RING_READ} tenants waiting).",
                value=sum(lengths),
            ),
        ]
        deepest = GaugeMetricFamily(
            "switchboard_fair_queue_depth",
            f"Runs waiting in a tenant's fair queue, for the {FAIR_TENANTS_EXPORTED} tenants "
            "with the most.",
            labels=["tenant"],
        )
        ranked = sorted(zip(tenants, lengths, strict=True), key=lambda pair: -pair[1])
        # With fewer tenants waiting than exported, known idle ones fill in at 0, so the
        # series exists (and a panel has data) when nothing waits.
        waiting = {slug for slug, _ in ranked}
        idle = [(slug, 0) for slug in self.idle_tenants() if slug not in waiting]
        for slug, length in [*ranked, *idle][:FAIR_TENANTS_EXPORTED]:
            deepest.add_metric([slug], length)
        families.append(deepest)
        if self.broker is not None:
            families.extend(self._read_broker())
        elif self.amqp_url:
            families.extend(self._read_amqp())
        return families

    def _read_amqp(self) -> list[Metric]:
        """RabbitMQ's queues: messages ready and consumers. Messages delivered and not yet
        acknowledged are not exported (a passive declare does not tell them; RabbitMQ's own
        Prometheus plugin does). A broker that does not answer sets its own `up` to 0, not
        the Redis state's."""
        up = GaugeMetricFamily(
            "switchboard_broker_up",
            "1 when this scrape read the queue depths from the AMQP broker, 0 when it could not.",
        )
        try:
            queues = read_amqp_queues(self.amqp_url, self.queue_names(), STATE_TIMEOUT_S)
        except Exception as error:  # noqa: BLE001 - any failure of the broker: say it, go on
            logger.warning("metrics: AMQP broker not read: %s", error)
            up.add_metric([], 0)
            return [up]
        depth = GaugeMetricFamily(
            "switchboard_queue_depth",
            "Messages waiting in a Celery queue (with fair queues on, one ticket per queued run).",
            labels=["queue"],
        )
        consumers = GaugeMetricFamily(
            "switchboard_queue_consumers",
            "Consumers (worker connections) attached to a Celery queue on the AMQP broker.",
            labels=["queue"],
        )
        for queue in queues:
            depth.add_metric([queue.name], queue.ready)
            consumers.add_metric([queue.name], queue.consumers)
        up.add_metric([], 1)
        return [depth, consumers, up]

    def _read_broker(self) -> list[Metric]:
        assert self.broker is not None
        names = self.queue_names()
        with self.broker.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.llen(keys.celery_queue(name))
            pipe.hlen(keys.celery_queue("unacked"))
            *depths, unacked = pipe.execute()
        depth = GaugeMetricFamily(
            "switchboard_queue_depth",
            "Messages waiting in a Celery queue (with fair queues on, one ticket per queued run).",
            labels=["queue"],
        )
        for name, length in zip(names, depths, strict=True):
            depth.add_metric([name], int(length))
        return [
            depth,
            GaugeMetricFamily(
                "switchboard_queue_unacked",
                "Celery messages delivered to a worker and not yet acknowledged.",
                value=int(unacked),
            ),
        ]


def _celery_queue_names() -> list[str]:
    # The project's Celery app (project/celery.py), found the way Celery finds it: this
    # module is imported by that one's signal handlers, never the other way round.
    from celery import current_app

    return [queue.name for queue in current_app.conf.task_queues or ()]


_state: RedisStateCollector | None = None


def state_collector() -> RedisStateCollector:
    """This process's collector, on its own short-timeout clients (never the hot path's)."""
    global _state
    if _state is None:
        config = conf()
        options = {"socket_timeout": STATE_TIMEOUT_S, "socket_connect_timeout": STATE_TIMEOUT_S}
        client = redis.Redis.from_url(config.redis_url, **options)
        broker_url = config.broker_url
        broker: redis.Redis | None = None
        if config.broker_in_streams_redis:
            broker = client
        elif broker_url.startswith(("redis://", "rediss://", "unix://")):
            broker = redis.Redis.from_url(broker_url, **options)
        _state = RedisStateCollector(
            client,
            broker,
            _celery_queue_names,
            lambda: list(_known_tenants),
            amqp_url=broker_url if is_amqp(broker_url) else "",
        )
    return _state


# --- exposition ----------------------------------------------------------------------------


def multiprocess_dir() -> str:
    return conf().prometheus_multiproc_dir


class _ThisProcess:
    """The default registry (this process's metrics, django-prometheus' included)."""

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        return REGISTRY.collect()


def exposition_registry(with_state: bool) -> CollectorRegistry:
    """What a scrape returns: every process of the host (multiprocess mode) or this one,
    plus the cluster state from Redis when `with_state`."""
    registry = CollectorRegistry()
    if multiprocess_dir():
        multiprocess.MultiProcessCollector(registry, path=multiprocess_dir())
    else:
        registry.register(_ThisProcess())
    if with_state:
        registry.register(state_collector())
    return registry


def metrics_view(request: HttpRequest) -> HttpResponse:
    """GET /metrics on gateways: the host's processes and the cluster state. It names every
    tenant and its traffic, and the gateway's port is the clients' too: only a scraper
    with SWITCHBOARD_METRICS_TOKEN as its bearer token is answered."""
    expected = conf().metrics_token
    if not expected:
        return HttpResponse(
            "metrics are off: set SWITCHBOARD_METRICS_TOKEN and scrape with it as a bearer token\n",
            status=403,
            content_type="text/plain",
        )
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), expected.encode()
    ):
        response = HttpResponse(
            "a bearer token is required\n", status=401, content_type="text/plain"
        )
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    initialise_known_series()
    body = generate_latest(exposition_registry(with_state=True))
    return HttpResponse(body, content_type=CONTENT_TYPE_LATEST)


def start_worker_exporter(port: int, addr: str = "0.0.0.0") -> WSGIServer | None:
    """Serve the host's metrics (no cluster state: gateways export that) on `port`, from
    a Celery worker's main process, for hosts that run no gateway. Returns the server (in
    a daemon thread), or None when the port is taken."""
    from prometheus_client import start_http_server

    if not multiprocess_dir():
        logger.warning(
            "worker metrics on port %s: PROMETHEUS_MULTIPROC_DIR is not set, so the pool "
            "processes' metrics (model calls) are not included",
            port,
        )
    # The backends' series at zero from the first scrape (tenants are the gateways').
    initialise_series((), known_backends())
    try:
        server, _ = start_http_server(port, addr, registry=exposition_registry(with_state=False))
    except OSError as error:
        # Another worker of this host serves the same directory already: nothing is lost.
        logger.warning("worker metrics not served on port %s: %s", port, error)
        return None
    logger.info("worker metrics served on port %s", port)
    return server


def mark_process_dead(pid: int | None = None) -> None:
    """Take an exiting process's gauges out of the host's sums (multiprocess mode)."""
    if not multiprocess_dir():
        return
    try:
        multiprocess.mark_process_dead(pid or os.getpid(), multiprocess_dir())
    except OSError as error:
        logger.warning("metrics: process %s not marked dead: %s", pid or os.getpid(), error)


# At the exit of any process that loaded this module (gateways, beat, a worker's main
# process; pool children exit without atexit, so Celery's signal handles them).
atexit.register(mark_process_dead)
