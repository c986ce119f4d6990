-- A connection opens (realtime/admission.py): counted for this gateway in its tenant's and
-- its client's hashes, unless either is at its maximum. The lease set lives in a slot of
-- its own, so the caller passes what it last read of it: the counts of gateways known dead
-- are dropped as they are met; any other gateway's count counts, live or not yet known
-- (one started since the caller read the leases): a limit is never exceeded for want of a
-- fresh read. The unknown ones are returned, for the caller to read the leases again.
-- KEYS: tenant_counts, client_counts (the tenant's: one slot)
-- ARGV: gateway, tenant_max, client_max, live_count, then known: the live gateways' ids
--       (live_count of them), then the dead ones' (lease lapsed or gone: dead for good)
-- Returns {refused, unknown ids...}: refused is 0 (admitted and counted), 1 (the tenant is
-- full) or 2 (the client is).
local tenant_counts, client_counts = KEYS[1], KEYS[2]
local gateway, tenant_max, client_max = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local live_count = tonumber(ARGV[4])
local known = {unpack(ARGV, 5)}

local state = {[gateway] = 'live'}
for i, id in ipairs(known) do
  if i <= live_count then state[id] = 'live' else state[id] = 'dead' end
end
local maxima = {tenant_max, client_max}
local result = {0}
for i, counts in ipairs({tenant_counts, client_counts}) do
  local fields = redis.call('HGETALL', counts)
  local total = 0
  for j = 1, #fields, 2 do
    local id = fields[j]
    if state[id] == 'dead' then
      redis.call('HDEL', counts, id)
    else
      if not state[id] then
        state[id] = 'unknown'
        result[#result + 1] = id
      end
      total = total + tonumber(fields[j + 1])
    end
  end
  if total >= maxima[i] then
    result[1] = i
    return result
  end
end
for _, counts in ipairs({tenant_counts, client_counts}) do
  redis.call('HINCRBY', counts, gateway, 1)
end
return result
