-- Removes a dead gateway's connection counts a slice at a time, then its lease; nothing if
-- it is alive again (realtime/admission.py).
-- KEYS: leases (gateway -> lease expiry ms), held (the dead gateway's hashes with a count)
-- ARGV: gateway (the dead one's id), limit (counts removed per call)
-- Returns how many counts are left to remove.
local leases, held = KEYS[1], KEYS[2]
local gateway, limit = ARGV[1], tonumber(ARGV[2])

-- #include redis_now_ms.lua
local expiry = redis.call('ZSCORE', leases, gateway)
if expiry and tonumber(expiry) > now then return 0 end
for _, counts in ipairs(redis.call('SPOP', held, limit)) do
  redis.call('HDEL', counts, gateway)
end
local left = redis.call('SCARD', held)
if left == 0 then redis.call('ZREM', leases, gateway) end
return left
