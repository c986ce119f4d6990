-- The run's one terminal event, reply.done. Its text is everything the deltas appended, so
-- the final text always equals their concatenation, whoever finishes the run (worker or
-- sweeper). With it, atomically: the run stops counting for flow control, its lease and
-- deadline go, a worker still holding it hears to stop, subscribed agents' triggers are
-- queued, the history outbox gets its record, and a failed run is listed for the admin.
-- KEYS: seq_key, log_key, run_key, text_key, deadlines_key, leases_key (the tenant's),
--       queue_key (Celery's, single Redis only), history_outbox_key, history_dropped_key,
--       problems_key, task_outbox_key (the tenant's)
-- ARGV: channel, prefix, text_prefix, tail, maxlen, owner ('' = any owner: sweeper),
--       status, run_id, finished_ttl (s), trigger_message ('' = no agent subscribes),
--       history_head ('' = history off: streams/records.py outbox_head), history_max,
--       problem_entry ('' = not failed nor degraded), problems_max, worker_stop_prefix,
--       outbox_entry (the trigger task for a broker other than this Redis, published
--       after; '' = none)
-- Returns {1, seq}; {0, existing_seq} already finished; {-2, owner} fenced; {-1, ''} no run.
local seq_key, log_key, run_key = KEYS[1], KEYS[2], KEYS[3]
local text_key, deadlines_key, leases_key = KEYS[4], KEYS[5], KEYS[6]
local queue_key, history_outbox_key, history_dropped_key = KEYS[7], KEYS[8], KEYS[9]
local problems_key, task_outbox_key = KEYS[10], KEYS[11]
local channel, prefix, text_prefix, tail, maxlen = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local owner, status, run_id, finished_ttl = ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local trigger_message, history_head, history_max = ARGV[10], ARGV[11], tonumber(ARGV[12])
local problem_entry, problems_max = ARGV[13], tonumber(ARGV[14])
local worker_stop_prefix, outbox_entry = ARGV[15], ARGV[16]

local run = redis.call('HMGET', run_key, 'status', 'owner', 'done_seq', 'worker')
if not run[1] then
  redis.call('ZREM', deadlines_key, run_id)
  redis.call('ZREM', leases_key, run_id)
  return {-1, ''}
end
if run[1] == 'done' then return {0, run[3] or ''} end
if owner ~= '' and run[2] ~= owner then return {-2, run[2] or ''} end
local suffix = text_prefix .. '"' .. (redis.call('GET', text_key) or '') .. '"' .. tail
-- #include stream_append.lua
redis.call('HSET', run_key, 'status', 'done', 'final_status', status, 'done_seq', seq)
-- Ended by someone other than its owner (a cancel, the deadline sweep) while a worker holds
-- it: that worker hears at once and stops the model call (orchestration/inflight.py).
if owner == '' and run[1] == 'running' and run[4] and worker_stop_prefix ~= '' then
  redis.call('PUBLISH', worker_stop_prefix .. run[4], run_id)
end
-- Flow control: the run no longer counts as in flight, nor as queued if never claimed.
local counted = redis.call('HMGET', run_key, 'inflight_key', 'queued_key')
if counted[1] then redis.call('ZREM', counted[1], run_id) end
if counted[2] then redis.call('ZREM', counted[2], run_id) end
redis.call('HDEL', run_key, 'lease')
redis.call('EXPIRE', run_key, finished_ttl)
redis.call('EXPIRE', text_key, finished_ttl)
redis.call('ZREM', deadlines_key, run_id)
redis.call('ZREM', leases_key, run_id)
-- Agents subscribed to this reply.done (orchestration/triggers.py): their trigger task is
-- queued by the same transaction that writes the event, so no trigger is ever lost.
if trigger_message and trigger_message ~= '' then
  redis.call('LPUSH', queue_key, trigger_message)
end
-- With another broker the trigger goes on the tenant's task outbox with the event, and the
-- caller publishes it after; the sweep publishes it should the caller die first.
if outbox_entry ~= '' then
  redis.call('ZADD', task_outbox_key, redis.call('TIME')[1], outbox_entry)
end
-- History (history/persist.py): the run goes on the persister's outbox with its reply.done,
-- so no finished run is missed. The cap drops the oldest records, counted, rather than let
-- a persister that is down for long fill Redis.
if history_head and history_head ~= '' then
  local message_seq = redis.call('HGET', run_key, 'message_seq') or 'null'
  local waiting = redis.call('LPUSH', history_outbox_key,
    history_head .. ',"message_seq":' .. message_seq .. ',"done_seq":' .. seq .. '}')
  if waiting > history_max then
    redis.call('LTRIM', history_outbox_key, 0, history_max - 1)
    redis.call('INCRBY', history_dropped_key, waiting - history_max)
  end
end
-- Failed and degraded runs, newest first, for the admin's live queue page.
if problem_entry and problem_entry ~= '' then
  redis.call('LPUSH', problems_key, problem_entry)
  redis.call('LTRIM', problems_key, 0, problems_max - 1)
end
return {1, seq}
