"""The agent registry (agents/__init__.py)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from pytest_django.fixtures import Settings

import agents
from agents import Agent, Step, UnknownAgent, agent_names, get_agent, register


@pytest.fixture(autouse=True)
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Agents registered by a test vanish after it; the built-in ones stay."""
    monkeypatch.setattr(agents, "_registry", dict(agents._registry))


def test_echo_is_built_in() -> None:
    echo = get_agent("echo")
    assert echo.name == "echo"
    assert [(step.backend, step.model) for step in echo.steps] == [("simulated", "echo")]
    assert "echo" in agent_names()


def test_unknown_agent() -> None:
    with pytest.raises(UnknownAgent) as caught:
        get_agent("no-such-agent")
    assert isinstance(caught.value, LookupError)
    assert caught.value.args == ("no-such-agent",)


def test_register_returns_the_agent_and_makes_it_findable() -> None:
    agent = Agent(name="summarise", steps=(Step(backend="simulated"),), deadline_s=5)
    assert register(agent) is agent
    assert get_agent("summarise") is agent


def test_registering_a_name_again_replaces_it() -> None:
    first = register(Agent(name="twice", steps=(Step(backend="simulated", model="a"),)))
    second = register(Agent(name="twice", steps=(Step(backend="simulated", model="b"),)))
    assert get_agent("twice") is second is not first
    assert agent_names().count("twice") == 1


def test_names_are_sorted() -> None:
    for name in ("zeta", "alpha", "mid"):
        register(Agent(name=name, steps=(Step(backend="simulated"),)))
    names = agent_names()
    assert names == sorted(names)
    assert {"alpha", "mid", "zeta", "echo"} <= set(names)


def test_registrations_do_not_leak_between_tests() -> None:
    assert "summarise" not in agent_names()


def test_defaults_come_from_settings_when_built(settings: Settings) -> None:
    settings.SWITCHBOARD = {
        **settings.SWITCHBOARD,
        "MODEL_SOFT_LIMIT_S": 1.25,
        "MODEL_MAX_RETRIES": 7,
        "RUN_DEADLINE_S": 9.5,
    }
    step = Step(backend="simulated")
    assert (step.soft_limit_s, step.max_retries) == (1.25, 7)
    assert Agent(name="x", steps=(step,)).deadline_s == 9.5
    assert step.fallback_text  # a degraded reply always has something to say


def test_agents_and_steps_are_immutable() -> None:
    step = Step(backend="simulated")
    with pytest.raises(AttributeError):
        step.backend = "other"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        get_agent("echo").name = "other"  # type: ignore[misc]


# --- definitions: validation, the decorator, patterns, prompts -----------------------------


def _one_step() -> tuple[Step]:
    return (Step(backend="simulated"),)


@pytest.mark.parametrize(
    ("definition", "complaint"),
    [
        (lambda: Agent(name="Bad Name", steps=_one_step()), "agent name"),
        (lambda: Agent(name="empty", steps=()), "no steps"),
        (
            lambda: Agent(
                name="twins",
                steps=(Step(backend="simulated", name="a"), Step(backend="simulated", name="a")),
            ),
            "step names must differ",
        ),
        (lambda: Agent(name="odd", steps=("not a step",)), "neither a Step"),  # type: ignore[arg-type]
        (
            lambda: Agent(name="rushed", steps=(Step(backend="simulated", soft_limit_s=0),)),
            "soft_limit_s",
        ),
        (lambda: Agent(name="neg", steps=_one_step(), deadline_s=-1), "deadline_s"),
        (
            lambda: Agent(name="deaf", steps=_one_step(), subscribes=(agents.On("message"),)),
            "supported",
        ),
        (
            lambda: Agent(
                name="metered", steps=(Step(backend="simulated", rate_limit={"rps": 1}),)
            ),
            "rate_limit",
        ),
    ],
)
def test_a_definition_that_could_never_run_is_refused_at_registration(
    definition: Callable[[], Agent], complaint: str
) -> None:
    with pytest.raises(agents.BadAgent, match=complaint):
        register(definition())


def test_the_decorator_registers_the_steps_it_returns() -> None:
    @agents.agent("decorated", deadline_s=12, subscribes=(agents.On(agent="echo"),))
    def decorated() -> list[Step]:
        """Says what it does."""
        return [Step(backend="simulated", name="only")]

    assert get_agent("decorated") is decorated
    assert decorated.deadline_s == 12
    assert decorated.description == "Says what it does."
    assert decorated.step_names() == ["only"]


