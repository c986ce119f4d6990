-- A connection closed (realtime/admission.py): it no longer counts for this gateway.
-- KEYS: tenant_counts, client_counts (the tenant's: one slot)
-- ARGV: gateway
-- Returns 1.
local tenant_counts, client_counts = KEYS[1], KEYS[2]
local gateway = ARGV[1]

for _, counts in ipairs({tenant_counts, client_counts}) do
  if redis.call('HINCRBY', counts, gateway, -1) <= 0 then
    redis.call('HDEL', counts, gateway)
  end
end
return 1
