"""Tools (agents/tools.py): schemas derived from signatures, arguments checked against them,
results bounded; and the backends' side of tool calls (workers/*_backend.py): calls
assembled from streamed fragments, bounded, and rounds fed back in each provider's format,
against the local fake over real sockets (the fake itself checked with the official SDKs)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Literal, Optional

import anthropic
import openai
import pytest

from agents import Agent, BadAgent, Step, StepContext, Tool, register
from agents.tools import (
    MAX_ARGUMENT_BYTES,
    MAX_TOOLS_PER_STEP,
    BadArguments,
    BadTool,
    parse_arguments,
    result_text,
    truncated,
)
from orchestration.tool_steps import with_tools_ran
from tests.fakes.openai_server import FakeOpenAIServer
from workers.anthropic_backend import AnthropicBackend
from workers.backends import (
    MAX_TOOL_ARGUMENT_CHARS,
    MAX_TOOL_CALLS_PER_TURN,
    ModelRequest,
    ToolCall,
    ToolCallAssembler,
    ToolResult,
    ToolRound,
)
from workers.openai_backend import OpenAIBackend


def weather(city: str, unit: Literal["c", "f"] = "c", days: int = 1) -> str:
    """Today's weather in a city.

    More words that the model is not shown."""
    return f"{city}: sunny ({unit}, {days}d)"


def search(terms: list[str], limit: Optional[int] = None, exact: bool = False) -> list[str]:  # noqa: UP045 - Optional is what is being tested
    """Search the knowledge base."""
    return terms[: limit or 1]


def scoped(query: str, context: StepContext) -> str:
    """Look something up for the run's tenant."""
    return f"{context.tenant}:{query}"


# --- schemas -------------------------------------------------------------------------------


def test_a_schema_is_derived_from_type_hints_and_the_docstrings_first_line() -> None:
    tool = Tool.of(weather)
    assert tool.name == "weather"
    assert tool.description == "Today's weather in a city."
    assert tool.parameters == {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "unit": {"enum": ["c", "f"]},
            "days": {"type": "integer"},
        },
        "additionalProperties": False,
        "required": ["city"],
    }
    assert Tool.of(search).parameters["properties"] == {
        "terms": {"type": "array", "items": {"type": "string"}},
        "limit": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
        "exact": {"type": "boolean"},
    }


def test_a_step_context_parameter_is_passed_not_offered() -> None:
    tool = Tool.of(scoped)
    assert tool.context_parameter == "context"
    assert tool.parameters["properties"] == {"query": {"type": "string"}}
    assert tool.parameters["required"] == ["query"]

    def optional(query: str, context: StepContext | None = None) -> str:
        """Callable without a context too."""
        return query

    assert Tool.of(optional).context_parameter == "context"
    assert Tool.of(optional).parameters["properties"] == {"query": {"type": "string"}}


def test_an_explicit_schema_name_and_description_win() -> None:
    schema = {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}

    def lookup(**kwargs: str) -> str:
        return kwargs["q"]

    tool = Tool.of(lookup, name="kb-lookup", description="Look up.", parameters=schema)
    assert (tool.name, tool.description, tool.parameters) == ("kb-lookup", "Look up.", schema)
    assert tool.spec() == {"name": "kb-lookup", "description": "Look up.", "parameters": schema}


def test_signatures_that_cannot_be_described_are_refused_when_the_step_is_made() -> None:
    def untyped(city):  # type: ignore[no-untyped-def]
        return city

    def dicts(options: dict[str, str]) -> str:
        return ""

    def star(*cities: str) -> str:
        return ""

    for function in (untyped, dicts, star):
        with pytest.raises(BadTool):
            Tool.of(function)
    with pytest.raises(BadAgent, match="tools"):
        Step(backend="openai", tools=(untyped,))
    with pytest.raises(BadTool, match="name"):
        Tool.of(weather, name="no spaces allowed")
    with pytest.raises(BadTool, match="schema"):
        Tool.of(weather, parameters={"type": "object", "x": "y" * 20_000})


