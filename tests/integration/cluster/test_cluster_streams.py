"""Send, publish, cancel and resume on a Redis Cluster with RabbitMQ (see conftest.py):
the suite's own tests, run again."""

import pytest

from tests.integration.test_resume import (  # noqa: F401
    reconnecting,
    test_a_mid_generation_drop_resumes_the_rest_of_the_reply,
    test_a_session_resumes_on_another_gateway_with_exactly_what_was_missed,
    test_sends_in_flight_when_a_gateway_dies_each_get_exactly_one_reply,
    test_subscribers_on_three_gateways_see_one_publisher_in_one_order,
)
from tests.integration.test_runs import (  # noqa: F401
    test_a_run_reaches_every_subscriber,
    test_cancel_ends_a_slow_run_as_cancelled,
    test_cancel_of_an_unknown_id_is_not_found,
    test_concurrent_runs_on_one_stream_each_get_one_done,
    test_duplicate_send_gets_the_original_ack_and_starts_nothing,
    test_echo_round_trip_streams_the_reply,
)
from tests.integration.test_streams import (  # noqa: F401
    test_duplicate_publish_gets_the_original_ack_and_appends_nothing,
    test_publish_fans_out_to_every_subscriber_in_order,
    test_since_older_than_the_retained_window_is_history_expired,
    test_subscribe_since_recovers_exactly_the_missed_events_then_live,
    test_tenants_sharing_a_stream_name_see_nothing_of_each_other,
    test_unsubscribe_stops_delivery,
)

pytestmark = pytest.mark.asyncio
