"""The integration suite's agents (see catalog.py for what each one's model does)."""

from __future__ import annotations

import time
from typing import Any

from agents import Agent, FallbackModel, On, PythonStep, Step, StepContext, Tool, register

from . import catalog as c


def check_chain(context: StepContext) -> str:
    """Visible: appends a mark, which says whether it saw the route step's output by name."""
    return c.CHAIN_CHECKED if context.outputs.get("route") == c.CHAIN_ROUTE_TEXT else "|unrouted"


register(
    Agent(
        name=c.CHAIN,
        steps=(
            Step(
                backend="openai",
                name="route",
                model=c.CHAIN_ROUTE_MODEL,
                prompt=c.CHAIN_ROUTE_PROMPT,
                visible=False,
            ),
            Step(
                backend="openai",
                name="answer",
                model=c.CHAIN_ANSWER_MODEL,
                prompt=c.CHAIN_ANSWER_PROMPT,
            ),
            PythonStep(check_chain, name="check", visible=True, soft_limit_s=1.0),
        ),
    )
)

register(
    Agent(
        name=c.FLAKY,
        steps=(Step(backend="openai", name="answer", model=c.FLAKY_MODEL, prompt=c.FLAKY_PROMPT),),
    )
)

register(
    Agent(
        name=c.CUT,
        steps=(Step(backend="openai", name="answer", model=c.CUT_MODEL, prompt=c.CUT_PROMPT),),
    )
)

register(
    Agent(
        name=c.STALL,
        steps=(
            Step(
                backend="openai",
                name="answer",
                model=c.STALL_MODEL,
                prompt=c.STALL_PROMPT,
                soft_limit_s=c.STALL_SOFT_LIMIT_S,
                max_retries=0,
                fallback_text=c.STALL_FALLBACK,
            ),
        ),
    )
)

register(
    Agent(
        name=c.HANG,
        steps=(
            Step(
                backend="openai",
                name="answer",
                model=c.HANG_MODEL,
                prompt=c.HANG_PROMPT,
                soft_limit_s=c.HANG_SOFT_LIMIT_S,
                max_retries=0,
            ),
        ),
    )
)

register(
    Agent(
        name=c.ROUTE_FAILS,
        steps=(
            Step(
                backend="openai",
                name="route",
                model=c.ROUTE_FAILS_ROUTE_MODEL,
                prompt=c.ROUTE_FAILS_ROUTE_PROMPT,
                visible=False,
                fallback_text=c.ROUTE_FAILS_FALLBACK,
                continue_on_fallback=True,
            ),
            Step(
                backend="openai",
                name="answer",
                model=c.ROUTE_FAILS_ANSWER_MODEL,
                prompt=c.ROUTE_FAILS_ANSWER_PROMPT,
            ),
        ),
    )
)

register(
    Agent(
        name=c.PING,
        steps=(Step(backend="openai", name="ping", model=c.LOOP_MODEL, prompt=c.PING_PROMPT),),
        subscribes=(On("reply.done", agent=c.PONG, streams=c.LOOP_STREAMS),),
    )
)

register(
    Agent(
        name=c.PONG,
        steps=(Step(backend="openai", name="pong", model=c.LOOP_MODEL, prompt=c.PONG_PROMPT),),
        subscribes=(On("reply.done", agent=c.PING, streams=c.LOOP_STREAMS),),
    )
)

register(
    Agent(
        name=c.METERED,
        steps=(
            Step(
                backend="openai",
                name="answer",
                model=c.METERED_MODEL,
                prompt=c.METERED_PROMPT,
                rate_limit={"rpm": c.METERED_RPM},
                fallback_text=c.METERED_FALLBACK,
            ),
        ),
    )
)

register(
    Agent(
        name=c.INTAKE,
        steps=(Step(backend="openai", name="read", model=c.INTAKE_MODEL, prompt=c.INTAKE_PROMPT),),
        subscribes=(On("published", streams=c.INTAKE_STREAMS),),
    )
)

register(
    Agent(
        name=c.FAILOVER,
        steps=(
            Step(
                backend="openai",
                model=c.FAILOVER_PRIMARY,
                prompt=c.FAILOVER_PROMPT,
                max_retries=1,
                fallbacks=(FallbackModel("openai", c.FAILOVER_SECOND),),
            ),
        ),
    )
)

