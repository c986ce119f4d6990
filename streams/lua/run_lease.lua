-- Fragment: the shared head of the run scripts that hold a lease. The Redis clock, so
-- every worker and sweeper compares leases against one clock whatever their own, and two
-- helpers. Leaves locals: now (epoch s), set_lease, keep_run.
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local function set_lease(run_key, leases_key, run_id, lease)
  -- Rounded down to the millisecond: a lease never lasts longer than asked.
  local score = string.format('%.3f', math.floor(lease * 1000) / 1000)
  redis.call('HSET', run_key, 'lease', score)
  redis.call('ZADD', leases_key, score, run_id)
  return score
end
-- Each claim and renewal sets the TTL of the record and its text to the run's deadline plus
-- the grace, whatever it was: they last as long as a late step or the sweeper may need them.
local function keep_run(run_key, text_key, deadline, grace)
  local left = math.max(0, math.ceil((tonumber(deadline) or now) - now))
  redis.call('EXPIRE', run_key, left + tonumber(grace))
  redis.call('EXPIRE', text_key, left + tonumber(grace))
end
