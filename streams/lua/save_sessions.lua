-- Many sessions' positions written at once: a gateway's checkpoint and its closing
-- connections' last saves (realtime/sessions.py), one call for up to hundreds of one
-- tenant's sessions (they share the tenant's slot) instead of two or three commands each.
-- Per session, as the single commands did: the owner and the changed positions (HSET, when
-- any changed or the lifetime is reset), the streams no longer subscribed (HDEL), and the
-- key's lifetime (EXPIRE, when ttl_s is not 0).
-- KEYS: session_keys, one per save
-- ARGV: per_save: for each key in order, the owner, ttl_s, how many positions changed and
--       how many streams are gone, then the changed (field, seq) pairs and the gone fields
-- Returns how many sessions were written.
local session_keys = {unpack(KEYS, 1)}
local per_save = {unpack(ARGV, 1)}

local arg = 1
for _, key in ipairs(session_keys) do
  local owner, ttl_s = per_save[arg], tonumber(per_save[arg + 1])
  local changed, gone = tonumber(per_save[arg + 2]), tonumber(per_save[arg + 3])
  arg = arg + 4
  if changed > 0 or ttl_s > 0 then
    local fields = {'client', owner}
    for i = arg, arg + 2 * changed - 1 do
      fields[#fields + 1] = per_save[i]
    end
    redis.call('HSET', key, unpack(fields))
  end
  arg = arg + 2 * changed
  if gone > 0 then
    redis.call('HDEL', key, unpack(per_save, arg, arg + gone - 1))
  end
  arg = arg + gone
  if ttl_s > 0 then
    redis.call('EXPIRE', key, ttl_s)
  end
end
return #session_keys
