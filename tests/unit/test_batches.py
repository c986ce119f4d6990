"""streams/batches.py: a lone request goes at once, a burst shares a batch, errors reach
their own callers, and a caller that stops waiting takes nothing with it."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from streams import batches
from streams.batches import Batches

pytestmark = pytest.mark.asyncio


class Recorder:
    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()
        self.release.set()

    async def send(self, items: list[int]) -> Sequence[int | BaseException]:
        self.batches.append(items)
        await self.release.wait()
        return [ValueError(item) if item < 0 else item * 10 for item in items]


async def test_a_lone_request_goes_at_once_and_a_burst_shares_the_next_batch() -> None:
    recorder = Recorder()
    queue: Batches[int, int] = Batches(recorder.send)
    recorder.release.clear()
    first = queue.submit(1)
    await asyncio.sleep(0)
    assert recorder.batches == [[1]]  # sent alone, nothing waited for a timer
    burst = [queue.submit(n) for n in (2, 3, 4)]  # arrive while the first is in flight
    recorder.release.set()
    assert await first == 10
    assert await asyncio.gather(*burst) == [20, 30, 40]
    assert recorder.batches == [[1], [2, 3, 4]]


async def test_each_caller_gets_its_own_error_and_a_failed_send_fails_its_batch() -> None:
    recorder = Recorder()
    queue: Batches[int, int] = Batches(recorder.send)
    good, bad = queue.submit(5), queue.submit(-1)
    assert await good == 50
    with pytest.raises(ValueError):
        await bad

    async def broken(items: list[int]) -> Sequence[int]:
        raise ConnectionError("Redis away")

    failing: Batches[int, int] = Batches(broken)
    futures = [failing.submit(n) for n in range(3)]
    for future in futures:
        with pytest.raises(ConnectionError):
            await future
    assert (await queue.submit(7)) == 70  # the queue goes on after a failure


async def test_a_caller_that_gives_up_leaves_the_others_answered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(batches, "MAX_BATCH", 2)
    recorder = Recorder()
    queue: Batches[int, int] = Batches(recorder.send)
    recorder.release.clear()
    futures = [queue.submit(n) for n in range(5)]
    futures[1].cancel()
    recorder.release.set()
    assert await futures[0] == 0 and await futures[4] == 40
    assert [await f for f in futures[2:4]] == [20, 30]
    assert recorder.batches == [[0, 1], [2, 3], [4]]  # never more than MAX_BATCH
