-- The streams of one tenant whose earliest presence entry has expired: the ones a sweep
-- must visit.
-- KEYS: index (the tenant's)
-- ARGV: limit
-- Returns up to `limit` index members (stream names).
local index = KEYS[1]
local limit = ARGV[1]

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZRANGEBYSCORE', index, '-inf', string.format('%d', now), 'LIMIT', 0, limit)
