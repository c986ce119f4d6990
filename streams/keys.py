"""Names of every Redis key and pub/sub channel Switchboard uses.

A tenant slug never contains ':', so `PREFIX:s:TENANT:STREAM:...` can never collide
across tenants whatever the stream name holds.
"""

from __future__ import annotations

from django.conf import settings
from redis.connection import parse_url

PREFIX: str = settings.SWITCHBOARD["KEY_PREFIX"]
# Pub/sub channels are shared by every database of a Redis server; naming the database
# keeps two deployments on one server (db 0 and db 1, say) from hearing each other.
_DATABASE = (
    parse_url(settings.REDIS_URL).get("db", 0)
    if settings.REDIS_URL.startswith(("redis://", "rediss://", "unix://"))
    else 0
)
STREAM_CHANNEL_PREFIX = f"{PREFIX}:{_DATABASE}:e:"
# Pub/sub channel: a tenant was changed by an operator (disabled, secret rotated, ...); every
# gateway listens and re-checks that tenant's open connections (realtime/control.py).
TENANT_CONTROL = f"{PREFIX}:{_DATABASE}:tenants"
# Pub/sub channel per worker process (+ its "host:pid" id, the run hash's `worker`): a run it
# holds was ended by someone else (cancel, deadline sweep), so it stops the model call now
# instead of at its next lease renewal (orchestration/inflight.py).
WORKER_STOP_PREFIX = f"{PREFIX}:{_DATABASE}:stop:"


def worker_stop_channel(worker: str) -> str:
    return f"{WORKER_STOP_PREFIX}{worker}"


def stream_seq(tenant: str, stream: str) -> str:
    return f"{PREFIX}:s:{tenant}:{stream}:seq"


def stream_log(tenant: str, stream: str) -> str:
    return f"{PREFIX}:s:{tenant}:{stream}:log"


def stream_channel(tenant: str, stream: str) -> str:
    return f"{STREAM_CHANNEL_PREFIX}{tenant}:{stream}"


def client_message(tenant: str, client: str, message_id: str) -> str:
    return f"{PREFIX}:m:{tenant}:{len(client)}:{client}:{message_id}"


def run(run_id: str) -> str:
    return f"{PREFIX}:run:{run_id}"


def run_text(run_id: str) -> str:
    return f"{PREFIX}:run:{run_id}:text"


def trigger(tenant: str, event_id: str, agent: str) -> str:
    """String: the run an event started for a subscribed agent (at most one per pair)."""
    return f"{PREFIX}:trig:{tenant}:{event_id}:{agent}"


RUN_DEADLINES = f"{PREFIX}:runs:deadlines"
# Sorted set: run id -> when its claimed step's lease runs out (epoch s, Redis clock).
RUN_LEASES = f"{PREFIX}:runs:leases"
# List (newest first, capped): failed and degraded runs as JSON {run, tenant, stream, agent,
# status, reason, at}, pushed by FINALIZE_RUN for the admin's live queue page.
RECENT_PROBLEMS = f"{PREFIX}:runs:recent"

# Conversation history (history/persist.py). The outbox is a list (newest first, capped) of
# finished runs FINALIZE_RUN queued for the database; the persister moves a batch at a time
# to the processing list and drops it only once its rows are inserted. The dropped counter
# counts records the cap discarded (a persister down for long); the lock keeps persisters
# from taking batches at the same time.
HISTORY_OUTBOX = f"{PREFIX}:history:outbox"
HISTORY_PROCESSING = f"{PREFIX}:history:processing"
HISTORY_DROPPED = f"{PREFIX}:history:dropped"
HISTORY_LOCK = f"{PREFIX}:history:lock"


def session(tenant: str, session_id: str) -> str:
    return f"{PREFIX}:sess:{tenant}:{session_id}"


def receipts(tenant: str, stream: str) -> str:
    """Hash: client -> the last seq it said it processed."""
    return f"{PREFIX}:s:{tenant}:{stream}:receipts"


def receipt_index(tenant: str) -> str:
    """Sorted set: stream -> when it last got a receipt (epoch s, Redis clock); the admin
    lists a tenant's receipts from it without a SCAN."""
    return f"{PREFIX}:receipts:{tenant}"


# Presence. The suffixes hold no ':', so no stream's keys can end like another stream's.
def presence_members(tenant: str, stream: str) -> str:
    """Sorted set: "GATEWAY CLIENT" -> when that gateway's entry expires (ms, Redis clock)."""
    return f"{PREFIX}:s:{tenant}:{stream}:presence.gw"


def presence_counts(tenant: str, stream: str) -> str:
    """Hash: client -> how many gateway entries it has (the client is present while > 0)."""
    return f"{PREFIX}:s:{tenant}:{stream}:presence.n"


