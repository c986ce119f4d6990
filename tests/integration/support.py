"""Helpers the integration tests share: collecting events and checking replies."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from client.connection import Event, SwitchboardClient, reply_problems, since_last_restart


async def collect_until(
    client: SwitchboardClient,
    stream: str,
    predicate: Callable[[Event], bool],
    timeout: float = 15.0,
) -> list[Event]:
    """Take the stream's events up to and including the first that matches."""
    events: list[Event] = []
    async with asyncio.timeout(timeout):
        while True:
            event = await client.next_event(stream, timeout=timeout)
            events.append(event)
            if predicate(event):
                return events


def is_done_of(message_id: str) -> Callable[[Event], bool]:
    def match(event: Event) -> bool:
        return event["kind"] == "reply.done" and event["cause"]["message"] == message_id

    return match


async def collect_run(
    client: SwitchboardClient, stream: str, message_id: str, timeout: float = 15.0
) -> list[Event]:
    """The stream's events until the reply.done of the send with `message_id`."""
    return await collect_until(client, stream, is_done_of(message_id), timeout)


async def take(
    client: SwitchboardClient, stream: str, count: int, timeout: float = 10.0
) -> list[Event]:
    return [await client.next_event(stream, timeout) for _ in range(count)]


def assert_contiguous(events: list[Event]) -> None:
    """Each seq once, in order, no gap."""
    seqs = [event["seq"] for event in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs


def reply_text(deltas: list[Event], done: Event) -> str:
    """Check a run's deltas (since its last `reply.restart`) against its reply.done and
    return the text they make."""
    run = done["data"]["run"]
    offset = 0
    for delta in deltas:
        assert delta["kind"] == "reply.delta"
        assert delta["data"]["run"] == run
        assert delta["data"]["offset"] == offset, "delta offsets must be contiguous"
        offset += len(delta["data"]["text"])
    text = "".join(delta["data"]["text"] for delta in deltas)
    assert done["data"]["text"] == text, "reply.done text must equal the deltas' concatenation"
    return text


def split_run(events: list[Event], message_id: str) -> tuple[list[Event], Event]:
    """(deltas, done) of one run among a stream's events; the deltas are those after the
    run's last `reply.restart`, if it had any (each restart is checked to start again at
    offset 0)."""
    mine = [e for e in events if e["cause"]["message"] == message_id]
    assert not reply_problems([e for e in mine if e["kind"] != "reply.done"])
    deltas = since_last_restart(mine)
    dones = [e for e in mine if e["kind"] == "reply.done"]
    assert len(dones) == 1, dones
    return deltas, dones[0]


def restarts(events: list[Event], message_id: str) -> list[Event]:
    """The `reply.restart` events of one run among a stream's events."""
    return [
        e for e in events if e["cause"]["message"] == message_id and e["kind"] == "reply.restart"
    ]


def ts(event: Event) -> datetime:
    return datetime.fromisoformat(event["ts"].replace("Z", "+00:00"))


async def wait_until(
    check: Callable[[], Awaitable[Any]], timeout: float, what: str, interval: float = 0.05
) -> Any:
    """Poll an async condition until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def dones_by_message(events: list[Event]) -> dict[str, list[Event]]:
    found: dict[str, list[Event]] = {}
    for event in events:
        if event["kind"] == "reply.done":
            found.setdefault(event["cause"]["message"], []).append(event)
    return found


async def collect_all_done(
    client: SwitchboardClient, stream: str, ids: list[str], timeout: float
) -> list[Event]:
    """The stream's events until every send in `ids` has had a reply.done."""
    events: list[Event] = []
    waiting = set(ids)
    async with asyncio.timeout(timeout):
        while waiting:
            event = await client.next_event(stream, timeout=timeout)
            events.append(event)
            if event["kind"] == "reply.done":
                waiting.discard(event["cause"]["message"])
    return events
