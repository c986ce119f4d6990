"""Names of every Redis key and pub/sub channel Switchboard uses.

A tenant slug never contains ':', so `PREFIX:s:TENANT:STREAM:...` can never collide
across tenants whatever the stream name holds.
"""

from __future__ import annotations

from typing import Any

from django.core.signals import setting_changed

from project.conf import Conf, conf

# The fixed names, read as module attributes (`keys.RUN_LEASES`) but built from the settings
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
    # Sorted set: run id -> its deadline (epoch s).
    "RUN_DEADLINES": "{prefix}:runs:deadlines",
    # Sorted set: run id -> when its claimed step's lease runs out (epoch s, Redis clock).
    "RUN_LEASES": "{prefix}:runs:leases",
    # List (newest first, capped): failed and degraded runs as JSON {run, tenant, stream,
    # agent, status, reason, at}, pushed by FINALIZE_RUN for the admin's live queue page.
    "RECENT_PROBLEMS": "{prefix}:runs:recent",
    # Conversation history (history/persist.py). The outbox is a list (newest first, capped)
    # of finished runs FINALIZE_RUN queued for the database; the persister moves a batch at a
    # time to the processing list and drops it only once its rows are inserted. The dropped
    # counter counts records the cap discarded (a persister down for long); the lock keeps
    # persisters from taking batches at the same time.
    "HISTORY_OUTBOX": "{prefix}:history:outbox",
    "HISTORY_PROCESSING": "{prefix}:history:processing",
    "HISTORY_DROPPED": "{prefix}:history:dropped",
    "HISTORY_LOCK": "{prefix}:history:lock",
    # Set: every tenant that has had keys written, in a slot of its own; sweepers walk it
    # for the per-tenant indexes (an entry is harmless when the tenant has nothing).
    "TENANTS": "{prefix}:tenants",
    # Sorted set: gateway process id -> until when it is alive (ms, Redis clock), renewed by
    # the process every PRESENCE_REFRESH_S: one command per process, however many connections.
    "GATEWAY_LEASES": "{prefix}:gateways",
    # Fair scheduling (streams/fairness.py). List: the tenants with queued runs, in
    # round-robin order (head: the one picked next).
    "FAIR_RING": "{prefix}:fq:ring",
    # Hash: tenant -> picks left in its current turn.
    "FAIR_DEFICITS": "{prefix}:fq:deficits",
    # Hash: tenant -> weight (picks per turn), written with each accepted send.
    "FAIR_WEIGHTS": "{prefix}:fq:weights",
    # String, TTL one sweep interval: a sweeper reconciled tickets (orchestration/tickets.py).
    "TICKETS_RECONCILED": "{prefix}:fq:reconciled",
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


def worker_stop_channel(worker: str) -> str:
    return f"{_names()['WORKER_STOP_PREFIX']}{worker}"


def stream_seq(tenant: str, stream: str) -> str:
    return f"{_prefix()}:s:{tenant}:{stream}:seq"


def stream_log(tenant: str, stream: str) -> str:
    return f"{_prefix()}:s:{tenant}:{stream}:log"


def stream_channel(tenant: str, stream: str) -> str:
    return f"{_names()['STREAM_CHANNEL_PREFIX']}{tenant}:{stream}"


def client_message(tenant: str, client: str, message_id: str) -> str:
    return f"{_prefix()}:m:{tenant}:{len(client)}:{client}:{message_id}"


def run(run_id: str) -> str:
    return f"{_prefix()}:run:{run_id}"


def run_text(run_id: str) -> str:
    return f"{_prefix()}:run:{run_id}:text"


def trigger(tenant: str, event_id: str, agent: str) -> str:
    """String: the run an event started for a subscribed agent (at most one per pair)."""
    return f"{_prefix()}:trig:{tenant}:{event_id}:{agent}"


def session(tenant: str, session_id: str) -> str:
    return f"{_prefix()}:sess:{tenant}:{session_id}"


