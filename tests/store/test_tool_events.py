"""Tool events on a real Redis: tool.call/tool.result go through the run's fenced writes
(APPEND_TOOL_EVENT), a retried or redelivered step voids its earlier tool events with
reply.restart (naming the step), and reply.done names the tools that ran."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable

import pytest
import redis

from agents import Agent, Step
from streams import keys
from streams.runs import Fenced, RunFinished, RunStore, StaleOffset
from tests.store.conftest import Streams, execute_step, log_events, of_kind
from workers import backends
from workers.backends import ModelError, ModelRequest, ToolCall


def started(streams: Streams, agent: str) -> str:
    appended = streams.send("room", "m-1", "what is alpha?", agent=agent)
    assert appended.run_id is not None
    return appended.run_id


def test_tool_events_are_written_by_the_owner_once_each(
    streams: Streams, runs: RunStore, r: redis.Redis
) -> None:
    run_id = started(streams, "echo")
    first = runs.claim(run_id, 0)
    second = runs.claim(run_id, 0)
    assert first is not None and second is not None
    data = {"run": run_id, "call": "c1", "name": "lookup", "step": 0, "arguments": {}}
    with pytest.raises(Fenced):
        runs.append_tool_event(first, "tool.call", data)
    runs.append_tool_event(second, "tool.call", data)
    # The same write again (its answer lost, say) is refused, not made twice.
    with pytest.raises(StaleOffset) as stale:
        runs.append_tool_event(dataclasses.replace(second, tool_events=0), "tool.call", data)
    assert stale.value.stored == 1
    result = {**data, "ok": True, "text": "value"}
    del result["arguments"]
    runs.append_tool_event(second, "tool.result", result, ["lookup"])
    [call] = of_kind(log_events(r, "room"), "tool.call")
    [answer] = of_kind(log_events(r, "room"), "tool.result")
    assert call["data"] == data and answer["data"] == result
    assert call["from"] == "agent:echo" and call["cause"]["message"] == "m-1"
    assert answer["seq"] == call["seq"] + 1
    # The text of the reply is untouched; the run remembers what ran.
    assert r.hget(keys.run(run_id), "emitted") in (None, b"0")
    again = runs.claim(run_id, 0)
    assert again is not None
    assert (again.tool_events, again.tool_step, again.tools_ran) == (2, 0, ["lookup"])
    assert runs.finalize(run_id, "ok", owner=again.owner, run=again)
    with pytest.raises(RunFinished):
        runs.append_tool_event(again, "tool.call", data)


class ToolsBackend:
    """Asks for `lookup` until a round's result is fed back, then answers with it. The
    first attempt fails after its call when `fail_once`."""

    name = "tools-test"

    def __init__(self, fail_once: bool = False) -> None:
        self.fail_once = fail_once
        self.requests: list[ModelRequest] = []

    def astream(self, request: ModelRequest) -> AsyncIterator[str]:
        raise AssertionError("a step with tools reads astream_events")

    async def astream_events(self, request: ModelRequest) -> AsyncIterator[str | ToolCall]:
        self.requests.append(request)
        if request.rounds:
            if self.fail_once and request.attempt == 1:
                raise ModelError("connection reset", transient=True)
            yield "answer:" + request.rounds[-1].results[0].content
            return
        yield "Looking. "
        yield ToolCall("call_1", "lookup", '{"key": "alpha"}')


def lookup(key: str) -> str:
    """Look a key up."""
    return f"value-of-{key}"


@pytest.fixture
def tools_agent(
    monkeypatch: pytest.MonkeyPatch, register_agent: Callable[..., Agent]
) -> Callable[[bool], ToolsBackend]:
    def make(fail_once: bool) -> ToolsBackend:
        backend = ToolsBackend(fail_once)
        monkeypatch.setitem(backends._backends, backend.name, backend)
        register_agent("tooled", Step(backend=backend.name, tools=(lookup,), max_retries=2))
        return backend

    return make


def test_a_tool_round_trip_through_the_step(
    streams: Streams, runs: RunStore, r: redis.Redis, tools_agent: Callable[[bool], ToolsBackend]
) -> None:
    backend = tools_agent(False)
    run_id = started(streams, "tooled")
    execute_step(runs, run_id, 0)
    events = [e for e in log_events(r, "room") if e["kind"] != "message"]
    kinds = [e["kind"] for e in events]
    assert kinds == ["reply.delta", "tool.call", "tool.result", "reply.delta", "reply.done"]
    assert events[2]["data"]["text"] == "value-of-alpha"
    assert events[-1]["data"]["text"] == "Looking. answer:value-of-alpha"
    detail = dict(events[-1]["data"]["detail"])
    # Each turn is a call of its own and counts (the test backend reports none: estimated,
    # a quarter of each turn's text rounded up).
    usage = detail.pop("usage")
    assert usage["estimated"] is True and usage["prompt_tokens"] > 0
    assert usage["completion_tokens"] == 3 + 6  # "Looking. ", "answer:value-of-alpha"
    assert detail == {"tools": ["lookup"]}
    assert [len(request.rounds) for request in backend.requests] == [0, 1]
    assert backend.requests[0].tools[0]["name"] == "lookup"


def test_a_retry_voids_the_earlier_attempts_tool_events_with_a_restart(
    streams: Streams, runs: RunStore, r: redis.Redis, tools_agent: Callable[[bool], ToolsBackend]
) -> None:
    tools_agent(True)
    run_id = started(streams, "tooled")
    execute_step(runs, run_id, 0)
    events = [e for e in log_events(r, "room") if e["kind"] != "message"]
    kinds = [e["kind"] for e in events]
    assert kinds == [
        "reply.delta",
        "tool.call",
        "tool.result",
        "reply.restart",
        "reply.delta",
        "tool.call",
        "tool.result",
        "reply.delta",
        "reply.done",
    ]
    restart = events[3]
    assert restart["data"]["reason"] == "retry" and restart["data"]["step"] == 0
    assert events[-1]["data"]["text"] == "Looking. answer:value-of-alpha"


def test_a_redelivered_step_that_showed_only_tool_events_restarts_too(
    streams: Streams, runs: RunStore, r: redis.Redis, tools_agent: Callable[[bool], ToolsBackend]
) -> None:
    tools_agent(False)
    run_id = started(streams, "tooled")
    lost = runs.claim(run_id, 0)
    assert lost is not None
    data = {"run": run_id, "call": "call_1", "name": "lookup", "step": 0, "arguments": {}}
    runs.append_tool_event(lost, "tool.call", data)
    execute_step(runs, run_id, 0)
    kinds = [e["kind"] for e in log_events(r, "room") if e["kind"] != "message"]
    assert kinds[:3] == ["tool.call", "reply.restart", "reply.delta"]
    assert kinds.count("tool.call") == 2 and kinds[-1] == "reply.done"
