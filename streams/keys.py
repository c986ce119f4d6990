"""Names of every Redis key and pub/sub channel Switchboard uses.

A tenant slug never contains ':', so `PREFIX:s:{TENANT}:STREAM:...` can never collide
across tenants whatever the stream name holds.

Hash tags. Every tenant-scoped key carries its tenant slug as its hash tag, `{TENANT}` in
place of the plain segment, so on a Redis Cluster all of a tenant's keys (its streams, runs,
sessions, buckets, counters and its share of the run indexes) live in one hash slot: every
script touches keys of one tenant only and stays in one slot, and the admission checks a
`send` makes (buckets, queued runs, budgets) are exact and atomic with its append. One hot
tenant pins itself to a node, never the others. The few keys that span tenants (the fair
ring, the tenant registry) sit in slots of their own and are written by calls of their own.
A run id embeds its tenant (`r<32 hex>.<TENANT>`, streams/events.py), so whoever holds a run
id finds its keys (`tenant_of_run`).
"""

from __future__ import annotations

from typing import Any

from django.core.signals import setting_changed

from project.conf import Conf, conf

# The fixed names, read as module attributes (`keys.FAIR_RING`) but built from the settings
# when read (module __getattr__ below), not at import: a settings change (a test's override
# of REDIS_URL, say) renames them.
_NAMES: dict[str, str] = {
    "PREFIX": "{prefix}",
    # Pub/sub channels are shared by every database of a Redis server; naming the database
    # keeps two deployments on one server (db 0 and db 1, say) from hearing each other.
    "STREAM_CHANNEL_PREFIX": "{prefix}:{database}:e:",
    # Pub/sub channel: a tenant was changed by an operator (disabled, secret rotated, ...);
    # every gateway listens and re-checks that tenant's open connections (realtime/control.py).
    "TENANT_CONTROL": "{prefix}:{database}:tenants",
    # Pub/sub channel per worker process (+ its "host:pid" id, the run hash's `worker`): a run
    # it holds was ended by someone else (cancel, deadline sweep), so it stops the model call
    # now instead of at its next lease renewal (orchestration/inflight.py).
    "WORKER_STOP_PREFIX": "{prefix}:{database}:stop:",
    # Set: every tenant that has had keys written (register_tenant). The sweepers and the
    # admin's live page iterate it to reach the per-tenant indexes (run deadlines, leases,
    # queued runs, history outbox, problems, presence); an entry is harmless when the tenant
    # has none.
    "TENANTS": "{prefix}:tenants",
    # The conversation history persister's lock (history/persist.py): one persister at a time.
    "HISTORY_LOCK": "{prefix}:history:lock",
    # Sorted set: gateway process id -> until when it is alive (ms, Redis clock), renewed by
    # the process every PRESENCE_REFRESH_S: one command per process, however many connections.
    "GATEWAY_LEASES": "{prefix}:gateways",
    # Fair scheduling (streams/fairness.py): the ring's keys share the hash tag {fq}, so
    # the ring script touches one slot. List: the tenants with queued runs, in round-robin
    # order (head: the one picked next).
    "FAIR_RING": "{prefix}:{{fq}}:ring",
    # Hash: tenant -> picks left in its current turn.
    "FAIR_DEFICITS": "{prefix}:{{fq}}:deficits",
    # Hash: tenant -> the latest push epoch the ring was told of (fair_state's `epoch`): a
    # tenant leaves the ring only when its queue was seen empty at that epoch or later.
    "FAIR_EPOCHS": "{prefix}:{{fq}}:epochs",
    # String: when the last fair pick took a run (epoch s), for the outbox sweep (tickets.py).
    "FAIR_PICKED": "{prefix}:{{fq}}:picked",
    # String, TTL one sweep interval: a sweeper reconciled tickets (orchestration/tickets.py).
    "TICKETS_RECONCILED": "{prefix}:fq:reconciled",
    # String, TTL the outbox grace: a sweeper published wake-ups (orchestration/tickets.py).
    "TICKETS_WOKEN": "{prefix}:fq:woken",
}
_built: tuple[Conf, dict[str, str]] | None = None


