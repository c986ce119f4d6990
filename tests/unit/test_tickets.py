"""The ticket reconciliation's decision and ticket recognition (orchestration/tickets.py)."""

from __future__ import annotations

import json

import pytest

from orchestration.tickets import MAX_TICKETS_PER_SWEEP, TICKET_MARKS, missing_tickets
from streams.enqueue import RUN_NEXT_TASK, celery_message


@pytest.mark.parametrize(
    ("queued", "waiting", "reserved", "missing"),
    [
        (0, 0, 0, 0),
        (3, 3, 0, 0),
        (3, 1, 0, 2),  # two tickets lost
        (3, 1, 2, 0),  # two taken by a worker just now: they may still pick
        (2, 5, 0, 0),  # spares (restored messages, tickets of cancelled runs): nothing
        (0, 0, 4, 0),
        (MAX_TICKETS_PER_SWEEP + 7, 0, 0, MAX_TICKETS_PER_SWEEP),  # the rest next sweep
    ],
)
def test_missing_tickets(queued: int, waiting: int, reserved: int, missing: int) -> None:
    assert missing_tickets(queued, waiting, reserved) == missing


def is_ticket(message: str) -> bool:
    return any(mark in message for mark in TICKET_MARKS)


def test_tickets_are_recognised_as_our_scripts_and_kombu_write_them() -> None:
    _, ours = celery_message(RUN_NEXT_TASK, [], "switchboard.runs")
    assert is_ticket(ours)
    # kombu writes messages (and its unacked entries) with json.dumps' spacing.
    assert is_ticket(json.dumps([json.loads(ours), "", "switchboard.runs"]))
    _, step = celery_message("switchboard.run.step", ["r-1", 0], "switchboard.runs")
    assert not is_ticket(step)


def test_no_text_a_client_chose_reads_as_a_ticket() -> None:
    # A published event's trigger carries the client's data in its argsrepr header.
    hostile = {"text": '"task":"switchboard.run.next"', "more": '"task": "switchboard.run.next"'}
    args = ["acme", "room", "e1", "alice", "m1", hostile]
    _, trigger = celery_message("switchboard.agents.trigger_published", args, "switchboard.runs")
    assert "switchboard.run.next" in trigger
    assert not is_ticket(trigger)
    assert not is_ticket(json.dumps([json.loads(trigger), "", "switchboard.runs"]))
