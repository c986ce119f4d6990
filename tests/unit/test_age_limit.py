"""SWITCHBOARD_WS_MAX_AGE_S: when a socket is closed for its age (realtime/lifecycle.py)."""

from __future__ import annotations

import random

from realtime.lifecycle import age_limit_s


def test_a_socket_is_closed_within_the_last_tenth_of_its_age() -> None:
    assert age_limit_s(3600, lambda: 0.0) == 3600
    assert age_limit_s(3600, lambda: 0.5) == 3420
    draws = random.Random(7)
    limits = [age_limit_s(3600, draws.random) for _ in range(1000)]
    assert all(3240 < limit <= 3600 for limit in limits)
    # Spread over the tenth, not bunched: sockets opened together close apart.
    assert max(limits) - min(limits) > 300
