"""Lua scripts: every write to a stream is one atomic script.

Atomicity is what makes the promises hold: the dedupe check, the seq, the log entry, the
live notification and (for a `send`) the run record and its Celery message are written
together or not at all, so a crash between two of them cannot lose or duplicate anything.

A published notification is `SEQ "\n" EVENT_JSON` on the stream's channel.
"""

# Shared tail of every append: assign the next seq, keep it in the log, notify gateways.
# Expects locals: seq_key, log_key, channel, prefix, suffix, maxlen. Leaves `seq`, `event`.
_APPEND = """
local seq = redis.call('INCR', seq_key)
local event = prefix .. seq .. suffix
redis.call('XADD', log_key, 'MAXLEN', '~', maxlen, seq .. '-0', 'e', event)
redis.call('PUBLISH', channel, seq .. '\\n' .. event)
"""

# KEYS: seq, log, dedupe (or an unused key when ARGV[6] is ''), celery_queue
# ARGV: channel, prefix, suffix, maxlen, dedupe_ttl_s, event_id ('' = no dedupe),
#       trigger_message ('' = no agent subscribes to this event: orchestration/triggers.py)
# Returns {1, "SEQ EVENT_ID"} when appended, {0, "SEQ EVENT_ID"} for a duplicate.
# (ACCEPT_SEND's receipt adds " RUN_ID".)
APPEND_EVENT = (
    """
local seq_key, log_key, dedupe_key = KEYS[1], KEYS[2], KEYS[3]
local channel, prefix, suffix, maxlen = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local dedupe_ttl, event_id = ARGV[5], ARGV[6]
local existing = redis.call('GET', dedupe_key)
if existing then return {0, existing} end
"""
    + _APPEND
    + """
local receipt = seq .. ' ' .. event_id
redis.call('SET', dedupe_key, receipt, 'EX', dedupe_ttl)
-- Agents subscribed to this event start from the same transaction that writes it (a
-- duplicate, answered above, starts nothing again).
if ARGV[7] and ARGV[7] ~= '' then redis.call('LPUSH', KEYS[4], ARGV[7]) end
return {1, receipt}
"""
)

# A client's `send`: the message event, the run record, its deadline and its first task.
# KEYS: seq, log, dedupe, run, run_deadlines, celery_queue, runs_in_flight, runs_queued,
#       fair_queue, fair_ring, fair_weights
# ARGV: channel, prefix, suffix, maxlen, dedupe_ttl_s, event_id,
#       run_id, deadline_epoch_s, run_ttl_s, celery_message ('' = the caller enqueues),
#       max_in_flight, max_queued (both -1 = not counted), counted_until_epoch_s,
#       fair_tenant ('' = no fair queue: the message is the run's own step), fair_weight,
#       then the run's fields as name/value pairs
# Returns {1, "SEQ EVENT_ID RUN_ID"} accepted; {0, receipt} duplicate; {-1, wait_ms} the
# connection has max_in_flight runs unfinished; {-2, wait_ms} the tenant has max_queued
# runs waiting for a worker. wait_ms: until the earliest of those runs' deadlines (-1: the
# limit is 0).
ACCEPT_SEND = (
    """
local seq_key, log_key, dedupe_key = KEYS[1], KEYS[2], KEYS[3]
local run_key, deadlines_key, queue_key = KEYS[4], KEYS[5], KEYS[6]
local channel, prefix, suffix, maxlen = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local dedupe_ttl, event_id = ARGV[5], ARGV[6]
local run_id, deadline, run_ttl, celery_message = ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local existing = redis.call('GET', dedupe_key)
if existing then return {0, existing} end

-- Flow control (realtime/admission.py). After the dedupe check (a repeat always gets its
-- ack) and before any write (a refused send leaves no trace). A run counts in its
-- connection's in-flight set until FINALIZE_RUN and in its tenant's queued set until its
-- first CLAIM_STEP (or FINALIZE_RUN); each member's score is counted_until, its deadline
-- plus a grace, after which a run whose record was lost stops counting.
local inflight_key, queued_key = KEYS[7], KEYS[8]
local max_in_flight, max_queued = tonumber(ARGV[11]), tonumber(ARGV[12])
local counted_until = tonumber(ARGV[13])
local function count_run() end
do
  local clock = redis.call('TIME')
  local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
  -- nil when there is room, else the ms until the earliest counted run's deadline.
  local function full(key, max)
    if max < 0 then return nil end
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    if redis.call('ZCARD', key) < max then return nil end
    local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    if #first == 0 then return -1 end
    local earliest = tonumber(first[2]) - (counted_until - tonumber(deadline))
    return math.max(0, math.ceil((earliest - now) * 1000))
  end
  local wait = full(inflight_key, max_in_flight)
  if wait then return {-1, wait} end
  wait = full(queued_key, max_queued)
  if wait then return {-2, wait} end
  local function add(key, max)
    if max < 0 then return end
    redis.call('ZADD', key, counted_until, run_id)
    local left = math.ceil(counted_until - now)
    if redis.call('TTL', key) < left then redis.call('EXPIRE', key, left) end
  end
  count_run = function()
    add(inflight_key, max_in_flight)
    add(queued_key, max_queued)
  end
end
"""
    + _APPEND
    + """
local receipt = seq .. ' ' .. event_id .. ' ' .. run_id
redis.call('SET', dedupe_key, receipt, 'EX', dedupe_ttl)
count_run()
local fields = {'status', 'queued', 'emitted', 0, 'attempt', 0, 'message_seq', seq}
for i = 16, #ARGV, 2 do
  fields[#fields + 1] = ARGV[i]
  fields[#fields + 1] = ARGV[i + 1]
end
redis.call('HSET', run_key, unpack(fields))
redis.call('EXPIRE', run_key, run_ttl)
redis.call('ZADD', deadlines_key, deadline, run_id)
if ARGV[14] ~= '' then
  -- Fair queue (streams/fairness.py): the run waits in its tenant's queue and the
  -- message is a ticket for whichever run is fairly next. A tenant is in the ring exactly
  -- while its queue is not empty.
  if redis.call('LPUSH', KEYS[9], run_id) == 1 then redis.call('RPUSH', KEYS[10], ARGV[14]) end
  redis.call('HSET', KEYS[11], ARGV[14], ARGV[15])
end
if celery_message ~= '' then redis.call('LPUSH', queue_key, celery_message) end
return {1, receipt}
"""
)

