"""Switchboard's settings as one typed object: `conf().run_lease_s`, never a string key.

project/settings.py reads every value from the environment and says why each exists; this
module only gives them names and types. The object is built from django.conf.settings on
first use, not at import, and dropped on Django's `setting_changed` signal (as channels'
layers are), so `override_settings` and pytest-django's `settings` fixture change what the
next `conf()` returns, with no module to reload. A value of the wrong type stops the process
at its first read instead of failing somewhere downstream.

Every package may import this module: it is the one import that goes down to `project`,
since settings sit below everything. It imports nothing of Switchboard's.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, get_type_hints

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from redis.connection import parse_url


def _top_level(name: str) -> Any:
    """A field read from a top-level setting (shared with Celery or Channels) rather than
    from the SWITCHBOARD dict, which is where every other field's upper-cased name is."""
    return field(metadata={"setting": name})


@dataclass(frozen=True, slots=True)
class Conf:
    """Every setting Switchboard's own code reads, named as in project/settings.py
    (SWITCHBOARD["RUN_LEASE_S"] is `run_lease_s`); see there for what each means."""

    # --- Redis and Celery's broker (top-level settings) ---
    redis_url: str = _top_level("REDIS_URL")
    redis_cluster_url: str = _top_level("REDIS_CLUSTER_URL")
    redis_socket_timeout_s: float = _top_level("REDIS_SOCKET_TIMEOUT_S")
    redis_max_connections: int = _top_level("REDIS_MAX_CONNECTIONS")
    redis_pool_wait_s: float = _top_level("REDIS_POOL_WAIT_S")
    broker_url: str = _top_level("CELERY_BROKER_URL")
    broker_transport_options: Mapping[str, Any] = _top_level("CELERY_BROKER_TRANSPORT_OPTIONS")
    sweep_interval_s: float = _top_level("SWEEP_INTERVAL_S")
    prometheus_multiproc_dir: str = _top_level("PROMETHEUS_MULTIPROC_DIR")
    worker_metrics_port: int = _top_level("WORKER_METRICS_PORT")
    websocket_allowed_origins: tuple[str, ...] = _top_level("WEBSOCKET_ALLOWED_ORIGINS")

    # --- Streams and runs ---
    key_prefix: str
    stream_retention: int
    dedupe_ttl_s: int
    replica_acks: int
    replica_ack_timeout_ms: int
    run_deadline_s: float
    run_lease_s: float
    fair_queue: bool
    check_script_slots: bool
    outbox_grace_s: float
    max_causal_depth: int

    # --- Gateway connections ---
    max_frame_bytes: int
    outbox_max_events: int
    outbox_max_bytes: int
    heartbeat_s: int
    gap_repair_s: float
    drain_s: float
    request_timeout_s: float
    ws_ping_interval_s: float
    ws_ping_timeout_s: float
    ws_max_age_s: float
    session_ttl_s: int
    session_checkpoint_s: float
    handshake_concurrency: int
    handshake_queue: int
    accept_rate_per_s: float
    accept_burst: int
    presence_ttl_s: float
    presence_announce_max: int
    presence_refresh_s: float
    presence_leave_grace_s: float
    gc_young_threshold: int

    # --- Tenants: cache, secrets, default per-tenant bounds ---
    tenant_cache_s: float
    tenant_cache_max: int
    tenant_cache_max_misses: int
    tenant_check_s: float
    secret_rotation_grace_s: float
    max_connections_per_tenant: int
    max_connections_per_client: int
    max_runs_in_flight_per_connection: int
    max_queued_runs_per_tenant: int
    client_messages_per_s: int
    client_burst: int
    tenant_messages_per_s: int
    tenant_burst: int
    client_receipts_per_s: int
    client_receipt_burst: int
    max_subscriptions_per_connection: int
    max_token_lifetime_s: int
    fault_injection: bool

    # --- Workers and model calls ---
    model_soft_limit_s: float
    model_max_retries: int
    model_retry_backoff_s: float
    worker_max_calls: int
    worker_threads: int
    worker_loop_stall_s: float
    worker_drain_s: float
    delta_flush_chars: int
    delta_flush_ms: float
    backend_limits: Mapping[str, Any]
    openai_base_url: str
    openai_api_key_env: str
    openai_model: str
    anthropic_base_url: str
    anthropic_api_key_env: str
    anthropic_model: str

    # --- Operations and history ---
    metrics_token: str
    demo_tenant: str
    history_outbox_max: int
    history_batch: int
    history_retention_days: int

    # --- Derived from the above when built ---
    # Pub/sub channels are shared by every database of a Redis server, so their names
    # carry the database number (streams/keys.py).
    redis_database: int = field(init=False)
    # Celery's broker is the very Redis database the streams live in: our scripts may then
    # push task messages atomically with the writes they belong to.
    broker_in_streams_redis: bool = field(init=False)
    # The data plane is a Redis Cluster (REDIS_CLUSTER_URL), not the single Redis.
    redis_cluster: bool = field(init=False)

    def __post_init__(self) -> None:
        database = 0
        if self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            database = int(parse_url(self.redis_url).get("db", 0))
        object.__setattr__(self, "redis_database", database)
        cluster = bool(self.redis_cluster_url)
        object.__setattr__(self, "redis_cluster", cluster)
        # A Redis Cluster is never Celery's broker (kombu's Redis transport has no cluster
        # support), whatever REDIS_URL says.
        same = not cluster and self.broker_url.rstrip("/") == self.redis_url.rstrip("/")
        object.__setattr__(self, "broker_in_streams_redis", same)

    @classmethod
    def from_settings(cls, source: Any) -> Conf:
        """Read every field from a Django settings object; each must be there (settings.py
        defines them all) and of its field's type."""
        hints = get_type_hints(cls)
        values: dict[str, Any] = {}
        for option in fields(cls):
            if not option.init:
                continue
            name = option.metadata.get("setting")
            try:
                if name is not None:
                    value = getattr(source, name)
                else:
                    name = f'SWITCHBOARD["{option.name.upper()}"]'
                    value = source.SWITCHBOARD[option.name.upper()]
            except (AttributeError, KeyError):
                raise ImproperlyConfigured(f"setting {name} is missing") from None
            values[option.name] = _typed(name, hints[option.name], value)
        return cls(**values)


