-- Fragment: the shared tail of every append to a stream. Assigns the next seq, keeps the
-- event in the log and notifies gateways (`SEQ "\n" EVENT` on the stream's channel).
-- Expects locals: seq_key, log_key, channel, prefix, suffix, maxlen.
-- Leaves locals: seq, event.
-- #include publish.lua
local seq = redis.call('INCR', seq_key)
local event = prefix .. seq .. suffix
redis.call('XADD', log_key, 'MAXLEN', '~', maxlen, seq .. '-0', 'e', event)
publish(channel, seq .. '\n' .. event)
