"""Tool calls over the real cluster: a gateway, a worker and the fake provider (its
"tools" kind, tests/fakes/openai_server.py) as separate processes, read by a WebSocket
client. Each test reads both sides: the tool.call/tool.result events and the reply the
client gets, and what the provider was sent back."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest

from client.connection import Event
from tests.fakes.openai_server import Call, FakeOpenAIServer, tool_results

from .agents_app import catalog as it
from .conftest import Connect
from .support import assert_contiguous, collect_run, split_run

pytestmark = pytest.mark.asyncio


def of_kind(events: list[Event], *kinds: str) -> list[Event]:
    return [event for event in events if event["kind"] in kinds]


def without_usage(detail: dict[str, Any]) -> dict[str, Any]:
    """reply.done's detail without the run's usage, which every tool turn adds to."""
    rest = dict(detail)
    assert rest.pop("usage")["total"] > 0
    return rest


async def run_agent(
    connect: Connect, unique: Callable[[str], str], agent: str
) -> tuple[list[Event], list[Event], Event]:
    """(every event of the run, its deltas, its reply.done) for one message to `agent`;
    the Python client's own assembly of the reply and its tool calls must agree."""
    client = await connect()
    stream = unique("tools")
    ack = await client.send(stream, agent, f"question {unique('q')}")
    events = await collect_run(client, stream, ack["id"])
    assert_contiguous(events)
    deltas, done = split_run(events, ack["id"])
    own_deltas, tools, own_done = await client.reply_with_tools(ack["id"], timeout=5)
    assert (own_deltas, own_done) == (deltas, done)
    results = {e["data"]["call"]: e["data"] for e in of_kind(events, "tool.result")}
    assert [t["call"] for t in tools] == [e["data"]["call"] for e in of_kind(events, "tool.call")]
    for tool in tools:
        assert (tool["ok"], tool["text"]) == (
            results[tool["call"]]["ok"],
            results[tool["call"]]["text"],
        )
    return events, deltas, done


async def provider_turns(provider: FakeOpenAIServer, model: str, count: int) -> list[Call]:
    return await asyncio.to_thread(
        provider.wait_for_calls, lambda call: call.model == model, count, 5.0, True
    )


def check_pair(events: list[Event], name: str) -> tuple[Event, Event]:
    """The run's one tool.call and one tool.result, in that order, for the same call."""
    [call] = of_kind(events, "tool.call")
    [result] = of_kind(events, "tool.result")
    assert events.index(call) < events.index(result)
    assert call["data"]["call"] == result["data"]["call"]
    assert call["data"]["name"] == result["data"]["name"] == name
    assert call["data"]["run"] == result["data"]["run"]
    assert call["from"] == result["from"]
    return call, result


@pytest.mark.parametrize("agent", [it.TOOLS, it.TOOLS_ANTHROPIC])
async def test_a_tool_call_round_trip_reaches_the_client_before_the_reply(
    connect: Connect, unique: Callable[[str], str], provider: FakeOpenAIServer, agent: str
) -> None:
    events, deltas, done = await run_agent(connect, unique, agent)
    call, result = check_pair(events, "lookup")
    assert call["data"]["arguments"] == {"key": "alpha"}
    assert result["data"]["ok"] is True
    assert result["data"]["text"] == "value-of-alpha"
    assert "error" not in result["data"]
    # What the model said before its call, then the events, then its answer.
    text = "".join(delta["data"]["text"] for delta in deltas)
    assert text == "Looking it up.answer:value-of-alpha"
    first_answer = next(d for d in deltas if "answer" in d["data"]["text"])
    assert events.index(result) < events.index(first_answer)
    assert events.index(deltas[0]) < events.index(call)
    assert done["data"]["status"] == "ok"
    assert without_usage(done["data"]["detail"]) == {"tools": ["lookup"]}
    # The provider got the result back in its own format, with the call's id.
    path = "/v1/messages" if agent == it.TOOLS_ANTHROPIC else "/v1/chat/completions"
    turns = [c for c in provider.calls if c.model == it.TOOLS_MODEL and c.path == path]
    answered = [c for c in turns if tool_results(c.body, path == "/v1/messages")]
    assert answered, "the provider never got the tool result"
    assert tool_results(answered[-1].body, path == "/v1/messages") == ["value-of-alpha"]


