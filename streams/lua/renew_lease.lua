-- The owner's heartbeat while its model call is silent: extend the step's lease (never
-- shortening it: a retry's backoff may have extended it further) and the run's TTL.
-- KEYS: run_key, text_key, leases_key
-- ARGV: owner, lease_s, grace_s, run_id
-- Returns 1 renewed; 0 the caller no longer owns a running step and must stop renewing.
local run_key, text_key, leases_key = KEYS[1], KEYS[2], KEYS[3]
local owner, lease_s, grace_s, run_id = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]

-- #include run_lease.lua
local run = redis.call('HMGET', run_key, 'status', 'owner', 'lease', 'deadline')
if run[1] ~= 'running' or run[2] ~= owner then return 0 end
set_lease(run_key, leases_key, run_id, math.max(now + lease_s, tonumber(run[3]) or 0))
keep_run(run_key, text_key, run[4], grace_s)
return 1
