-- What the outbox sweep (orchestration/tickets.py) needs of a tenant's fair queue, read-only
-- in the tenant's slot: how many runs wait in it and when the oldest was created.
-- KEYS: fair_queue_key
-- ARGV: run_prefix (a run's key is run_prefix .. run_id)
-- Returns {runs queued, the oldest's `created` (epoch s, as text; '' = none or gone)}.
local fair_queue_key = KEYS[1]
local run_prefix = ARGV[1]

local count = redis.call('LLEN', fair_queue_key)
if count == 0 then return {0, ''} end
local oldest = redis.call('LINDEX', fair_queue_key, -1)
return {count, redis.call('HGET', run_prefix .. oldest, 'created') or ''}