def test_a_steps_tools_are_bounded_and_named_once() -> None:
    step = Step(backend="openai", tools=(weather, Tool.of(search, soft_limit_s=1.0)))
    assert [tool.name for tool in step.tools] == ["weather", "search"]
    assert step.max_tool_rounds == 4
    with pytest.raises(BadAgent, match="differ"):
        Step(backend="openai", tools=(weather, weather))
    many = tuple(Tool.of(weather, name=f"w{index}") for index in range(MAX_TOOLS_PER_STEP + 1))
    with pytest.raises(BadAgent, match="at most"):
        Step(backend="openai", tools=many)
    with pytest.raises(BadAgent, match="max_tool_rounds"):
        Step(backend="openai", tools=(weather,), max_tool_rounds=0)
    agent = register(Agent(name="test-tools-agent", steps=(step,)))
    assert agent.steps[0].tools == step.tools


# --- arguments ----------------------------------------------------------------------------


def test_arguments_are_checked_against_the_schema() -> None:
    schema = Tool.of(weather).parameters
    assert parse_arguments('{"city": "Oslo"}', schema) == {"city": "Oslo"}
    assert parse_arguments('{"city": "Oslo", "unit": "f", "days": 3}', schema)["days"] == 3
    refused = {
        "{bad": "not valid JSON",
        "[1, 2]": "JSON object",
        "{}": "missing 'city'",
        '{"city": 3}': "must be string",
        '{"city": "Oslo", "unit": "k"}': "one of",
        '{"city": "Oslo", "days": true}': "must be integer",
        '{"city": "Oslo", "days": 1.5}': "must be integer",
        '{"city": "Oslo", "shell": "rm"}': "unexpected 'shell'",
    }
    for text, why in refused.items():
        with pytest.raises(BadArguments, match=why):
            parse_arguments(text, schema)
    search_schema = Tool.of(search).parameters
    assert parse_arguments('{"terms": ["a"], "limit": null}', search_schema)["limit"] is None
    with pytest.raises(BadArguments, match=r"terms\[1\]"):
        parse_arguments('{"terms": ["a", 2]}', search_schema)
    with pytest.raises(BadArguments, match="none of"):
        parse_arguments('{"terms": [], "limit": "x"}', search_schema)


def test_hostile_arguments_are_bounded() -> None:
    schema = Tool.of(search).parameters
    huge = json.dumps({"terms": ["x" * MAX_ARGUMENT_BYTES]})
    with pytest.raises(BadArguments, match="bytes"):
        parse_arguments(huge, schema)
    deep = "[" * 5000 + "]" * 5000
    with pytest.raises(BadArguments):
        parse_arguments('{"terms": ' + deep + "}", schema)


def test_results_are_text_and_cut_with_a_marker() -> None:
    assert result_text("plain") == "plain"
    assert result_text({"a": [1, 2]}) == '{"a": [1, 2]}'
    assert result_text(None) == ""
    text, cut = truncated("x" * 1000, 100)
    assert cut and len(text) == 100 and text.endswith("more characters]")
    assert truncated("short", 100) == ("short", False)


def test_reply_done_detail_names_the_tools_that_ran() -> None:
    assert with_tools_ran(None, []) is None
    assert with_tools_ran(None, ["weather"]) == {"tools": ["weather"]}
    degraded = {"reason": "timeout", "message": "timeout"}
    assert with_tools_ran(degraded, ["a", "b"]) == {**degraded, "tools": ["a", "b"]}


# --- the backends' side ------------------------------------------------------------------


