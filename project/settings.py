"""Switchboard settings: every knob is read from the environment here, and only here."""

from __future__ import annotations

import json
import os
from pathlib import Path

import dj_database_url
from celery.schedules import crontab

# Task and queue names are defined once, with the messages our scripts push (plain
# constants: importing them loads nothing of Django's).
from streams.enqueue import (
    HISTORY_PERSIST_TASK,
    HISTORY_PURGE_TASK,
    RUNS_QUEUE,
    SWEEP_TASK,
)

BASE_DIR = Path(__file__).resolve().parent.parent


def env_str(name: str, default: str) -> str:
    return os.environ.get(name, default)


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value not in (None, "") else default


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in env_str(name, default).split(",") if item.strip()]


SECRET_KEY = env_str("SECRET_KEY", "switchboard-insecure-development-key-change-me")
DEBUG = env_bool("DEBUG", False)
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]")
# Origins a browser WebSocket may come from; "*" allows any. Non-browser clients send no Origin.
WEBSOCKET_ALLOWED_ORIGINS = env_list("WEBSOCKET_ALLOWED_ORIGINS", ",".join(ALLOWED_HOSTS))

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_prometheus",
    "channels",
    "tenants",
    "realtime",
    "orchestration",
    "workers",
    "history",
    "loadtest",
    "console",
]
# The example agents (examples/agents.py: a streaming assistant and a summariser that
# reacts to it) are on unless turned off; they call the "openai" backend.
if env_bool("SWITCHBOARD_EXAMPLE_AGENTS", True):
    INSTALLED_APPS.append("examples")
# Your own apps with agents.py modules, without editing this file (comma-separated).
INSTALLED_APPS += env_list("SWITCHBOARD_EXTRA_APPS", "")
# Benchmarks add their baseline consumers and tasks; never on in production.
if env_bool("SWITCHBOARD_BENCH", False):
    INSTALLED_APPS.append("bench")

MIDDLEWARE = [
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "django.middleware.security.SecurityMiddleware",
    # The admin's CSS and JavaScript from STATIC_ROOT, before anything touches the session.
    "realtime.staticfiles.StaticFilesMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
]

ROOT_URLCONF = "project.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        # Before the apps' templates: admin/base_site.html here replaces the admin's own.
        "DIRS": [BASE_DIR / "project" / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]
WSGI_APPLICATION = None
ASGI_APPLICATION = "project.asgi.application"

DATABASES = {
    "default": dj_database_url.parse(
        env_str("DATABASE_URL", f"sqlite:///{BASE_DIR / 'var' / 'switchboard.sqlite3'}"),
        conn_max_age=60,
    )
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True
STATIC_URL = "static/"
# Where `manage.py collectstatic` writes the admin's files and the gateway serves them from
# (realtime/staticfiles.py); `bin/dev start` and the Docker image's build fill it.
STATIC_ROOT = Path(env_str("SWITCHBOARD_STATIC_ROOT", str(BASE_DIR / "var" / "static")))
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    # Content-hashed names (cached for a year by browsers and proxies) plus gzip variants.
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}

# --- Redis -----------------------------------------------------------------------------
# Every key Switchboard, Celery and the channel layer write starts with this.
KEY_PREFIX = env_str("SWITCHBOARD_KEY_PREFIX", "sb")
REDIS_URL = env_str("REDIS_URL", "redis://127.0.0.1:6379/0")
# Any node of a Redis Cluster (e.g. redis://10.0.0.5:7000; the others are discovered): the
# streams, runs and sessions then live there, sharded by tenant, for a deployment that one
# Redis no longer holds. Empty: everything in the single Redis at REDIS_URL (the default).
REDIS_CLUSTER_URL = env_str("REDIS_CLUSTER_URL", "")
# redis-py 8 defaults socket_timeout to 5 s; blocking reads (pub/sub, BRPOP) need longer.
REDIS_SOCKET_TIMEOUT_S = env_float("REDIS_SOCKET_TIMEOUT_S", 30.0)
# redis-py 8 raises MaxConnectionsError past the pool cap: size it for a handshake burst.
REDIS_MAX_CONNECTIONS = env_int("REDIS_MAX_CONNECTIONS", 512)
# How long a command waits for a free pooled connection (every one busy: Redis is behind);
# then a client's frame is answered `overloaded` (429) and background work tries later.
REDIS_POOL_WAIT_S = env_float("REDIS_POOL_WAIT_S", 10.0)

