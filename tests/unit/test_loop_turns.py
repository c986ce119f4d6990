"""realtime/daphne_tuning.time_turns: the long turns of a real asyncio event loop, timed."""

from __future__ import annotations

import asyncio
import selectors
import time

from realtime.daphne_tuning import LONG_TURN_S, time_turns


def test_a_turn_that_holds_the_loop_is_observed_by_its_length() -> None:
    selector = selectors.DefaultSelector()
    loop = asyncio.SelectorEventLoop(selector)
    observed: list[float] = []
    time_turns(selector, observed.append)

    def hold_the_loop() -> None:
        # A callback that keeps the loop from its next turn, as a thousand handshakes do.
        time.sleep(0.06)

    async def night() -> None:
        for _ in range(20):  # short turns: none observed
            await asyncio.sleep(0)
        asyncio.get_running_loop().call_soon(hold_the_loop)
        await asyncio.sleep(0.01)

    try:
        loop.run_until_complete(night())
    finally:
        loop.close()
    assert len(observed) == 1, observed
    assert 0.06 <= observed[0] < 5


def test_turns_shorter_than_the_threshold_and_the_wait_between_are_not_turns() -> None:
    """Time spent waiting in the selector (an idle loop) is not counted as a turn."""
    selector = selectors.DefaultSelector()
    loop = asyncio.SelectorEventLoop(selector)
    observed: list[float] = []
    time_turns(selector, observed.append)
    try:
        loop.run_until_complete(asyncio.sleep(LONG_TURN_S * 5))
    finally:
        loop.close()
    assert observed == []
