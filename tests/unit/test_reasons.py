"""What a degraded reply.done's detail.message says (streams/reasons.py)."""

from __future__ import annotations

import pytest

from streams.reasons import degraded_message
from workers.backends import ModelError, ModelTimeout


@pytest.mark.parametrize(
    ("reason", "error", "message"),
    [
        (
            "model_error",
            ModelError("x: no model", False, summary="model not configured"),
            "model not configured",
        ),
        (
            "model_error",
            ModelError("answered 500: boom", True, summary="provider error 500"),
            "provider error 500",
        ),
        # Without a summary the provider's words stay in the log, never in the reply.
        ("model_error", ModelError("answered 500: secret detail", True), "model error"),
        ("timeout", ModelTimeout(), "timeout"),
        ("deadline", None, "no time left before the run's deadline"),
        ("rate_limited", None, "model rate limit reached"),
        ("internal", RuntimeError("a bug"), "internal error"),
        ("something_new", None, "something new"),
    ],
)
def test_degraded_message(reason: str, error: BaseException | None, message: str) -> None:
    assert degraded_message(reason, error) == message
