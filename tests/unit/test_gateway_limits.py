"""Per-tenant bounds of realtime/admission.py that need no Redis: fault options, subscriptions."""

from __future__ import annotations

import dataclasses

import pytest
from django.test import override_settings

from realtime.admission import FAULT_OPTIONS, NEVER_RETRY_MS, run_options, subscription_refusal
from tenants.config import TenantConfig

TENANT = TenantConfig("acme", "s", True, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1)
FAULTY = {"fail": "timeout", "latency_ms": 600_000, "chunk_delay_ms": 5, "chunks": 3}


def switchboard_settings(**changes: object) -> override_settings:
    from django.conf import settings

    return override_settings(SWITCHBOARD={**settings.SWITCHBOARD, **changes})


def test_fault_options_are_dropped_unless_allowed() -> None:
    with switchboard_settings(FAULT_INJECTION=False):
        assert run_options(FAULTY, TENANT) == {"chunks": 3}
        assert set(FAULT_OPTIONS) == {"fail", "latency_ms", "chunk_delay_ms"}
        ordinary = {"temperature": 0.2}
        assert run_options(ordinary, TENANT) is ordinary  # nothing to drop: no copy
        allowed = dataclasses.replace(TENANT, fault_injection=True)
        assert run_options(FAULTY, allowed) == FAULTY
    with switchboard_settings(FAULT_INJECTION=True):
        assert run_options(FAULTY, TENANT) == FAULTY


@pytest.mark.parametrize(("subscribed", "refused"), [(0, False), (2, False), (3, True)])
def test_subscriptions_past_the_tenant_cap_are_refused(subscribed: int, refused: bool) -> None:
    tenant = dataclasses.replace(TENANT, max_subscriptions_per_connection=3)
    error = subscription_refusal(tenant, subscribed, "room", "f-1")
    assert (error is not None) == refused
    if error is not None:
        assert (error.code, error.frame_id, error.retry_after_ms) == (
            "rate_limited",
            "f-1",
            NEVER_RETRY_MS,
        )
        assert "(3)" in error.detail and error.extra == {"stream": "room"}
