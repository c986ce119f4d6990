-- The tenant's part of a fair pick (streams/fairness.py), in the tenant's slot: take the
-- oldest run off its fair queue and, when the run is live, give it the pick lease, all at
-- once. The ring's part follows (FAIR_SETTLE) with what this answers.
-- KEYS: fair_queue_key, fair_state_key, leases_key (the tenant's)
-- ARGV: run_prefix (a run's key is run_prefix .. run_id), lease_s
-- Returns {RUN_ID or '', live (1 or 0), runs left queued, the queue's epoch, its weight}.
local fair_queue_key, fair_state_key, leases_key = KEYS[1], KEYS[2], KEYS[3]
local run_prefix, lease_s = ARGV[1], tonumber(ARGV[2])

local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local run_id = redis.call('RPOP', fair_queue_key)
local live = 0
if run_id then
  local run_key = run_prefix .. run_id
  local run = redis.call('HMGET', run_key, 'status', 'deadline')
  -- A run cancelled or ended by the sweeper while queued, or already past its deadline
  -- (the deadline sweep ends it), costs no worker and no pick.
  if run[1] == 'queued' and (tonumber(run[2]) or 0) > now then
    live = 1
    -- The pick lease: the run stays queued until its claim, which replaces the lease.
    local lease = string.format('%.3f', math.floor((now + lease_s) * 1000) / 1000)
    redis.call('HSET', run_key, 'step', 0, 'lease', lease)
    redis.call('ZADD', leases_key, lease, run_id)
  end
end
local state = redis.call('HMGET', fair_state_key, 'epoch', 'weight')
return {run_id or '', live, redis.call('LLEN', fair_queue_key), tonumber(state[1]) or 0,
  tonumber(state[2]) or 1}
