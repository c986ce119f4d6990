"""A model step's tool-call loop, on the model-call runtime.

A step with tools (agents/tools.py) calls its model with the tools offered; when the model
asks for calls instead of answering, each call is checked, run and its result fed back,
and the model is called again, until it answers in text. Per round:

1. the model's turn streams: its text pieces go into the reply as in any step (coalesced),
   its tool calls are assembled from their streamed fragments (workers/*_backend.py);
2. each call, in order, is one `tool.call` event (its arguments as validated, or null when
   they were not valid), then the tool runs, then one `tool.result` event (ok, or the
   error: `bad_arguments`, `unknown_tool`, `timeout`, `exception`). Both go through the
   run's fenced writes (APPEND_TOOL_EVENT), so a fenced attempt writes none and a write
   retried through a Redis restart is never made twice;
3. the results go back to the model in the provider's format.

Bounds: the step's soft limit times each model turn; each tool call has its tool's own
soft limit; the run's deadline bounds all of it. A plain function runs in the runtime's
bounded thread pool (never on the loop), an `async def` one is awaited on the loop. A call
past its limit is answered `timeout` to the model (a thread cannot be stopped: it is left
to finish, holding its pool thread, as a PythonStep would).

After `max_tool_rounds` rounds of calls the model is asked once more with tool calls
forbidden (`tool_choice` none), so it answers with what it has. A model that still asks
for calls then ends the step on its fallback (`model_error`, "tool round limit reached").

A retried or redelivered step runs its loop again from its first round (tools included:
they should be safe to repeat); its `reply.restart` voids the earlier attempt's tool events
with its text (the restart's `step` says from which step on).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing
from dataclasses import replace
from typing import Any, Protocol

from agents import Step, StepContext
from agents.tools import BadArguments, Tool, parse_arguments, result_text, truncated
from orchestration.coalesce import Coalescer
from streams.runs import Run
from workers.backends import (
    ModelError,
    ModelRequest,
    ToolCall,
    ToolResult,
    ToolRound,
    supports_tools,
)

logger = logging.getLogger(__name__)

# What a tool.call event shows of arguments that were not valid, and the most an error's
# words may take in a tool.result.
MAX_SHOWN_NAME_CHARS = 64
MAX_ERROR_CHARS = 500


class ToolRoundsExhausted(ModelError):
    def __init__(self, rounds: int) -> None:
        super().__init__(
            f"the model still asked for tools after {rounds} rounds and a last call without",
            transient=False,
            summary="tool round limit reached",
        )


class StepWriter(Protocol):
    """What the loop needs of the step that runs it (orchestration/steps.py's _Step)."""

    run: Run

    def time_for_call(self) -> float: ...

    def model_request(self, step: Step, prompt: str) -> ModelRequest: ...

    def model_backend(self) -> Any:
        """The backend of the model being tried (the step's own, or a fallback's)."""
        ...

    def tool_context(self) -> StepContext: ...

    async def append(self, text: str) -> None: ...

    async def append_pending(self, coalescer: Coalescer) -> None: ...

    async def record_usage(
        self,
        step: Step,
        request: ModelRequest,
        prompt_chars: int,
        output_chars: int,
        finished: bool,
    ) -> None: ...

    async def append_tool_event(
        self, kind: str, data: dict[str, Any], tools_ran: list[str] | None = None
    ) -> None: ...


async def call_with_tools(writer: StepWriter, step: Step, prompt: str, coalescer: Coalescer) -> str:
    """The step's tool loop; returns its output, the text of every turn. Raises
    TimeoutError (a turn past the soft limit), ModelError, or what the writes raise."""
    backend = writer.model_backend()
    if not supports_tools(backend):
        raise ModelError(
            f"backend {getattr(backend, 'name', step.backend)!r} cannot offer tools",
            False,
            summary="tools not supported",
        )
    tools: dict[str, Tool] = {tool.name: tool for tool in step.tools}
    specs = tuple(tool.spec() for tool in step.tools)
    rounds: list[ToolRound] = []
    seen_ids: set[str] = set()
    said: list[str] = []
    for round_index in range(step.max_tool_rounds + 1):
        last = round_index == step.max_tool_rounds
        request = replace(
            writer.model_request(step, prompt),
            tools=specs,
            rounds=tuple(rounds),
            tool_choice="none" if last else "auto",
        )
        budget = min(step.soft_limit_s, writer.time_for_call())
        # Each turn is a call of its own to the provider: its tokens are counted as it ends.
        turn: tuple[str, list[ToolCall]] | None = None
        emitted_before = writer.run.emitted
        try:
            turn = await _turn(writer, step, backend, request, budget, coalescer)
        finally:
            received = len(turn[0]) if turn else writer.run.emitted - emitted_before
            await writer.record_usage(
                step, request, len(request.prompt), received, turn is not None
            )
        text, calls = turn
        said.append(text)
        if not calls:
            return "".join(said)
        if last:
            raise ToolRoundsExhausted(step.max_tool_rounds)
        # Text before the calls goes out before their events, so the stream reads in order.
        await writer.append_pending(coalescer)
        calls = _distinct_ids(calls, seen_ids, round_index)
        results = [await run_call(writer, tools, call) for call in calls]
        rounds.append(ToolRound(text, tuple(calls), tuple(results)))
    raise AssertionError("unreachable: the last round returns or raises")


async def _turn(
    writer: StepWriter,
    step: Step,
    backend: Any,
    request: ModelRequest,
    budget: float,
    coalescer: Coalescer,
) -> tuple[str, list[ToolCall]]:
    """One model turn: its text (streamed into the reply when the step is visible) and the
    calls it asked for. Only waits for the model count against `budget`, as for a step
    without tools."""
    loop = asyncio.get_running_loop()
    limit_at = loop.time() + budget
    last_moment = loop.time() + writer.time_for_call()
    produced: list[str] = []
    calls: list[ToolCall] = []
    items: AsyncIterator[str | ToolCall] = backend.astream_events(request)
    async with aclosing(items):  # type: ignore[type-var]
        while True:
            try:
                async with asyncio.timeout_at(limit_at):
                    item = await anext(items)
            except StopAsyncIteration:
                break
            if isinstance(item, ToolCall):
                calls.append(item)
                continue
            produced.append(item)
            if step.visible and (text := coalescer.add(item)):
                began = loop.time()
                await writer.append(text)
                limit_at = min(limit_at + loop.time() - began, last_moment)
    return "".join(produced), calls


def _distinct_ids(calls: list[ToolCall], seen: set[str], round_index: int) -> list[ToolCall]:
    """The calls with ids distinct across the step's rounds (a provider may repeat one)."""
    made = []
    for position, call in enumerate(calls):
        call_id = call.id
        if call_id in seen:
            call_id = f"call_{round_index}_{position}"
            while call_id in seen:
                call_id += "x"
        seen.add(call_id)
        made.append(call if call_id == call.id else replace(call, id=call_id))
    return made


async def run_call(writer: StepWriter, tools: Mapping[str, Tool], call: ToolCall) -> ToolResult:
    """One call: its tool.call event, the tool's run within its soft limit, its tool.result
    event; the result as the model is told it."""
    run = writer.run
    shown_name = call.name[:MAX_SHOWN_NAME_CHARS]
    tool = tools.get(call.name)
    arguments: dict[str, Any] | None = None
    refusal = ""
    if tool is None:
        refusal, words = "unknown_tool", f"no tool named {shown_name!r}"
    elif call.oversized:
        refusal, words = "bad_arguments", "arguments too large"
    else:
        try:
            arguments = parse_arguments(call.arguments, tool.parameters)
        except BadArguments as bad:
            refusal, words = "bad_arguments", str(bad)
    base = {"run": run.run_id, "call": call.id, "name": shown_name, "step": run.step}
    await writer.append_tool_event("tool.call", {**base, "arguments": arguments})
    started = time.monotonic()
    cut = False
    if refusal:
        ok, failure, text = False, refusal, words[:MAX_ERROR_CHARS]
    else:
        assert tool is not None and arguments is not None
        ok, failure, text = await _invoke(writer, tool, arguments)
        text, cut = truncated(text, tool.max_result_chars)
    log = logger.info if ok else logger.warning
    log(
        "tool call tenant=%s run=%s step=%s tool=%s ok=%s error=%s after=%.3fs",
        run.tenant,
        run.run_id,
        run.step,
        shown_name,
        ok,
        failure or "-",
        time.monotonic() - started,
    )
    ran = None
    if tool is not None and not refusal and tool.name not in run.tools_ran:
        ran = [*run.tools_ran, tool.name]
    result: dict[str, Any] = {**base, "ok": ok, "text": text}
    if failure:
        result["error"] = failure
    if cut:
        result["truncated"] = True
    await writer.append_tool_event("tool.result", result, ran)
    content = text if ok else f"error ({failure}): {text}"
    return ToolResult(call.id, call.name, content, is_error=not ok)


async def _invoke(
    writer: StepWriter, tool: Tool, arguments: dict[str, Any]
) -> tuple[bool, str, str]:
    """(ok, error code, text) of running the tool: its result as text, or why it has none."""
    kwargs = dict(arguments)
    if tool.context_parameter:
        kwargs[tool.context_parameter] = writer.tool_context()
    budget = max(0.0, min(tool.soft_limit_s, writer.time_for_call()))
    try:
        async with asyncio.timeout(budget):
            if inspect.iscoroutinefunction(tool.function):
                value = await tool.function(**kwargs)
            else:
                call = functools.partial(tool.function, **kwargs)
                value = await asyncio.get_running_loop().run_in_executor(None, call)
        return True, "", result_text(value)
    except TimeoutError:
        return False, "timeout", f"the tool did not answer within {budget:.3g}s"
    except asyncio.CancelledError:
        raise
    except Exception as error:
        logger.warning("tool %s raised", tool.name, exc_info=True)
        return False, "exception", f"{type(error).__name__}: {error}"[:MAX_ERROR_CHARS]


def with_tools_ran(detail: Any, tools_ran: list[str]) -> Any:
    """A reply.done's detail naming the tools that ran in the run (`tools`), if any."""
    if not tools_ran:
        return detail
    if detail is None:
        return {"tools": list(tools_ran)}
    if isinstance(detail, dict):
        return {**detail, "tools": list(tools_ran)}
    return detail
