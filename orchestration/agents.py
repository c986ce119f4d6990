"""Agents: a name, a deadline and a pipeline of model-call steps. Pure definitions."""

from __future__ import annotations

from dataclasses import dataclass, field

from django.conf import settings


@dataclass(frozen=True, slots=True)
class Step:
    backend: str
    model: str = ""
    soft_limit_s: float = field(default_factory=lambda: settings.SWITCHBOARD["MODEL_SOFT_LIMIT_S"])
    max_retries: int = field(default_factory=lambda: settings.SWITCHBOARD["MODEL_MAX_RETRIES"])
    # The least time a call of this step can do anything useful in. With less left before
    # the run's deadline (or before its backend's rate limit would let it start) the call
    # is not made: the client gets the fallback at once, reason `deadline` (`rate_limited`).
    min_budget_s: float = 0.5
    # What the client reads when this step cannot answer (time, errors, deadline).
    fallback_text: str = "Sorry, the assistant could not answer in time. Please try again."


@dataclass(frozen=True, slots=True)
class Agent:
    name: str
    steps: tuple[Step, ...]
    deadline_s: float = field(default_factory=lambda: settings.SWITCHBOARD["RUN_DEADLINE_S"])


class UnknownAgent(LookupError):
    pass


_registry: dict[str, Agent] = {}


def register(agent: Agent) -> Agent:
    _registry[agent.name] = agent
    return agent


def get_agent(name: str) -> Agent:
    try:
        return _registry[name]
    except KeyError:
        raise UnknownAgent(name) from None


def agent_names() -> list[str]:
    return sorted(_registry)


# The built-in agent: replies with the message text through the simulated backend.
register(Agent(name="echo", steps=(Step(backend="simulated", model="echo"),)))
