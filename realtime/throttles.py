"""Refusals (429s and 4029s) counted by a gateway, for the admin's live page.

Each gateway process counts its refusals in memory per tenant and reason, and adds them to a
per-minute Redis hash (`keys.throttled`) once a second; console/live.py reads the last
minutes. A refusal does no I/O of its own, so a refusal storm stays as cheap as before; a
gateway that dies loses at most its last second of counts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable

import redis.asyncio as aredis

from streams import keys

logger = logging.getLogger(__name__)

THROTTLE_FLUSH_S = 1.0
# Minute hashes live this long (the live page shows the last few of them).
THROTTLE_KEEP_S = 15 * 60


class ThrottleCounter:
    """A gateway process's refusals, per (tenant, reason), on their way to Redis."""

    def __init__(self, client_factory: Callable[[], aredis.Redis]) -> None:
        self._client_factory = client_factory
        self._counts: Counter[tuple[str, str]] = Counter()
        self._task: asyncio.Task[None] | None = None

    def count(self, tenant: str, reason: str) -> None:
        """One refusal; no I/O here (the refusal path must stay as fast as it was)."""
        self._counts[(tenant, reason)] += 1
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._flush_forever())

    async def flush(self, now: float | None = None) -> None:
        """Add what was counted to the current minute's hash (one pipeline)."""
        counts, self._counts = self._counts, Counter()
        if not counts:
            return
        key = keys.throttled(int((time.time() if now is None else now) // 60))
        try:
            async with self._client_factory().pipeline(transaction=False) as pipe:
                for (tenant, reason), count in counts.items():
                    pipe.hincrby(key, f"{tenant}:{reason}", count)
                pipe.expire(key, THROTTLE_KEEP_S)
                await pipe.execute()
        except Exception:
            # Kept for the next flush: bounded by tenants x reasons, however long Redis is away.
            self._counts.update(counts)
            raise

    async def _flush_forever(self) -> None:
        while self._counts:
            await asyncio.sleep(THROTTLE_FLUSH_S)
            try:
                await self.flush()
            except Exception as error:  # noqa: BLE001 - counts wait for the next round
                logger.warning("refusal counts not written (%s); trying again", error)


_throttles: ThrottleCounter | None = None


def throttle_counter() -> ThrottleCounter:
    global _throttles
    if _throttles is None:
        from streams.redis_clients import async_client

        _throttles = ThrottleCounter(async_client)
    return _throttles
