-- A step's output, for the steps after it (orchestration/steps.py), written only by the
-- step's current owner. `fell_back` records that a step gave its fallback and the run went
-- on: the run then ends `degraded`, naming it.
-- KEYS: run_key
-- ARGV: owner, field (out.N), output, fell_back ('' = none)
-- Returns 1, or 0 when the caller no longer owns a running step.
local run_key = KEYS[1]
local owner, field, output, fell_back = ARGV[1], ARGV[2], ARGV[3], ARGV[4]

local run = redis.call('HMGET', run_key, 'status', 'owner')
if run[1] ~= 'running' or run[2] ~= owner then return 0 end
redis.call('HSET', run_key, field, output)
if fell_back ~= '' then redis.call('HSET', run_key, 'fell_back', fell_back) end
return 1