# --- Channels --------------------------------------------------------------------------
# Only the benchmarks' baselines (the naive path Switchboard is measured against) use the
# layer; the gateways never do (realtime/consumer.py turns it off): stream events travel
# through the hub, since the layer drops messages silently (at most once, see docs).
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {
            # A list with the URL honours its database number and any password.
            "hosts": [
                {
                    "address": REDIS_URL,
                    # Above channels-redis' 5 s blocking read, or idle receivers die (trap 1).
                    "socket_timeout": REDIS_SOCKET_TIMEOUT_S,
                }
            ],
            # Per-process capacity shared by all channels of a process (trap 4).
            "capacity": env_int("CHANNEL_LAYER_CAPACITY", 1000),
            "expiry": 60,
            "prefix": f"{KEY_PREFIX}:layer:",
        },
    }
}

# --- Celery ----------------------------------------------------------------------------
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", REDIS_URL)
if REDIS_CLUSTER_URL and not os.environ.get("CELERY_BROKER_URL"):
    # kombu's Redis transport cannot use a Redis Cluster, so there is no default to fall to.
    from django.core.exceptions import ImproperlyConfigured

    raise ImproperlyConfigured(
        "REDIS_CLUSTER_URL is set, so CELERY_BROKER_URL must be too: Celery's broker cannot "
        "be a Redis Cluster (use RabbitMQ, amqp://..., or a separate single Redis)"
    )
# Results are never read (no .get() anywhere): storing them would only cost Redis writes.
CELERY_TASK_IGNORE_RESULT = True
CELERY_RESULT_BACKEND = None
# A message is acknowledged when its task returns, which is once its step is claimed in
# Redis (orchestration/dispatch.py): from then on the run's lease, not the broker, protects
# the step. A worker that dies before leaves it unacknowledged and the broker hands it to
# another (RabbitMQ at once, when the connection drops; the Redis transport after the
# visibility timeout); a redelivered message whose step was claimed is a fenced no-op.
CELERY_TASK_ACKS_LATE = True
# A pool child killed mid-task (OOM, SIGKILL) puts its message back instead of acking it:
# its step was not claimed yet, or the claim fences the second attempt.
CELERY_TASK_REJECT_ON_WORKER_LOST = True
# One message per pool thread: a busy worker must not hoard queued runs (on RabbitMQ a
# prefetched message stays with its worker, unacknowledged, until it acks or dies).
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_DEFAULT_QUEUE = RUNS_QUEUE
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# A Redis blip must not cut a reply mid-stream: a step that loses the broker finishes (its
# appends are fenced, its message comes back later as a no-op). Said explicitly because
# Celery 6 changes the default.
CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = False
# Unacked messages return to the queue after this. A step's message is acknowledged once the
# step is claimed (its lease protects it from then on), so only a dispatcher that died
# between fetching and claiming waits this long.
CELERY_VISIBILITY_TIMEOUT_S = env_int("CELERY_VISIBILITY_TIMEOUT_S", 120)
# The broker's kind decides which transport options apply: kombu's Redis transport and its
# AMQP one share none, and each warns about or mis-reads the other's.
AMQP_BROKER = CELERY_BROKER_URL.startswith(("amqp://", "amqps://", "pyamqp://"))
if AMQP_BROKER:
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        # Publisher confirms: a publish returns only once RabbitMQ has the message (durable
        # queue, persistent message: on disk), so "published" means it survives a broker
        # restart; an unconfirmed publish raises and is left to the sweeper (the outbox).
        "confirm_publish": True,
    }