def _typed(name: str, kind: Any, value: Any) -> Any:
    """`value` as a `kind`: ints pass for floats, lists for tuples; anything else that is
    not of its type is a configuration error."""
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind == tuple[str, ...] and isinstance(value, list | tuple):
        return tuple(value)
    if kind == Mapping[str, Any] and isinstance(value, Mapping):
        return value
    if kind in (int, str, bool) and type(value) is kind:
        return value
    raise ImproperlyConfigured(f"setting {name} must be {kind}, not {value!r}")


# The settings a Conf is built from: a change to any other leaves it be.
_SOURCES = frozenset(
    {"SWITCHBOARD"} | {option.metadata["setting"] for option in fields(Conf) if option.metadata}
)

_current: Conf | None = None
_lock = threading.Lock()


def conf() -> Conf:
    """Switchboard's settings, built on first use after start or after a settings change."""
    current = _current
    if current is None:
        current = _build()
    return current


def _build() -> Conf:
    global _current
    with _lock:
        if _current is None:
            _current = Conf.from_settings(settings)
        return _current


def reset(*, setting: str | None = None, **kwargs: Any) -> None:
    """Drop the built object, so the next conf() reads the settings again (for Django's
    setting_changed; `setting` None drops it whatever changed)."""
    global _current
    if setting is None or setting in _SOURCES:
        with _lock:
            _current = None


setting_changed.connect(reset, dispatch_uid="switchboard-conf-reset")
