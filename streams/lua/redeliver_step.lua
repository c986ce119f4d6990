-- A step whose lease ran out: its worker died or stalled. Enqueue the same step again,
-- fence the lost owner and leave the run queued, without a lease, until the new attempt
-- claims it. One script, so any number of sweepers redeliver a lost step exactly once.
-- With a broker other than the streams' Redis the caller publishes the message after, and
-- the run holds a publish lease meanwhile (HAND_OVER says why).
-- KEYS: run_key, leases_key (the tenant's), queue_key (Celery's, single Redis only)
-- ARGV: run_id, step, message ('' = the caller publishes after), max_redeliveries,
--       publish_lease_s (0 = none)
-- Returns {1, redeliveries, publish lease or ''} enqueued; {0, why} nothing to do;
-- {-2, redeliveries} none left: the caller ends the run.
local run_key, leases_key, queue_key = KEYS[1], KEYS[2], KEYS[3]
local run_id, step, message = ARGV[1], ARGV[2], ARGV[3]
local max_redeliveries, publish_lease_s = tonumber(ARGV[4]), tonumber(ARGV[5])

-- #include run_lease.lua
local run = redis.call('HMGET', run_key, 'status', 'lease', 'step', 'redeliveries', 'deadline')
-- A queued run holds a lease only between its fair pick and its claim (fairness.py), or
-- while its step's message is being published (HAND_OVER).
if run[1] ~= 'running' and not (run[1] == 'queued' and run[2]) then
  redis.call('ZREM', leases_key, run_id)
  return {0, run[1] or 'missing'}
end
local lease = tonumber(run[2]) or 0
if lease > now then
  -- Renewed since the sweeper listed it.
  redis.call('ZADD', leases_key, run[2], run_id)
  return {0, 'leased'}
end
if run[3] ~= step then return {0, 'step'} end
-- Past its deadline the deadline sweep ends the run; a new attempt could not finish it.
if (tonumber(run[5]) or 0) <= now then return {0, 'deadline'} end
local count = tonumber(run[4]) or 0
if count >= max_redeliveries then return {-2, count} end
redis.call('HSET', run_key, 'status', 'queued', 'redeliveries', count + 1)
redis.call('HDEL', run_key, 'owner', 'lease')
redis.call('ZREM', leases_key, run_id)
if message ~= '' then redis.call('LPUSH', queue_key, message) end
local lease = ''
if publish_lease_s > 0 then
  lease = set_lease(run_key, leases_key, run_id, now + publish_lease_s)
end
return {1, count + 1, lease}
