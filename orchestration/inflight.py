"""The steps one worker process holds: their leases renewed together, and their stop signals.

A step's lease tells the sweeper its worker is alive. Renewing it from a thread (or a timer)
per step costs a worker more the more calls it holds, so `InFlight` renews every held step
whose lease is due in one pipeline per interval. Appends renew a step's lease as well, so a
streaming step is skipped; only silent ones (a model still thinking) are renewed.

A step learns that its run no longer needs it in two ways, both ending in `stop`, which
cancels the step's task:
- pushed: whoever ends a run a worker holds (a client's cancel, the deadline sweep) publishes
  the run id on the holding worker's channel (FINALIZE_RUN, keys.worker_stop_channel), which
  `listen` hears within milliseconds;
- found: a renewal that the store refuses (the run was finished, or fenced by a newer
  attempt) — the backstop when a push was missed while the listener reconnected.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import redis.asyncio as aredis
from redis.exceptions import RedisError

from ops import metrics
from streams import keys
from streams.runs import AsyncRunStore, Run, worker_id

logger = logging.getLogger(__name__)

# Why a held step was stopped; the step reads it to decide what it still owes.
ENDED = "ended"  # someone else finished the run (cancel, sweep): write nothing
LOST = "lost"  # the store refused a renewal: another attempt owns it, or it finished
DRAIN = "drain"  # the worker is shutting down: hand the step to another worker


@dataclass(slots=True)
class Held:
    run: Run
    task: asyncio.Task[object]
    stop_reason: str = ""
    stopped_at: float = field(default=0.0)


class InFlight:
    def __init__(self, store: AsyncRunStore) -> None:
        self.store = store
        self._held: dict[str, Held] = {}
        # Three chances to renew before a lease runs out, so one slow round trip is not taken
        # for a dead worker.
        self.every_s = max(store.lease_s / 3, 0.05)

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, run: Run) -> Held:
        task = asyncio.current_task()
        assert task is not None, "a step is held from inside its own task"
        held = Held(run, task)
        self._held[run.run_id] = held
        metrics.worker_calls_in_flight(+1)
        return held

    def release(self, held: Held) -> None:
        if self._held.get(held.run.run_id) is held:
            del self._held[held.run.run_id]
            metrics.worker_calls_in_flight(-1)

    def stop(self, run_id: str, reason: str) -> bool:
        """Cancel the step holding `run_id`, saying why; False when none is held here."""
        held = self._held.get(run_id)
        if held is None or held.stop_reason:
            return False
        held.stop_reason = reason
        held.stopped_at = time.monotonic()
        held.task.cancel(reason)
        logger.info("step stopped reason=%s tenant=%s run=%s", reason, held.run.tenant, run_id)
        return True

    def stop_all(self, reason: str) -> int:
        return sum(self.stop(run_id, reason) for run_id in list(self._held))

    def due(self, now: float) -> list[Run]:
        """The held runs whose lease nothing has renewed for `every_s`."""
        return [
            held.run
            for held in self._held.values()
            if not held.stop_reason and now - held.run.renewed_at >= self.every_s
        ]

    async def renew_due(self) -> int:
        """One pipeline for every due lease; steps whose renewal is refused are stopped."""
        runs = self.due(time.monotonic())
        if not runs:
            return 0
        kept = await self.store.renew_leases(runs)
        lost = 0
        for run, renewed in zip(runs, kept, strict=True):
            if not renewed and self.stop(run.run_id, LOST):
                lost += 1
        return lost

    async def keep_leases(self) -> None:
        """Renew due leases for as long as the process runs."""
        while True:
            try:
                await self.renew_due()
                await asyncio.sleep(self.every_s / 2)
            except asyncio.CancelledError:
                raise
            except RedisError:
                # Tried again soon; should a lease lapse meanwhile the step is redelivered and
                # this attempt fenced, which is safe.
                logger.warning("lease renewal failed; retrying", exc_info=True)
                await asyncio.sleep(min(self.every_s, 0.5))
            except Exception:
                logger.exception("lease renewal failed; retrying")
                await asyncio.sleep(min(self.every_s, 0.5))

    async def listen(self, client: aredis.Redis) -> None:
        """Stop held steps whose run someone else ended, as soon as that is published."""
        channel = keys.worker_stop_channel(worker_id())
        backoff = 0.1
        while True:
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(channel)
                backoff = 0.1
                # A stop published while we were not subscribed is found by a renewal now.
                await self.renew_all_now()
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        self.stop(message["data"].decode(), ENDED)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("worker stop channel lost; resubscribing", exc_info=True)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                try:
                    await pubsub.aclose()
                except Exception:
                    pass

    async def renew_all_now(self) -> None:
        runs = [held.run for held in self._held.values() if not held.stop_reason]
        if not runs:
            return
        for run, renewed in zip(runs, await self.store.renew_leases(runs), strict=True):
            if not renewed:
                self.stop(run.run_id, LOST)
