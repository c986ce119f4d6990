"""Two agents on the "openai" backend: one that only streams a reply, one whose step offers
a tool with a closed set of arguments (a grammar-constrained model can only produce a
short, valid call)."""

from __future__ import annotations

from agents import Agent, Step, register

from .catalog import PLAIN, TOOLS, lookup

register(Agent(name=PLAIN, steps=(Step(backend="openai", name="answer"),)))
register(
    Agent(
        name=TOOLS,
        steps=(Step(backend="openai", name="answer", tools=(lookup,), max_tool_rounds=2),),
    )
)
