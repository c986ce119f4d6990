"""Presence, receipts and flow-control limits on a Redis Cluster with RabbitMQ (see
conftest.py): the suite's own tests, run again."""

import pytest

from tests.integration.test_limits import (  # noqa: F401
    test_a_client_past_its_rate_is_refused_with_the_honest_wait,
    test_a_connection_past_its_runs_in_flight_is_refused_until_one_ends,
    test_a_tenant_past_its_queued_runs_is_overloaded,
    test_connections_past_the_client_and_tenant_caps_are_closed_4029,
)
from tests.integration.test_presence import (  # noqa: F401
    short_ttl_gateway,
    test_a_client_with_two_connections_is_one_entry,
    test_presence_is_per_tenant,
    test_subscribers_see_each_others_join_and_leave,
)
from tests.integration.test_receipts import (  # noqa: F401
    test_a_receipt_beyond_the_head_is_refused,
    test_another_tenant_sees_nothing_of_a_streams_receipts,
    test_receipts_sent_over_the_websocket_are_read_over_http,
)

pytestmark = pytest.mark.asyncio
