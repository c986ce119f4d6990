"""Operators' tenant changes reaching open connections: disable, delete, secret rotation.

A tenant's settings are checked at connect (tenants/tokens.py); this module closes the
connections that were admitted before a change and may no longer stay open:

- **disabled or deleted tenant**: closed with 4003 "tenant disabled" ("tenant deleted");
- **rotated secret**: a connection whose token was verified with a secret the tenant no
  longer accepts (the previous one once its grace is over, or one two rotations old) is
  closed with 4001 "signing secret rotated", like a connect with that token would be.

Two paths, on every gateway process:

1. **Control message.** The admin (or anyone calling
   `tenants.announcements.announce_tenant_change`) publishes the tenant's slug on
   `keys.TENANT_CONTROL` after the change is committed. Each gateway's `TenantControl`
   listens on its own pub/sub connection, drops the tenant from its `TenantCache`, reads it
   again and closes what must go: within milliseconds.
2. **Periodic check.** Pub/sub is at-most-once (a gateway reconnecting to Redis misses what
   was published meanwhile), a change may be made without a message (an `update()` in a
   shell), and a grace ends by the clock, not by an event. So every
   `SWITCHBOARD_TENANT_CHECK_S` each gateway looks at the tenants of its open connections
   through its tenant cache: a change is applied within `TENANT_CACHE_S + TENANT_CHECK_S`
   without any message.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import orjson
import redis.asyncio as aredis

from project.conf import conf
from realtime.protocol import CLOSE_FORBIDDEN, CLOSE_UNAUTHORIZED
from streams import keys
from tenants.config import TenantCache, TenantConfig
from tenants.tokens import SECRET_ROTATED, Identity

logger = logging.getLogger(__name__)

TENANT_DISABLED = "tenant disabled"
TENANT_DELETED = "tenant deleted"
RECONNECT_BACKOFF_S = (0.1, 0.25, 0.5, 1.0, 2.0)
# A quiet control connection is PINGed this often, so a dead one is noticed and replaced.
IDLE_PING_S = 10.0


class Controlled(Protocol):
    """What TenantControl needs of a connection (GatewayConsumer)."""

    identity: Identity
    connection_id: str

    def close_with(self, code: int, reason: str, save_session: bool = True) -> None: ...


def close_verdict(secret: str, tenant: TenantConfig | None, now: float) -> tuple[int, str] | None:
    """Why a connection whose token `secret` verified must close now, as (code, reason);
    None when it may stay. An empty `secret` (not known) is not judged by the secret."""
    if tenant is None:
        return CLOSE_FORBIDDEN, TENANT_DELETED
    if not tenant.enabled:
        return CLOSE_FORBIDDEN, TENANT_DISABLED
    if not secret or secret == tenant.signing_secret:
        return None
    if secret == tenant.previous_signing_secret and now < tenant.previous_secret_until:
        return None
    return CLOSE_UNAUTHORIZED, SECRET_ROTATED


class TenantControl:
    """One per gateway process: its open connections by tenant, the control listener and
    the periodic check. Tasks start with the first connection watched."""

    def __init__(
        self,
        tenants: TenantCache,
        client_factory: Callable[[], aredis.Redis],
        check_s: float,
    ) -> None:
        self.tenants = tenants
        self.check_s = check_s
        self._client_factory = client_factory
        # tenant -> the secret its connections' tokens verified with -> those connections:
        # a check judges each secret once, so it costs per tenant, not per connection.
        self._by_tenant: dict[str, dict[str, set[Controlled]]] = {}
        self._tenant_of: dict[Controlled, tuple[str, str]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._checker: asyncio.Task[None] | None = None
        self._handling: set[asyncio.Task[Any]] = set()
        self.closing = False

    # --- the registry ------------------------------------------------------------------

    def watch(self, connection: Controlled) -> None:
        """Register an admitted connection (its identity is known)."""
        slug, secret = connection.identity.tenant, connection.identity.secret
        self._by_tenant.setdefault(slug, {}).setdefault(secret, set()).add(connection)
        self._tenant_of[connection] = (slug, secret)
        self.start()

    def forget(self, connection: Controlled) -> None:
        """The connection is gone (never watched: nothing to do)."""
        place = self._tenant_of.pop(connection, None)
        if place is None:
            return
        slug, secret = place
        by_secret = self._by_tenant.get(slug)
        if by_secret is None:
            return
        group = by_secret.get(secret)
        if group is not None:
            group.discard(connection)
            if not group:
                del by_secret[secret]
        if not by_secret:
            del self._by_tenant[slug]

    def connections(self, slug: str) -> list[Controlled]:
        """The tenant's open connections in this process."""
        return [c for group in self._by_tenant.get(slug, {}).values() for c in group]

    def tenants_open(self) -> list[str]:
        return list(self._by_tenant)

    # --- enforcing ---------------------------------------------------------------------

    async def enforce(self, slug: str) -> int:
        """Close the tenant's connections that may not stay, judged on its cached settings;
        returns how many were closed."""
        by_secret = self._by_tenant.get(slug)
        if not by_secret:
            return 0
        tenant = await self.tenants.get(slug)
        now = time.time()
        closing: list[tuple[Controlled, tuple[int, str]]] = []
        for secret, group in by_secret.items():
            verdict = close_verdict(secret, tenant, now)
            if verdict is not None:
                closing.extend((connection, verdict) for connection in group)
        closed = 0
        for connection, (code, reason) in closing:
            connection.close_with(code, reason)
            # Closed now: a close that races its disconnect must not be counted twice.
            self.forget(connection)
            closed += 1
            logger.info(
                "connection closed by tenant change tenant=%s client=%s conn=%s: %s %s",
                slug,
                connection.identity.client,
                connection.connection_id,
                code,
                reason,
            )
        return closed

    async def changed(self, slug: str) -> int:
        """An operator changed the tenant: read it again and apply it."""
        self.tenants.forget(slug)
        return await self.enforce(slug)

    async def check_all(self) -> None:
        for slug in self.tenants_open():
            try:
                await self.enforce(slug)
            except Exception:
                # The database is away, say: the connections stay, the next check retries.
                logger.warning("tenant check failed tenant=%s", slug, exc_info=True)

    # --- tasks -------------------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._listener is None or self._listener.done():
            self._listener = loop.create_task(self._listen_forever())
        if self._checker is None or self._checker.done():
            self._checker = loop.create_task(self._check_forever())

    async def _check_forever(self) -> None:
        while not self.closing:
            await asyncio.sleep(self.check_s)
            await self.check_all()

    async def _listen_forever(self) -> None:
        failures = 0
        while not self.closing:
            pubsub = self._client_factory().pubsub()
            try:
                await pubsub.subscribe(keys.TENANT_CONTROL)
                if failures:
                    # Messages published while we were away are lost: check every tenant.
                    self._spawn(self.check_all())
                failures = 0
                await self._read(pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - any failure: reconnect and go on
                delay = RECONNECT_BACKOFF_S[min(failures, len(RECONNECT_BACKOFF_S) - 1)]
                failures += 1
                logger.warning(
                    "tenant control lost redis (%s); reconnecting in %.2fs", error, delay
                )
                await asyncio.sleep(delay)
            finally:
                try:
                    await pubsub.aclose()
                except Exception:  # noqa: BLE001 - the connection is being thrown away
                    pass

    async def _read(self, pubsub: Any) -> None:
        while True:
            message = await pubsub.get_message(timeout=IDLE_PING_S)
            if message is None:
                await pubsub.ping()
                continue
            if message.get("type") != "message":
                continue
            try:
                slug = orjson.loads(message["data"])["tenant"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                logger.warning("tenant control message ignored: %r", message.get("data"))
                continue
            if isinstance(slug, str):
                self._spawn(self._apply(slug))

    def _spawn(self, work: Any) -> None:
        # Off the reading loop: a slow database read must not hold up the next message.
        task = asyncio.get_running_loop().create_task(work)
        self._handling.add(task)
        task.add_done_callback(self._handling.discard)

    async def _apply(self, slug: str) -> None:
        try:
            closed = await self.changed(slug)
        except Exception:
            logger.warning("tenant change not applied tenant=%s", slug, exc_info=True)
            return
        if closed:
            logger.info("tenant change closed %s connections tenant=%s", closed, slug)

    async def close(self) -> None:
        self.closing = True
        for task in (self._listener, self._checker, *self._handling):
            if task is not None:
                task.cancel()


_control: TenantControl | None = None


def tenant_control() -> TenantControl:
    global _control
    if _control is None:
        from streams.redis_clients import pubsub_client
        from tenants.config import tenant_cache

        _control = TenantControl(tenant_cache, pubsub_client, conf().tenant_check_s)
    return _control
