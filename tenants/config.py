"""Tenant settings as the gateway sees them: an immutable snapshot, cached per process.

The gateway must not touch the database per frame or per connection (a handshake burst
would queue on Django's single sync thread), so tenants are loaded once and kept for
SWITCHBOARD["TENANT_CACHE_S"] seconds.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import OrderedDict
from dataclasses import dataclass

from asgiref.sync import sync_to_async

from project.conf import conf
from streams.usage import Budgets

# The shape of Tenant.slug (its validator, tenants/models.py): 1 to 63 characters.
TENANT_SLUG_PATTERN = r"\A[a-z0-9][a-z0-9_-]{0,62}\Z"
_SLUG = re.compile(TENANT_SLUG_PATTERN)


@dataclass(frozen=True, slots=True)
class AgentGrant:
    """A TenantAgent row: whether the tenant may run the agent, and what its runs use
    instead of the agent's code ("" keeps the code's; api_key_env names a variable)."""

    agent: str
    enabled: bool = True
    model: str = ""
    api_key_env: str = ""
    base_url: str = ""
    # The grant's fallback models as JSON text ("" for the code's): orchestration/failover.py.
    fallbacks: str = ""


@dataclass(frozen=True, slots=True)
class TenantConfig:
    slug: str
    signing_secret: str
    enabled: bool
    max_frame_bytes: int
    stream_retention: int
    max_connections: int
    max_connections_per_client: int
    max_runs_in_flight_per_connection: int
    max_queued_runs: int
    client_messages_per_s: int
    client_burst: int
    tenant_messages_per_s: int
    tenant_burst: int
    weight: int = 1
    client_receipts_per_s: int = 100
    client_receipt_burst: int = 200
    max_subscriptions_per_connection: int = 1_000
    # Not limits: public_limits (the welcome) leaves them out, clients are not told them.
    all_agents: bool = True
    agent_grants: tuple[AgentGrant, ...] = ()
    max_causal_depth: int = 3
    max_token_lifetime_s: int = 30 * 24 * 3600
    fault_injection: bool = False
    # Secret rotation (tenants/tokens.py): the secret before the last rotation, which still
    # verifies tokens until previous_secret_until (epoch s); "" and 0.0 when there is none.
    previous_signing_secret: str = ""
    previous_secret_until: float = 0.0
    # Tokens the tenant's runs may use per UTC day and month (0: no budget).
    daily_token_budget: int = 0
    monthly_token_budget: int = 0

    def public_limits(self) -> dict[str, int]:
        from tenants.models import LIMIT_FIELDS

        return {name: getattr(self, name) for name in LIMIT_FIELDS}

    def token_budgets(self) -> Budgets:
        return Budgets(self.daily_token_budget, self.monthly_token_budget)

    def _grant(self, agent: str) -> AgentGrant | None:
        # A handful of grants per tenant: a scan is cheaper than keeping a dict per snapshot.
        for grant in self.agent_grants:
            if grant.agent == agent:
                return grant
        return None

    def may_use(self, agent: str) -> bool:
        """A grant for the agent decides, enabled or not; without one, all_agents does."""
        grant = self._grant(agent)
        return self.all_agents if grant is None else grant.enabled

    def agent_overrides(self, agent: str) -> dict[str, str]:
        """What the tenant's runs of `agent` use instead of its code: the non-empty ones of
        model, api_key_env, base_url and fallbacks of an enabled grant ({} without one)."""
        grant = self._grant(agent)
        if grant is None or not grant.enabled:
            return {}
        from tenants.models import AGENT_OVERRIDE_FIELDS

        overrides = {name: getattr(grant, name) for name in AGENT_OVERRIDE_FIELDS}
        return {name: value for name, value in overrides.items() if value}


def load_tenant(slug: str) -> TenantConfig | None:
    from tenants.models import Tenant

    tenant = Tenant.objects.filter(slug=slug).prefetch_related("agent_grants").first()
    if tenant is None:
        return None
    from tenants.models import AGENT_OVERRIDE_FIELDS, LIMIT_FIELDS, override_value

    until = tenant.previous_secret_until()
    return TenantConfig(
        slug=tenant.slug,
        signing_secret=tenant.signing_secret,
        enabled=tenant.enabled,
        weight=tenant.weight,
        all_agents=tenant.all_agents,
        agent_grants=tuple(
            AgentGrant(
                agent=row.agent,
                enabled=row.enabled,
                **{name: override_value(row, name) for name in AGENT_OVERRIDE_FIELDS},
            )
            for row in tenant.agent_grants.all()
        ),
        max_causal_depth=tenant.max_causal_depth,
        max_token_lifetime_s=tenant.max_token_lifetime_s,
        fault_injection=tenant.fault_injection,
        daily_token_budget=tenant.daily_token_budget,
        monthly_token_budget=tenant.monthly_token_budget,
        previous_signing_secret=tenant.previous_signing_secret if until else "",
        previous_secret_until=until.timestamp() if until else 0.0,
        **{name: getattr(tenant, name) for name in LIMIT_FIELDS},
    )


class TenantCache:
    """slug -> TenantConfig, each kept ttl_s; misses ("no such tenant") are kept as long,
    against floods of tokens naming tenants that do not exist.

    The slug comes from a token whose signature cannot be checked before the tenant is
    known, so callers check its shape first (`valid_slug`), and both tables are bounded:
    past `max_tenants` (or `max_misses`) the least recently used entry goes. Misses have a
    table of their own, so a flood of unknown slugs never pushes a real tenant out: it
    costs at most one database read per slug per ttl_s and `max_misses` entries.

    A bound not given is the setting's (SWITCHBOARD_TENANT_CACHE_S, _MAX, _MAX_MISSES), read
    when used, so the process's cache, made at import, follows a settings change."""

    def __init__(
        self,
        ttl_s: float | None = None,
        max_tenants: int | None = None,
        max_misses: int | None = None,
    ) -> None:
        self._ttl_s = ttl_s
        self._max_tenants = max_tenants
        self._max_misses = max_misses
        self._entries: OrderedDict[str, tuple[TenantConfig, float]] = OrderedDict()
        self._misses: OrderedDict[str, float] = OrderedDict()  # slug -> expires_at
        # One database read per slug at a time: a reconnect storm that finds the entry
        # expired waits for that read instead of sending thousands of identical queries.
        self._loading: dict[str, asyncio.Future[TenantConfig | None]] = {}

    @property
    def ttl_s(self) -> float:
        return conf().tenant_cache_s if self._ttl_s is None else self._ttl_s

    @property
    def max_tenants(self) -> int:
        return max(1, conf().tenant_cache_max if self._max_tenants is None else self._max_tenants)

    @property
    def max_misses(self) -> int:
        limit = self._max_misses
        return max(1, conf().tenant_cache_max_misses if limit is None else limit)

    def sizes(self) -> tuple[int, int]:
        """(tenants, misses) held now."""
        return len(self._entries), len(self._misses)

    def _fresh(self, slug: str, now: float) -> tuple[bool, TenantConfig | None]:
        """(True, the cached answer) while it is fresh, else (False, None)."""
        entry = self._entries.get(slug)
        if entry is not None and entry[1] > now:
            self._entries.move_to_end(slug)
            return True, entry[0]
        missed_until = self._misses.get(slug)
        if missed_until is not None and missed_until > now:
            self._misses.move_to_end(slug)
            return True, None
        return False, None

    def _store(self, slug: str, config: TenantConfig | None, now: float) -> None:
        # Imported here: tenants.models imports this module while Django loads its apps.
        from ops import metrics

        expires_at = now + self.ttl_s
        if config is None:
            self._entries.pop(slug, None)
            self._misses[slug] = expires_at
            self._misses.move_to_end(slug)
            while len(self._misses) > self.max_misses:
                self._misses.popitem(last=False)
        else:
            self._misses.pop(slug, None)
            self._entries[slug] = (config, expires_at)
            self._entries.move_to_end(slug)
            while len(self._entries) > self.max_tenants:
                self._entries.popitem(last=False)
        metrics.tenant_cache_loaded(config is not None, len(self._entries), len(self._misses))

    async def get(self, slug: str) -> TenantConfig | None:
        fresh, config = self._fresh(slug, time.monotonic())
        if fresh:
            return config
        loading = self._loading.get(slug)
        if loading is not None:
            return await asyncio.shield(loading)
        loading = self._loading[slug] = asyncio.get_running_loop().create_future()
        try:
            config = await sync_to_async(load_tenant, thread_sensitive=False)(slug)
        except asyncio.CancelledError:
            loading.cancel()
            raise
        except Exception as error:
            loading.set_exception(error)
            loading.exception()  # retrieved here, so a lone loader logs no "never retrieved"
            raise
        finally:
            del self._loading[slug]
        self._store(slug, config, time.monotonic())
        loading.set_result(config)
        return config

    def forget(self, slug: str) -> None:
        """Drop a tenant's entry, so the next get reads the database (an operator changed it)."""
        self._entries.pop(slug, None)
        self._misses.pop(slug, None)

    def cached(self, slug: str) -> TenantConfig | None:
        """The last loaded settings of a tenant, expired or not, without a database read."""
        entry = self._entries.get(slug)
        return entry[0] if entry is not None else None

    def get_sync(self, slug: str) -> TenantConfig | None:
        now = time.monotonic()
        fresh, config = self._fresh(slug, now)
        if fresh:
            return config
        config = load_tenant(slug)
        self._store(slug, config, now)
        return config


def valid_slug(slug: object) -> bool:
    """Whether `slug` has a tenant slug's shape (tenants/models.py), checked before any
    lookup: what a token claims is read before its signature can be verified."""
    return isinstance(slug, str) and _SLUG.match(slug) is not None


tenant_cache = TenantCache()
