-- Draw `cost` tokens from one or several token buckets (streams/buckets.py) atomically:
-- from all of them, or, when any is short, from none. A bucket is a hash {tokens, at} that
-- refills at `rate` tokens a second up to `burst`, on the Redis clock; an idle bucket
-- expires once it would be full again.
-- KEYS: buckets (one key per bucket)
-- ARGV: cost, then limits: (rate_per_s, burst) for each bucket in KEYS order
-- Returns 0 when every bucket paid, else the milliseconds until all of them could (-1:
-- never: the cost exceeds a burst, or a rate is 0).
local buckets = {unpack(KEYS, 1)}
local cost = tonumber(ARGV[1])
local limits = {unpack(ARGV, 2)}

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local levels = {}
local wait = 0
for i, key in ipairs(buckets) do
  local rate = tonumber(limits[2 * i - 1])
  local burst = tonumber(limits[2 * i])
  local state = redis.call('HMGET', key, 'tokens', 'at')
  local tokens = tonumber(state[1])
  if tokens == nil then
    tokens = burst
  else
    local elapsed = math.max(0, now - tonumber(state[2]))
    tokens = math.min(burst, tokens + elapsed * rate / 1000)
  end
  levels[i] = tokens
  if tokens < cost then
    if cost > burst or rate <= 0 then
      wait = -1
    elseif wait >= 0 then
      wait = math.max(wait, math.ceil((cost - tokens) * 1000 / rate))
    end
  end
end
if wait ~= 0 then return wait end
for i, key in ipairs(buckets) do
  local rate = tonumber(limits[2 * i - 1])
  local burst = tonumber(limits[2 * i])
  local left = levels[i] - cost
  redis.call('HSET', key, 'tokens', tostring(left), 'at', now)
  local refill_ms = math.ceil((burst - left) * 1000 / math.max(rate, 0.001)) + 1000
  redis.call('PEXPIRE', key, refill_ms)
end
return 0
