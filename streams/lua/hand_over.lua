-- A step hands the run to a step's task: nobody holds the run until that task claims it. A
-- message waiting in the queue is safe in Redis, so a queued run has no lease. Used for the
-- next step of a pipeline and by a worker that drains on shutdown to hand its unfinished
-- step to another worker at once (the same step again; its claim restarts the reply).
-- KEYS: run_key, leases_key, queue_key (Celery's)
-- ARGV: owner, run_id, message ('' = the caller enqueues after)
-- Returns 1, or 0 when the caller no longer owns the run (nothing is written or queued).
local run_key, leases_key, queue_key = KEYS[1], KEYS[2], KEYS[3]
local owner, run_id, message = ARGV[1], ARGV[2], ARGV[3]

local run = redis.call('HMGET', run_key, 'status', 'owner')
if run[1] ~= 'running' or run[2] ~= owner then return 0 end
redis.call('HSET', run_key, 'status', 'queued')
redis.call('HDEL', run_key, 'owner', 'lease')
redis.call('ZREM', leases_key, run_id)
if message ~= '' then redis.call('LPUSH', queue_key, message) end
return 1
