"""How fast a gateway process takes new connections from its listening socket.

A reconnect storm arrives at once: the sockets one network blip cut come back within a
second. Each new connection costs the process's one event loop its HTTP upgrade, the
WebSocket handshake and the token check before the handshake line (realtime/handshakes.py)
even sees it. Taken as fast as the kernel hands them over, a storm's connections hold the
CPU for seconds, and every event for the connections already open waits behind them; where
processes share cores, every other process's events wait too. Taken at a bounded rate,
the same work is spread out with room left for delivery in between, and the connections
not yet taken wait in the kernel's accept queue (the listen backlog), which costs the
process nothing. Past the backlog the kernel drops the SYN and TCP sends it again.

Pure logic: a token bucket on the process's monotonic clock; the listening port asks it
(realtime/daphne_tuning.pace_accepts).
"""

from __future__ import annotations

# Refills are sums of float products: 0.2 s at 10 a second must be 2 tokens, not 1.999.
_ROUNDING = 1e-9


class AcceptPace:
    """Up to `burst` accepts at once, refilled at `rate_per_s`; a rate of 0 never limits."""

    def __init__(self, rate_per_s: float, burst: int, now: float) -> None:
        self.rate_per_s = max(0.0, rate_per_s)
        self.burst = max(1, burst)
        self._tokens = float(self.burst)
        self._at = now

    @property
    def limited(self) -> bool:
        return self.rate_per_s > 0

    def allowance(self, now: float) -> int:
        """How many connections may be accepted now."""
        if not self.limited:
            return self.burst
        self._refill(now)
        return int(self._tokens + _ROUNDING)

    def took(self, count: int, now: float) -> None:
        if not self.limited or count <= 0:
            return
        self._refill(now)
        self._tokens = max(0.0, self._tokens - count)

    def wait_s(self, now: float) -> float:
        """Seconds until one more connection may be accepted (0: one may be now)."""
        if not self.limited:
            return 0.0
        self._refill(now)
        return max(0.0, (1.0 - _ROUNDING - self._tokens) / self.rate_per_s)

    def _refill(self, now: float) -> None:
        if now > self._at:
            self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate_per_s)
        self._at = max(self._at, now)