# Shared head of the run scripts that hold a lease: the Redis clock, so every worker and
# sweeper compares leases against one clock whatever their own, and two helpers.
_RUN_LEASE = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local function set_lease(run_key, leases_key, run_id, lease)
  -- Rounded down to the millisecond: a lease never lasts longer than asked.
  local score = string.format('%.3f', math.floor(lease * 1000) / 1000)
  redis.call('HSET', run_key, 'lease', score)
  redis.call('ZADD', leases_key, score, run_id)
end
-- Each claim and renewal sets the TTL of the record and its text to the run's deadline plus
-- the grace, whatever it was: they last as long as a late step or the sweeper may need them.
local function keep_run(run_key, text_key, deadline, grace)
  local left = math.max(0, math.ceil((tonumber(deadline) or now) - now))
  redis.call('EXPIRE', run_key, left + tonumber(grace))
  redis.call('EXPIRE', text_key, left + tonumber(grace))
end
"""

# A worker takes a run's step: it becomes the owner, every earlier owner is fenced off, and
# the step holds a lease that the owner renews while it works (APPEND_DELTA, RENEW_LEASE).
# KEYS: run, run_text, run_leases
# ARGV: owner_token, step, lease_s, grace_s, run_id, worker, retries
# Returns {} when the run is gone, finished or past this step, else the run hash as a flat
# list.
CLAIM_STEP = (
    _RUN_LEASE
    + """
