"""The garbage collector, tuned for a process that holds thousands of long-lived sockets.

Idle, a gateway allocates in bursts that die at once: daphne walks every connection each
second (a list of one tuple per socket) and pings each every 20 s. With Python's young
threshold of 700, a collection runs in the middle of every such burst, finds the burst
alive and promotes it; the promoted garbage soon triggers a full collection, which walks
every object of every socket (about a second of CPU at 15,000 sockets, measured). With a
young threshold above a burst's size, young collections are rare and find the bursts
already gone, so almost nothing is promoted and full collections become rare.

Objects made before the first socket (modules, settings, Django) live as long as the
process: they are frozen out of every later collection.

Each collection stops every connection of the process while it runs, so its length is
measured (`PauseLog`, fed by the collector's own callback) and reported each second as
`switchboard_gc_pause_seconds`. The callback only appends to a bounded deque: it runs
wherever an allocation triggers a collection, maybe while prometheus_client holds its
non-reentrant lock, so the metric is written later, by the process's own once-a-second
work (`report_pauses`).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ops import metrics

logger = logging.getLogger(__name__)

_tuned = False
_pauses: PauseLog | None = None

# Pauses kept between two reports: a second holds a few collections at most; past this
# the oldest are dropped (a report is then short, never a process's memory long).
PAUSES_KEPT = 1024


class PauseLog:
    """The collector's pauses since they were last taken, as (generation, seconds)."""

    def __init__(
        self, clock: Callable[[], float] = time.perf_counter, capacity: int = PAUSES_KEPT
    ) -> None:
        self._clock = clock
        self._started = 0.0
        self._pauses: deque[tuple[int, float]] = deque(maxlen=capacity)

    def on_collection(self, phase: str, info: dict[str, Any]) -> None:
        """gc.callbacks' signature: "start" before a collection, "stop" after it."""
        if phase == "start":
            self._started = self._clock()
        else:
            self._pauses.append((info["generation"], self._clock() - self._started))

    def take(self) -> list[tuple[int, float]]:
        taken = []
        while self._pauses:
            taken.append(self._pauses.popleft())
        return taken


def watch_pauses() -> None:
    """Measure every collection of this process from now on (once per process)."""
    global _pauses
    if _pauses is None:
        _pauses = PauseLog()
        gc.callbacks.append(_pauses.on_collection)


def report_pauses() -> None:
    """Hand the pauses measured since the last report to the metric."""
    if _pauses is not None:
        for generation, seconds in _pauses.take():
            metrics.gc_paused(generation, seconds)


async def report_pauses_every(interval_s: float = 1.0) -> None:
    """report_pauses, for as long as the loop runs (a worker's model-call runtime)."""
    while True:
        await asyncio.sleep(interval_s)
        report_pauses()


def tune_for_long_lived_connections(young_threshold: int) -> bool:
    """Apply once per process (the gateway's first socket); False when already done or
    turned off (`young_threshold` 0). The pauses are measured from here on either way,
    the whole-heap collection before the freeze included."""
    global _tuned
    watch_pauses()
    if _tuned or young_threshold <= 0:
        return False
    _tuned = True
    _, middle, old = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(young_threshold, middle, old)
    logger.info(
        "garbage collector tuned: young threshold %s, %s objects frozen",
        young_threshold,
        gc.get_freeze_count(),
    )
    return True
