-- A tenant's fair queue went from empty to not (ACCEPT_SEND, START_TRIGGERED_RUN answered
-- its ring_epoch): the tenant joins the ring (streams/fairness.py) unless it is in it, and
-- the ring learns the push's epoch, so a pick that saw the queue empty before this push
-- cannot take the tenant out (FAIR_SETTLE). The ring's keys are one slot of their own;
-- the ticket goes in with the join, so no worker takes it before the ring has the tenant.
-- KEYS: ring, epochs, queue_key (Celery's, single Redis only)
-- ARGV: tenant, epoch, message ('' = none, or the caller publishes it after)
-- Returns 1 when the tenant joined, 0 when it was in the ring already.
local ring, epochs, queue_key = KEYS[1], KEYS[2], KEYS[3]
local tenant, epoch, message = ARGV[1], tonumber(ARGV[2]), ARGV[3]

if epoch > (tonumber(redis.call('HGET', epochs, tenant)) or 0) then
  redis.call('HSET', epochs, tenant, epoch)
end
local joined = 0
if not redis.call('LPOS', ring, tenant) then
  redis.call('RPUSH', ring, tenant)
  joined = 1
end
if message ~= '' then redis.call('LPUSH', queue_key, message) end
return joined
