-- One piece of a reply, appended only by the run's current owner at the expected offset.
-- It renews the owner's lease: a streaming step needs no other heartbeat.
-- KEYS: seq_key, log_key, run_key, text_key, leases_key
-- ARGV: channel, prefix, suffix, maxlen, owner, offset, piece_chars, piece_fragment (the
--       piece as a JSON string fragment), lease_s, grace_s, run_id
-- Returns {1, seq}; {-1, status} finished or gone; {-2, owner} fenced (another owner, or the
-- step was redelivered); {-3, emitted} wrong offset.
local seq_key, log_key, run_key, text_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local leases_key = KEYS[5]
local channel, prefix, suffix, maxlen = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local owner, offset = ARGV[5], tonumber(ARGV[6])
local piece_chars, piece_fragment = tonumber(ARGV[7]), ARGV[8]
local lease_s, grace_s, run_id = tonumber(ARGV[9]), ARGV[10], ARGV[11]

-- #include run_lease.lua
local run = redis.call('HMGET', run_key, 'status', 'owner', 'emitted', 'deadline')
if (not run[1]) or run[1] == 'done' then return {-1, run[1] or 'missing'} end
if run[1] ~= 'running' or run[2] ~= owner then return {-2, run[2] or ''} end
local emitted = tonumber(run[3] or '0')
if offset ~= emitted then return {-3, tostring(emitted)} end
redis.call('APPEND', text_key, piece_fragment)
redis.call('HSET', run_key, 'emitted', emitted + piece_chars)
set_lease(run_key, leases_key, run_id, now + lease_s)
keep_run(run_key, text_key, run[4], grace_s)
-- #include stream_append.lua
return {1, seq}
