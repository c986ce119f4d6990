-- A gateway renews its one lease (realtime/admission.py) and learns which gateways' leases
-- have lapsed, for it to reap their counts.
-- KEYS: leases (gateway -> lease expiry ms)
-- ARGV: gateway, lease_ms, dead_max (how many dead gateways to return)
-- Returns {lost, dead gateway ids...}: lost is 1 when this gateway's lease had lapsed (its
-- counts may have been reaped: it writes them back).
local leases = KEYS[1]
local gateway, lease_ms, dead_max = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])

-- #include redis_now_ms.lua
local expiry = redis.call('ZSCORE', leases, gateway)
local lost = 0
if not expiry or tonumber(expiry) <= now then lost = 1 end
redis.call('ZADD', leases, string.format('%d', now + lease_ms), gateway)
local result = {lost}
local dead = redis.call('ZRANGEBYSCORE', leases, '-inf', string.format('(%d', now),
  'LIMIT', 0, dead_max)
for _, id in ipairs(dead) do result[#result + 1] = id end
return result
