"""Failover across models, the pure part (orchestration/failover.py): a step's chain of
models with a tenant's overrides, and which failures move on to the next model."""

from __future__ import annotations

import json

import pytest

from agents import MAX_FALLBACK_MODELS, BadAgent, FallbackModel, Step, check_fallbacks
from orchestration import failover
from orchestration.failover import Candidate, Failure, chain, fails_over
from workers.backends import ModelCancelled, ModelError, ModelTimeout

STEP = Step(
    backend="openai",
    model="primary",
    fallbacks=(FallbackModel("anthropic", "claude"), FallbackModel("openai", "small")),
)


def test_the_chain_is_the_steps_model_then_its_fallbacks_in_order() -> None:
    assert chain(STEP, {}) == [
        Candidate("openai", "primary"),
        Candidate("anthropic", "claude", position=1),
        Candidate("openai", "small", position=2),
    ]
    assert [candidate.is_fallback for candidate in chain(STEP, {})] == [False, True, True]
    assert chain(Step(backend="openai"), {}) == [Candidate("openai", "")]


def test_the_tenants_model_key_and_endpoint_apply_to_the_steps_own_model_only() -> None:
    overrides = {"model": "theirs", "api_key_env": "THEIR_KEY", "base_url": "https://x/v1"}
    first, second, _ = chain(STEP, overrides)
    assert first == Candidate("openai", "theirs", "THEIR_KEY", "https://x/v1")
    assert second == Candidate("anthropic", "claude", position=1)
    # The simulated backend's options are the test's: no overrides reach it.
    assert chain(Step(backend="simulated", model="echo"), overrides)[0].model == "echo"


def test_a_tenants_fallback_list_replaces_the_steps() -> None:
    tenants = [{"backend": "openai", "model": "theirs", "api_key_env": "K", "base_url": "u"}]
    overrides = {failover.FALLBACKS_OVERRIDE: json.dumps(tenants)}
    assert chain(STEP, overrides)[1:] == [Candidate("openai", "theirs", "K", "u", position=1)]


@pytest.mark.parametrize(
    "raw",
    [
        "not json",
        '{"backend": "openai"}',
        '[{"backend": "Bad Name"}]',
        '[{"backend": "openai", "surprise": 1}]',
        '[{"backend": "openai", "model": 5}]',
        '[{"backend": "openai", "api_key_env": "sk-a-key-not-a-name"}]',
        json.dumps([{"backend": "openai"}] * (MAX_FALLBACK_MODELS + 1)),
        '["openai"]',
    ],
)
def test_a_malformed_tenant_list_is_ignored_for_the_steps_own(raw: str) -> None:
    assert chain(STEP, {failover.FALLBACKS_OVERRIDE: raw})[1:] == chain(STEP, {})[1:]


def model_error(
    status: int | None = None, transient: bool | None = None, misconfigured: bool = False
) -> ModelError:
    """An error as the backends raise it: a status of 408, 429 or 5xx is transient."""
    if transient is None:
        transient = status is not None and (status >= 500 or status in (408, 429))
    return ModelError("boom", transient, status=status, misconfigured=misconfigured)


@pytest.mark.parametrize(
    ("failure", "moves_on"),
    [
        # The model's fault: another may answer.
        (Failure("model_error", model_error(500)), True),
        (Failure("model_error", model_error(503)), True),
        (Failure("model_error", model_error(429)), True),
        (Failure("model_error", model_error(None, transient=True)), True),  # connection
        (Failure("timeout", ModelTimeout()), True),
        (Failure("rate_limited"), True),
        (Failure("model_error", model_error(None, misconfigured=True)), True),
        (Failure("model_error", model_error(401)), True),
        (Failure("model_error", model_error(403)), True),
        (Failure("model_error", model_error(404)), True),
        # The request's fault, or nobody is owed an answer: no other model is tried.
        (Failure("model_error", model_error(400)), False),
        (Failure("model_error", model_error(413)), False),
        (Failure("model_error", model_error(422)), False),
        (Failure("model_error", model_error(None)), False),  # a malformed stream
        (Failure("model_error", ModelCancelled()), False),
        (Failure("deadline"), False),
        (Failure("internal", RuntimeError("bug")), False),
    ],
)
def test_which_failures_fail_over(failure: Failure, moves_on: bool) -> None:
    assert fails_over(failure) is moves_on


def test_the_reason_a_chain_ends_on_is_its_last_models() -> None:
    assert failover.failure_of(ModelTimeout()).reason == "timeout"
    assert failover.failure_of(model_error(500)).reason == "model_error"


def test_the_answering_model_names_its_default_when_the_step_named_none() -> None:
    assert failover.answered_by(Candidate("openai", "", position=1), "gpt-x") == {
        "backend": "openai",
        "model": "gpt-x",
        "fallback": True,
    }
    assert failover.answered_by(Candidate("openai", "mine"), "gpt-x")["model"] == "mine"


def test_a_steps_fallback_list_is_checked_when_the_agent_is_registered() -> None:
    from agents import Agent, validate

    too_many = (FallbackModel("openai"),) * (MAX_FALLBACK_MODELS + 1)
    for fallbacks in (
        too_many,
        (FallbackModel("Open AI"),),
        (FallbackModel("x", api_key_env="k"),),
    ):
        with pytest.raises(BadAgent):
            validate(Agent("a", (Step(backend="openai", fallbacks=fallbacks),)))
    check_fallbacks([FallbackModel("openai", "m", "https://x/v1", "KEY")])
