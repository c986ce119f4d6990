-- The fair pick (streams/fairness.py): deficit round robin over the tenants with runs
-- queued. One script: the ring, the deficits, the tenant's queue and the run's pick lease
-- change together or not at all.
-- KEYS: ring_key, deficits_key, weights_key, leases_key
-- ARGV: queue_prefix (a tenant's fair queue is queue_prefix .. tenant), run_prefix (a run's
--       key is run_prefix .. run_id), lease_s, max_skipped
-- Returns {RUN_ID, skipped} picked; {'', skipped} nothing (left) to pick.
local ring, deficits, weights, leases_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local queue_prefix, run_prefix = ARGV[1], ARGV[2]
local lease_s, max_skipped = tonumber(ARGV[3]), tonumber(ARGV[4])

local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local skipped = 0
while true do
  local tenant = redis.call('LINDEX', ring, 0)
  if not tenant then return {'', skipped} end
  local queue = queue_prefix .. tenant
  local deficit = tonumber(redis.call('HGET', deficits, tenant)) or 0
  if deficit < 1 then
    -- At the head with no pick left: this turn's quantum.
    deficit = deficit + math.max(1, math.floor(tonumber(redis.call('HGET', weights, tenant)) or 1))
  end
  local run_id = redis.call('RPOP', queue)
  local live = false
  if run_id then
    local run = redis.call('HMGET', run_prefix .. run_id, 'status', 'deadline')
    -- A run cancelled or ended by the sweeper while queued, or already past its deadline
    -- (the deadline sweep ends it), costs no worker and no pick.
    live = run[1] == 'queued' and (tonumber(run[2]) or 0) > now
  end
  if redis.call('LLEN', queue) == 0 then
    -- Nothing more queued: the tenant leaves the ring and forfeits its deficit.
    redis.call('LPOP', ring)
    redis.call('HDEL', deficits, tenant)
  else
    if live then deficit = deficit - 1 end
    if deficit < 1 then redis.call('RPUSH', ring, redis.call('LPOP', ring)) end
    redis.call('HSET', deficits, tenant, deficit)
  end
  if live then
    -- The pick lease: the run stays queued until its claim, which replaces the lease.
    local run_key = run_prefix .. run_id
    local lease = string.format('%.3f', math.floor((now + lease_s) * 1000) / 1000)
    redis.call('HSET', run_key, 'step', 0, 'lease', lease)
    redis.call('ZADD', leases_key, lease, run_id)
    return {run_id, skipped}
  end
  if run_id then
    skipped = skipped + 1
    if skipped >= max_skipped then return {'', skipped} end
  end
end
