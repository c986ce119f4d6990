-- A worker takes a run's step: it becomes the owner, every earlier owner is fenced off, and
-- the step holds a lease that the owner renews while it works (APPEND_DELTA, RENEW_LEASE).
-- KEYS: run_key, text_key, leases_key
-- ARGV: owner, step, lease_s, grace_s, run_id, worker, retries
-- Returns {} when the run is gone, finished or past this step, else the run hash as a flat
-- list.
local run_key, text_key, leases_key = KEYS[1], KEYS[2], KEYS[3]
local owner, step, lease_s, grace_s = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local run_id, worker, retries = ARGV[5], ARGV[6], ARGV[7]

-- #include run_lease.lua
local run = redis.call('HMGET', run_key, 'status', 'step', 'emitted', 'deadline')
if (not run[1]) or run[1] == 'done' then return {} end
-- A message for an earlier step (kombu restores a dead worker's message late) must not
-- run that step again: its text is already in the reply.
if run[2] and tonumber(step) < tonumber(run[2]) then return {} end
-- Flow control: the run no longer waits for a worker (only its first claim counts).
local queued_key = redis.call('HGET', run_key, 'queued_key')
if queued_key then
  redis.call('ZREM', queued_key, run_id)
  redis.call('HDEL', run_key, 'queued_key')
end
if run[2] ~= step then
  -- A new step starts where the reply stands now; a retry of the same step keeps its base.
  redis.call('HSET', run_key, 'step_base', run[3] or 0)
end
redis.call('HSET', run_key, 'status', 'running', 'owner', owner, 'step', step,
  'worker', worker, 'retries', retries)
redis.call('HINCRBY', run_key, 'attempt', 1)
set_lease(run_key, leases_key, run_id, now + lease_s)
keep_run(run_key, text_key, run[4], grace_s)
return redis.call('HGETALL', run_key)