def test_streamed_fragments_assemble_into_bounded_calls_with_safe_distinct_ids() -> None:
    calls = ToolCallAssembler()
    calls.add(0, "call_a", "wea", '{"ci')
    calls.add(0, None, "ther", 'ty": "Oslo"}')
    calls.add(1, "call_a", "search", "x" * (MAX_TOOL_ARGUMENT_CHARS + 1))  # repeated id
    calls.add(2, "bad id!", "search", "{}")
    calls.add("3", "call_x", "ignored", "{}")  # not an index
    made = calls.calls()
    assert made[0] == ToolCall("call_a", "weather", '{"city": "Oslo"}')
    assert made[1].oversized and made[1].arguments == "" and made[1].id != "call_a"
    assert made[2].id.startswith("call_") and " " not in made[2].id
    assert len(made) == 3
    many = ToolCallAssembler()
    for index in range(MAX_TOOL_CALLS_PER_TURN + 5):
        many.add(index, f"c{index}", "t", "{}")
    assert len(many.calls()) == MAX_TOOL_CALLS_PER_TURN and many.dropped == 5


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    fake = FakeOpenAIServer().start()
    yield fake
    fake.stop()


SPEC = Tool.of(weather).spec()
ROUND = ToolRound(
    "Checking.",
    (ToolCall("call_1", "weather", '{"city": "Oslo"}'),),
    (ToolResult("call_1", "weather", "Oslo: sunny"),),
)


def turn(backend: OpenAIBackend, request: ModelRequest) -> list[str | ToolCall]:
    async def main() -> list[str | ToolCall]:
        try:
            async with asyncio.timeout(5):
                return [item async for item in backend.astream_events(request)]
        finally:
            await backend.aclose()

    return asyncio.run(main())


@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
def test_a_turn_yields_text_then_the_call_with_its_streamed_arguments(
    server: FakeOpenAIServer, dialect: str
) -> None:
    backend = (
        OpenAIBackend(server.base_url)
        if dialect == "openai"
        else AnthropicBackend(server.base_url, name="anthropic")
    )
    model = 'tools?call=weather&say=Let+me+look.&args={"city":+"Oslo"}'
    items = turn(backend, ModelRequest(model=model, prompt="weather?", tools=(SPEC,)))
    *text, call = items
    assert "".join(map(str, text)) == "Let me look."
    assert isinstance(call, ToolCall)
    assert (call.name, json.loads(call.arguments)) == ("weather", {"city": "Oslo"})
    # With the round's result fed back, the model answers in text.
    request = ModelRequest(
        model=model,
        prompt="weather?",
        tools=(SPEC,),
        rounds=(ToolRound("Let me look.", (call,), (ToolResult(call.id, "weather", "sunny"),)),),
    )
    assert "".join(map(str, turn(backend, request))) == "answer:sunny"


def test_rounds_are_fed_back_in_openais_format() -> None:
    request = ModelRequest(
        model="m", prompt="weather?", tools=(SPEC,), rounds=(ROUND,), tool_choice="none"
    )
    _, _, body = OpenAIBackend("http://x").build_request("http://x", "m", "", request)
    assert body["tools"] == [{"type": "function", "function": SPEC}]
    assert body["tool_choice"] == "none"
    assert body["messages"] == [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Oslo: sunny"},
    ]


def test_rounds_are_fed_back_in_anthropics_format() -> None:
    bad = ToolCall("call_2", "weather", "{bad")
    request = ModelRequest(
        model="m",
        prompt="weather?",
        tools=(SPEC,),
        rounds=(ROUND, ToolRound("", (bad,), (ToolResult("call_2", "weather", "no", True),))),
    )
    backend = AnthropicBackend("http://x", name="anthropic")
    _, _, body = backend.build_request("http://x", "m", "", request)
    assert body["tools"] == [
        {"name": "weather", "description": SPEC["description"], "input_schema": SPEC["parameters"]}
    ]
    assert "tool_choice" not in body
    assert body["messages"][1:] == [
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Oslo"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "call_1",
                    "content": "Oslo: sunny",
                    "is_error": False,
                }
            ],
        },
        # Malformed arguments go back as an empty input: the result told the model why.
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "call_2", "name": "weather", "input": {}}],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "call_2", "content": "no", "is_error": True}
            ],
        },
    ]


