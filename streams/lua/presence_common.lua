-- Fragment: the shared helpers of the per-stream presence scripts (realtime/presence.py).
-- Expects locals: members (zset: "GATEWAY CLIENT" scored by expiry ms), counts (hash:
-- client -> gateway members), names (hash: client -> name), index (the tenant's zset of
-- streams by earliest expiry), lingering (hash: client -> the gateway whose member of it
-- outlives a connection cut without a goodbye, for the leave grace), channel, index_member, stream_json, id_prefix, ts_json,
-- announce_max. Every key is the tenant's (one slot), the channel too.
-- Leaves locals: announced (events published so far), now (Redis's clock, ms), announce,
-- drop, sweep, reindex (and publish).
-- #include publish.lua
-- #include presence_index.lua
-- #include redis_now_ms.lua

local announced = 0
-- An event without a seq: an empty head before the newline tells gateways so.
-- Not on a stream with more than announce_max present clients: every subscriber gets
-- every join, so a crowd joining would cost the square of its size in frames.
local function announce(kind, client, name)
  announced = announced + 1
  if redis.call('HLEN', counts) > announce_max then return end
  local client_json = cjson.encode(client)
  local name_json = 'null'
  if name and name ~= '' then name_json = cjson.encode(name) end
  publish(channel, '\n{"type":"event","stream":' .. stream_json
    .. ',"id":"' .. id_prefix .. string.format('%08x', announced)
    .. '","kind":"' .. kind .. '","from":' .. cjson.encode('client:' .. client)
    .. ',"cause":{"client":' .. client_json .. ',"message":null,"prev":null}'
    .. ',"ts":' .. ts_json
    .. ',"data":{"client":' .. client_json .. ',"name":' .. name_json .. '}}')
end

-- One gateway's member goes; the client leaves when it was its last.
local function drop(member)
  if redis.call('ZREM', members, member) == 0 then return end
  local space = string.find(member, ' ', 1, true)
  local client = string.sub(member, space + 1)
  if redis.call('HGET', lingering, client) == string.sub(member, 1, space - 1) then
    redis.call('HDEL', lingering, client)
  end
  if redis.call('HINCRBY', counts, client, -1) <= 0 then
    local name = redis.call('HGET', names, client)
    redis.call('HDEL', counts, client)
    redis.call('HDEL', names, client)
    announce('leave', client, name)
  end
end

local function sweep(limit)
  local expired = redis.call('ZRANGEBYSCORE', members, '-inf', string.format('%d', now),
    'LIMIT', 0, limit)
  for _, member in ipairs(expired) do drop(member) end
  return #expired
end

local function reindex() reindex_stream(index, members, index_member) end