def presence_names(tenant: str, stream: str) -> str:
    """Hash: client -> display name, for every present client."""
    return f"{PREFIX}:s:{tenant}:{stream}:presence.names"


# Sorted set: "TENANT:STREAM" -> the earliest expiry among the stream's presence entries.
PRESENCE_INDEX = f"{PREFIX}:presence:due"


def celery_queue(queue: str) -> str:
    """The list kombu's Redis transport keeps a queue in (it prefixes every key)."""
    return settings.CELERY_BROKER_TRANSPORT_OPTIONS.get("global_keyprefix", "") + queue


def celery_unacked() -> tuple[str, str]:
    """kombu's Redis transport's messages delivered to a worker and not yet acknowledged: a
    hash (delivery tag -> [message, exchange, routing key]) and its index (sorted set:
    delivery tag -> when it was delivered, epoch s)."""
    options = settings.CELERY_BROKER_TRANSPORT_OPTIONS
    prefix = options.get("global_keyprefix", "")
    return (
        prefix + options.get("unacked_key", "unacked"),
        prefix + options.get("unacked_index_key", "unacked_index"),
    )


# Flow control (realtime/admission.py). Client keys carry the client id's length, like dedupe
# keys, so no client id can end like another's.
def rate_client(tenant: str, client: str) -> str:
    """Token bucket (hash) of one client's send/publish rate."""
    return f"{PREFIX}:rate:{tenant}:{len(client)}:{client}"


def rate_receipts(tenant: str, client: str) -> str:
    """Token bucket (hash) of one client's receipt rate (apart from its messages')."""
    return f"{PREFIX}:rate:{tenant}:r:{len(client)}:{client}"


def rate_tenant(tenant: str) -> str:
    """Token bucket (hash) of the whole tenant's send/publish rate."""
    return f"{PREFIX}:rate:{tenant}"


def connections_tenant(tenant: str) -> str:
    """Hash: gateway process id -> how many of the tenant's connections it holds (a dead
    process's count stops counting when its lease in GATEWAY_LEASES lapses)."""
    return f"{PREFIX}:conn:{tenant}"


def connections_client(tenant: str, client: str) -> str:
    """Hash: the same counts, for one client id."""
    return f"{PREFIX}:conn:{tenant}:{len(client)}:{client}"


# Sorted set: gateway process id -> until when it is alive (ms, Redis clock), renewed by
# the process every PRESENCE_REFRESH_S: one command per process, however many connections.
GATEWAY_LEASES = f"{PREFIX}:gateways"


def gateway_connection_keys(gateway: str) -> str:
    """Set: the connection-count hashes a gateway process has a count in, so its counts
    can be removed once it is dead."""
    return f"{PREFIX}:gateway:{gateway}:conn"


def throttled(minute: int) -> str:
    """Hash, TTL: "TENANT:REASON" -> refusals (429s, 4029s) gateways counted in that minute
    (epoch s // 60), for the admin's live page (console/live.py)."""
    return f"{PREFIX}:throttled:{minute}"


def runs_in_flight(tenant: str, connection: str) -> str:
    """Sorted set: run id -> until when it may count (epoch s): one connection's unfinished
    runs."""
    return f"{PREFIX}:runs:inflight:{tenant}:{connection}"


def runs_queued(tenant: str) -> str:
    """Sorted set: run id -> until when it may count (epoch s): the tenant's runs accepted
    and never claimed by a worker."""
    return f"{PREFIX}:runs:queued:{tenant}"


# Fair scheduling (streams/fairness.py). Tenants in the ring are values, not key
# parts, so only the queue key embeds a slug.
def fair_queue(tenant: str) -> str:
    """List: the tenant's run ids waiting for a worker (LPUSH on accept, RPOP on pick)."""
    return f"{PREFIX}:fq:q:{tenant}"


# List: the tenants with queued runs, in round-robin order (head: the one picked next).
FAIR_RING = f"{PREFIX}:fq:ring"
# Hash: tenant -> picks left in its current turn.
FAIR_DEFICITS = f"{PREFIX}:fq:deficits"
# Hash: tenant -> weight (picks per turn), written with each accepted send.
FAIR_WEIGHTS = f"{PREFIX}:fq:weights"
# String, TTL one sweep interval: a sweeper reconciled tickets (orchestration/tickets.py).
TICKETS_RECONCILED = f"{PREFIX}:fq:reconciled"


# Traffic recording (realtime/recording.py, manage.py record_traffic).
def recording(tenant: str) -> str:
    """String, TTL: the tenant's recording switch (JSON: sample rate, salt, redaction); it
    expires unless its recorder renews it, so a crashed recorder stops the recording."""
    return f"{PREFIX}:rec:{tenant}"


def recording_log(tenant: str) -> str:
    """Stream, capped: the sampled frames and connection markers of the tenant's recording."""
    return f"{PREFIX}:rec:{tenant}:frames"