def test_steps_without_names_are_named_by_position() -> None:
    defined = Agent(
        name="positions",
        steps=(Step(backend="simulated"), agents.PythonStep(str, name="mine"), Step(backend="x")),
    )
    assert defined.step_names() == ["step1", "mine", "step3"]


@pytest.mark.parametrize(
    ("pattern", "event", "matches"),
    [
        (agents.On(agent="answer", streams="support:*"), ("answer", "support:1", "ok"), True),
        (agents.On(agent="answer", streams="support:*"), ("answer", "sales:1", "ok"), False),
        (agents.On(agent="answer", streams="support:*"), ("other", "support:1", "ok"), False),
        (agents.On(agent="answer"), ("answer", "support:1", "degraded"), False),
        (agents.On(statuses=("ok", "degraded")), ("any", "s", "degraded"), True),
        (agents.On(agent="a?"), ("ab", "s", "ok"), True),
    ],
)
def test_patterns_match_kind_agent_stream_and_status(
    pattern: agents.On, event: tuple[str, str, str], matches: bool
) -> None:
    assert pattern.matches("reply.done", *event) is matches
    assert pattern.matches("message", *event) is False


def test_subscribers_lists_each_agent_once_however_many_patterns_match() -> None:
    register(
        Agent(
            name="watcher",
            steps=_one_step(),
            subscribes=(agents.On(agent="echo"), agents.On(streams="room*")),
        )
    )
    assert [a.name for a in agents.subscribers("reply.done", "echo", "room1", "ok")] == ["watcher"]
    assert agents.subscribers("reply.done", "echo", "room1", "failed") == []


def _context(**extra: object) -> agents.StepContext:
    fields: dict = {
        "tenant": "t",
        "stream": "s",
        "agent": "a",
        "run_id": "r",
        "message": "the message",
        "input": "the input",
        "outputs": {"route": "billing"},
        "options": {},
    }
    fields.update(extra)
    return agents.StepContext(**fields)


@pytest.mark.parametrize(
    ("prompt", "rendered"),
    [
        (None, "the input"),
        ("{input} / {message} / {route}", "the input / the message / billing"),
        ("{missing} stays", "{missing} stays"),
        ("a lone { brace", "a lone { brace"),
        ("{0} positional", "{0} positional"),
        (lambda ctx: ctx.message.upper(), "THE MESSAGE"),
    ],
)
def test_render_prompt(prompt: agents.Prompt, rendered: str) -> None:
    assert agents.render_prompt(prompt, _context()) == rendered


def test_published_patterns_match_streams_and_only_subscribed_kinds_are_looked_at() -> None:
    pattern = agents.On("published", streams="tickets:*")
    assert pattern.matches("published", "", "tickets:9")
    assert not pattern.matches("published", "", "sales:9")
    assert not pattern.matches("reply.done", "echo", "tickets:9", "ok")
    register(Agent(name="intake", steps=_one_step(), subscribes=(pattern,)))
    assert [a.name for a in agents.subscribers("published", "", "tickets:9")] == ["intake"]
    assert agents.subscribers("no.such.kind", "", "tickets:9") == []


def test_missing_configuration_names_a_model_step_without_a_model(settings: Settings) -> None:
    settings.SWITCHBOARD = {**settings.SWITCHBOARD, "OPENAI_MODEL": "", "ANTHROPIC_MODEL": ""}
    needs_model = Agent(name="needs", steps=(Step(backend="openai"),))
    assert agents.missing_configuration(needs_model, {}) == "model not configured"
    # The tenant's override, the step's own model or the backend's default is enough.
    assert agents.missing_configuration(needs_model, {"model": "m"}) == ""
    assert agents.missing_configuration(Agent(name="own", steps=(Step("openai", "m"),)), {}) == ""
    settings.SWITCHBOARD = {**settings.SWITCHBOARD, "OPENAI_MODEL": "default"}
    assert agents.missing_configuration(needs_model, {}) == ""
    # Backends that need no model name (the simulated one, echo) always can run.
    assert agents.missing_configuration(get_agent("echo"), {}) == ""
