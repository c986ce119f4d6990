-- A connection opens (realtime/admission.py): counted for this gateway in its tenant's and
-- its client's hashes, unless either is at its maximum. Only gateways whose lease is
-- current count; a dead gateway's counts are dropped as they are met.
-- KEYS: tenant_counts, client_counts, leases (gateway -> lease expiry ms), held (this
--       gateway's hashes with a count)
-- ARGV: gateway, lease_ms, tenant_max, client_max
-- Returns {refused, lease_created}: refused is 0 (admitted and counted), 1 (the tenant is
-- full) or 2 (the client is); lease_created 1 when this gateway had no lease (its first
-- admission, or its lease lapsed and was reaped: the registry then writes its counts back).
local tenant_counts, client_counts, leases, held = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local gateway, lease_ms = ARGV[1], tonumber(ARGV[2])
local tenant_max, client_max = tonumber(ARGV[3]), tonumber(ARGV[4])

-- #include redis_now_ms.lua
local maxima = {tenant_max, client_max}
local created = 0
if not redis.call('ZSCORE', leases, gateway) then
  redis.call('ZADD', leases, string.format('%d', now + lease_ms), gateway)
  created = 1
end
for i, counts in ipairs({tenant_counts, client_counts}) do
  local fields = redis.call('HGETALL', counts)
  local total = 0
  for j = 1, #fields, 2 do
    local expiry = redis.call('ZSCORE', leases, fields[j])
    if expiry and tonumber(expiry) > now then
      total = total + tonumber(fields[j + 1])
    else
      -- A dead gateway's connections stop counting as soon as its lease has lapsed.
      redis.call('HDEL', counts, fields[j])
    end
  end
  if total >= maxima[i] then return {i, created} end
end
for _, counts in ipairs({tenant_counts, client_counts}) do
  if redis.call('HINCRBY', counts, gateway, 1) == 1 then redis.call('SADD', held, counts) end
end
return {0, created}
