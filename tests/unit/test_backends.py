"""Model backends (workers/backends.py): even splitting, the simulated model (an async
stream, bounded and stopped by the runtime through asyncio timeouts and cancellation), and
blocking backends read through the runtime's thread pool."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from workers.backends import (
    ModelError,
    ModelRequest,
    SimulatedBackend,
    blocking_stream,
    get_backend,
    open_stream,
    register_backend,
    split_evenly,
)

FAR = float("inf")  # a deadline that never passes


@pytest.mark.parametrize(
    ("text", "pieces", "expected"),
    [
        ("abcdef", 3, ["ab", "cd", "ef"]),
        ("abcdefg", 3, ["abc", "de", "fg"]),
        ("abc", 1, ["abc"]),
        ("abc", 5, ["a", "b", "c"]),
        ("abc", 0, ["abc"]),
        ("abc", -2, ["abc"]),
        ("", 4, [""]),
        ("😀é中", 2, ["😀é", "中"]),
    ],
)
def test_split_evenly_examples(text: str, pieces: int, expected: list[str]) -> None:
    assert split_evenly(text, pieces) == expected


@pytest.mark.parametrize("seed", range(30))
def test_split_evenly_properties(seed: int) -> None:
    rng = random.Random(seed)
    text = "".join(rng.choice('ab "\\\né😀中') for _ in range(rng.randint(1, 300)))
    pieces = rng.randint(-1, 400)
    parts = split_evenly(text, pieces)
    assert "".join(parts) == text  # contiguous and complete
    assert all(parts)  # never an empty piece for non-empty text
    assert len(parts) == max(1, min(pieces, len(text)))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1  # evenly
    assert [len(part) for part in parts] == sorted((len(part) for part in parts), reverse=True)


def collect(options: dict[str, object], attempt: int = 1, within_s: float = 60.0) -> list[str]:
    """The simulated call's pieces, under a runtime-style time bound."""
    request = ModelRequest(model="echo", prompt="hello there", options=options, attempt=attempt)

    async def main() -> list[str]:
        async with asyncio.timeout(within_s):
            return [piece async for piece in SimulatedBackend().astream(request)]

    return asyncio.run(main())


def test_simulated_backend_echoes_in_four_pieces_by_default() -> None:
    pieces = collect({})
    assert "".join(pieces) == "hello there"
    assert len(pieces) == 4


@pytest.mark.parametrize(
    ("chunks", "count"),
    [(1, 1), (3, 3), (11, 11), (50, 11), (0, 1), (-5, 1), (2.9, 2), (True, 4), ("3", 4), (None, 4)],
)
def test_simulated_backend_chunks_option(chunks: object, count: int) -> None:
    pieces = collect({"chunks": chunks})
    assert "".join(pieces) == "hello there"
    assert len(pieces) == count


def test_simulated_backend_fail_error_is_transient_on_every_attempt() -> None:
    for attempt in (1, 2, 5):
        with pytest.raises(ModelError) as caught:
            collect({"fail": "error"}, attempt=attempt)
        assert caught.value.transient


def test_simulated_backend_fail_error_once_recovers_on_the_second_attempt() -> None:
    with pytest.raises(ModelError) as caught:
        collect({"fail": "error_once"}, attempt=1)
    assert caught.value.transient
    assert "".join(collect({"fail": "error_once"}, attempt=2)) == "hello there"


def test_simulated_backend_unknown_fail_mode_is_ignored() -> None:
    assert "".join(collect({"fail": "sometimes"})) == "hello there"


def test_fail_timeout_stalls_until_the_runtimes_time_bound() -> None:
    # The backend never answers; the step's asyncio timeout ends it (the step reads that
    # as ModelTimeout).
    with pytest.raises(TimeoutError):
        collect({"fail": "timeout"}, within_s=0.05)


def test_latency_past_the_time_bound_is_not_waited_out() -> None:
    # Ten minutes of latency against a bound of 50 ms (pytest-timeout would stop a backend
    # that slept the latency out).
    with pytest.raises(TimeoutError):
        collect({"latency_ms": 600_000}, within_s=0.05)


def test_latency_within_the_time_bound_answers() -> None:
    assert "".join(collect({"latency_ms": 1})) == "hello there"


def test_backend_registry() -> None:
    assert isinstance(get_backend("simulated"), SimulatedBackend)
    with pytest.raises(KeyError):
        get_backend("no-such-backend")
    with pytest.raises(TypeError):
        register_backend(object())  # type: ignore[arg-type]


def test_chunk_delay_spaces_the_pieces() -> None:
    request = ModelRequest(
        model="echo", prompt="hello there", options={"chunks": 3, "chunk_delay_ms": 40}
    )

    async def main() -> list[tuple[float, str]]:
        start = time.monotonic()
        return [
            (time.monotonic() - start, piece) async for piece in SimulatedBackend().astream(request)
        ]

    arrivals = asyncio.run(main())
    assert "".join(piece for _, piece in arrivals) == "hello there"
    assert arrivals[0][0] < 0.04  # no delay before the first piece
    assert arrivals[1][0] >= 0.04
    assert arrivals[2][0] >= 0.08


