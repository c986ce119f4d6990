"""The delta coalescing policy (orchestration/coalesce.py), on a fake clock."""

from __future__ import annotations

from orchestration.coalesce import Coalescer


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def coalescer(max_chars: int = 10, max_wait_s: float = 0.05) -> tuple[Coalescer, Clock]:
    clock = Clock()
    return Coalescer(max_chars, max_wait_s, clock=clock), clock


def test_the_first_piece_is_flushed_at_once() -> None:
    c, _ = coalescer()
    assert c.add("a") == "a"
    assert c.pending == 0


def test_later_pieces_are_buffered_until_the_size_limit() -> None:
    c, _ = coalescer(max_chars=10)
    c.add("first")
    assert [c.add(p) for p in ("abc", "def", "ghi")] == ["", "", ""]
    assert c.pending == 9
    assert c.add("j") == "abcdefghij"
    assert c.pending == 0
    assert c.add("k") == ""  # a new buffer, within the wait of the last flush


def test_one_piece_larger_than_the_limit_goes_out_whole() -> None:
    c, _ = coalescer(max_chars=4)
    c.add("x")
    assert c.add("a long piece") == "a long piece"


def test_a_piece_arriving_after_the_wait_flushes_the_buffer_with_it() -> None:
    c, clock = coalescer(max_chars=100, max_wait_s=0.05)
    c.add("a")
    clock.now += 0.01
    assert c.add("b") == ""
    clock.now += 0.039
    assert c.add("c") == ""
    clock.now += 0.001  # 50 ms after the last flush
    assert c.add("d") == "bcd"


def test_a_slow_model_is_not_delayed() -> None:
    c, clock = coalescer(max_chars=100, max_wait_s=0.05)
    for piece in ("a", "b", "c"):
        assert c.add(piece) == piece
        clock.now += 0.2


def test_flush_returns_what_is_left_once() -> None:
    c, _ = coalescer()
    assert c.flush() == ""
    c.add("a")
    c.add("b")
    c.add("c")
    assert c.flush() == "bc"
    assert c.flush() == ""


def test_discard_drops_the_buffer() -> None:
    c, _ = coalescer()
    c.add("a")
    c.add("bc")
    assert c.discard() == 2
    assert c.flush() == ""


def test_empty_pieces_are_ignored() -> None:
    c, _ = coalescer()
    assert c.add("") == ""
    assert c.add("a") == "a"  # still the first piece


def test_zero_chars_or_zero_wait_disables_coalescing() -> None:
    for c in (Coalescer(0, 0.05), Coalescer(64, 0)):
        assert not c.enabled
        assert [c.add(p) for p in ("a", "b", "c")] == ["a", "b", "c"]
        assert c.pending == 0


def test_concatenation_of_flushes_is_the_input() -> None:
    c, clock = coalescer(max_chars=7, max_wait_s=0.05)
    pieces = [f"p{i}" for i in range(100)]
    out = []
    for index, piece in enumerate(pieces):
        clock.now += 0.003 if index % 9 else 0.06
        if text := c.add(piece):
            out.append(text)
    out.append(c.flush())
    assert "".join(out) == "".join(pieces)
    assert len(out) < len(pieces) / 2
