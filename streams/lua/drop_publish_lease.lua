-- A step's message is out (published after HAND_OVER or REDELIVER_STEP to a broker other
-- than the streams' Redis): drop the publish lease those set, unless the run moved on (its
-- claim replaced the lease, or the lease sweep already published it again).
-- KEYS: run_key, leases_key (the tenant's)
-- ARGV: run_id, lease (the publish lease as set)
-- Returns 1 dropped, 0 the run moved on.
local run_key, leases_key = KEYS[1], KEYS[2]
local run_id, lease = ARGV[1], ARGV[2]

local run = redis.call('HMGET', run_key, 'status', 'lease')
if run[1] ~= 'queued' or run[2] ~= lease then return 0 end
redis.call('HDEL', run_key, 'lease')
redis.call('ZREM', leases_key, run_id)
return 1
