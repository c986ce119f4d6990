"""Agents, the cancel of a stalled call and triggers (agents subscribed to events) on a
Redis Cluster with RabbitMQ (see conftest.py): the suite's own tests, run again."""

import pytest

from tests.integration.test_agents import (  # noqa: F401
    test_a_chain_streams_only_its_visible_steps,
    test_a_published_event_starts_its_subscriber_once_even_when_published_twice,
    test_an_assistant_reply_on_a_support_stream_starts_one_summariser,
    test_assistant_streams_its_reply_from_the_provider,
)
from tests.integration.test_cancel import (  # noqa: F401
    test_cancel_of_a_finished_run_says_how_it_ended,
    test_cancel_of_a_stalled_call_frees_its_worker_at_once,
)

pytestmark = pytest.mark.asyncio
