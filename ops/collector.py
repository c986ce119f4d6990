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
"""

from __future__ import annotations

import gc
import logging

logger = logging.getLogger(__name__)

_tuned = False


def tune_for_long_lived_connections(young_threshold: int) -> bool:
    """Apply once per process (the gateway's first socket); False when already done or
    turned off (`young_threshold` 0)."""
    global _tuned
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
