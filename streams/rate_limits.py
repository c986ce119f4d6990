"""Per-minute rate limits as configured: requests and tokens per minute of a model backend
(SWITCHBOARD["BACKEND_LIMITS"]) or of an agent's step (`Step.rate_limit`).

Only the parsing, pure: agent definitions are checked with it when they register (in every
process, gateways included) and the workers turn what it returns into Redis token buckets
(workers/quotas.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class BackendLimit:
    rpm: int | None = None  # requests per minute
    tpm: int | None = None  # tokens per minute


class BadLimits(ValueError):
    pass


def parse_limits(raw: Mapping[str, Any] | None) -> dict[str, BackendLimit]:
    """{"backend": {"rpm": N, "tpm": M}} -> BackendLimit per backend; refuses nonsense so a
    typo fails at start, not as an unlimited backend."""
    limits: dict[str, BackendLimit] = {}
    for name, spec in (raw or {}).items():
        if not isinstance(spec, Mapping) or not set(spec) <= {"rpm", "tpm"}:
            raise BadLimits(f"backend limit {name!r}: expected an object with rpm and/or tpm")
        values = {}
        for unit in ("rpm", "tpm"):
            value = spec.get(unit)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value <= 0
            ):
                raise BadLimits(f"backend limit {name!r}: {unit} must be a positive integer")
            values[unit] = value
        limits[name] = BackendLimit(**values)
    return limits
