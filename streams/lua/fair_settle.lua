-- The ring's part of a fair pick (streams/fairness.py), after FAIR_POP took a run off the
-- tenant's queue: deficit round robin's bookkeeping, in the ring's own slot. The tenant at
-- the head with less than one pick left gets its quantum (its weight); a live pick costs
-- one; a tenant below one pick goes to the tail. A tenant whose queue FAIR_POP saw empty
-- leaves the ring and forfeits its deficit, unless a push the ring has heard of (FAIR_JOIN)
-- came after that look: the epoch makes removal safe against a send racing the pick.
-- KEYS: ring, deficits, epochs, picked
-- ARGV: tenant, live (1 or 0), left (runs left queued), epoch (the queue's, at the pop),
--       weight
-- Returns 1 when the tenant left the ring, else 0.
local ring, deficits, epochs, picked = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local tenant, live, left = ARGV[1], ARGV[2] == '1', tonumber(ARGV[3])
local epoch, weight = tonumber(ARGV[4]), tonumber(ARGV[5])

if live then
  local clock = redis.call('TIME')
  redis.call('SET', picked, clock[1])
end
if left == 0 and (tonumber(redis.call('HGET', epochs, tenant)) or 0) <= epoch then
  redis.call('LREM', ring, 0, tenant)
  redis.call('HDEL', deficits, tenant)
  redis.call('HDEL', epochs, tenant)
  return 1
end
local deficit = tonumber(redis.call('HGET', deficits, tenant)) or 0
if deficit < 1 then deficit = deficit + math.max(1, math.floor(weight)) end
if live then deficit = deficit - 1 end
if deficit < 1 and redis.call('LREM', ring, 1, tenant) > 0 then
  redis.call('RPUSH', ring, tenant)
end
redis.call('HSET', deficits, tenant, deficit)
return 0
