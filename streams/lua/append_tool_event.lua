-- A tool call or its result (`tool.call`, `tool.result`) of a run's step, appended only by
-- the run's current owner and only as the run's next tool event, so a fenced attempt
-- cannot write one and a write whose answer was lost is never made twice. It leaves the
-- reply's text alone, marks the step as having shown tool events (a retry of it starts
-- with reply.restart; RESTART_REPLY clears the mark) and renews the owner's lease.
-- KEYS: seq_key, log_key, run_key, text_key, leases_key
-- ARGV: channel, prefix, suffix, maxlen, owner, count (the run's tool events before this
--       one), step, tools_ran (the run's tool names as JSON, '' = unchanged), lease_s,
--       grace_s, run_id
-- Returns {1, seq}; {-1, status} finished or gone; {-2, owner} fenced; {-3, count} not the
-- next tool event (value: how many the run has).
local seq_key, log_key, run_key, text_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local leases_key = KEYS[5]
local channel, prefix, suffix, maxlen = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local owner, count, step, tools_ran = ARGV[5], tonumber(ARGV[6]), ARGV[7], ARGV[8]
local lease_s, grace_s, run_id = tonumber(ARGV[9]), ARGV[10], ARGV[11]

-- #include run_lease.lua
local run = redis.call('HMGET', run_key, 'status', 'owner', 'tool_events', 'deadline')
if (not run[1]) or run[1] == 'done' then return {-1, run[1] or 'missing'} end
if run[1] ~= 'running' or run[2] ~= owner then return {-2, run[2] or ''} end
local stored = tonumber(run[3] or '0')
if count ~= stored then return {-3, tostring(stored)} end
redis.call('HSET', run_key, 'tool_events', stored + 1, 'tool_step', step)
if tools_ran ~= '' then redis.call('HSET', run_key, 'tools_ran', tools_ran) end
set_lease(run_key, leases_key, run_id, now + lease_s)
keep_run(run_key, text_key, run[4], grace_s)
-- #include stream_append.lua
return {1, seq}
