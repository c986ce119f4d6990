"""The "openai" backend against llama.cpp's OpenAI-compatible server (llama-cpp-python),
serving a tiny random-weight model: real SSE framing, real chunk shapes, real tool-call
fragments. Skipped unless a Python with llama_cpp is available (conftest.py).

The model's text is gibberish (random weights), so the checks are on shapes: the reply
the client assembles is the text llama.cpp generated, piece for piece; a tool call comes
out of the stream whole (its name, its id, arguments that parse and fit the schema)."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from agents import Tool
from agents.tools import parse_arguments
from tests.integration.support import assert_contiguous, collect_run, reply_text, split_run
from workers.backends import ModelRequest, ToolCall, ToolResult, ToolRound
from workers.openai_backend import OpenAIBackend, sse_events

from .agents_app.catalog import PLAIN, TOOLS, lookup
from .conftest import MODEL_ALIAS, Board, Connect, LlamaServer

# Greedy and short: the same text on every run, in well under a second.
OPTIONS = {"max_tokens": 24, "temperature": 0, "seed": 16}
PROMPT = "Say something."
LOOKUP = Tool.of(lookup).spec()


def complete_at_once(server: LlamaServer, prompt: str) -> str:
    """The same request as the backend's, not streamed: what the model says, whole."""
    body = {
        "model": MODEL_ALIAS,
        "messages": [{"role": "user", "content": prompt}],
        **OPTIONS,
    }
    request = urllib.request.Request(
        f"{server.base_url}/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)["choices"][0]["message"]["content"] or ""


@pytest.mark.asyncio
async def test_a_streamed_reply_is_the_text_llama_cpp_generated(
    llama_server: LlamaServer,
    llama_switchboard: Board,
    connect: Connect,
    unique: Callable[[str], str],
) -> None:
    client = await connect()
    stream = unique("llama")
    ack = await client.send(stream, PLAIN, PROMPT, options=OPTIONS)
    events = await collect_run(client, stream, ack["id"], timeout=60)
    assert_contiguous(events)
    deltas, done = split_run(events, ack["id"])
    assert done["data"]["status"] == "ok", (done, llama_switchboard.log_tails())
    text = reply_text(deltas, done)
    # Nothing dropped or doubled between llama.cpp's chunks and the client: the streamed
    # reply is what the same greedy request generates whole.
    expected = await asyncio.to_thread(complete_at_once, llama_server, PROMPT)
    assert text, "llama.cpp streamed pieces the backend did not read"
    assert text == expected


@pytest.mark.asyncio
async def test_a_step_with_a_tool_ends_once_and_every_call_is_whole(
    llama_switchboard: Board, connect: Connect, unique: Callable[[str], str]
) -> None:
    """The step leaves the choice to the model and sends no tool_choice, which
    llama-cpp-python 0.3 takes as "no tools" (so it answers in text); a server that offers
    them may answer or call `lookup`. Either way the run ends once, ok (not on a stream
    cut short), and any call the client sees is valid and answered."""
    client = await connect()
    stream = unique("llama-tools")
    ack = await client.send(stream, TOOLS, "Look up alpha.", options=OPTIONS)
    events = await collect_run(client, stream, ack["id"], timeout=60)
    assert_contiguous(events)
    deltas, done = split_run(events, ack["id"])
    assert done["data"]["status"] == "ok", (done, llama_switchboard.log_tails())
    reply_text(deltas, done)
    calls = [event for event in events if event["kind"] == "tool.call"]
    results = [event for event in events if event["kind"] == "tool.result"]
    assert [call["data"]["call"] for call in calls] == [
        result["data"]["call"] for result in results
    ]
    for call, result in zip(calls, results, strict=True):
        assert events.index(call) < events.index(result)
        assert call["data"]["name"] == "lookup"
        assert parse_arguments(json.dumps(call["data"]["arguments"]), LOOKUP["parameters"])
        assert result["data"]["ok"] is True
    assert done["data"].get("tools", []) == [call["data"]["name"] for call in calls]


class ForcedToolBackend(OpenAIBackend):
    """The backend with the request's tool forced (`tool_choice` naming the function), the
    one way llama-cpp-python streams a tool call: it refuses to stream one it chose itself.
    The product does not force tools; this drives the backend's own stream reading."""

    def build_request(
        self, base_url: str, model: str, key: str, request: ModelRequest
    ) -> tuple[str, dict[str, str], dict[str, Any]]:
        url, headers, body = super().build_request(base_url, model, key, request)
        if request.tool_choice == "auto":
            body["tool_choice"] = {"type": "function", "function": {"name": LOOKUP["name"]}}
        return url, headers, body


async def raw_tool_fragments(server: LlamaServer, body: dict[str, Any]) -> list[dict[str, Any]]:
    """Every `delta.tool_calls` fragment of the stream, as llama.cpp sent it."""
    fragments: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{server.base_url}/chat/completions", json=body) as response:
            assert response.status == 200
            async for _, payload in sse_events(response):
                if payload.strip() == "[DONE]":
                    continue
                for choice in json.loads(payload)["choices"]:
                    fragments.extend((choice.get("delta") or {}).get("tool_calls") or ())
    return fragments


@pytest.mark.asyncio
async def test_a_forced_tool_call_streamed_by_llama_cpp_assembles_whole_and_its_round_is_accepted(
    llama_server: LlamaServer,
) -> None:
    backend = ForcedToolBackend(llama_server.base_url, MODEL_ALIAS)
    request = ModelRequest(
        model=MODEL_ALIAS, prompt="Look up alpha.", options=OPTIONS, tools=(LOOKUP,)
    )
    try:
        async with asyncio.timeout(30):
            items = [item async for item in backend.astream_events(request)]
            _, _, body = backend.build_request(llama_server.base_url, MODEL_ALIAS, "", request)
            fragments = await raw_tool_fragments(llama_server, body)
            # The call's result fed back (an assistant message with tool_calls, a tool
            # message) in a last round with tools forbidden: llama.cpp must accept the shape.
            [call] = [item for item in items if isinstance(item, ToolCall)]
            answer_request = ModelRequest(
                model=MODEL_ALIAS,
                prompt="Look up alpha.",
                options=OPTIONS,
                tools=(LOOKUP,),
                rounds=(ToolRound("", (call,), (ToolResult(call.id, call.name, "value"),)),),
                tool_choice="none",
            )
            answer = [item async for item in backend.astream_events(answer_request)]
    finally:
        await backend.aclose()
    assert call.name == "lookup"
    arguments = parse_arguments(call.arguments, LOOKUP["parameters"])
    assert arguments["key"] in ("alpha", "beta")
    # Greedy, so the raw stream is the same call: the backend joined its argument
    # fragments exactly, however many there were, and kept the server's id (one per
    # request, "call__0_<name>_<completion id>"; ours would be "call_0_0").
    assert len({fragment["id"] for fragment in fragments}) == 1
    assert call.id.startswith(f"call__0_{call.name}_")
    assert call.id.rsplit("_", 1)[0] == fragments[0]["id"].rsplit("_", 1)[0]
    assert call.arguments == "".join(f["function"]["arguments"] or "" for f in fragments)
    assert all(isinstance(item, str) for item in answer)
