"""Announcing an operator's tenant change to every gateway (disable, delete, secret rotation).

The announcement is the tenant's slug published on `keys.TENANT_CONTROL` once the change is
committed; each gateway's listener (realtime/control.py) drops the tenant from its cache,
reads it again and closes the connections that may no longer stay open. Pub/sub is
at-most-once, so the gateways also re-check their tenants on their own every
SWITCHBOARD_TENANT_CHECK_S: an announcement makes a change take effect at once, its loss
only later.
"""

from __future__ import annotations

import logging

import orjson
from redis.exceptions import RedisError

from streams import keys

logger = logging.getLogger(__name__)


def announce_tenant_change(slug: str, why: str = "changed") -> bool:
    """Tell every gateway to re-check the tenant's open connections now (call it after the
    change is committed). False when Redis could not be reached: the gateways then apply the
    change within TENANT_CACHE_S + TENANT_CHECK_S by themselves."""
    from streams.redis_clients import sync_client

    payload = orjson.dumps({"tenant": slug, "why": why})
    try:
        listeners = sync_client().publish(keys.TENANT_CONTROL, payload)
    except RedisError as error:
        logger.warning("tenant change not announced tenant=%s why=%s: %s", slug, why, error)
        return False
    logger.info("tenant change announced tenant=%s why=%s gateways=%s", slug, why, listeners)
    return True