def test_the_fakes_tool_calls_read_as_the_official_clients_read_them(
    server: FakeOpenAIServer,
) -> None:
    model = 'tools?call=weather&args={"city":+"Oslo"}'
    with openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0) as client:
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "weather?"}],
            tools=[{"type": "function", "function": SPEC}],
            stream=True,
        )
        arguments = ""
        names = []
        for chunk in stream:
            for fragment in chunk.choices[0].delta.tool_calls or ():
                if fragment.function and fragment.function.name:
                    names.append(fragment.function.name)
                arguments += (fragment.function and fragment.function.arguments) or ""
    assert names == ["weather"] and json.loads(arguments) == {"city": "Oslo"}
    with anthropic.Anthropic(base_url=server.base_url[: -len("/v1")], api_key="k") as client:
        with client.messages.stream(
            model=model,
            max_tokens=100,
            messages=[{"role": "user", "content": "weather?"}],
            tools=[{"name": "weather", "input_schema": SPEC["parameters"]}],
        ) as reply:
            message = reply.get_final_message()
    [use] = [block for block in message.content if block.type == "tool_use"]
    assert (use.name, use.input) == ("weather", {"city": "Oslo"})


# --- one call, as the step's loop runs it (orchestration/tool_steps.py) -------------------


class RecordingWriter:
    """What the loop writes, kept instead of appended to a stream."""

    def __init__(self, time_left: float = 5.0) -> None:
        from streams.runs import Run

        self.run = Run(
            run_id="r1",
            tenant="acme",
            stream="room",
            agent="tooled",
            client="alice",
            message_id="m1",
            message_event="e1",
            text="",
            options={},
            deadline=0.0,
            retention=100,
            attempt=1,
            emitted=0,
            step_base=0,
            owner="o",
            step=1,
        )
        self.time_left = time_left
        self.written: list[tuple[str, dict[str, object], list[str] | None]] = []

    def time_for_call(self) -> float:
        return self.time_left

    def tool_context(self) -> StepContext:
        return StepContext(
            tenant="acme",
            stream="room",
            agent="tooled",
            run_id="r1",
            message="",
            input="",
            outputs={},
            options={},
        )

    async def append_tool_event(
        self, kind: str, data: dict[str, object], tools_ran: list[str] | None = None
    ) -> None:
        self.written.append((kind, data, tools_ran))
        if tools_ran is not None:
            self.run.tools_ran = tools_ran


def one_call(tool: Tool | None, call: ToolCall, writer: RecordingWriter) -> ToolResult:
    from orchestration.tool_steps import run_call

    tools = {tool.name: tool} if tool is not None else {}
    return asyncio.run(run_call(writer, tools, call))  # type: ignore[arg-type]


def test_a_call_writes_its_call_and_result_and_names_the_tool_once() -> None:
    writer = RecordingWriter()
    result = one_call(Tool.of(scoped), ToolCall("c1", "scoped", '{"query": "q"}'), writer)
    assert result == ToolResult("c1", "scoped", "acme:q")
    (kind1, call, ran1), (kind2, answer, ran2) = writer.written
    assert (kind1, kind2) == ("tool.call", "tool.result")
    assert call == {
        "run": "r1",
        "call": "c1",
        "name": "scoped",
        "step": 1,
        "arguments": {"query": "q"},
    }
    assert answer == {
        "run": "r1",
        "call": "c1",
        "name": "scoped",
        "step": 1,
        "ok": True,
        "text": "acme:q",
    }
    assert (ran1, ran2) == (None, ["scoped"])
    one_call(Tool.of(scoped), ToolCall("c2", "scoped", '{"query": "q"}'), writer)
    assert writer.written[-1][2] is None, "a tool that already ran is named once"


def test_calls_that_cannot_run_are_refused_in_words_the_model_reads() -> None:
    writer = RecordingWriter()
    unknown = one_call(None, ToolCall("c1", "x" * 500, "{}"), writer)
    assert unknown.is_error and unknown.content.startswith("error (unknown_tool)")
    assert len(writer.written[0][1]["name"]) == 64  # type: ignore[arg-type]
    big = one_call(Tool.of(weather), ToolCall("c2", "weather", "", oversized=True), writer)
    assert big.is_error and "too large" in big.content
    assert writer.written[-2][1]["arguments"] is None
    assert writer.written[-1][2] is None, "a refused call ran no tool"


