-- Fragment: Redis's clock in milliseconds, so that gateway clocks never matter.
-- Leaves local: now (epoch ms).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
