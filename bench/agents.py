"""Agents of the benchmarks (installed with the bench app, SWITCHBOARD_BENCH=1).

bench.generations holds calls for a minute or more, so its agents get a soft limit and a
run deadline that fit (the defaults are 10 s and 30 s)."""

from agents import Agent, Step, register

# Long enough for bench.generations' longest model time (--model-seconds) and its queueing.
SOFT_LIMIT_S = 600.0
DEADLINE_S = 900.0

register(
    Agent(
        name="bench-simulated",
        steps=(Step(backend="simulated", soft_limit_s=SOFT_LIMIT_S),),
        deadline_s=DEADLINE_S,
    )
)
register(
    Agent(
        name="bench-openai",
        # The model (how the bench provider streams) comes from SWITCHBOARD_OPENAI_MODEL.
        steps=(Step(backend="openai", soft_limit_s=SOFT_LIMIT_S, max_retries=0),),
        deadline_s=DEADLINE_S,
    )
)
