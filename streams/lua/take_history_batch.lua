-- The oldest `count` records of the history outbox move to the processing list,
-- atomically: nothing is ever only in the persister's memory (history/persist.py).
-- KEYS: outbox, processing
-- ARGV: count (at most about 5,000: the records are unpacked onto Lua's stack)
-- Returns the moved records, oldest first.
local outbox, processing = KEYS[1], KEYS[2]
local count = ARGV[1]

local taken = redis.call('RPOP', outbox, count)
if not taken then return {} end
redis.call('RPUSH', processing, unpack(taken))
return taken