else:
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "visibility_timeout": CELERY_VISIBILITY_TIMEOUT_S,
        # Same reason as REDIS_SOCKET_TIMEOUT_S: BRPOP must outlive redis-py 8's 5 s default.
        "socket_timeout": REDIS_SOCKET_TIMEOUT_S,
        # Celery's queues and bookkeeping live beside our keys, under the same prefix.
        "global_keyprefix": f"{KEY_PREFIX}:celery:",
    }
# AMQP heartbeats: a worker whose connection died silently (a cut network, a frozen host)
# is noticed by RabbitMQ within two intervals, and its unacknowledged messages (steps not
# yet claimed) go to another worker. Celery's default of 120 s makes that four minutes.
# (Ignored by the Redis transport, whose equivalent is the visibility timeout.)
CELERY_BROKER_HEARTBEAT = env_int("CELERY_BROKER_HEARTBEAT", 30)
# Connecting gives up after this: a publish never waits longer than a few of these.
CELERY_BROKER_CONNECTION_TIMEOUT = env_float("CELERY_BROKER_CONNECTION_TIMEOUT", 4.0)
# Workers and beat reconnect forever after a broker restart (None: no retry limit); what
# was queued in durable queues is still there when they do.
CELERY_BROKER_CONNECTION_RETRY = True
CELERY_BROKER_CONNECTION_MAX_RETRIES = None
# A publish that fails is retried briefly, then raises: the caller logs it and the work,
# already in Redis, is left to the sweeper (docs/guarantees.md), never to an unbounded wait.
CELERY_TASK_PUBLISH_RETRY = True
CELERY_TASK_PUBLISH_RETRY_POLICY = {
    "max_retries": 2,
    "interval_start": 0,
    "interval_step": 0.5,
    "interval_max": 1,
}
# RabbitMQ queue type for the project's queues: "classic" (one node) or "quorum"
# (replicated across a RabbitMQ cluster; survives losing a node). Changing it needs the old
# queues deleted first: RabbitMQ refuses to redeclare a queue with another type.
CELERY_TASK_DEFAULT_QUEUE_TYPE = env_str("CELERY_QUEUE_TYPE", "classic")
# Pool threads dispatch steps to the process's model-call runtime (workers/runtime.py) and
# return once a step is claimed: a few suffice, since none waits on a model. They also bound
# prefetch: a full runtime parks them, so the worker stops taking messages.
CELERY_WORKER_CONCURRENCY = env_int("CELERY_WORKER_CONCURRENCY", 4)
# "threads": dispatchers share the process, and so its runtime and its connections; the
# model calls themselves run on the runtime's event loop whatever the pool.
CELERY_WORKER_POOL = env_str("CELERY_WORKER_POOL", "threads")
# Celery's rate limits are per worker and unused (limits are global, in Redis); checking
# them costs the consumer time on every task.
CELERY_WORKER_DISABLE_RATE_LIMITS = True
# Workers restart their children now and then so a leaking backend cannot grow forever.
CELERY_WORKER_MAX_TASKS_PER_CHILD = env_int("CELERY_WORKER_MAX_TASKS_PER_CHILD", 100_000)
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
# The sweeper ends runs whose deadline has passed; it must run often relative to deadlines.
SWEEP_INTERVAL_S = env_float("SWITCHBOARD_SWEEP_INTERVAL_S", 2.0)
# How often finished runs are moved from Redis into the history tables: how far behind the
# database (not the clients, who read Redis) may be.
HISTORY_FLUSH_S = env_float("SWITCHBOARD_HISTORY_FLUSH_S", 2.0)
CELERY_BEAT_SCHEDULE = {
    "sweep-overdue-runs": {
        "task": SWEEP_TASK,
        "schedule": SWEEP_INTERVAL_S,
        "options": {"expires": SWEEP_INTERVAL_S * 5},
    },
    "persist-history": {
        "task": HISTORY_PERSIST_TASK,
        "schedule": HISTORY_FLUSH_S,
        # A late one is redundant: the next drains whatever it would have.
        "options": {"expires": HISTORY_FLUSH_S * 5},
    },
    "purge-history": {
        "task": HISTORY_PURGE_TASK,
        # Daily at a fixed time (UTC), not every 24 h from beat's start: a beat restarted
        # more often than daily would otherwise never purge.
        "schedule": crontab(hour=3, minute=17),
        "options": {"expires": 3600},
    },
}

