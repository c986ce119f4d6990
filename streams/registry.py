"""The tenant registry: a set of every tenant with keys, which the sweepers iterate.

Run deadlines, leases, queued runs, the history outbox and recent problems are indexed per
tenant (in the tenant's hash slot, streams/keys.py), so whoever sweeps them needs the list
of tenants. Whoever writes a tenant's first keys registers it first (an idempotent SADD,
remembered by the process for a while, so the hot path pays a dict lookup). Registering
before writing means no key can exist unswept; an entry whose tenant has nothing is
harmless: its sweep finds empty indexes. A send whose script finds the tenant's fair-queue
state new (its first push, epoch 1: a new tenant, or a Redis that lost its data) registers
the tenant again at once, whatever the process remembers.
"""

from __future__ import annotations

import time

import redis
import redis.asyncio as aredis

from streams import keys

# The fair-queue epoch of a tenant's first push (streams/lua/fair_queue_insert.lua).
NEW_TENANT_EPOCH = 1


def register(client: redis.Redis, tenant: str, again: bool = False) -> None:
    """Make sure `tenant` is in the registry (blocking client); `again`: whatever this
    process remembers (the tenant's keys were found new: Redis may have lost them all)."""
    now = time.monotonic()
    if not again and keys.tenant_registered(tenant, now):
        return
    client.sadd(keys.TENANTS, tenant)
    keys.note_registered(tenant, now)


async def register_async(client: aredis.Redis, tenant: str, again: bool = False) -> None:
    """Make sure `tenant` is in the registry (asyncio client); `again` as for `register`."""
    now = time.monotonic()
    if not again and keys.tenant_registered(tenant, now):
        return
    await client.sadd(keys.TENANTS, tenant)
    keys.note_registered(tenant, now)


def tenants(client: redis.Redis) -> list[str]:
    """Every registered tenant, sorted (a set of tenants, not of their keys: small)."""
    return sorted(
        member.decode() if isinstance(member, bytes) else str(member)
        for member in client.smembers(keys.TENANTS)
    )
