-- A step hands the run to a step's task: nobody holds the run until that task claims it. A
-- message waiting in the queue is safe in the broker, so a queued run has no lease, except
-- while its message is published after this script (a broker other than the streams'
-- Redis): then it holds a publish lease, which the caller drops once the message is out
-- (DROP_PUBLISH_LEASE) and which, should the caller die first, runs out and has the lease
-- sweep publish the step again (REDELIVER_STEP). Used for the next step of a pipeline and
-- by a worker that drains on shutdown to hand its unfinished step to another worker at
-- once (the same step again; its claim restarts the reply).
-- KEYS: run_key, leases_key (the tenant's), queue_key (Celery's, single Redis only)
-- ARGV: owner, run_id, message ('' = the caller publishes after), publish_lease_s (0 = none)
-- Returns the publish lease set ('' = none), or 0 when the caller no longer owns the run
-- (nothing is written or queued).
local run_key, leases_key, queue_key = KEYS[1], KEYS[2], KEYS[3]
local owner, run_id, message = ARGV[1], ARGV[2], ARGV[3]
local publish_lease_s = tonumber(ARGV[4])

-- #include run_lease.lua
local run = redis.call('HMGET', run_key, 'status', 'owner')
if run[1] ~= 'running' or run[2] ~= owner then return 0 end
redis.call('HSET', run_key, 'status', 'queued')
redis.call('HDEL', run_key, 'owner', 'lease')
redis.call('ZREM', leases_key, run_id)
if message ~= '' then redis.call('LPUSH', queue_key, message) end
if publish_lease_s > 0 then
  return set_lease(run_key, leases_key, run_id, now + publish_lease_s)
end
return ''
