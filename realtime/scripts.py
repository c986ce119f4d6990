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

# KEYS: seq, log, dedupe (or an unused key when ARGV[6] is '')
# ARGV: channel, prefix, suffix, maxlen, dedupe_ttl_s, event_id ('' = no dedupe)
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
return {1, receipt}
"""
)

# A client's `send`: the message event, the run record, its deadline and its first task.
# KEYS: seq, log, dedupe, run, run_deadlines, celery_queue
# ARGV: channel, prefix, suffix, maxlen, dedupe_ttl_s, event_id,
#       run_id, deadline_epoch_s, run_ttl_s, celery_message ('' = the caller enqueues),
#       then the run's fields as name/value pairs
ACCEPT_SEND = (
    """
local seq_key, log_key, dedupe_key = KEYS[1], KEYS[2], KEYS[3]
local run_key, deadlines_key, queue_key = KEYS[4], KEYS[5], KEYS[6]
local channel, prefix, suffix, maxlen = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local dedupe_ttl, event_id = ARGV[5], ARGV[6]
local run_id, deadline, run_ttl, celery_message = ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local existing = redis.call('GET', dedupe_key)
if existing then return {0, existing} end
"""
    + _APPEND
    + """
local receipt = seq .. ' ' .. event_id .. ' ' .. run_id
redis.call('SET', dedupe_key, receipt, 'EX', dedupe_ttl)
local fields = {'status', 'queued', 'emitted', 0, 'attempt', 0, 'message_seq', seq}
for i = 11, #ARGV, 2 do
  fields[#fields + 1] = ARGV[i]
  fields[#fields + 1] = ARGV[i + 1]
end
redis.call('HSET', run_key, unpack(fields))
redis.call('EXPIRE', run_key, run_ttl)
redis.call('ZADD', deadlines_key, deadline, run_id)
if celery_message ~= '' then redis.call('LPUSH', queue_key, celery_message) end
return {1, receipt}
"""
)

# A worker takes a run's step: it becomes the owner, and every earlier owner is fenced off.
# KEYS: run   ARGV: owner_token, step, run_ttl_s
# Returns {} when the run is gone or finished, else the run hash as a flat list.
CLAIM_STEP = """
local status = redis.call('HGET', KEYS[1], 'status')
if (not status) or status == 'done' then return {} end
if redis.call('HGET', KEYS[1], 'step') ~= ARGV[2] then
  -- A new step starts where the reply stands now; a retry of the same step keeps its base.
  redis.call('HSET', KEYS[1], 'step_base', redis.call('HGET', KEYS[1], 'emitted') or 0)
end
redis.call('HSET', KEYS[1], 'status', 'running', 'owner', ARGV[1], 'step', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('EXPIRE', KEYS[1], ARGV[3])
return redis.call('HGETALL', KEYS[1])
"""

# One piece of a reply, appended only by the run's current owner at the expected offset.
# KEYS: seq, log, run, run_text
# ARGV: channel, prefix, suffix, maxlen, owner_token, offset, piece_chars, piece_json_fragment
# Returns {1, seq}; {-1, status} not running; {-2, owner} fenced; {-3, emitted} wrong offset.
APPEND_DELTA = (
    """
local seq_key, log_key, run_key, text_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local channel, prefix, suffix, maxlen = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local run = redis.call('HMGET', run_key, 'status', 'owner', 'emitted')
if run[1] ~= 'running' then return {-1, run[1] or 'missing'} end
if run[2] ~= ARGV[5] then return {-2, run[2] or ''} end
local emitted = tonumber(run[3] or '0')
if tonumber(ARGV[6]) ~= emitted then return {-3, tostring(emitted)} end
redis.call('APPEND', text_key, ARGV[8])
redis.call('HSET', run_key, 'emitted', emitted + tonumber(ARGV[7]))
"""
    + _APPEND
    + """
return {1, seq}
"""
)

# The run's one terminal event. Its text is everything the deltas appended, so the final
# text always equals their concatenation, whoever finishes the run (worker or sweeper).
# KEYS: seq, log, run, run_text, run_deadlines
# ARGV: channel, prefix, text_prefix, suffix, maxlen, owner_token ('' = any owner: sweeper),
#       status, run_id, finished_ttl_s
# Returns {1, seq}; {0, existing_seq} already finished; {-2, owner} fenced; {-1, ''} no run.
FINALIZE_RUN = (
    """
local seq_key, log_key, run_key = KEYS[1], KEYS[2], KEYS[3]
local text_key, deadlines_key = KEYS[4], KEYS[5]
local channel, prefix, text_prefix, tail, maxlen = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local run = redis.call('HMGET', run_key, 'status', 'owner', 'done_seq')
if not run[1] then
  redis.call('ZREM', deadlines_key, ARGV[8])
  return {-1, ''}
end
if run[1] == 'done' then return {0, run[3] or ''} end
if ARGV[6] ~= '' and run[2] ~= ARGV[6] then return {-2, run[2] or ''} end
local suffix = text_prefix .. '"' .. (redis.call('GET', text_key) or '') .. '"' .. tail
"""
    + _APPEND
    + """
redis.call('HSET', run_key, 'status', 'done', 'final_status', ARGV[7], 'done_seq', seq)
redis.call('EXPIRE', run_key, ARGV[9])
redis.call('EXPIRE', text_key, ARGV[9])
redis.call('ZREM', deadlines_key, ARGV[8])
return {1, seq}
"""
)