def test_an_async_tool_past_its_limit_is_a_timeout_and_long_results_are_cut() -> None:
    async def slow(key: str) -> str:
        """Sleeps."""
        await asyncio.sleep(10)
        return key

    def long(key: str) -> str:
        """Long."""
        return key * 1000

    writer = RecordingWriter()
    late = one_call(
        Tool.of(slow, soft_limit_s=0.05), ToolCall("c1", "slow", '{"key": "a"}'), writer
    )
    assert late.is_error and late.content.startswith("error (timeout)")
    assert writer.written[-1][1]["error"] == "timeout"
    cut = one_call(
        Tool.of(long, max_result_chars=100), ToolCall("c2", "long", '{"key": "ab"}'), writer
    )
    assert len(cut.content) == 100 and cut.content.endswith("more characters]")
    assert writer.written[-1][1]["truncated"] is True
    # The run's deadline bounds a tool too: no time left, no wait.
    hurried = one_call(Tool.of(slow), ToolCall("c3", "slow", '{"key": "a"}'), RecordingWriter(0.0))
    assert hurried.content.startswith("error (timeout)")


def llama_cpp_chunk(delta: dict[str, object], finish_reason: str | None = None) -> bytes:
    """One SSE event as llama-cpp-python's server (0.3.x, chatml-function-calling) sends a
    tool call: `\\r\\n` line ends, and every fragment of a call repeats its id and whole
    name (and a legacy `function_call`), with `content` and `role` null."""
    event = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": "m",
        "choices": [{"index": 0, "finish_reason": finish_reason, "logprobs": None, "delta": delta}],
    }
    return f"data: {json.dumps(event)}\r\n\r\n".encode()


def llama_cpp_fragment(arguments: str) -> dict[str, object]:
    return {
        "role": None,
        "content": None,
        "function_call": {"name": "weather", "arguments": arguments},
        "tool_calls": [
            {
                "index": 0,
                "id": "call__0_weather_cmpl-1",
                "type": "function",
                "function": {"name": "weather", "arguments": arguments},
            }
        ],
    }


def test_a_turn_without_text_is_fed_back_with_empty_content() -> None:
    """Neither `"content": null` (llama-cpp-python's server answers 500 with validation
    errors) nor left out (its chat template fails on the missing key)."""
    silent = ToolRound("", ROUND.calls, ROUND.results)
    request = ModelRequest(model="m", prompt="weather?", tools=(SPEC,), rounds=(silent,))
    _, _, body = OpenAIBackend("http://x").build_request("http://x", "m", "", request)
    assistant = body["messages"][1]
    assert assistant["role"] == "assistant" and assistant["content"] == ""
    assert assistant["tool_calls"][0]["id"] == "call_1"


def test_a_tool_call_streamed_as_llama_cpp_sends_it_keeps_its_name() -> None:
    from aiohttp import web

    fragments = ["{", '"city', '": ', '"Oslo"', "}", " ", ""]
    body = llama_cpp_chunk(
        {"role": "assistant", "content": None, "function_call": None, "tool_calls": None}
    )
    body += b"".join(llama_cpp_chunk(llama_cpp_fragment(piece)) for piece in fragments)
    body += llama_cpp_chunk(
        {"role": None, "content": None, "function_call": None, "tool_calls": None}, "tool_calls"
    )
    body += b"data: [DONE]\r\n\r\n"

    async def completions(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(body)
        await response.write_eof()
        return response

    async def main() -> list[str | ToolCall]:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", completions)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        backend = OpenAIBackend(f"http://127.0.0.1:{port}/v1", "m")
        request = ModelRequest(model="m", prompt="weather?", tools=(SPEC,))
        try:
            async with asyncio.timeout(5):
                return [item async for item in backend.astream_events(request)]
        finally:
            await backend.aclose()
            await runner.cleanup()

    [call] = asyncio.run(main())
    assert call == ToolCall("call__0_weather_cmpl-1", "weather", '{"city": "Oslo"} ')
    assert parse_arguments(call.arguments, SPEC["parameters"]) == {"city": "Oslo"}
