"""Which reply events a client library files under one of its own sends."""

from __future__ import annotations

from typing import Any

import pytest

from realtime.client import answers_own_send


def reply(cause: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "reply.delta", "cause": cause, "data": {"run": "r1"}}


@pytest.mark.parametrize(
    ("cause", "client", "own"),
    [
        ({"client": "alice", "message": "m1", "prev": "e1"}, "alice", True),
        ({"client": "bob", "message": "m1", "prev": "e1"}, "alice", False),
        # A summariser reacting to alice's reply keeps her client and message id in its
        # cause, but it is not the reply to her send.
        (
            {"client": "alice", "message": "m1", "prev": "e2", "depth": 1, "chain": ["e1", "e2"]},
            "alice",
            False,
        ),
    ],
)
def test_answers_own_send(cause: dict[str, Any], client: str, own: bool) -> None:
    assert answers_own_send(reply(cause), client) is own
