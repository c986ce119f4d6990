-- This gateway's member for a client on a stream is added or extended; the client joins
-- (announced on the stream's channel) when it is its first gateway member. A client back
-- within its leave grace takes over the member kept for it: kept on this gateway, it is
-- this one, extended; kept on another, that one goes without a leave (this one holds the
-- client), so the client's goodbye later is a leave at once, not at the grace's end.
-- KEYS: members, counts, names, index, lingering (see presence_common.lua)
-- ARGV: channel, index_member, stream_json, id_prefix (24 hex digits: event ids are it and
--       a counter), ts_json, announce_max (no events past this many present clients),
--       gateway, ttl_ms, client, name
-- Returns the events announced: 1 when the client joined.
local members, counts, names, index = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local lingering = KEYS[5]
local channel, index_member, stream_json = ARGV[1], ARGV[2], ARGV[3]
local id_prefix, ts_json, announce_max = ARGV[4], ARGV[5], tonumber(ARGV[6])
local gateway, ttl_ms, client, name = ARGV[7], tonumber(ARGV[8]), ARGV[9], ARGV[10]

-- #include presence_common.lua
local expiry = string.format('%d', now + ttl_ms)
local kept_on = redis.call('HGET', lingering, client)
if redis.call('ZADD', members, expiry, gateway .. ' ' .. client) == 1 then
  if redis.call('HINCRBY', counts, client, 1) == 1 then
    redis.call('HSET', names, client, name)
    announce('join', client, name)
  end
end
if kept_on then
  redis.call('HDEL', lingering, client)
  if kept_on ~= gateway then drop(kept_on .. ' ' .. client) end
end
reindex()
return announced
