-- A retried or redelivered model call after the reply already streamed part of an earlier
-- attempt: that text is void (a model is not deterministic; two outputs must never be
-- spliced). Appends `reply.restart`, then, when earlier steps of the pipeline streamed text
-- (the first `keep_chars` of the reply), that text again as a delta at offset 0, and leaves
-- the reply holding just it. Written only by the current owner.
-- KEYS: seq_key, log_key, run_key, text_key, leases_key
-- ARGV: channel, restart_prefix, restart_suffix, maxlen, owner, keep_chars,
--       keep_fragment (the kept text as a JSON string fragment), delta_prefix,
--       delta_suffix ('' = nothing kept), lease_s, grace_s, run_id
-- Returns {1, seq of the last event}; {-1, status} finished or gone; {-2, owner} fenced.
local seq_key, log_key, run_key, text_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local leases_key = KEYS[5]
local channel, restart_prefix, restart_suffix, maxlen = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local owner, keep_chars, keep_fragment = ARGV[5], tonumber(ARGV[6]), ARGV[7]
local delta_prefix, delta_suffix = ARGV[8], ARGV[9]
local lease_s, grace_s, run_id = tonumber(ARGV[10]), ARGV[11], ARGV[12]

-- #include run_lease.lua
local run = redis.call('HMGET', run_key, 'status', 'owner', 'deadline')
if (not run[1]) or run[1] == 'done' then return {-1, run[1] or 'missing'} end
if run[1] ~= 'running' or run[2] ~= owner then return {-2, run[2] or ''} end
redis.call('SET', text_key, keep_fragment)
redis.call('HSET', run_key, 'emitted', keep_chars, 'step_base', keep_chars)
redis.call('HINCRBY', run_key, 'restarts', 1)
-- The step's tool events are void with its text (APPEND_TOOL_EVENT marks them).
redis.call('HDEL', run_key, 'tool_step')
set_lease(run_key, leases_key, run_id, now + lease_s)
keep_run(run_key, text_key, run[3], grace_s)
local prefix, suffix = restart_prefix, restart_suffix
-- #include stream_append.lua
if delta_suffix ~= '' then
  local prefix, suffix = delta_prefix, delta_suffix
  -- #include stream_append.lua
  return {1, seq}
end
return {1, seq}
