"""Test-only agents for the integration suite, installed in the test cluster by
SWITCHBOARD_EXTRA_APPS (tests/integration/conftest.py). Their steps call the "openai"
backend, which the cluster points at the fake provider (tests/fakes/openai_server.py); the
fake's behaviour is chosen by each step's model name."""
