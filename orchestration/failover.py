"""Failover across models: which models a step tries, in which order, and on which errors
the next one is tried. Pure: no I/O (orchestration/steps.py makes the calls).

A model step's chain is its own model (with the tenant's overrides of model, key and
endpoint) followed by its fallback models: the tenant's list from its agent grant when it
set one, else the step's `fallbacks` in code. Each model in turn gets the step's retries
for transient errors; when a model *fails over*, the next one is tried, and when the chain
is spent the step gives its fixed fallback text as before.

What fails over (the fault is this model's, another may well answer):
- a transient provider error (5xx, 408, 429, a connection refused or cut mid-stream) once
  this model's retries are spent, or when the run cannot afford another wait for it;
- a call that ran out the step's soft limit (`timeout`);
- this model's rate limit (workers/quotas.py) not coming back in time to start it;
- this model's configuration: no model name, its key's variable unset, an unknown backend
  name, or the provider refusing the key or the model (401, 403, 404).

What does not (another model would be asked the same thing, or nobody owes an answer):
- any other permanent 4xx (400 bad request, 413 too large, 422 ...), a malformed stream;
- too little of the run's time left to start a call (`deadline`);
- a bug in the step (`internal`), a cancelled or taken-over run.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from agents import MAX_FALLBACK_MODELS, FallbackModel, Step, check_fallbacks, fallback_from
from workers.backends import ModelCancelled, ModelError, ModelTimeout

logger = logging.getLogger(__name__)

# The key of a run's agent_config (the tenant's overrides) holding its fallback list, as
# JSON text so the overrides stay a mapping of strings.
FALLBACKS_OVERRIDE = "fallbacks"
# Statuses that say the provider will not serve this model with this key at all: another
# model or endpoint may, so they fail over although they are permanent for this one.
MODEL_REFUSED_STATUSES = frozenset({401, 403, 404})


@dataclass(frozen=True, slots=True)
class Candidate:
    """One model of a step's chain; `position` 0 is the step's own, 1.. its fallbacks."""

    backend: str
    model: str = ""
    api_key_env: str = ""
    base_url: str = ""
    position: int = 0

    @property
    def is_fallback(self) -> bool:
        return self.position > 0


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a model of the chain did not answer: a fallback `reason` (timeout, model_error,
    rate_limited, deadline, internal) and the error, when there was one."""

    reason: str
    error: BaseException | None = None


def chain(step: Step, overrides: Mapping[str, str]) -> list[Candidate]:
    """The models the step tries, in order. `overrides` are the run's agent_config: the
    tenant's model, api_key_env and base_url apply to the step's own model (not to the
    simulated backend's, whose options are the test's), its fallback list replaces the
    step's."""
    own = overrides if step.backend != "simulated" else {}
    candidates = [
        Candidate(
            backend=step.backend,
            model=own.get("model") or step.model,
            api_key_env=own.get("api_key_env", ""),
            base_url=own.get("base_url", ""),
        )
    ]
    fallbacks = tenant_fallbacks(overrides.get(FALLBACKS_OVERRIDE, "")) or step.fallbacks
    for position, fallback in enumerate(fallbacks[:MAX_FALLBACK_MODELS], start=1):
        candidates.append(
            Candidate(
                backend=fallback.backend,
                model=fallback.model,
                api_key_env=fallback.api_key_env,
                base_url=fallback.base_url,
                position=position,
            )
        )
    return candidates


def tenant_fallbacks(raw: str) -> tuple[FallbackModel, ...]:
    """A tenant's fallback list as the run carries it (JSON text, checked by the admin
    when saved); () when absent or, defensively, malformed."""
    if not raw:
        return ()
    try:
        entries = orjson.loads(raw)
        fallbacks = tuple(fallback_from(entry) for entry in entries)
        check_fallbacks(fallbacks)
    except (orjson.JSONDecodeError, TypeError, ValueError, AttributeError):
        logger.warning("a tenant's fallback list is malformed; the step's own is used")
        return ()
    return fallbacks


def fails_over(failure: Failure) -> bool:
    """Whether the next model of the chain is tried after this failure (module doc)."""
    if failure.reason == "rate_limited":
        return True
    if failure.reason in ("deadline", "internal"):
        return False
    error = failure.error
    if not isinstance(error, ModelError) or isinstance(error, ModelCancelled):
        return False
    if isinstance(error, ModelTimeout) or error.transient or error.misconfigured:
        return True
    return error.status in MODEL_REFUSED_STATUSES


def failure_of(error: ModelError) -> Failure:
    """The fallback reason a model error gives when the chain ends on it."""
    return Failure("timeout" if isinstance(error, ModelTimeout) else "model_error", error)


def answered_by(candidate: Candidate, default_model: str) -> dict[str, Any]:
    """What a reply.done's detail says of the model that answered (`detail.model`)."""
    return {
        "backend": candidate.backend,
        "model": candidate.model or default_model,
        "fallback": candidate.is_fallback,
    }
