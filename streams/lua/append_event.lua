-- Append one client event to a stream, at most once per client message id: the dedupe
-- check, the seq, the log entry, the live notification and the triggers of agents that
-- subscribe to it are written together or not at all.
-- KEYS: seq_key, log_key, dedupe_key (any key when event_id is ''), queue_key (Celery's,
--       single Redis only), task_outbox_key (the tenant's)
-- ARGV: channel, prefix, suffix, maxlen, dedupe_ttl (s), event_id ('' = no dedupe),
--       trigger_message ('' = no agent subscribes to this event: orchestration/triggers.py),
--       outbox_entry (the same for a broker other than this Redis: FINALIZE_RUN says how)
-- Returns {1, "SEQ EVENT_ID"} when appended, {0, "SEQ EVENT_ID"} for a duplicate.
local seq_key, log_key, dedupe_key, queue_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local task_outbox_key = KEYS[5]
local channel, prefix, suffix, maxlen = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local dedupe_ttl, event_id = ARGV[5], ARGV[6]
local trigger_message, outbox_entry = ARGV[7], ARGV[8]

local existing = redis.call('GET', dedupe_key)
if existing then return {0, existing} end
-- #include stream_append.lua
local receipt = seq .. ' ' .. event_id
redis.call('SET', dedupe_key, receipt, 'EX', dedupe_ttl)
-- Agents subscribed to this event start from the same transaction that writes it (a
-- duplicate, answered above, starts nothing again).
if trigger_message and trigger_message ~= '' then
  redis.call('LPUSH', queue_key, trigger_message)
end
if outbox_entry ~= '' then
  redis.call('ZADD', task_outbox_key, redis.call('TIME')[1], outbox_entry)
end
return {1, receipt}