local run_key, text_key, leases_key = KEYS[1], KEYS[2], KEYS[3]
local run = redis.call('HMGET', run_key, 'status', 'step', 'emitted', 'deadline')
if (not run[1]) or run[1] == 'done' then return {} end
-- A message for an earlier step (kombu restores a dead worker's message late) must not
-- run that step again: its text is already in the reply.
if run[2] and tonumber(ARGV[2]) < tonumber(run[2]) then return {} end
-- Flow control: the run no longer waits for a worker (only its first claim counts).
local queued_key = redis.call('HGET', run_key, 'queued_key')
if queued_key then
  redis.call('ZREM', queued_key, ARGV[5])
  redis.call('HDEL', run_key, 'queued_key')
end
if run[2] ~= ARGV[2] then
  -- A new step starts where the reply stands now; a retry of the same step keeps its base.
  redis.call('HSET', run_key, 'step_base', run[3] or 0)
end
redis.call('HSET', run_key, 'status', 'running', 'owner', ARGV[1], 'step', ARGV[2],
  'worker', ARGV[6], 'retries', ARGV[7])
redis.call('HINCRBY', run_key, 'attempt', 1)
set_lease(run_key, leases_key, ARGV[5], now + tonumber(ARGV[3]))
keep_run(run_key, text_key, run[4], ARGV[4])
return redis.call('HGETALL', run_key)
"""
)

# One piece of a reply, appended only by the run's current owner at the expected offset.
# It renews the owner's lease: a streaming step needs no other heartbeat.
# KEYS: seq, log, run, run_text, run_leases
# ARGV: channel, prefix, suffix, maxlen, owner_token, offset, piece_chars, piece_json_fragment,
#       lease_s, grace_s, run_id
# Returns {1, seq}; {-1, status} finished or gone; {-2, owner} fenced (another owner, or the
# step was redelivered); {-3, emitted} wrong offset.
APPEND_DELTA = (
    _RUN_LEASE
    + """
local seq_key, log_key, run_key, text_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local channel, prefix, suffix, maxlen = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local run = redis.call('HMGET', run_key, 'status', 'owner', 'emitted', 'deadline')
if (not run[1]) or run[1] == 'done' then return {-1, run[1] or 'missing'} end
if run[1] ~= 'running' or run[2] ~= ARGV[5] then return {-2, run[2] or ''} end
local emitted = tonumber(run[3] or '0')
if tonumber(ARGV[6]) ~= emitted then return {-3, tostring(emitted)} end
redis.call('APPEND', text_key, ARGV[8])
redis.call('HSET', run_key, 'emitted', emitted + tonumber(ARGV[7]))
set_lease(run_key, KEYS[5], ARGV[11], now + tonumber(ARGV[9]))
keep_run(run_key, text_key, run[4], ARGV[10])
"""
    + _APPEND
    + """
return {1, seq}
"""
)

# The run's one terminal event. Its text is everything the deltas appended, so the final
# text always equals their concatenation, whoever finishes the run (worker or sweeper).
# KEYS: seq, log, run, run_text, run_deadlines, run_leases, celery_queue,
#       history_outbox, history_dropped, recent_problems
# ARGV: channel, prefix, text_prefix, suffix, maxlen, owner_token ('' = any owner: sweeper),
#       status, run_id, finished_ttl_s, trigger_message ('' = no agent subscribes),
#       history_head ('' = history off: streams/records.py outbox_head), history_max,
#       problem_entry ('' = not failed nor degraded), problems_max, worker_stop_prefix
# Returns {1, seq}; {0, existing_seq} already finished; {-2, owner} fenced; {-1, ''} no run.
FINALIZE_RUN = (
    """
local seq_key, log_key, run_key = KEYS[1], KEYS[2], KEYS[3]
local text_key, deadlines_key, leases_key = KEYS[4], KEYS[5], KEYS[6]
local channel, prefix, text_prefix, tail, maxlen = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local worker_stop_prefix = ARGV[15]
local run = redis.call('HMGET', run_key, 'status', 'owner', 'done_seq', 'worker')
if not run[1] then
  redis.call('ZREM', deadlines_key, ARGV[8])
  redis.call('ZREM', leases_key, ARGV[8])
  return {-1, ''}
end
if run[1] == 'done' then return {0, run[3] or ''} end
if ARGV[6] ~= '' and run[2] ~= ARGV[6] then return {-2, run[2] or ''} end
local suffix = text_prefix .. '"' .. (redis.call('GET', text_key) or '') .. '"' .. tail
"""
    + _APPEND
    + """
redis.call('HSET', run_key, 'status', 'done', 'final_status', ARGV[7], 'done_seq', seq)
-- Ended by someone other than its owner (a cancel, the deadline sweep) while a worker holds
-- it: that worker hears at once and stops the model call (orchestration/inflight.py).
if ARGV[6] == '' and run[1] == 'running' and run[4] and worker_stop_prefix ~= '' then
  redis.call('PUBLISH', worker_stop_prefix .. run[4], ARGV[8])
end
-- Flow control: the run no longer counts as in flight, nor as queued if never claimed.
local counted = redis.call('HMGET', run_key, 'inflight_key', 'queued_key')
if counted[1] then redis.call('ZREM', counted[1], ARGV[8]) end
if counted[2] then redis.call('ZREM', counted[2], ARGV[8]) end
redis.call('HDEL', run_key, 'lease')
redis.call('EXPIRE', run_key, ARGV[9])
redis.call('EXPIRE', text_key, ARGV[9])
redis.call('ZREM', deadlines_key, ARGV[8])
redis.call('ZREM', leases_key, ARGV[8])
-- Agents subscribed to this reply.done (orchestration/triggers.py): their trigger task is
-- queued by the same transaction that writes the event, so no trigger is ever lost.
if ARGV[10] and ARGV[10] ~= '' then redis.call('LPUSH', KEYS[7], ARGV[10]) end
-- History (history/persist.py): the run goes on the persister's outbox with its reply.done,
-- so no finished run is missed. The cap drops the oldest records, counted, rather than let
-- a persister that is down for long fill Redis.
if ARGV[11] and ARGV[11] ~= '' then
  local message_seq = redis.call('HGET', run_key, 'message_seq') or 'null'
  local waiting = redis.call('LPUSH', KEYS[8],
    ARGV[11] .. ',"message_seq":' .. message_seq .. ',"done_seq":' .. seq .. '}')
  local history_max = tonumber(ARGV[12])
  if waiting > history_max then
    redis.call('LTRIM', KEYS[8], 0, history_max - 1)
    redis.call('INCRBY', KEYS[9], waiting - history_max)
  end
end
-- Failed and degraded runs, newest first, for the admin's live queue page.
if ARGV[13] and ARGV[13] ~= '' then
  redis.call('LPUSH', KEYS[10], ARGV[13])
  redis.call('LTRIM', KEYS[10], 0, tonumber(ARGV[14]) - 1)
end
return {1, seq}
"""
)

# A step's output, for the steps after it (orchestration/sweeping.py), written only by the
# step's current owner. `fell_back` records that a step gave its fallback and the run went
# on: the run then ends `degraded`, naming it.
# KEYS: run   ARGV: owner_token, field, output, fell_back ('' = none)
# Returns 1, or 0 when the caller no longer owns a running step.
SAVE_OUTPUT = """
local run = redis.call('HMGET', KEYS[1], 'status', 'owner')
if run[1] ~= 'running' or run[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'fell_back', ARGV[4]) end
return 1
"""

# A run started by an event an agent subscribed to (orchestration/triggers.py): its record,
# deadline and first task, at most once per (triggering event, agent) however often the
# trigger is delivered. It counts as queued for its tenant like a client's run.
# KEYS: trigger_dedupe, run, run_deadlines, celery_queue, runs_queued, fair_queue,
#       fair_ring, fair_weights
# ARGV: run_id, deadline_epoch_s, run_ttl_s, dedupe_ttl_s, celery_message ('' = the caller
#       enqueues), max_queued (-1 = not counted), counted_until_epoch_s,
#       fair_tenant ('' = no fair queue), fair_weight, then the run's fields as pairs
# Returns {1, run_id} started; {0, run_id} this event already started this agent;
# {-2, ''} the tenant's queue is full (nothing written).
START_TRIGGERED_RUN = """
local dedupe_key, run_key, deadlines_key, queue_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local run_id, deadline, run_ttl, dedupe_ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local existing = redis.call('GET', dedupe_key)
if existing then return {0, existing} end
local max_queued, counted_until = tonumber(ARGV[6]), ARGV[7]
local fields = {'status', 'queued', 'emitted', 0, 'attempt', 0}
if max_queued >= 0 then
  local clock = redis.call('TIME')
  local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
  if redis.call('ZCARD', KEYS[5]) >= max_queued then return {-2, ''} end
  redis.call('ZADD', KEYS[5], counted_until, run_id)
  local left = math.ceil(tonumber(counted_until) - now)
  if redis.call('TTL', KEYS[5]) < left then redis.call('EXPIRE', KEYS[5], left) end
  fields[#fields + 1] = 'queued_key'
  fields[#fields + 1] = KEYS[5]
end
redis.call('SET', dedupe_key, run_id, 'EX', dedupe_ttl)
for i = 10, #ARGV, 2 do
  fields[#fields + 1] = ARGV[i]
  fields[#fields + 1] = ARGV[i + 1]
end
redis.call('HSET', run_key, unpack(fields))
redis.call('EXPIRE', run_key, run_ttl)
redis.call('ZADD', deadlines_key, deadline, run_id)
if ARGV[8] ~= '' then
  if redis.call('LPUSH', KEYS[6], run_id) == 1 then redis.call('RPUSH', KEYS[7], ARGV[8]) end
  redis.call('HSET', KEYS[8], ARGV[8], ARGV[9])
end
if ARGV[5] ~= '' then redis.call('LPUSH', queue_key, ARGV[5]) end
return {1, run_id}
"""

# The owner's heartbeat while its model call is silent: extend the step's lease (never
# shortening it: a retry's backoff may have extended it further) and the run's TTL.
# KEYS: run, run_text, run_leases   ARGV: owner_token, lease_s, grace_s, run_id
# Returns 1 renewed; 0 the caller no longer owns a running step and must stop renewing.
RENEW_LEASE = (
    _RUN_LEASE
    + """
local run_key, text_key, leases_key = KEYS[1], KEYS[2], KEYS[3]
local run = redis.call('HMGET', run_key, 'status', 'owner', 'lease', 'deadline')
if run[1] ~= 'running' or run[2] ~= ARGV[1] then return 0 end
set_lease(run_key, leases_key, ARGV[4], math.max(now + tonumber(ARGV[2]), tonumber(run[3]) or 0))
keep_run(run_key, text_key, run[4], ARGV[3])
return 1
"""
)

# RENEW_LEASE for many owners at once: one call per batch of a worker's silent steps
# (orchestration/inflight.py), so holding thousands of calls costs one round trip and one
# command per interval, not one per call.
# KEYS: run_leases   ARGV: lease_s, grace_s, run_key_prefix, then (run_id, owner_token) pairs
# Returns one 1 (renewed) or 0 (no longer that owner's running step) per pair, in order.
RENEW_LEASES = (
    _RUN_LEASE
    + """
local leases_key = KEYS[1]
local lease_s, grace, run_prefix = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local renewed = {}
for i = 4, #ARGV, 2 do
  local run_id, owner = ARGV[i], ARGV[i + 1]
  local run_key = run_prefix .. run_id
  local run = redis.call('HMGET', run_key, 'status', 'owner', 'lease', 'deadline')
  if run[1] ~= 'running' or run[2] ~= owner then
    renewed[#renewed + 1] = 0
  else
    set_lease(run_key, leases_key, run_id, math.max(now + lease_s, tonumber(run[3]) or 0))
    keep_run(run_key, run_key .. ':text', run[4], grace)
    renewed[#renewed + 1] = 1
  end
end
return renewed
"""
)

# A step hands the run to a step's task: nobody holds the run until that task claims it. A
# message waiting in the queue is safe in Redis, so a queued run has no lease. Used for the
# next step of a pipeline and by a worker that drains on shutdown to hand its unfinished
# step to another worker at once (the same step again; its claim restarts the reply).
# KEYS: run, run_leases, celery_queue
# ARGV: owner_token, run_id, celery_message ('' = the caller enqueues after)
# Returns 1, or 0 when the caller no longer owns the run (nothing is written or queued).
HAND_OVER = """
local run_key, leases_key, queue_key = KEYS[1], KEYS[2], KEYS[3]
local owner, run_id, message = ARGV[1], ARGV[2], ARGV[3]
local run = redis.call('HMGET', run_key, 'status', 'owner')
if run[1] ~= 'running' or run[2] ~= owner then return 0 end
redis.call('HSET', run_key, 'status', 'queued')
redis.call('HDEL', run_key, 'owner', 'lease')
redis.call('ZREM', leases_key, run_id)
if message ~= '' then redis.call('LPUSH', queue_key, message) end
return 1
"""

# A retried or redelivered model call after the reply already streamed part of an earlier
# attempt: that text is void (a model is not deterministic; two outputs must never be
# spliced). Appends `reply.restart`, then, when earlier steps of the pipeline streamed text
# (the first `keep_chars` of the reply), that text again as a delta at offset 0, and leaves
# the reply holding just it. Written only by the current owner.
# KEYS: seq, log, run, run_text, run_leases
# ARGV: channel, restart_prefix, restart_suffix, maxlen, owner_token, keep_chars,
#       keep_fragment (the kept text as a JSON string fragment), delta_prefix,
#       delta_suffix ('' = nothing kept), lease_s, grace_s, run_id
# Returns {1, seq of the last event}; {-1, status} finished or gone; {-2, owner} fenced.
RESTART_REPLY = (
    _RUN_LEASE
    + """
local seq_key, log_key, run_key, text_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local channel, maxlen, owner = ARGV[1], ARGV[4], ARGV[5]
local run = redis.call('HMGET', run_key, 'status', 'owner', 'deadline')
if (not run[1]) or run[1] == 'done' then return {-1, run[1] or 'missing'} end
if run[1] ~= 'running' or run[2] ~= owner then return {-2, run[2] or ''} end
redis.call('SET', text_key, ARGV[7])
redis.call('HSET', run_key, 'emitted', tonumber(ARGV[6]), 'step_base', tonumber(ARGV[6]))
redis.call('HINCRBY', run_key, 'restarts', 1)
set_lease(run_key, KEYS[5], ARGV[12], now + tonumber(ARGV[10]))
keep_run(run_key, text_key, run[3], ARGV[11])
local prefix, suffix = ARGV[2], ARGV[3]
"""
    + _APPEND
    + """
if ARGV[9] ~= '' then
  local prefix, suffix = ARGV[8], ARGV[9]
"""
    + _APPEND
    + """
  return {1, seq}
end
return {1, seq}
"""
)

# A step whose lease ran out: its worker died or stalled. Enqueue the same step again,
# fence the lost owner and leave the run queued, without a lease, until the new attempt
# claims it. One script, so any number of sweepers redeliver a lost step exactly once.
# KEYS: run, run_leases, celery_queue
# ARGV: run_id, step, celery_message ('' = the caller enqueues), max_redeliveries
# Returns {1, redeliveries} enqueued; {0, why} nothing to do; {-2, redeliveries} none left:
# the caller ends the run.
REDELIVER_STEP = (
    _RUN_LEASE
    + """
local run_key, leases_key = KEYS[1], KEYS[2]
local run = redis.call('HMGET', run_key, 'status', 'lease', 'step', 'redeliveries', 'deadline')
-- A queued run holds a lease only between its fair pick and its claim (fairness.py).
if run[1] ~= 'running' and not (run[1] == 'queued' and run[2]) then
  redis.call('ZREM', leases_key, ARGV[1])
  return {0, run[1] or 'missing'}
end
local lease = tonumber(run[2]) or 0
if lease > now then
  -- Renewed since the sweeper listed it.
  redis.call('ZADD', leases_key, run[2], ARGV[1])
  return {0, 'leased'}
end
if run[3] ~= ARGV[2] then return {0, 'step'} end
-- Past its deadline the deadline sweep ends the run; a new attempt could not finish it.
if (tonumber(run[5]) or 0) <= now then return {0, 'deadline'} end
local count = tonumber(run[4]) or 0
if count >= tonumber(ARGV[4]) then return {-2, count} end
redis.call('HSET', run_key, 'status', 'queued', 'redeliveries', count + 1)
redis.call('HDEL', run_key, 'owner', 'lease')
redis.call('ZREM', leases_key, ARGV[1])
if ARGV[3] ~= '' then redis.call('LPUSH', KEYS[3], ARGV[3]) end
return {1, count + 1}
"""
)

# A client's receipt: how far it has processed a stream. It only moves forward (a late or
# reordered receipt must not undo a newer one) and never past the stream's head (a seq the
# stream has not assigned is a client bug, not a position). Seq 0 (nothing processed, where
# every client starts) writes nothing: stream names are the clients' to choose, and a receipt
# on a stream with no events must not create keys. Every other receipt, even an ignored one,
# keeps the stream's receipts and the tenant's index alive for another TTL, and the index
# sheds streams whose receipts have expired, so it never outgrows what it lists.
# KEYS: seq, receipts, receipt_index   ARGV: client, seq, stream, ttl_s
# Returns {1, seq} recorded; {0, stored} not newer than the stored one (or seq 0);
# {-1, head} beyond head.
RECORD_RECEIPT = """
local seq_key, receipts_key, index_key = KEYS[1], KEYS[2], KEYS[3]
local client, stream, ttl = ARGV[1], ARGV[3], tonumber(ARGV[4])
local seq = tonumber(ARGV[2])
local head = tonumber(redis.call('GET', seq_key) or '0')
if seq > head then return {-1, head} end
local outcome
local stored = redis.call('HGET', receipts_key, client)
if seq == 0 then return {0, tonumber(stored or '0')} end
if stored and tonumber(stored) >= seq then
  outcome = {0, tonumber(stored)}
else
  redis.call('HSET', receipts_key, client, ARGV[2])
  outcome = {1, seq}
end
local now = tonumber(redis.call('TIME')[1])
redis.call('EXPIRE', receipts_key, ttl)
redis.call('ZADD', index_key, now, stream)
redis.call('ZREMRANGEBYSCORE', index_key, '-inf', '(' .. (now - ttl))
redis.call('EXPIRE', index_key, ttl)
return outcome
"""
