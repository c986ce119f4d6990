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

# Failover across models (one provider, told apart by model name). it-failover: the step's
# own model answers 500 every time (retried once), its fallback model answers.
FAILOVER = "it-failover"
FAILOVER_PRIMARY = "status=500&tag=failover"
FAILOVER_ANSWER = "answered by the fallback model"
FAILOVER_SECOND = f"stream?text={FAILOVER_ANSWER.replace(' ', '+')}&pieces=3"
FAILOVER_PROMPT = "failover:{message}"

# it-failover-cut: the own model streams two pieces, then the connection drops (no
# retry): the fallback's whole answer follows a reply.restart, never spliced on.
FAILOVER_CUT = "it-failover-cut"
FAILOVER_CUT_PIECES_BEFORE = 2
FAILOVER_CUT_PRIMARY = f"disconnect?after={FAILOVER_CUT_PIECES_BEFORE}&pieces=4&delay_ms=100"
FAILOVER_CUT_ANSWER = "the fallback's whole answer"
FAILOVER_CUT_SECOND = f"stream?text={FAILOVER_CUT_ANSWER.replace(' ', '+')}&pieces=3"
FAILOVER_CUT_PROMPT = "failover-cut:{message}"

# it-failover-down: every model of the chain fails: the step's fixed fallback text.
FAILOVER_DOWN = "it-failover-down"
FAILOVER_DOWN_MODELS = ("status=503&tag=down", "status=502&tag=down")
FAILOVER_DOWN_FALLBACK = "it-failover-down: no model could answer"
FAILOVER_DOWN_PROMPT = "failover-down:{message}"

# it-failover-bad: the own model refuses the request itself (400): no fallback model is
# asked, the step gives its fallback text.
FAILOVER_BAD = "it-failover-bad"
FAILOVER_BAD_PRIMARY = "status=400&tag=failover"
FAILOVER_BAD_SECOND = "stream?text=never+asked"
FAILOVER_BAD_FALLBACK = "it-failover-bad: the request was refused"
FAILOVER_BAD_PROMPT = "failover-bad:{message}"

# it-failover-tenant: as it-failover, but a tenant's grant lists its own fallback model
# (another endpoint, its own key), which replaces the code's.
FAILOVER_TENANT = "it-failover-tenant"
FAILOVER_TENANT_PRIMARY = "status=500&tag=tenant"
FAILOVER_TENANT_CODE_SECOND = "stream?text=the+code's+fallback"
FAILOVER_TENANT_PROMPT = "failover-tenant:{message}"

# it-tools*: a step offering tools (agents/tools.py), its model a fake that calls one
# (tests/fakes/openai_server.py, kind "tools") and answers "answer:" + the results.
TOOL_ARGS = '{"key":+"alpha"}'
TOOLS = "it-tools"  # one call of `lookup`, then the answer
TOOLS_MODEL = f"tools?call=lookup&args={TOOL_ARGS}&say=Looking+it+up.&pieces=2"
TOOLS_ANTHROPIC = "it-tools-anthropic"  # the same over the "anthropic" backend
TOOL_RAISES = "it-tool-raises"
TOOL_RAISES_MODEL = f"tools?call=explode&args={TOOL_ARGS}"
TOOL_SLOW = "it-tool-slow"
TOOL_SLOW_MODEL = f"tools?call=dawdle&args={TOOL_ARGS}"
TOOL_SLOW_LIMIT_S = 0.5
TOOL_SLOW_SLEEP_S = 3.0
TOOL_ROUNDS = "it-tool-rounds"  # asks for calls as long as it may
TOOL_ROUNDS_MAX = 2
TOOL_ROUNDS_MODEL = f"tools?call=lookup&args={TOOL_ARGS}&rounds=99"
TOOL_STUBBORN = "it-tool-stubborn"  # asks for calls even when told not to
TOOL_STUBBORN_MODEL = f"tools?call=lookup&args={TOOL_ARGS}&rounds=99&stubborn=1"
TOOL_BAD_ARGS = "it-tool-bad-args"  # its arguments are not JSON
TOOL_BAD_ARGS_MODEL = "tools?call=lookup&args={bad"
