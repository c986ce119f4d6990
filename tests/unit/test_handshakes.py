"""The handshake line (realtime/handshakes.py): turns, a bounded wait, nothing lost."""

from __future__ import annotations

import asyncio
import time

import pytest

from realtime.handshakes import BEHIND_S, HandshakeLine, LineFull, LoopLag

pytestmark = pytest.mark.asyncio


async def test_turns_are_taken_concurrency_at_a_time_in_arrival_order() -> None:
    line = HandshakeLine(concurrency=2, max_waiting=10)
    order: list[int] = []
    release = asyncio.Event()

    async def handshake(number: int) -> None:
        await line.enter()
        try:
            order.append(number)
            await release.wait()
        finally:
            line.leave()

    tasks = [asyncio.create_task(handshake(n)) for n in range(5)]
    for _ in range(5):
        await asyncio.sleep(0)
    assert order == [0, 1] and line.waiting == 3
    release.set()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4] and line.waiting == 0


async def test_a_full_line_turns_a_newcomer_away_at_once_and_takes_one_again_later() -> None:
    line = HandshakeLine(concurrency=1, max_waiting=1)
    await line.enter()  # the one turn, held
    waiter = asyncio.create_task(line.enter())
    await asyncio.sleep(0)
    assert line.waiting == 1
    with pytest.raises(LineFull):
        await line.enter()
    line.leave()
    await waiter  # the one waiting got the turn
    assert line.waiting == 0
    waiter_two = asyncio.create_task(line.enter())  # room in the line again
    await asyncio.sleep(0)
    assert line.waiting == 1
    line.leave()
    await waiter_two
    line.leave()


async def test_a_waiter_cancelled_leaves_the_line_and_takes_no_turn() -> None:
    line = HandshakeLine(concurrency=1, max_waiting=5)
    await line.enter()
    waiter = asyncio.create_task(line.enter())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert line.waiting == 0
    line.leave()
    await asyncio.wait_for(line.enter(), 1)  # the turn is free: nobody kept it
    line.leave()


async def test_no_waiting_when_a_turn_is_free() -> None:
    line = HandshakeLine(concurrency=3, max_waiting=0)
    for _ in range(3):
        await line.enter()  # max_waiting 0 refuses only those who would wait
    with pytest.raises(LineFull):
        await line.enter()


async def test_while_the_loop_is_behind_a_handshake_waits_unless_it_would_be_the_only_one() -> None:
    behind = True
    line = HandshakeLine(concurrency=4, max_waiting=10, behind=lambda: behind)
    await asyncio.wait_for(line.enter(), 1)  # alone: it goes on however late the loop is
    second = asyncio.create_task(line.enter())
    await asyncio.sleep(0.05)
    assert not second.done() and line.active == 1  # held back beside the first
    behind = False
    await asyncio.wait_for(second, 1)
    assert line.active == 2
    line.leave()
    line.leave()
    assert line.active == 0


async def test_a_handshake_held_back_and_cancelled_gives_its_turn_back() -> None:
    line = HandshakeLine(concurrency=1, max_waiting=10, behind=lambda: True)
    line.active = 1  # as if another handshake were going on
    held = asyncio.create_task(line.enter())
    await asyncio.sleep(0.03)
    held.cancel()
    with pytest.raises(asyncio.CancelledError):
        await held
    line.active = 0
    await asyncio.wait_for(line.enter(), 1)  # the one turn is free again
    line.leave()


async def test_loop_lag_sees_a_loop_kept_busy() -> None:
    lag = LoopLag()
    lag.behind()  # starts watching
    await asyncio.sleep(0.03)
    time.sleep(0.1)  # the loop blocked, as by a burst of work
    await asyncio.sleep(0.001)  # the watcher wakes first, late
    try:
        assert lag.late_s > BEHIND_S and lag.behind()
    finally:
        lag.stop()
