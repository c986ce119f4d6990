"""A connection's outbound buffer: bounded in frames and in bytes, drained by one writer."""

from __future__ import annotations

from collections import deque


class OutboxFull(Exception):
    """The reader is too slow for its buffer: the connection is closed with 4008."""


class Outbox:
    __slots__ = ("max_frames", "max_bytes", "_frames", "_bytes")

    def __init__(self, max_frames: int, max_bytes: int) -> None:
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self._frames: deque[str] | None = None  # created on first use: idle sockets stay small
        self._bytes = 0

    def push(self, frame: str) -> None:
        frames = self._frames
        if frames is None:
            frames = self._frames = deque()
        size = len(frame)
        if len(frames) >= self.max_frames or self._bytes + size > self.max_bytes:
            raise OutboxFull(f"{len(frames)} frames, {self._bytes} bytes waiting")
        frames.append(frame)
        self._bytes += size

    def pop(self) -> str | None:
        frames = self._frames
        if not frames:
            return None
        frame = frames.popleft()
        self._bytes -= len(frame)
        return frame

    def frames(self) -> list[str]:
        """What is waiting, oldest first (a copy)."""
        return list(self._frames) if self._frames else []

    def __len__(self) -> int:
        return len(self._frames) if self._frames else 0

    @property
    def pending_bytes(self) -> int:
        return self._bytes
