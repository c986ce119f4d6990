-- A connection that ended without a goodbye: this gateway's members of its clients on many
-- streams of one tenant are kept for the grace instead of removed, so a client that comes
-- back within it (to any gateway: presence_join.lua takes the kept member over) neither
-- left nor joined. One not taken over expires, and the sweep announces its leave. Never
-- creates a member nor extends one (the earlier of the two expiries), so a kept member
-- cannot outlive its TTL or undo a leave.
-- KEYS: index (the tenant's), then stream_keys: per stream its members and lingering keys
-- ARGV: gateway, grace_ms, then per_stream: for each stream in stream_keys' order, its
--       index member, how many clients follow, and those clients
-- Returns how many members are kept.
local index = KEYS[1]
local stream_keys = {unpack(KEYS, 2)}
local gateway, grace_ms = ARGV[1], tonumber(ARGV[2])
local per_stream = {unpack(ARGV, 3)}

-- #include presence_index.lua
-- #include redis_now_ms.lua
local until_ms = now + grace_ms
local kept = 0
local arg = 1
for k = 1, #stream_keys, 2 do
  local members, lingering = stream_keys[k], stream_keys[k + 1]
  local index_member, count = per_stream[arg], tonumber(per_stream[arg + 1])
  arg = arg + 2
  for i = arg, arg + count - 1 do
    local client = per_stream[i]
    local member = gateway .. ' ' .. client
    local expiry = redis.call('ZSCORE', members, member)
    if expiry then
      kept = kept + 1
      redis.call('HSET', lingering, client, gateway)
      if tonumber(expiry) > until_ms then
        redis.call('ZADD', members, string.format('%d', until_ms), member)
      end
    end
  end
  arg = arg + count
  reindex_stream(index, members, index_member)
end
return kept
