"""The agent registry (orchestration/agents.py)."""

from __future__ import annotations

import pytest
from pytest_django.fixtures import Settings

from orchestration import agents
from orchestration.agents import Agent, Step, UnknownAgent, agent_names, get_agent, register


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
        register(Agent(name=name, steps=()))
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
