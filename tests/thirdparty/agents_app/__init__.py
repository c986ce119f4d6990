"""Agents for the checks against third-party model servers (tests/thirdparty), installed
in their cluster by SWITCHBOARD_EXTRA_APPS. Their steps call the "openai" backend, which
that cluster points at the real server under test."""
