"""Model backends (workers/backends.py): even splitting and the simulated model."""

from __future__ import annotations

import random
import threading
import time

import pytest

from workers.backends import (
    ModelCancelled,
    ModelError,
    ModelRequest,
    ModelTimeout,
    SimulatedBackend,
    get_backend,
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


def collect(options: dict[str, object], attempt: int = 1, deadline: float = FAR) -> list[str]:
    request = ModelRequest(model="echo", prompt="hello there", options=options, attempt=attempt)
    return list(SimulatedBackend().stream(request, deadline))


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


def test_fail_timeout_stalls_until_the_deadline_then_times_out() -> None:
    with pytest.raises(ModelTimeout) as caught:
        collect({"fail": "timeout"}, deadline=time.monotonic() + 0.05)
    assert not caught.value.transient
    assert isinstance(caught.value, ModelError)


def test_latency_past_the_deadline_times_out_without_waiting_it_out() -> None:
    # Ten minutes of latency against a deadline already passed: the backend must give up
    # at the deadline (pytest-timeout would stop a backend that slept the latency out).
    with pytest.raises(ModelTimeout):
        collect({"latency_ms": 600_000}, deadline=time.monotonic() - 1)


def test_latency_within_the_deadline_answers() -> None:
    assert "".join(collect({"latency_ms": 1}, deadline=time.monotonic() + 60)) == "hello there"


def test_backend_registry() -> None:
    assert isinstance(get_backend("simulated"), SimulatedBackend)
    with pytest.raises(KeyError):
        get_backend("no-such-backend")


def test_chunk_delay_spaces_the_pieces() -> None:
    request = ModelRequest(
        model="echo", prompt="hello there", options={"chunks": 3, "chunk_delay_ms": 40}
    )
    arrivals = []
    start = time.monotonic()
    for piece in SimulatedBackend().stream(request, FAR):
        arrivals.append((time.monotonic() - start, piece))
    assert "".join(piece for _, piece in arrivals) == "hello there"
    assert arrivals[0][0] < 0.04  # no delay before the first piece
    assert arrivals[1][0] >= 0.04
    assert arrivals[2][0] >= 0.08


@pytest.mark.parametrize("delay", [0, -5, "100", None, True])
def test_chunk_delay_ignores_nonsense_values(delay: object) -> None:
    started = time.monotonic()
    assert "".join(collect({"chunks": 5, "chunk_delay_ms": delay})) == "hello there"
    assert time.monotonic() - started < 0.5


def test_chunk_delay_past_the_deadline_times_out_after_the_pieces_in_time() -> None:
    # Ten minutes between pieces against a deadline in 50 ms: the first piece arrives, the
    # second wait hits the deadline and gives up there instead of sleeping it out.
    request = ModelRequest(
        model="echo", prompt="hello there", options={"chunks": 3, "chunk_delay_ms": 600_000}
    )
    stream = SimulatedBackend().stream(request, time.monotonic() + 0.05)
    assert next(stream) == "hell"
    started = time.monotonic()
    with pytest.raises(ModelTimeout):
        next(stream)
    assert time.monotonic() - started < 5


def cancelled_request(options: dict[str, object]) -> ModelRequest:
    request = ModelRequest(model="echo", prompt="hello there", options=options)
    request.cancelled.set()
    return request


@pytest.mark.parametrize(
    "options",
    [
        {"latency_ms": 600_000},
        {"fail": "timeout"},
        {"chunks": 2, "chunk_delay_ms": 600_000},
    ],
)
def test_a_cancelled_call_stops_waiting_at_once(options: dict[str, object]) -> None:
    # Ten minutes of waiting against a far deadline: only the cancellation can end it
    # (pytest-timeout would stop a backend that slept it out).
    with pytest.raises(ModelCancelled) as caught:
        list(SimulatedBackend().stream(cancelled_request(options), FAR))
    assert not caught.value.transient


def test_a_call_cancelled_from_another_thread_mid_wait_returns() -> None:
    request = ModelRequest(model="echo", prompt="hello there", options={"latency_ms": 600_000})
    canceller = threading.Thread(target=request.cancelled.set)
    canceller.start()
    with pytest.raises(ModelCancelled):
        list(SimulatedBackend().stream(request, FAR))
    canceller.join()


def test_a_call_cancelled_between_pieces_yields_no_more() -> None:
    request = ModelRequest(
        model="echo", prompt="hello there", options={"chunks": 3, "chunk_delay_ms": 600_000}
    )
    stream = SimulatedBackend().stream(request, FAR)
    first = next(stream)
    request.cancelled.set()
    with pytest.raises(ModelCancelled):
        next(stream)
    assert first == split_evenly("hello there", 3)[0]


def test_requests_compare_without_their_cancellation_event() -> None:
    assert ModelRequest(model="m", prompt="p") == ModelRequest(model="m", prompt="p")
    assert ModelRequest(model="m", prompt="p").cancelled is not (
        ModelRequest(model="m", prompt="p").cancelled
    )
