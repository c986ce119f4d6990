"""What the agents of agents.py are called and the tool they offer, importable by the tests
without registering the agents in the test process."""

from __future__ import annotations

from typing import Literal

PLAIN = "llama-plain"  # one step that streams a reply
TOOLS = "llama-tools"  # one step that offers `lookup`


def lookup(key: Literal["alpha", "beta"]) -> str:
    """Look a key up."""
    return f"value-of-{key}"