register(
    Agent(
        name=c.FAILOVER_CUT,
        steps=(
            Step(
                backend="openai",
                model=c.FAILOVER_CUT_PRIMARY,
                prompt=c.FAILOVER_CUT_PROMPT,
                max_retries=0,
                fallbacks=(FallbackModel("openai", c.FAILOVER_CUT_SECOND),),
            ),
        ),
    )
)

register(
    Agent(
        name=c.FAILOVER_DOWN,
        steps=(
            Step(
                backend="openai",
                model=c.FAILOVER_DOWN_MODELS[0],
                prompt=c.FAILOVER_DOWN_PROMPT,
                max_retries=0,
                fallbacks=(FallbackModel("openai", c.FAILOVER_DOWN_MODELS[1]),),
                fallback_text=c.FAILOVER_DOWN_FALLBACK,
            ),
        ),
    )
)

register(
    Agent(
        name=c.FAILOVER_BAD,
        steps=(
            Step(
                backend="openai",
                model=c.FAILOVER_BAD_PRIMARY,
                prompt=c.FAILOVER_BAD_PROMPT,
                fallbacks=(FallbackModel("openai", c.FAILOVER_BAD_SECOND),),
                fallback_text=c.FAILOVER_BAD_FALLBACK,
            ),
        ),
    )
)

register(
    Agent(
        name=c.FAILOVER_TENANT,
        steps=(
            Step(
                backend="openai",
                model=c.FAILOVER_TENANT_PRIMARY,
                prompt=c.FAILOVER_TENANT_PROMPT,
                max_retries=0,
                fallbacks=(FallbackModel("openai", c.FAILOVER_TENANT_CODE_SECOND),),
            ),
        ),
    )
)


def lookup(key: str) -> str:
    """Look a key up."""
    return f"value-of-{key}"


def explode(key: str) -> str:
    """A tool that fails."""
    raise ValueError(f"no such key {key}")


def dawdle(key: str) -> str:
    """A tool slower than its soft limit (a plain function: it runs in the thread pool)."""
    time.sleep(c.TOOL_SLOW_SLEEP_S)
    return "too late"


def tool_agent(name: str, model: str, tool: Tool, backend: str = "openai", **extra: Any) -> None:
    register(
        Agent(
            name=name,
            steps=(Step(backend=backend, name="answer", model=model, tools=(tool,), **extra),),
        )
    )


tool_agent(c.TOOLS, c.TOOLS_MODEL, Tool.of(lookup))
tool_agent(c.TOOLS_ANTHROPIC, c.TOOLS_MODEL, Tool.of(lookup), backend="anthropic")
tool_agent(c.TOOL_RAISES, c.TOOL_RAISES_MODEL, Tool.of(explode))
tool_agent(c.TOOL_SLOW, c.TOOL_SLOW_MODEL, Tool.of(dawdle, soft_limit_s=c.TOOL_SLOW_LIMIT_S))
tool_agent(c.TOOL_ROUNDS, c.TOOL_ROUNDS_MODEL, Tool.of(lookup), max_tool_rounds=c.TOOL_ROUNDS_MAX)
tool_agent(
    c.TOOL_STUBBORN,
    c.TOOL_STUBBORN_MODEL,
    Tool.of(lookup),
    max_tool_rounds=c.TOOL_ROUNDS_MAX,
    max_retries=0,
)
tool_agent(c.TOOL_BAD_ARGS, c.TOOL_BAD_ARGS_MODEL, Tool.of(lookup))


def after_interruption(context: StepContext) -> str:
    """Steering: a run a `send` with `interrupt: true` started sees what the runs it cut
    off had said in its options, and puts it before the new message."""
    cut_off = context.options.get("interrupted") or []
    said = " / ".join(item["text"] for item in cut_off)
    return f"[{c.STEER_MARK}{said}] {context.message}" if cut_off else context.message


register(
    Agent(
        name=c.STEER,
        steps=(Step(backend="simulated", model="echo", prompt=after_interruption),),
    )
)
