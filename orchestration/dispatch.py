"""How a Celery task hands a step to this worker process's model-call runtime.

Celery orchestrates steps: their messages, acknowledgements, fairness and redelivery. Each
step then runs as a coroutine on the runtime (workers/runtime.py), and the task that brought
it returns once the step is claimed, so a pool thread is busy for a Redis round trip per
step, not for a model call. The pieces of one worker process, built on first use:

- the runtime, bounded by `WORKER_MAX_CALLS`;
- an `AsyncRunStore` on the loop's Redis client;
- `InFlight`, with its two services on the loop: one lease renewal for all held steps, and
  the listener that stops a step as soon as its run is ended elsewhere.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from celery.exceptions import Reject

from ops.collector import report_pauses_every, tune_for_long_lived_connections
from orchestration.inflight import DRAIN, InFlight
from orchestration.steps import CLAIM_RETRY_S, StepOutcome, durably, execute_step
from project.conf import conf
from streams.fairness import AsyncFairQueue
from streams.redis_clients import async_client, pubsub_client
from streams.runs import AsyncRunStore
from workers.backends import close_backends
from workers.runtime import Admit, ModelCallRuntime, RuntimeClosed, runtime

logger = logging.getLogger(__name__)

# A dispatcher waits this long for a free slot before giving its message back to the broker,
# so that a full worker's pool threads are not all parked (maintenance tasks share them) and
# a worker with room elsewhere can take the message.
SLOT_WAIT_S = 2.0


@dataclass(slots=True)
class WorkerSide:
    runtime: ModelCallRuntime
    store: AsyncRunStore
    inflight: InFlight
    fair: AsyncFairQueue


_side: WorkerSide | None = None
_side_lock = threading.Lock()


def worker_side() -> WorkerSide:
    global _side
    with _side_lock:
        if _side is None:
            # Thousands of held calls make the heap large and long-lived, like a gateway's
            # sockets: full collections of it would stall the loop (ops/collector.py).
            tune_for_long_lived_connections(conf().gc_young_threshold)
            engine = runtime()
            engine.add_service(report_pauses_every)
            store = AsyncRunStore(async_client())
            inflight = InFlight(store)
            engine.add_service(inflight.keep_leases)
            engine.add_service(lambda: inflight.listen(pubsub_client()))
            _side = WorkerSide(engine, store, inflight, AsyncFairQueue(store.client))
            engine.start()
        return _side


def run_step(run_id: str, step: int, retries: int) -> bool:
    """Start `step` of a run on the runtime; returns once it is claimed (True) or found to
    have nothing to do (False). A full or draining runtime gives the message back."""
    side = worker_side()

    async def call(admit: Admit) -> StepOutcome:
        return await execute_step(side.store, side.inflight, run_id, step, retries, admit)

    return bool(_submit(side, call))


def run_next() -> bool:
    """A fair-queue ticket: start the first step of whichever queued run is fairly next.
    The pick happens once a slot is free, so a picked run never waits for this worker."""
    side = worker_side()

    async def call(admit: Admit) -> StepOutcome:
        picked = await durably(
            lambda: side.fair.pick(side.store.lease_s), time.time() + CLAIM_RETRY_S
        )
        if picked.run_id is None:
            # A spare ticket (a requeued or restored message): its run was started by another.
            logger.info("ticket found no queued run skipped=%s", picked.skipped)
            admit(False)
            return StepOutcome()
        return await execute_step(side.store, side.inflight, picked.run_id, 0, 0, admit)

    return bool(_submit(side, call))


def _submit(side: WorkerSide, call: object) -> object:
    try:
        return side.runtime.submit(call, wait_s=SLOT_WAIT_S)  # type: ignore[arg-type]
    except RuntimeClosed:
        # Back to the broker for another worker (or this one, restarted).
        raise Reject("model-call runtime full or draining", requeue=True) from None


def begin_drain() -> None:
    """The worker is shutting down: take no new steps (Celery stops fetching too)."""
    if _side is not None:
        _side.runtime.begin_drain()


def drain() -> None:
    """Let the steps in flight finish within WORKER_DRAIN_S, then hand the rest to other
    workers at once (each gives its run back to the queue, HAND_OVER) and stop the loop."""
    side = _side
    if side is None:
        return
    bound = conf().worker_drain_s

    async def hand_over() -> int:
        return side.inflight.stop_all(DRAIN)

    left = side.runtime.drain(bound, hand_over)
    logger.info("model-call runtime drained; handed over=%s", left)
    try:
        side.runtime.call_soon(close_backends).result(timeout=5)
    except Exception:
        logger.warning("model backends did not close cleanly", exc_info=True)
    side.runtime.stop()
