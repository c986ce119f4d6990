-- RENEW_LEASE for many owners at once: one call per batch of a worker's silent steps
-- (orchestration/inflight.py), so holding thousands of calls costs one round trip and one
-- command per interval, not one per call.
-- KEYS: leases_key
-- ARGV: lease_s, grace_s, run_prefix (a run's key is run_prefix .. run_id),
--       then owners: (run_id, owner) pairs
-- Returns one 1 (renewed) or 0 (no longer that owner's running step) per pair, in order.
local leases_key = KEYS[1]
local lease_s, grace_s, run_prefix = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local owners = {unpack(ARGV, 4)}

-- #include run_lease.lua
local renewed = {}
for i = 1, #owners, 2 do
  local run_id, owner = owners[i], owners[i + 1]
  local run_key = run_prefix .. run_id
  local run = redis.call('HMGET', run_key, 'status', 'owner', 'lease', 'deadline')
  if run[1] ~= 'running' or run[2] ~= owner then
    renewed[#renewed + 1] = 0
  else
    set_lease(run_key, leases_key, run_id, math.max(now + lease_s, tonumber(run[3]) or 0))
    keep_run(run_key, run_key .. ':text', run[4], grace_s)
    renewed[#renewed + 1] = 1
  end
end
return renewed
