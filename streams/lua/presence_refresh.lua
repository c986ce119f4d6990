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

local t = redis.call('TIME')
local expiry = string.format('%d',
  tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + ttl_ms)
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
  local first = redis.call('ZRANGE', members, 0, 0, 'WITHSCORES')
  if #first == 0 then
    redis.call('ZREM', index, index_member)
  else
    redis.call('ZADD', index, first[2], index_member)
  end
  missing[#missing + 1] = absent
end
return missing
