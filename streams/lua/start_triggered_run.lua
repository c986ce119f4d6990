-- A run started by an event an agent subscribed to (orchestration/triggers.py): its record,
-- deadline, place in the fair queue and first task, at most once per (triggering event,
-- agent) however often the trigger is delivered. It counts as queued for its tenant like a
-- client's run. Every key is the tenant's but Celery's queue (ACCEPT_SEND says why).
-- KEYS: dedupe_key, run_key, deadlines_key, queue_key (Celery's, single Redis only),
--       queued_key (the tenant's runs queued), fair_queue_key, fair_state_key
-- ARGV: run_id, deadline (epoch s), run_ttl (s), dedupe_ttl (s), celery_message ('' = the
--       caller enqueues), max_queued (-1 = not counted), counted_until (epoch s),
--       fair_tenant ('' = no fair queue), fair_weight,
--       then run_fields: the run's fields as name/value pairs
-- Returns {1, run_id, ring_epoch} started (ring_epoch as ACCEPT_SEND's); {0, run_id}
-- this event already started this agent; {-2, ''} the tenant's queue is full (nothing written).
local dedupe_key, run_key, deadlines_key, queue_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local queued_key = KEYS[5]
local fair_queue_key, fair_state_key = KEYS[6], KEYS[7]
local run_id, deadline, run_ttl, dedupe_ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local celery_message, max_queued, counted_until = ARGV[5], tonumber(ARGV[6]), ARGV[7]
local fair_tenant, fair_weight = ARGV[8], ARGV[9]
local run_fields = {unpack(ARGV, 10)}

local existing = redis.call('GET', dedupe_key)
if existing then return {0, existing} end
local fields = {'status', 'queued', 'emitted', 0, 'attempt', 0}
if max_queued >= 0 then
  local clock = redis.call('TIME')
  local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
  redis.call('ZREMRANGEBYSCORE', queued_key, '-inf', now)
  if redis.call('ZCARD', queued_key) >= max_queued then return {-2, ''} end
  redis.call('ZADD', queued_key, counted_until, run_id)
  local left = math.ceil(tonumber(counted_until) - now)
  if redis.call('TTL', queued_key) < left then redis.call('EXPIRE', queued_key, left) end
  fields[#fields + 1] = 'queued_key'
  fields[#fields + 1] = queued_key
end
redis.call('SET', dedupe_key, run_id, 'EX', dedupe_ttl)
-- #include run_create.lua
-- #include fair_queue_insert.lua
if celery_message ~= '' and ring_epoch == 0 then
  redis.call('LPUSH', queue_key, celery_message)
end
return {1, run_id, ring_epoch}
