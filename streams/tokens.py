"""Token usage in Redis: each model call's usage added to its run and its tenant's day and
month counters (ADD_USAGE), and the counters read back for the admin's live page. The
arithmetic (estimates, periods, resets) is streams/usage.py's."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

import redis
import redis.asyncio as aredis

from streams import keys, scripts
from streams.usage import DAY, MONTH, Usage, counter_expires_at, day_label, month_label


def counter_keys(tenant: str, now: datetime) -> tuple[str, str]:
    """The tenant's (today's, this month's) counters, UTC."""
    return (
        keys.tokens_used(tenant, DAY, day_label(now)),
        keys.tokens_used(tenant, MONTH, month_label(now)),
    )


def add_usage_call(run_id: str, tenant: str, usage: Usage, now: datetime) -> scripts.AddUsage:
    day_key, month_key = counter_keys(tenant, now)
    return scripts.AddUsage(
        run_key=keys.run(run_id),
        day_key=day_key,
        month_key=month_key,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        estimated=1 if usage.estimated else 0,
        day_expires_at=counter_expires_at(DAY, now),
        month_expires_at=counter_expires_at(MONTH, now),
    )


async def add_usage(
    client: aredis.Redis, run_id: str, tenant: str, usage: Usage, now: datetime | None = None
) -> tuple[int, int]:
    """Count one model call's usage; returns the tenant's (today's, this month's) totals."""
    call = add_usage_call(run_id, tenant, usage, now or datetime.now(UTC))
    return await call.run_async(client)


def tokens_used(
    client: redis.Redis, tenants: Iterable[str], now: datetime | None = None
) -> dict[str, tuple[int, int]]:
    """tenant -> (tokens used today, this month), one pipelined read."""
    slugs = list(tenants)
    if not slugs:
        return {}
    moment = now or datetime.now(UTC)
    with client.pipeline(transaction=False) as pipe:
        for slug in slugs:
            for key in counter_keys(slug, moment):
                pipe.get(key)
        values = pipe.execute()
    return {
        slug: (int(values[2 * index] or 0), int(values[2 * index + 1] or 0))
        for index, slug in enumerate(slugs)
    }