# --- Metrics ---------------------------------------------------------------------------
# prometheus_client's own variable (it reads it too, at import): when set, every process
# writes its metrics to files there and /metrics sums the host's (ops/metrics.py).
PROMETHEUS_MULTIPROC_DIR = env_str("PROMETHEUS_MULTIPROC_DIR", "")
# A Celery worker's main process serves its host's metrics on this port (0: off), for
# hosts or containers with no gateway whose /metrics would include them.
WORKER_METRICS_PORT = env_int("SWITCHBOARD_WORKER_METRICS_PORT", 0)

# --- Switchboard -----------------------------------------------------------------------
SWITCHBOARD = {
    # Key prefix of every Redis key Switchboard owns.
    "KEY_PREFIX": KEY_PREFIX,
    # Events kept per stream for resume; older ones answer history_expired.
    "STREAM_RETENTION": env_int("SWITCHBOARD_STREAM_RETENTION", 10_000),
    # How long a client message id is remembered for duplicate detection.
    "DEDUPE_TTL_S": env_int("SWITCHBOARD_DEDUPE_TTL_S", 24 * 3600),
    # Replicas that must hold a client's publish or send before its ack (Redis `WAIT`,
    # on the connection that wrote it), and how long to wait for them: 0 acks once the
    # master has it, and a master lost before replicating it loses it (docs/guarantees.md).
    # A wait that times out answers `unavailable` with retry_after_ms: the write may be on
    # the master alone, and the client's retry (same id) waits again.
    "REPLICA_ACKS": env_int("SWITCHBOARD_REPLICA_ACKS", 0),
    "REPLICA_ACK_TIMEOUT_MS": env_int("SWITCHBOARD_REPLICA_ACK_TIMEOUT_MS", 1000),
    # Default per-tenant frame size limit in bytes.
    "MAX_FRAME_BYTES": env_int("SWITCHBOARD_MAX_FRAME_BYTES", 64 * 1024),
    # Outbound buffer per connection: events and bytes waiting to be written.
    "OUTBOX_MAX_EVENTS": env_int("SWITCHBOARD_OUTBOX_MAX_EVENTS", 1_000),
    "OUTBOX_MAX_BYTES": env_int("SWITCHBOARD_OUTBOX_MAX_BYTES", 1024 * 1024),
    # Seconds between client heartbeats advertised in welcome.
    "HEARTBEAT_S": env_int("SWITCHBOARD_HEARTBEAT_S", 25),
    # Soft limit of one model call; the run answers degraded when it passes.
    "MODEL_SOFT_LIMIT_S": env_float("SWITCHBOARD_MODEL_SOFT_LIMIT_S", 10.0),
    # Whole-run deadline by default.
    "RUN_DEADLINE_S": env_float("SWITCHBOARD_RUN_DEADLINE_S", 30.0),
    # Retries of a transient model error before the fallback answers.
    "MODEL_MAX_RETRIES": env_int("SWITCHBOARD_MODEL_MAX_RETRIES", 3),
    "MODEL_RETRY_BACKOFF_S": env_float("SWITCHBOARD_MODEL_RETRY_BACKOFF_S", 0.2),
    # How long tenant settings are cached inside a gateway process.
    "TENANT_CACHE_S": env_float("SWITCHBOARD_TENANT_CACHE_S", 5.0),
    # Tenants a gateway process keeps cached, and slugs it remembers as "no such tenant"
    # (in a table of their own): token floods naming made-up tenants cost bounded memory.
    "TENANT_CACHE_MAX": env_int("SWITCHBOARD_TENANT_CACHE_MAX", 10_000),
    "TENANT_CACHE_MAX_MISSES": env_int("SWITCHBOARD_TENANT_CACHE_MAX_MISSES", 10_000),
    # How often a gateway re-checks the tenants of its open connections (disabled, secret
    # rotated): the backstop for a missed control message (realtime/control.py).
    "TENANT_CHECK_S": env_float("SWITCHBOARD_TENANT_CHECK_S", 2.0),
    # Tokens signed with a tenant's previous secret stay valid this long after a rotation,
    # so issuers can deploy the new secret without cutting their users off.
    "SECRET_ROTATION_GRACE_S": env_float("SWITCHBOARD_SECRET_ROTATION_GRACE_S", 3600.0),
    # Gap repair: how long a connection waits for a missing seq before reading the log.
    "GAP_REPAIR_S": env_float("SWITCHBOARD_GAP_REPAIR_S", 0.05),
    # How long a gateway drains on SIGTERM before closing connections with 1012.
    "DRAIN_S": env_float("SWITCHBOARD_DRAIN_S", 5.0),
    # Default per-tenant bounds (each editable per tenant in the admin). Past one, the
    # client is answered at once (429 or close 4029); nothing is queued for later.
    "MAX_CONNECTIONS_PER_TENANT": env_int("SWITCHBOARD_MAX_CONNECTIONS_PER_TENANT", 20_000),
    "MAX_CONNECTIONS_PER_CLIENT": env_int("SWITCHBOARD_MAX_CONNECTIONS_PER_CLIENT", 20),
    "MAX_RUNS_IN_FLIGHT_PER_CONNECTION": env_int(
        "SWITCHBOARD_MAX_RUNS_IN_FLIGHT_PER_CONNECTION", 8
    ),
    "MAX_QUEUED_RUNS_PER_TENANT": env_int("SWITCHBOARD_MAX_QUEUED_RUNS_PER_TENANT", 2_000),
    "CLIENT_MESSAGES_PER_S": env_int("SWITCHBOARD_CLIENT_MESSAGES_PER_S", 20),
    "CLIENT_BURST": env_int("SWITCHBOARD_CLIENT_BURST", 40),
    "TENANT_MESSAGES_PER_S": env_int("SWITCHBOARD_TENANT_MESSAGES_PER_S", 2_000),
    "TENANT_BURST": env_int("SWITCHBOARD_TENANT_BURST", 4_000),
    # Receipts pay a bucket of their own per client (each is a Redis write): roomier than
    # messages, as a client reading many streams sends one per stream it reads.
    "CLIENT_RECEIPTS_PER_S": env_int("SWITCHBOARD_CLIENT_RECEIPTS_PER_S", 100),
    "CLIENT_RECEIPT_BURST": env_int("SWITCHBOARD_CLIENT_RECEIPT_BURST", 200),
    # Default per-tenant cap on one connection's stream subscriptions (subscribe, and the
    # streams it sends to); past it, rate_limited. Each costs presence keys and session fields.
    "MAX_SUBSCRIPTIONS_PER_CONNECTION": env_int(
        "SWITCHBOARD_MAX_SUBSCRIPTIONS_PER_CONNECTION", 1_000
    ),
    # Default per-tenant longest token lifetime: a token whose exp is further away is
    # refused (4001), so a leaked token cannot be valid for ever.
    "MAX_TOKEN_LIFETIME_S": env_int("SWITCHBOARD_MAX_TOKEN_LIFETIME_S", 30 * 24 * 3600),
    # The simulated backend's fault and delay options (fail, latency_ms, chunk_delay_ms)
    # for every tenant: for rehearsals and tests only, since one tenant's stalls take
    # worker time from all. Off, they are honoured only for tenants with fault_injection.
    "FAULT_INJECTION": env_bool("SWITCHBOARD_FAULT_INJECTION", False),
    # A request's line and headers (and a body) must arrive within this many seconds of
    # the connection opening, or of the last response on it; else 408 and closed
    # (realtime/daphne_tuning.py). Daphne has no such bound: a trickling client held a
    # socket for ever. 0: no bound.
    "REQUEST_TIMEOUT_S": env_float("SWITCHBOARD_REQUEST_TIMEOUT_S", 10.0),
    # The gateway pings each socket this often (daphne's --ping-interval, set here so every
    # launcher agrees) and drops one whose pong is later than the timeout: how long a dead
    # peer can hold a socket, and how often an idle one shows a proxy it is alive.
    "WS_PING_INTERVAL_S": env_float("SWITCHBOARD_WS_PING_INTERVAL_S", 20.0),
    "WS_PING_TIMEOUT_S": env_float("SWITCHBOARD_WS_PING_TIMEOUT_S", 30.0),
    # The longest a WebSocket stays open: past it (less up to a tenth, drawn per socket, so
    # sockets opened together do not all close together) it is closed 1012 and its client
    # resumes, maybe on another gateway (rebalancing after a scale-out). 0: no limit, which
    # also turns off daphne's own (24 h, closed without a code, all at once).
    "WS_MAX_AGE_S": env_float("SWITCHBOARD_WS_MAX_AGE_S", 0.0),
    # GET /metrics answers only with "Authorization: Bearer <this>": it names every tenant
    # and its traffic. "": /metrics is off on gateways (403).
    "METRICS_TOKEN": env_str("SWITCHBOARD_METRICS_TOKEN", ""),
    # Default per-tenant chain of runs triggered by runs' events: stops agents' ping-pong.
    "MAX_CAUSAL_DEPTH": env_int("SWITCHBOARD_MAX_CAUSAL_DEPTH", 3),
    # How long a session outlives its last connection; a reconnect within it resumes.
    "SESSION_TTL_S": env_int("SWITCHBOARD_SESSION_TTL_S", 300),
    # How often a gateway writes its open sessions' delivered positions to Redis: the most
    # a session can be behind (events repeated, never skipped) after a gateway crash.
    "SESSION_CHECKPOINT_S": env_float("SWITCHBOARD_SESSION_CHECKPOINT_S", 1.0),
    # New connections a gateway process sets up at once (token, admission, session, the
    # resumed streams' catch-up): a reconnect storm taken all at once stalls delivery to
    # the connections already open for seconds (realtime/handshakes.py).
    "HANDSHAKE_CONCURRENCY": env_int("SWITCHBOARD_HANDSHAKE_CONCURRENCY", 32),
    # Handshakes that may wait for a turn; past it a newcomer is closed 1012 at once.
    "HANDSHAKE_QUEUE": env_int("SWITCHBOARD_HANDSHAKE_QUEUE", 5000),
    # New connections a gateway process takes from its listening socket per second, after a
    # burst of this many (0, the default: as fast as they come): a storm's upgrades taken
    # all at once hold the CPU ahead of delivery; paced, the rest wait in the kernel's
    # accept queue (realtime/accept_pace.py). Off until measured to help (performance.md).
    "ACCEPT_RATE_PER_S": env_float("SWITCHBOARD_ACCEPT_RATE_PER_S", 0.0),
    "ACCEPT_BURST": env_int("SWITCHBOARD_ACCEPT_BURST", 100),
    # A presence entry not refreshed for this long is a ghost (its gateway died) and leaves.
    "PRESENCE_TTL_S": env_float("SWITCHBOARD_PRESENCE_TTL_S", 30.0),
    # join/leave are announced on streams with at most this many present clients (every
    # subscriber gets every join: a crowd would cost the square of its size in frames);
    # the presence query answers on any stream.
    "PRESENCE_ANNOUNCE_MAX": env_int("SWITCHBOARD_PRESENCE_ANNOUNCE_MAX", 100),
    # A connection that ends without a goodbye (cut, going away, a gateway restarting)
    # keeps its clients present this long: one back within it neither left nor joined, so
    # a reconnect storm or a rolling restart costs no join/leave fan-out (0: leave at once).
    "PRESENCE_LEAVE_GRACE_S": env_float("SWITCHBOARD_PRESENCE_LEAVE_GRACE_S", 15.0),
    # How often a gateway refreshes the presence entries of its connections.
    "PRESENCE_REFRESH_S": env_float("SWITCHBOARD_PRESENCE_REFRESH_S", 10.0),
    # Gateways' and workers' young-generation GC threshold (Python's default is 700): with
    # thousands of long-lived sockets or model calls, the default turns short-lived bursts
    # into full collections of the whole heap (0: leave the collector as Python sets it).
    "GC_YOUNG_THRESHOLD": env_int("SWITCHBOARD_GC_YOUNG_THRESHOLD", 50_000),
    # A claimed step's lease: a worker that stops renewing it for this long is taken for
    # dead and the sweeper redelivers the step to another worker.
    "RUN_LEASE_S": env_float("SWITCHBOARD_RUN_LEASE_S", 5.0),
    # The model-call runtime of each worker process (workers/runtime.py): calls in flight at
    # most (past it the worker stops taking messages, so queues grow in Redis, not here).
    "WORKER_MAX_CALLS": env_int("SWITCHBOARD_WORKER_MAX_CALLS", 5_000),
    # Threads for blocking work beside the event loop: Python steps and blocking backends.
    "WORKER_THREADS": env_int("SWITCHBOARD_WORKER_THREADS", 32),
    # A loop that has not turned for this long is wedged by blocking code: the worker exits
    # and its steps are redelivered (what Celery's hard time limit did for a stuck task).
    "WORKER_LOOP_STALL_S": env_float("SWITCHBOARD_WORKER_LOOP_STALL_S", 30.0),
    # On SIGTERM, how long calls in flight may finish before the rest are handed to other
    # workers (and their replies restart there).
    "WORKER_DRAIN_S": env_float("SWITCHBOARD_WORKER_DRAIN_S", 10.0),
    # A reply's pieces are appended in deltas of up to this many characters, so a fast
    # model does not cost a Redis write and a frame per token (0: one delta per piece).
    "DELTA_FLUSH_CHARS": env_int("SWITCHBOARD_DELTA_FLUSH_CHARS", 64),
    # ...or as soon as a piece arrives this long after the last delta: the most coalescing
    # delays a streaming reply (0: one delta per piece).
    "DELTA_FLUSH_MS": env_float("SWITCHBOARD_DELTA_FLUSH_MS", 50.0),
    # Providers' rate limits per backend name, global across workers, e.g.
    # {"openai": {"rpm": 500, "tpm": 90000}}; a call waits for them only while its run can.
    "BACKEND_LIMITS": json.loads(env_str("SWITCHBOARD_BACKEND_LIMITS", "") or "{}"),
    # New runs wait in per-tenant queues and workers take them by weighted deficit round
    # robin across tenants (streams/fairness.py); 0: one FIFO Celery queue for all.
    "FAIR_QUEUE": env_bool("SWITCHBOARD_FAIR_QUEUE", True),
    # Check that every Lua script call's keys hash to one slot, as a Redis Cluster demands,
    # on a single Redis too (streams/scripts.py): on in the test suites, so the single-Redis
    # suite catches a cross-slot script before a cluster does. Costs a CRC per key per call.
    "CHECK_SCRIPT_SLOTS": env_bool("SWITCHBOARD_CHECK_SCRIPT_SLOTS", False),
    # With a Celery broker other than the streams' Redis, a task is published after the
    # script that wrote its work: the sweeper publishes again (a wake-up ticket, a step's
    # message) for work still unclaimed this long after, so a crash in between loses nothing.
    "OUTBOX_GRACE_S": env_float("SWITCHBOARD_OUTBOX_GRACE_S", 5.0),
    # The "openai" backend (workers/openai_backend.py): any OpenAI-compatible server
    # (OpenAI, vLLM, Ollama, llama.cpp), so the URL is configurable.
    # (Set but empty, as a compose file may leave it, means the default, like unset.)
    "OPENAI_BASE_URL": env_str("SWITCHBOARD_OPENAI_BASE_URL", "") or "https://api.openai.com/v1",
    # The NAME of the variable holding the API key, so the key stays out of settings and
    # the database ("" sends no key, as local servers need none).
    "OPENAI_API_KEY_ENV": env_str("SWITCHBOARD_OPENAI_API_KEY_ENV", "OPENAI_API_KEY"),
    # The model of a step that names none (Step.model wins).
    "OPENAI_MODEL": env_str("SWITCHBOARD_OPENAI_MODEL", ""),
    # The "anthropic" backend (workers/anthropic_backend.py), Anthropic's Messages API;
    # configured like "openai", the key by the NAME of its variable.
    "ANTHROPIC_BASE_URL": env_str("SWITCHBOARD_ANTHROPIC_BASE_URL", "")
    or "https://api.anthropic.com/v1",
    "ANTHROPIC_API_KEY_ENV": env_str("SWITCHBOARD_ANTHROPIC_API_KEY_ENV", "ANTHROPIC_API_KEY"),
    "ANTHROPIC_MODEL": env_str("SWITCHBOARD_ANTHROPIC_MODEL", ""),
    # The tenant whose tokens /demo/token hands to anyone who asks, for the demo page
    # (realtime/pages.py says why that is for development only); "": no demo. bin/dev start
    # sets it to "demo"; never set it on a deployment reachable by others.
    "DEMO_TENANT": env_str("SWITCHBOARD_DEMO_TENANT", ""),
    # Finished runs waiting in Redis for the history persister, at most: past it the oldest
    # are dropped (and counted) so a persister down for long cannot fill Redis; 0: no history.
    "HISTORY_OUTBOX_MAX": env_int("SWITCHBOARD_HISTORY_OUTBOX_MAX", 100_000),
    # Finished runs the persister inserts per batch (two rows each): one bulk insert each.
    "HISTORY_BATCH": env_int("SWITCHBOARD_HISTORY_BATCH", 500),
    # Days conversation history is kept in the database (0: forever); purged daily.
    "HISTORY_RETENTION_DAYS": env_int("SWITCHBOARD_HISTORY_RETENTION_DAYS", 30),
}

LOG_LEVEL = env_str("LOG_LEVEL", "INFO")
# "json" (one object per line, for log collectors; the Docker image sets it) or "plain" (for
# people). Both carry the tenant, connection, client, run and event ids (ops/logcontext.py).
LOG_FORMAT = env_str("LOG_FORMAT", "plain")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"context": {"()": "ops.logcontext.ContextFilter"}},
    "formatters": {
        "plain": {
            # The ids go before the message, so a message still ends the line it starts.
            "format": "%(asctime)s %(levelname)s %(process)d %(name)s:%(log_context)s %(message)s"
        },
        "json": {"()": "ops.logcontext.json_formatter"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "json" if LOG_FORMAT == "json" else "plain",
            "filters": ["context"],
        }
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        # Daphne logs every connection at INFO; that is CPU on the hot path.
        "daphne": {"level": "WARNING"},
        "django.channels.server": {"level": "WARNING"},
        # httpx2 (the openai backend's client) logs every request at INFO.
        "httpx2": {"level": "WARNING"},
    },
}