def _names() -> dict[str, str]:
    """_NAMES for the settings in force, built again only after they change."""
    global _built
    current = conf()
    built = _built
    if built is None or built[0] is not current:
        prefix, database = current.key_prefix, current.redis_database
        names = {
            name: form.format(prefix=prefix, database=database) for name, form in _NAMES.items()
        }
        built = _built = (current, names)
    return built[1]


def __getattr__(name: str) -> str:
    try:
        value = _names()[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    # Kept as a module global from now on, so later reads are plain ones (a module
    # __getattr__ costs about half a microsecond); _forget drops them on a settings change.
    globals()[name] = value
    return value


def _forget(**kwargs: Any) -> None:
    for name in _NAMES:
        globals().pop(name, None)


setting_changed.connect(_forget, dispatch_uid="switchboard-keys-forget")


def _prefix() -> str:
    return conf().key_prefix


def _tag(tenant: str) -> str:
    """The tenant as a hash tag: every key of the tenant hashes to its slot."""
    return "{" + tenant + "}"


def tenant_of_run(run_id: str) -> str:
    """The tenant a run id names (`r<32 hex>.<TENANT>`, streams/events.py new_run_id);
    ValueError for an id of any other form."""
    head, dot, tenant = run_id.partition(".")
    if not dot or not tenant or len(head) != 33 or head[0] != "r":
        raise ValueError(f"not a run id: {run_id!r}")
    return tenant


# --- the tenant registry ----------------------------------------------------------------------

# Tenants this process registered, and when (time.monotonic()): each is added again after a
# while, so a registry lost with its Redis node (a restart without data, a failover that lost
# the latest writes) is filled again by the traffic that follows. A send that finds its
# tenant's fair-queue state new registers at once (streams/registry.py).
_registered: dict[str, float] = {}
REGISTER_AGAIN_S = 60.0


def tenant_registered(tenant: str, now: float) -> bool:
    """Whether this process registered `tenant` recently (no need to again)."""
    at = _registered.get(tenant)
    return at is not None and now - at < REGISTER_AGAIN_S


def note_registered(tenant: str, now: float) -> None:
    _registered[tenant] = now


def forget_registered() -> None:
    """Register every tenant again on its next write (a test flushing Redis, say)."""
    _registered.clear()


def worker_stop_channel(worker: str) -> str:
    return f"{_names()['WORKER_STOP_PREFIX']}{worker}"


def stream_seq(tenant: str, stream: str) -> str:
    return f"{_prefix()}:s:{_tag(tenant)}:{stream}:seq"


def stream_log(tenant: str, stream: str) -> str:
    return f"{_prefix()}:s:{_tag(tenant)}:{stream}:log"


def stream_channel(tenant: str, stream: str) -> str:
    """The stream's pub/sub channel; tagged like its keys, so a sharded publish (SPUBLISH)
    from the stream's scripts goes to the shard of the slot they run in."""
    return f"{_names()['STREAM_CHANNEL_PREFIX']}{_tag(tenant)}:{stream}"


def client_message(tenant: str, client: str, message_id: str) -> str:
    return f"{_prefix()}:m:{_tag(tenant)}:{len(client)}:{client}:{message_id}"


def run(run_id: str) -> str:
    return f"{_prefix()}:run:{_tag(tenant_of_run(run_id))}:{run_id}"


def run_text(run_id: str) -> str:
    return f"{_prefix()}:run:{_tag(tenant_of_run(run_id))}:{run_id}:text"


def run_prefix(tenant: str) -> str:
    """What a run's key is this plus its id, for scripts that address many of a tenant's
    runs (run_prefix(t) + run_id == run(run_id) for every run of t)."""
    return f"{_prefix()}:run:{_tag(tenant)}:"


# Per-tenant run indexes: each is touched by the same scripts as the tenant's run records,
# so it shares their slot; the sweepers visit them tenant by tenant (TENANTS).
def run_deadlines(tenant: str) -> str:
    """Sorted set: run id -> its deadline (epoch s)."""
    return f"{_prefix()}:runs:{_tag(tenant)}:deadlines"


def run_leases(tenant: str) -> str:
    """Sorted set: run id -> when its claimed step's lease runs out (epoch s, Redis clock)."""
    return f"{_prefix()}:runs:{_tag(tenant)}:leases"


def recent_problems(tenant: str) -> str:
    """List (newest first, capped): the tenant's failed and degraded runs as JSON {run,
    tenant, stream, agent, status, reason, at}, pushed by FINALIZE_RUN for the admin's live
    queue page."""
    return f"{_prefix()}:runs:{_tag(tenant)}:recent"


# Conversation history (history/persist.py). The outbox is a list (newest first, capped) of
# the tenant's finished runs FINALIZE_RUN queued for the database; the persister moves a
# batch at a time to the processing list and drops it only once its rows are inserted. The
# dropped counter counts records the cap discarded (a persister down for long).
def history_outbox(tenant: str) -> str:
    return f"{_prefix()}:history:{_tag(tenant)}:outbox"


def history_processing(tenant: str) -> str:
    return f"{_prefix()}:history:{_tag(tenant)}:processing"


def history_dropped(tenant: str) -> str:
    return f"{_prefix()}:history:{_tag(tenant)}:dropped"


def task_outbox(tenant: str) -> str:
    """Sorted set: Celery tasks a script wrote for the tenant while the broker is another
    (`streams.enqueue.outbox_entry` JSON -> when written, epoch s, Redis clock). The writer
    publishes each after its script and removes it; the sweep publishes what is left past
    the outbox grace (orchestration/tickets.py), so a crash in between loses nothing."""
    return f"{_prefix()}:outbox:{_tag(tenant)}"


def trigger(tenant: str, event_id: str, agent: str) -> str:
    """String: the run an event started for a subscribed agent (at most one per pair)."""
    return f"{_prefix()}:trig:{_tag(tenant)}:{event_id}:{agent}"


def session(tenant: str, session_id: str) -> str:
    return f"{_prefix()}:sess:{_tag(tenant)}:{session_id}"


def receipts(tenant: str, stream: str) -> str:
    """Hash: client -> the last seq it said it processed."""
    return f"{_prefix()}:s:{_tag(tenant)}:{stream}:receipts"


def receipt_index(tenant: str) -> str:
    """Sorted set: stream -> when it last got a receipt (epoch s, Redis clock); the admin
    lists a tenant's receipts from it without a SCAN."""
    return f"{_prefix()}:receipts:{_tag(tenant)}"


# Presence. The suffixes hold no ':', so no stream's keys can end like another stream's.
def presence_members(tenant: str, stream: str) -> str:
    """Sorted set: "GATEWAY CLIENT" -> when that gateway's entry expires (ms, Redis clock)."""
    return f"{_prefix()}:s:{_tag(tenant)}:{stream}:presence.gw"


def presence_counts(tenant: str, stream: str) -> str:
    """Hash: client -> how many gateway entries it has (the client is present while > 0)."""
    return f"{_prefix()}:s:{_tag(tenant)}:{stream}:presence.n"


def presence_names(tenant: str, stream: str) -> str:
    """Hash: client -> display name, for every present client."""
    return f"{_prefix()}:s:{_tag(tenant)}:{stream}:presence.names"


def presence_lingering(tenant: str, stream: str) -> str:
    """Hash: client -> the gateway whose member of it is kept for the leave grace after a
    connection cut without a goodbye (taken over by the client's next join)."""
    return f"{_prefix()}:s:{_tag(tenant)}:{stream}:presence.linger"


def presence_due(tenant: str) -> str:
    """Sorted set: stream -> the earliest expiry among its presence entries (ms, Redis
    clock): the tenant's streams a presence sweep must visit, in the tenant's slot."""
    return f"{_prefix()}:presence:due:{_tag(tenant)}"


def celery_queue(queue: str) -> str:
    """The list kombu's Redis transport keeps a queue in (it prefixes every key). Only
    meaningful while the broker is the streams' single Redis (broker_in_streams_redis)."""
    return conf().broker_transport_options.get("global_keyprefix", "") + queue


def celery_unacked() -> tuple[str, str]:
    """kombu's Redis transport's messages delivered to a worker and not yet acknowledged: a
    hash (delivery tag -> [message, exchange, routing key]) and its index (sorted set:
    delivery tag -> when it was delivered, epoch s)."""
    options = conf().broker_transport_options
    prefix = options.get("global_keyprefix", "")
    return (
        prefix + options.get("unacked_key", "unacked"),
        prefix + options.get("unacked_index_key", "unacked_index"),
    )


# Flow control (realtime/admission.py). Client keys carry the client id's length, like dedupe
# keys, so no client id can end like another's.
def rate_client(tenant: str, client: str) -> str:
    """Token bucket (hash) of one client's send/publish rate."""
    return f"{_prefix()}:rate:{_tag(tenant)}:{len(client)}:{client}"


def rate_receipts(tenant: str, client: str) -> str:
    """Token bucket (hash) of one client's receipt rate (apart from its messages')."""
    return f"{_prefix()}:rate:{_tag(tenant)}:r:{len(client)}:{client}"


def rate_tenant(tenant: str) -> str:
    """Token bucket (hash) of the whole tenant's send/publish rate."""
    return f"{_prefix()}:rate:{_tag(tenant)}"


def connections_tenant(tenant: str) -> str:
    """Hash: gateway process id -> how many of the tenant's connections it holds (a dead
    process's count stops counting when its lease in GATEWAY_LEASES lapses)."""
    return f"{_prefix()}:conn:{_tag(tenant)}"


def connections_client(tenant: str, client: str) -> str:
    """Hash: the same counts, for one client id."""
    return f"{_prefix()}:conn:{_tag(tenant)}:{len(client)}:{client}"


def gateway_connection_keys(gateway: str) -> str:
    """Set: the connection-count hashes a gateway process has a count in, so its counts
    can be removed once it is dead."""
    return f"{_prefix()}:gateway:{gateway}:conn"


def throttled(minute: int) -> str:
    """Hash, TTL: "TENANT:REASON" -> refusals (429s, 4029s) gateways counted in that minute
    (epoch s // 60), for the admin's live page (console/live.py)."""
    return f"{_prefix()}:throttled:{minute}"


def runs_in_flight(tenant: str, connection: str) -> str:
    """Sorted set: run id -> until when it may count (epoch s): one connection's unfinished
    runs."""
    return f"{_prefix()}:runs:inflight:{_tag(tenant)}:{connection}"


def runs_queued(tenant: str) -> str:
    """Sorted set: run id -> until when it may count (epoch s): the tenant's runs accepted
    and never claimed by a worker."""
    return f"{_prefix()}:runs:queued:{_tag(tenant)}"


def tokens_used(tenant: str, period: str, label: str) -> str:
    """Integer, EXPIREAT the period's end plus a grace: tokens the tenant's model calls used
    in one UTC day (`period` "day", label YYYYMMDD) or month ("month", YYYYMM), added by
    ADD_USAGE as each call ends and read by ACCEPT_SEND against the tenant's budgets."""
    return f"{_prefix()}:tokens:{_tag(tenant)}:{period}:{label}"


# Fair scheduling (streams/fairness.py). Tenants in the ring are values, not key parts; a
# tenant's queue and state are in its own slot.
def fair_queue(tenant: str) -> str:
    """List: the tenant's run ids waiting for a worker (LPUSH on accept, RPOP on pick)."""
    return f"{_prefix()}:fq:q:{_tag(tenant)}"


def fair_state(tenant: str) -> str:
    """Hash: the tenant's fair-queue state: `epoch` (pushes so far, so the ring can tell a
    queue seen empty before a push from one seen empty after it) and `weight` (its picks
    per turn, written with each push)."""
    return f"{_prefix()}:fq:t:{_tag(tenant)}"


# Traffic recording (realtime/recording.py, manage.py record_traffic).
def recording(tenant: str) -> str:
    """String, TTL: the tenant's recording switch (JSON: sample rate, salt, redaction); it
    expires unless its recorder renews it, so a crashed recorder stops the recording."""
    return f"{_prefix()}:rec:{_tag(tenant)}"


def recording_log(tenant: str) -> str:
    """Stream, capped: the sampled frames and connection markers of the tenant's recording."""
    return f"{_prefix()}:rec:{_tag(tenant)}:frames"
