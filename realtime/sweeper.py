"""Gateways sweep runs too, so a run's terminal event never waits for a worker.

Beat schedules the same sweep as a Celery task, but a task needs a live worker; a gateway
is up whenever a client could be waiting. The sweep ends runs past their deadline and
redelivers steps whose worker stopped renewing their lease (it died). Both are atomic
scripts that do nothing to a run already finished or redelivered, so any number of
sweepers are safe together.
"""

from __future__ import annotations

import asyncio
import logging
import random

from orchestration.sweeping import sweep_runs
from project.conf import conf
from streams.redis_clients import sync_client
from streams.runs import RunStore

logger = logging.getLogger(__name__)


class Sweeper:
    """This process's sweep task (one per gateway, owned by realtime/node.py)."""

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start sweeping (again, should the task have ended); on the gateway's loop."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _sweep_forever(self) -> None:
        interval = conf().sweep_interval_s
        store = RunStore(sync_client())
        while True:
            # Jitter keeps many gateways from sweeping in step.
            await asyncio.sleep(interval * random.uniform(0.5, 1.5))
            try:
                swept = await asyncio.to_thread(sweep_runs, store)
            except Exception:
                logger.exception("sweeping runs failed; trying again next interval")
                continue
            if swept.ended:
                logger.warning("gateway sweeper ended %s overdue runs", swept.ended)
