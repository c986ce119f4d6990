-- A connection closed (realtime/admission.py): it no longer counts for this gateway.
-- KEYS: tenant_counts, client_counts, held (this gateway's hashes with a count)
-- ARGV: gateway
-- Returns 1.
local tenant_counts, client_counts, held = KEYS[1], KEYS[2], KEYS[3]
local gateway = ARGV[1]

for _, counts in ipairs({tenant_counts, client_counts}) do
  if redis.call('HINCRBY', counts, gateway, -1) <= 0 then
    redis.call('HDEL', counts, gateway)
    redis.call('SREM', held, counts)
  end
end
return 1