@pytest.mark.parametrize("delay", [0, -5, "100", None, True])
def test_chunk_delay_ignores_nonsense_values(delay: object) -> None:
    # A nonsense delay is no delay: done well within a bound far below any real spacing.
    assert "".join(collect({"chunks": 5, "chunk_delay_ms": delay}, within_s=0.5)) == "hello there"


def test_chunk_delay_past_the_time_bound_ends_after_the_pieces_in_time() -> None:
    # Ten minutes between pieces against a bound of 50 ms: the first piece arrives, the
    # wait for the second is cut off by the bound instead of being slept out.
    request = ModelRequest(
        model="echo", prompt="hello there", options={"chunks": 3, "chunk_delay_ms": 600_000}
    )
    received: list[str] = []

    async def main() -> None:
        async with asyncio.timeout(0.05):
            async for piece in SimulatedBackend().astream(request):
                received.append(piece)

    with pytest.raises(TimeoutError):
        asyncio.run(main())
    assert received == ["hell"]


@pytest.mark.parametrize(
    "options",
    [
        {"latency_ms": 600_000},
        {"fail": "timeout"},
        {"chunks": 2, "chunk_delay_ms": 600_000},
    ],
)
def test_a_cancelled_call_stops_waiting_at_once(options: dict[str, object]) -> None:
    # Ten minutes of waiting with no time bound: only the cancellation (a stop) can end it.
    request = ModelRequest(model="echo", prompt="hello there", options=options)
    received: list[str] = []

    async def main() -> None:
        async def call() -> None:
            async for piece in SimulatedBackend().astream(request):
                received.append(piece)

        task = asyncio.create_task(call())
        await asyncio.sleep(0.02)  # let it reach its wait
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert received == ([] if "latency_ms" in options or "fail" in options else ["hello "])


def test_requests_compare_without_their_cancellation_event() -> None:
    assert ModelRequest(model="m", prompt="p") == ModelRequest(model="m", prompt="p")
    assert ModelRequest(model="m", prompt="p").cancelled is not (
        ModelRequest(model="m", prompt="p").cancelled
    )


class BlockingEcho:
    """A backend of the earlier, blocking interface: one word at a time, waiting on the
    request's cancellation between words as such a backend must; or a failure."""

    name = "blocking-echo"

    def __init__(self, gap_s: float = 0.0, fail_after: int | None = None) -> None:
        self.gap_s = gap_s
        self.fail_after = fail_after
        self.finished = threading.Event()
        self.thread: str = ""

    def stream(self, request: ModelRequest, deadline: float) -> Iterator[str]:
        self.thread = threading.current_thread().name
        try:
            for index, word in enumerate(request.prompt.split(" ")):
                if index == self.fail_after:
                    raise ModelError("provider went away", transient=True)
                if index and request.cancelled.wait(self.gap_s):
                    return
                yield word if index == 0 else " " + word
        finally:
            self.finished.set()


def read_all(pieces: AsyncIterator[str]) -> list[str]:
    async def main() -> list[str]:
        return [piece async for piece in pieces]

    return asyncio.run(main())


def test_a_blocking_backend_streams_through_a_thread_off_the_loop() -> None:
    backend = BlockingEcho()
    request = ModelRequest(model="m", prompt="one two three")

    async def main() -> tuple[list[str], str]:
        pieces = open_stream(backend, request, time.monotonic() + 60)
        return [piece async for piece in pieces], threading.current_thread().name

    pieces, loop_thread = asyncio.run(main())
    assert pieces == ["one", " two", " three"]
    assert backend.thread and backend.thread != loop_thread


def test_a_blocking_backends_error_is_raised_in_the_loop() -> None:
    backend = BlockingEcho(fail_after=1)
    request = ModelRequest(model="m", prompt="one two three")
    received: list[str] = []

    async def main() -> None:
        async for piece in blocking_stream(backend, request, FAR):
            received.append(piece)

    with pytest.raises(ModelError) as caught:
        asyncio.run(main())
    assert caught.value.transient
    assert received == ["one"]


def test_leaving_a_blocking_stream_early_cancels_its_call() -> None:
    # Ten minutes between words: only request.cancelled, set when the reader leaves (a
    # stop, a timeout), lets the backend's thread finish.
    backend = BlockingEcho(gap_s=600)
    request = ModelRequest(model="m", prompt="one two three")

    async def main() -> list[str]:
        received: list[str] = []
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                async for piece in blocking_stream(backend, request, FAR):
                    received.append(piece)
        return received

    assert asyncio.run(main()) == ["one"]
    assert request.cancelled.is_set()
    assert backend.finished.wait(5)


def test_open_stream_takes_the_async_interface_when_there_is_one() -> None:
    request = ModelRequest(model="m", prompt="hello there", options={"chunks": 2})
    pieces: Any = open_stream(SimulatedBackend(), request, FAR)
    assert read_all(pieces) == ["hello ", "there"]
