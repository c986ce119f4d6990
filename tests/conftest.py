"""Fixtures any test may use. Suite-specific ones live in each suite's own conftest.py."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable

import pytest

# Tests get their own Redis database, flushed before use: never a deployment's.
DEFAULT_TEST_REDIS_URL = "redis://127.0.0.1:6379/15"


@pytest.fixture(scope="session")
def test_redis_url() -> str:
    """The Redis URL tests may flush and fill (SWITCHBOARD_TEST_REDIS_URL overrides)."""
    return os.environ.get("SWITCHBOARD_TEST_REDIS_URL") or DEFAULT_TEST_REDIS_URL


def neighbour_database(url: str, offset: int) -> str:
    """The same Redis, another database: suites that flush must not flush each other."""
    base, _, database = url.rpartition("/")
    number = int(database) if database.isdigit() else 0
    return f"{base}/{(number + offset) % 16}"


@pytest.fixture
def unique() -> Callable[[str], str]:
    """Make names no other test uses: `unique("room")` -> "room-3f2a9c1d"."""

    def make(prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex[:8]}"

    return make
