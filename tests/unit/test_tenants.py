"""Tenant slug validation (tenants/models.py): no database needed to validate fields."""

from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError

from tenants.models import Tenant


def validate(slug: str) -> None:
    Tenant(slug=slug).full_clean(validate_unique=False, validate_constraints=False)


@pytest.mark.parametrize("slug", ["acme", "a", "0day", "a-b_c", "x" * 63])
def test_valid_slugs(slug: str) -> None:
    validate(slug)


@pytest.mark.parametrize("slug", ["", "Acme", "-acme", "_acme", "ac:me", "ac me", "x" * 64, "é"])
def test_invalid_slugs(slug: str) -> None:
    with pytest.raises(ValidationError):
        validate(slug)


def test_trailing_newline_is_not_a_valid_slug() -> None:
    with pytest.raises(ValidationError):
        validate("acme\n")