def receipts(tenant: str, stream: str) -> str:
    """Hash: client -> the last seq it said it processed."""
    return f"{_prefix()}:s:{tenant}:{stream}:receipts"


def receipt_index(tenant: str) -> str:
    """Sorted set: stream -> when it last got a receipt (epoch s, Redis clock); the admin
    lists a tenant's receipts from it without a SCAN."""
    return f"{_prefix()}:receipts:{tenant}"


# Presence. The suffixes hold no ':', so no stream's keys can end like another stream's.
def presence_members(tenant: str, stream: str) -> str:
    """Sorted set: "GATEWAY CLIENT" -> when that gateway's entry expires (ms, Redis clock)."""
    return f"{_prefix()}:s:{tenant}:{stream}:presence.gw"


def presence_counts(tenant: str, stream: str) -> str:
    """Hash: client -> how many gateway entries it has (the client is present while > 0)."""
    return f"{_prefix()}:s:{tenant}:{stream}:presence.n"


def presence_names(tenant: str, stream: str) -> str:
    """Hash: client -> display name, for every present client."""
    return f"{_prefix()}:s:{tenant}:{stream}:presence.names"


def presence_due(tenant: str) -> str:
    """Sorted set: stream -> the earliest expiry among its presence entries (ms, Redis
    clock): the tenant's streams a presence sweep must visit, in the tenant's slot."""
    return f"{_prefix()}:presence:due:{{{tenant}}}"


def celery_queue(queue: str) -> str:
    """The list kombu's Redis transport keeps a queue in (it prefixes every key)."""
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
    return f"{_prefix()}:rate:{tenant}:{len(client)}:{client}"


def rate_receipts(tenant: str, client: str) -> str:
    """Token bucket (hash) of one client's receipt rate (apart from its messages')."""
    return f"{_prefix()}:rate:{tenant}:r:{len(client)}:{client}"


def rate_tenant(tenant: str) -> str:
    """Token bucket (hash) of the whole tenant's send/publish rate."""
    return f"{_prefix()}:rate:{tenant}"


def connections_tenant(tenant: str) -> str:
    """Hash: gateway process id -> how many of the tenant's connections it holds (a dead
    process's count stops counting when its lease in GATEWAY_LEASES lapses)."""
    return f"{_prefix()}:conn:{tenant}"


def connections_client(tenant: str, client: str) -> str:
    """Hash: the same counts, for one client id."""
    return f"{_prefix()}:conn:{tenant}:{len(client)}:{client}"


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
    return f"{_prefix()}:runs:inflight:{tenant}:{connection}"


def runs_queued(tenant: str) -> str:
    """Sorted set: run id -> until when it may count (epoch s): the tenant's runs accepted
    and never claimed by a worker."""
    return f"{_prefix()}:runs:queued:{tenant}"


# Fair scheduling (streams/fairness.py). Tenants in the ring are values, not key
# parts, so only the queue key embeds a slug.
def tokens_used(tenant: str, period: str, label: str) -> str:
    """Integer, EXPIREAT the period's end plus a grace: tokens the tenant's model calls used
    in one UTC day (`period` "day", label YYYYMMDD) or month ("month", YYYYMM), added by
    ADD_USAGE as each call ends and read by ACCEPT_SEND against the tenant's budgets."""
    return f"{_prefix()}:tokens:{tenant}:{period}:{label}"


def fair_queue(tenant: str) -> str:
    """List: the tenant's run ids waiting for a worker (LPUSH on accept, RPOP on pick)."""
    return f"{_prefix()}:fq:q:{tenant}"


# Traffic recording (realtime/recording.py, manage.py record_traffic).
def recording(tenant: str) -> str:
    """String, TTL: the tenant's recording switch (JSON: sample rate, salt, redaction); it
    expires unless its recorder renews it, so a crashed recorder stops the recording."""
    return f"{_prefix()}:rec:{tenant}"


def recording_log(tenant: str) -> str:
    """Stream, capped: the sampled frames and connection markers of the tenant's recording."""
    return f"{_prefix()}:rec:{tenant}:frames"
