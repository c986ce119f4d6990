-- One model call's token usage (streams/usage.py), added at once to its run (for the
-- run's reply.done and history) and to its tenant's counters of the current UTC day and
-- month (what ACCEPT_SEND checks the tenant's budgets against).
-- KEYS: run_key, day_key, month_key
-- ARGV: prompt_tokens, completion_tokens, estimated (1 or 0), day_expires_at,
--       month_expires_at (epoch s)
-- Returns {tokens used today, tokens used this month}.
local run_key, day_key, month_key = KEYS[1], KEYS[2], KEYS[3]
local prompt_tokens, completion_tokens = tonumber(ARGV[1]), tonumber(ARGV[2])
local estimated, day_expires_at, month_expires_at = ARGV[3], ARGV[4], ARGV[5]

-- A run already gone (expired long after it finished) is not created again by this.
if redis.call('EXISTS', run_key) == 1 then
  redis.call('HINCRBY', run_key, 'usage_prompt', prompt_tokens)
  redis.call('HINCRBY', run_key, 'usage_completion', completion_tokens)
  if estimated == '1' then redis.call('HSET', run_key, 'usage_est', 1) end
end
local total = prompt_tokens + completion_tokens
local today = redis.call('INCRBY', day_key, total)
redis.call('EXPIREAT', day_key, day_expires_at)
local month = redis.call('INCRBY', month_key, total)
redis.call('EXPIREAT', month_key, month_expires_at)
return {today, month}
