"""The integration suite's agents (see catalog.py for what each one's model does)."""

from __future__ import annotations

from agents import Agent, On, PythonStep, Step, StepContext, register

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
