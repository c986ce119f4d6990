"""What the test agents are called, which fake model each step calls and what they answer.

Plain constants, no Django: the tests import this module without registering the agents in
their own process (agents.py does that, in the cluster's processes only).
"""

from __future__ import annotations

# it-chain: a hidden route step, a visible answer told the route's output, a visible check.
CHAIN = "it-chain"
CHAIN_ROUTE_TEXT = "topic-from-the-hidden-route-step"
CHAIN_ROUTE_MODEL = f"stream?text={CHAIN_ROUTE_TEXT}&pieces=2"
CHAIN_ROUTE_PROMPT = "route:{message}"
CHAIN_ANSWER_MODEL = "stream?text=the-chain-answer-streamed-in-three-pieces&pieces=3&delay_ms=150"
CHAIN_ANSWER_PROMPT = "topic={route}|{message}"
CHAIN_CHECKED = "|checked"

# it-flaky: 429 with Retry-After once, then the prompt streams. The retry backoff of the
# cluster is 0.05 s, so only the provider's Retry-After can make the retry wait this long.
FLAKY = "it-flaky"
FLAKY_RETRY_AFTER_S = 1
FLAKY_MODEL = f"status=429&retry_after={FLAKY_RETRY_AFTER_S}&fail_first=1&pieces=4&delay_ms=150"
FLAKY_PROMPT = "flaky:{message}"

# it-cut: the connection is dropped after two pieces once, then the prompt streams.
CUT = "it-cut"
CUT_PIECES_BEFORE = 2
# The retry answers differently, as a real model does: the client must never see the two
# answers spliced.
CUT_RETRY_TEXT = "a different answer the second time"
CUT_MODEL = (
    f"disconnect?after={CUT_PIECES_BEFORE}&fail_first=1&pieces=4&delay_ms=150"
    f"&retry_text={CUT_RETRY_TEXT.replace(' ', '+')}"
)
CUT_PROMPT = "cut:{message}"

# it-stall: one piece, then silence past the step's soft limit; never retried.
STALL = "it-stall"
STALL_SOFT_LIMIT_S = 1.0
STALL_MODEL = "stall?after=1&pieces=4"
STALL_PROMPT = "stall:{message}"
STALL_FALLBACK = "it-stall: the model went quiet"

# it-hang: the same stall under a soft limit far longer than the test waits after a cancel
# (still inside the cluster's 8 s run deadline): only the cancel can end its call early.
HANG = "it-hang"
HANG_SOFT_LIMIT_S = 6.0
HANG_MODEL = "stall?after=1&pieces=4&tag=hang"
HANG_PROMPT = "hang:{message}"

# it-route-fails: the hidden route step's model answers a permanent 400; its fallback
# "general" is its output and the answer step goes on.
ROUTE_FAILS = "it-route-fails"
ROUTE_FAILS_ROUTE_MODEL = "status=400"
ROUTE_FAILS_ROUTE_PROMPT = "route:{message}"
ROUTE_FAILS_FALLBACK = "general"
ROUTE_FAILS_ANSWER_MODEL = "stream?pieces=2&delay_ms=150"
ROUTE_FAILS_ANSWER_PROMPT = "topic={route}|{message}"

# it-ping and it-pong answer each other's reply.done on streams "loop:*": a loop only the
# tenant's maximum causal depth stops.
PING, PONG = "it-ping", "it-pong"
LOOP_STREAMS = "loop:*"
PING_PROMPT = "ping:{input}"
PONG_PROMPT = "pong:{input}"
LOOP_MODEL = "stream?pieces=2"

# A step with a per-tenant rate limit of one call a minute: a tenant's second call within
# the minute would wait about 60 s, far past the run's deadline, so it answers at once
# with the fallback, reason rate_limited; another tenant's budget is its own.
METERED = "it-metered"
METERED_RPM = 1
METERED_MODEL = "stream?pieces=2"
METERED_PROMPT = "metered:{message}"
METERED_FALLBACK = "it-metered: over this tenant's rate for the step"

# Started by a client's `publish` on streams matching inbox:*; its message is the data.
INTAKE = "it-intake"
INTAKE_STREAMS = "inbox:*"
INTAKE_MODEL = "stream?pieces=2"
INTAKE_PROMPT = "intake:{message}"

# Steering (`send` with `interrupt: true`): echoes the new message after the text of the
# runs it interrupted.
STEER = "steer"
STEER_MARK = "interrupted after: "
