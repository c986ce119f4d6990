"""Agents: what runs when a message arrives, or when another agent's reply is done.

An agent is a name, a deadline and a pipeline of steps. A step is a model call (`Step`,
also exported as `ModelStep`) or plain Python (`PythonStep`); each step's output feeds the
next, and only the steps marked `visible` stream into the reply the client reads. Each step
runs as its own Celery task with its own soft time limit, retries, rate limit and fallback.

An agent may also subscribe to other agents' events (`On`): a `reply.done` of agent
`answer` on a stream matching `support:*` starts a run of the subscriber on that stream,
with the reply's text as its message. How far such chains may go is bounded per tenant
(its maximum causal depth).

Agents are defined in code, in any installed app's `agents.py` (found at start-up, as
Celery finds `tasks.py`), and registered with `register` or the `@agent` decorator. This
module is pure: definitions and the registry, no I/O.

    from agents import Agent, On, PythonStep, Step, register

    register(Agent(
        name="summariser",
        steps=(Step(backend="openai", prompt="Summarise in one line:\\n{input}"),),
        subscribes=(On("reply.done", agent="assistant", streams="support:*"),),
    ))
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agents.tools import (
    DEFAULT_TOOL_ROUNDS,
    MAX_TOOL_ROUNDS,
    BadTool,
    tools_of,
)
from agents.tools import Tool as Tool  # re-exported: `from agents import Tool`
from project.conf import Conf, conf

# Event kinds an agent may subscribe to: each is written by one transaction that also
# enqueues its subscribers (FINALIZE_RUN for `reply.done`, APPEND_EVENT for a client's
# `published`), so no trigger is lost.
SUBSCRIBABLE_KINDS = frozenset({"reply.done", "published"})
AGENT_NAME = re.compile(r"\A[a-z0-9][a-z0-9_.-]{0,62}\Z")
DEFAULT_FALLBACK = "Sorry, the assistant could not answer in time. Please try again."
# Fallback models a step (or a tenant's grant) may list: each one tried can take the run's
# time again, so the chain is short.
MAX_FALLBACK_MODELS = 3
BACKEND_NAME = re.compile(r"\A[a-z0-9][a-z0-9_.-]{0,62}\Z")
# An environment variable's name, never a key (as a tenant's override: tenants/models.py).
ENV_NAME = re.compile(r"\A[A-Z_][A-Z0-9_]*\Z")


@dataclass(frozen=True, slots=True)
class StepContext:
    """What a step sees: the run's message, the previous step's output and every earlier
    step's output by name. For a run started by a subscription, `message` is the text of
    the triggering reply and `trigger` says where it came from."""

    tenant: str
    stream: str
    agent: str
    run_id: str
    message: str
    input: str
    outputs: Mapping[str, str]
    options: Mapping[str, Any]
    depth: int = 0
    # What started a run by subscription; None for a client's send. {"kind": "reply.done",
    # "agent", "run", "event", "status"} or {"kind": "published", "client", "event",
    # "data"} (the published JSON as sent; `message` is it as text).
    trigger: Mapping[str, Any] | None = None


Prompt = str | Callable[[StepContext], str] | None


@dataclass(frozen=True, slots=True)
class FallbackModel:
    """Another model a step tries when its own cannot answer (Step.fallbacks): a backend
    and its model ("" for the backend's default), optionally its own endpoint and the NAME
    of the environment variable holding its key ("" for the backend's configuration)."""

    backend: str
    model: str = ""
    base_url: str = ""
    api_key_env: str = ""


@dataclass(frozen=True, slots=True)
class Step:
    """A model call. `prompt` builds what the model is asked from the context: None sends
    the step's input; a string is a template over `{input}`, `{message}` and the earlier
    outputs by name (`{route}`); a function gets the StepContext."""

    backend: str
    model: str = ""
    name: str = ""
    prompt: Prompt = None
    # Whether the model's text streams into the reply (reply.delta) or only feeds the
    # next step.
    visible: bool = True
    soft_limit_s: float = field(default_factory=lambda: conf().model_soft_limit_s)
    max_retries: int = field(default_factory=lambda: conf().model_max_retries)
    # The least time a call of this step can do anything useful in. With less left before
    # the run's deadline (or before its backend's rate limit would let it start) the call
    # is not made: the client gets the fallback at once, reason `deadline` (`rate_limited`).
    min_budget_s: float = 0.5
    # The step's output when it cannot answer (time, errors, deadline). A run stops there,
    # `degraded`, with this text as the end of its reply, unless `continue_on_fallback`:
    # then the text is the step's output and the pipeline goes on (the run still ends
    # `degraded`, naming the step).
    fallback_text: str = DEFAULT_FALLBACK
    continue_on_fallback: bool = False
    # Calls of this step per tenant: {"rpm": N, "tpm": M} (workers/quotas.py), in Redis so
    # one limit binds every worker. A step waits for its budget while its deadline allows.
    rate_limit: Mapping[str, int] | None = None
    # Other models tried in order when this step's own fails over (orchestration/
    # failover.py says on which errors), before `fallback_text`; at most
    # MAX_FALLBACK_MODELS. A tenant's agent grant may list its own instead (admin).
    fallbacks: tuple[FallbackModel, ...] = ()
    # Functions (or agents.tools.Tool) the model may call during the step
    # (agents/tools.py), and how many rounds of calls it may make before it must answer.
    tools: tuple[Any, ...] = ()
    max_tool_rounds: int = DEFAULT_TOOL_ROUNDS

    def __post_init__(self) -> None:
        if self.tools:
            try:
                object.__setattr__(self, "tools", tools_of(tuple(self.tools)))
            except BadTool as error:
                raise BadAgent(f"a step's tools: {error}") from None
        if not (1 <= self.max_tool_rounds <= MAX_TOOL_ROUNDS):
            raise BadAgent(f"a step's max_tool_rounds must be 1..{MAX_TOOL_ROUNDS}")

    @property
    def calls_model(self) -> bool:
        return True


ModelStep = Step


@dataclass(frozen=True, slots=True)
class PythonStep:
    """Plain Python: `run(context)` returns the step's output. An exception, or a run
    longer than `soft_limit_s`, gives the fallback. A step past its limit is abandoned,
    not killed (Python cannot stop a thread), so keep I/O in it bounded by timeouts."""

    run: Callable[[StepContext], str]
    name: str = ""
    visible: bool = False
    soft_limit_s: float = 5.0
    fallback_text: str = DEFAULT_FALLBACK
    continue_on_fallback: bool = False
    min_budget_s: float = 0.05

    @property
    def calls_model(self) -> bool:
        return False


AnyStep = Step | PythonStep


@dataclass(frozen=True, slots=True)
class On:
    """An event pattern: `kind` from agent `agent` on streams matching `streams` (shell
    globs: `support:*`), for `reply.done` only with a status in `statuses`. A
    `published` event comes from a client, not an agent: its pattern names streams only."""

    kind: str = "reply.done"
    agent: str = "*"
    streams: str = "*"
    statuses: tuple[str, ...] = ("ok",)

    def matches(self, kind: str, agent: str, stream: str, status: str | None = None) -> bool:
        return (
            kind == self.kind
            and fnmatch.fnmatchcase(agent, self.agent)
            and fnmatch.fnmatchcase(stream, self.streams)
            and (status is None or status in self.statuses)
        )


@dataclass(frozen=True, slots=True)
class Agent:
    name: str
    steps: tuple[AnyStep, ...]
    deadline_s: float = field(default_factory=lambda: conf().run_deadline_s)
    subscribes: tuple[On, ...] = ()
    description: str = ""

    def step_names(self) -> list[str]:
        """Each step's name: its own, else `step1`, `step2`, ... by position."""
        return [step.name or f"step{index + 1}" for index, step in enumerate(self.steps)]


class UnknownAgent(LookupError):
    pass


class BadAgent(ValueError):
    """A definition that could never run as written; raised at registration (start-up)."""


_registry: dict[str, Agent] = {}
# Kinds some agent ever subscribed to: a `publish` with no subscriber anywhere costs a set
# lookup (never shrunk: a replaced definition at worst costs the full check).
_subscribed_kinds: set[str] = set()


def validate(agent: Agent) -> None:
    if not AGENT_NAME.match(agent.name):
        raise BadAgent(f"agent name {agent.name!r}: lowercase letters, digits, '.', '-', '_'")
    if not agent.steps:
        raise BadAgent(f"agent {agent.name!r} has no steps")
    for step in agent.steps:
        if not isinstance(step, (Step, PythonStep)):
            raise BadAgent(f"agent {agent.name!r}: {step!r} is neither a Step nor a PythonStep")
    names = agent.step_names()
    if len(set(names)) != len(names):
        raise BadAgent(f"agent {agent.name!r}: step names must differ, got {names}")
    for step in agent.steps:
        if step.soft_limit_s <= 0:
            raise BadAgent(f"agent {agent.name!r}: a step's soft_limit_s must be positive")
        if isinstance(step, Step) and step.rate_limit is not None:
            from streams.rate_limits import BadLimits, parse_limits

            try:
                parse_limits({agent.name: step.rate_limit})
            except BadLimits as error:
                raise BadAgent(f"agent {agent.name!r}: a step's rate_limit: {error}") from None
        if isinstance(step, Step) and step.fallbacks:
            try:
                check_fallbacks(step.fallbacks)
            except ValueError as error:
                raise BadAgent(f"agent {agent.name!r}: a step's fallbacks: {error}") from None
    if agent.deadline_s < 0:
        raise BadAgent(f"agent {agent.name!r}: deadline_s must not be negative")
    for pattern in agent.subscribes:
        if pattern.kind not in SUBSCRIBABLE_KINDS:
            raise BadAgent(
                f"agent {agent.name!r} subscribes to {pattern.kind!r}; "
                f"supported: {sorted(SUBSCRIBABLE_KINDS)}"
            )
        if pattern.kind == "published" and pattern.agent != "*":
            raise BadAgent(
                f"agent {agent.name!r}: published events come from clients; "
                "their pattern names streams, not an agent"
            )


def check_fallbacks(fallbacks: tuple[FallbackModel, ...] | list[FallbackModel]) -> None:
    """ValueError naming the first problem of a fallback list: too long, not FallbackModel,
    a backend name or key variable of the wrong shape. Whether the backend exists is known
    only where backends are (the worker; the admin checks it for a tenant's list)."""
    if len(fallbacks) > MAX_FALLBACK_MODELS:
        raise ValueError(f"at most {MAX_FALLBACK_MODELS} fallback models, got {len(fallbacks)}")
    for fallback in fallbacks:
        if not isinstance(fallback, FallbackModel):
            raise ValueError(f"{fallback!r} is not a FallbackModel")
        if not BACKEND_NAME.match(fallback.backend):
            raise ValueError(f"backend {fallback.backend!r}: lowercase letters, digits, '.-_'")
        if fallback.api_key_env and not ENV_NAME.match(fallback.api_key_env):
            raise ValueError(f"api_key_env {fallback.api_key_env!r}: a variable's NAME")
        if len(fallback.model) > 200 or len(fallback.base_url) > 200:
            raise ValueError("a fallback's model and base_url are at most 200 characters")


FALLBACK_FIELDS = ("backend", "model", "base_url", "api_key_env")


def fallback_from(entry: object) -> FallbackModel:
    """A FallbackModel from its JSON object ({"backend", "model"?, "base_url"?,
    "api_key_env"?}, as a tenant's grant holds it); TypeError or ValueError for anything
    else. The caller checks the list with check_fallbacks."""
    if not isinstance(entry, Mapping):
        raise TypeError(f"a fallback model is an object, not {type(entry).__name__}")
    unknown = set(entry) - set(FALLBACK_FIELDS)
    if unknown:
        raise ValueError(f"unknown fields {sorted(map(str, unknown))}")
    values = {name: entry.get(name, "") for name in FALLBACK_FIELDS}
    if not all(isinstance(value, str) for value in values.values()):
        raise TypeError("a fallback model's fields are strings")
    return FallbackModel(**values)


def register(agent: Agent) -> Agent:
    """Make the agent available by name (a later definition of the name replaces it)."""
    validate(agent)
    _registry[agent.name] = agent
    _subscribed_kinds.update(pattern.kind for pattern in agent.subscribes)
    return agent


def agent(
    name: str,
    *,
    deadline_s: float | None = None,
    subscribes: tuple[On, ...] = (),
    description: str = "",
) -> Callable[[Callable[[], tuple[AnyStep, ...] | list[AnyStep]]], Agent]:
    """Decorator form: the decorated function returns the agent's steps.

    @agent("triage", subscribes=(On(agent="intake"),))
    def triage():
        return [Step(backend="openai", name="route", visible=False), ...]
    """

    def define(build: Callable[[], tuple[AnyStep, ...] | list[AnyStep]]) -> Agent:
        extra: dict[str, Any] = {} if deadline_s is None else {"deadline_s": deadline_s}
        return register(
            Agent(
                name=name,
                steps=tuple(build()),
                subscribes=tuple(subscribes),
                description=description or (build.__doc__ or "").strip(),
                **extra,
            )
        )

    return define


def get_agent(name: str) -> Agent:
    try:
        return _registry[name]
    except KeyError:
        raise UnknownAgent(name) from None


def agent_names() -> list[str]:
    return sorted(_registry)


# Backends that call nothing without a model name, and the setting naming their default.
DEFAULT_MODELS: dict[str, Callable[[Conf], str]] = {
    "openai": lambda config: config.openai_model,
    "anthropic": lambda config: config.anthropic_model,
}


def missing_configuration(agent: Agent, overrides: Mapping[str, str]) -> str:
    """Why every run of `agent` would end on its fallback, as a short phrase for people
    ("model not configured"), or "" when nothing it needs is known to be missing.
    `overrides` are the tenant's for this agent (TenantConfig.agent_overrides). A step is
    missing its model only when no model of its chain (its own, then its fallback models)
    has one."""
    for step in agent.steps:
        if not isinstance(step, Step):
            continue
        own = (step.backend, overrides.get("model") or step.model)
        chain = [own] + [(f.backend, f.model) for f in _fallbacks_of(step, overrides)]
        if not any(_has_model(backend, model) for backend, model in chain):
            return "model not configured"
    return ""


def _has_model(backend: str, model: str) -> bool:
    default_model = DEFAULT_MODELS.get(backend)
    return default_model is None or bool(model or default_model(conf()))


def _fallbacks_of(step: Step, overrides: Mapping[str, str]) -> tuple[FallbackModel, ...]:
    """The step's fallback models for a tenant: its grant's list (JSON text) when set and
    readable, else the step's own."""
    raw = overrides.get("fallbacks") or ""
    if raw:
        try:
            return tuple(fallback_from(entry) for entry in json.loads(raw))
        except (TypeError, ValueError):
            pass
    return step.fallbacks


def subscribers(kind: str, from_agent: str, stream: str, status: str | None = None) -> list[Agent]:
    """The agents an event starts, by name (each once, whatever number of its patterns
    match)."""
    if kind not in _subscribed_kinds:
        return []
    return [
        candidate
        for name, candidate in sorted(_registry.items())
        if any(p.matches(kind, from_agent, stream, status) for p in candidate.subscribes)
    ]


class _Outputs(dict[str, str]):
    """Template lookups: an unknown name is left as written rather than failing the step
    (a prompt may contain braces of its own, e.g. JSON examples)."""

    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def render_prompt(prompt: Prompt, context: StepContext) -> str:
    if prompt is None:
        return context.input
    if callable(prompt):
        return prompt(context)
    values = _Outputs(context.outputs)
    values.update(input=context.input, message=context.message)
    try:
        return prompt.format_map(values)
    except (ValueError, IndexError, AttributeError, KeyError):
        # Braces the template did not mean as fields ("{" alone, "{0}"): taken literally.
        return prompt


# The built-in agent: replies with the message text through the simulated backend.
register(Agent(name="echo", steps=(Step(backend="simulated", model="echo"),)))
