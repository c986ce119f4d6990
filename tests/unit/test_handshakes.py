"""The handshake line (realtime/handshakes.py): turns, a bounded wait, nothing lost."""

from __future__ import annotations

import asyncio

import pytest

from realtime.handshakes import HandshakeLine, LineFull

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
