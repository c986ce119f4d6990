-- Fragment: a new run's record and its deadline (streams/runs.py reads the record).
-- Expects locals: run_key, run_id, run_ttl, deadline, deadlines_key, fields (the fields the
-- script sets itself, as a flat name/value list), run_fields (the caller's, likewise).
for _, value in ipairs(run_fields) do fields[#fields + 1] = value end
redis.call('HSET', run_key, unpack(fields))
redis.call('EXPIRE', run_key, run_ttl)
redis.call('ZADD', deadlines_key, deadline, run_id)