async def test_a_tool_that_raises_is_an_error_result_the_model_answers(
    connect: Connect, unique: Callable[[str], str]
) -> None:
    events, deltas, done = await run_agent(connect, unique, it.TOOL_RAISES)
    _, result = check_pair(events, "explode")
    assert result["data"]["ok"] is False
    assert result["data"]["error"] == "exception"
    assert result["data"]["text"] == "ValueError: no such key alpha"
    assert done["data"]["status"] == "ok"
    assert done["data"]["text"] == "answer:error (exception): ValueError: no such key alpha"
    assert without_usage(done["data"]["detail"]) == {"tools": ["explode"]}


async def test_a_tool_past_its_soft_limit_is_a_timeout_result_not_a_failed_run(
    connect: Connect, unique: Callable[[str], str]
) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    events, deltas, done = await run_agent(connect, unique, it.TOOL_SLOW)
    elapsed = loop.time() - started
    _, result = check_pair(events, "dawdle")
    assert result["data"]["ok"] is False
    assert result["data"]["error"] == "timeout"
    assert done["data"]["status"] == "ok"
    assert done["data"]["text"].startswith("answer:error (timeout)")
    # The step did not wait for the tool's thread to finish.
    assert elapsed < it.TOOL_SLOW_SLEEP_S


async def test_after_the_round_limit_the_model_answers_with_what_it_has(
    connect: Connect, unique: Callable[[str], str], provider: FakeOpenAIServer
) -> None:
    events, deltas, done = await run_agent(connect, unique, it.TOOL_ROUNDS)
    calls = of_kind(events, "tool.call")
    results = of_kind(events, "tool.result")
    assert len(calls) == len(results) == it.TOOL_ROUNDS_MAX
    assert len({event["data"]["call"] for event in calls}) == it.TOOL_ROUNDS_MAX
    assert done["data"]["status"] == "ok"
    assert done["data"]["text"] == "answer:" + "|".join(["value-of-alpha"] * it.TOOL_ROUNDS_MAX)
    assert without_usage(done["data"]["detail"]) == {"tools": ["lookup"]}
    last = [c for c in provider.calls if c.model == it.TOOL_ROUNDS_MODEL][-1]
    assert last.body["tool_choice"] == "none"


async def test_a_model_that_will_not_stop_calling_ends_degraded(
    connect: Connect, unique: Callable[[str], str]
) -> None:
    events, deltas, done = await run_agent(connect, unique, it.TOOL_STUBBORN)
    assert len(of_kind(events, "tool.call")) == it.TOOL_ROUNDS_MAX
    assert done["data"]["status"] == "degraded"
    assert done["data"]["detail"]["message"] == "tool round limit reached"
    assert done["data"]["detail"]["tools"] == ["lookup"]


async def test_malformed_arguments_are_refused_and_told_to_the_model(
    connect: Connect, unique: Callable[[str], str], provider: FakeOpenAIServer
) -> None:
    events, deltas, done = await run_agent(connect, unique, it.TOOL_BAD_ARGS)
    call, result = check_pair(events, "lookup")
    assert call["data"]["arguments"] is None
    assert result["data"]["ok"] is False
    assert result["data"]["error"] == "bad_arguments"
    assert "not valid JSON" in result["data"]["text"]
    assert done["data"]["status"] == "ok"
    assert done["data"]["text"].startswith("answer:error (bad_arguments)")
    # The tool never ran, so reply.done names none (only the turns' usage).
    assert without_usage(done["data"]["detail"]) == {}
    # The call went back to the provider with arguments it can parse.
    fed_back = [
        c
        for c in provider.calls
        if c.model == it.TOOL_BAD_ARGS_MODEL and tool_results(c.body, False)
    ][-1]
    assistant = fed_back.body["messages"][1]
    assert json.loads(assistant["tool_calls"][0]["function"]["arguments"]) == {}
