-- Extends this gateway's members of many streams of one tenant in one call; never creates
-- one (a refresh racing a leave must not bring the entry back).
-- KEYS: index (the tenant's), then stream_members: each stream's members key
-- ARGV: gateway, ttl_ms, then per_stream: for each stream in stream_members' order, its
--       index member, how many clients follow, and those clients
-- Returns, per stream, the clients that had no member (swept while this gateway could not
-- refresh): the tracker joins them again.
local index = KEYS[1]
local stream_members = {unpack(KEYS, 2)}
local gateway, ttl_ms = ARGV[1], tonumber(ARGV[2])
local per_stream = {unpack(ARGV, 3)}

-- #include presence_index.lua
-- #include redis_now_ms.lua
local expiry = string.format('%d', now + ttl_ms)
local missing = {}
local arg = 1
for _, members in ipairs(stream_members) do
  local index_member, count = per_stream[arg], tonumber(per_stream[arg + 1])
  arg = arg + 2
  local absent = {}
  for i = arg, arg + count - 1 do
    local member = gateway .. ' ' .. per_stream[i]
    if redis.call('ZSCORE', members, member) then
      redis.call('ZADD', members, expiry, member)
    else
      absent[#absent + 1] = per_stream[i]
    end
  end
  arg = arg + count
  reindex_stream(index, members, index_member)
  missing[#missing + 1] = absent
end
return missing
