-- A client's receipt: how far it has processed a stream. It only moves forward (a late or
-- reordered receipt must not undo a newer one) and never past the stream's head (a seq the
-- stream has not assigned is a client bug, not a position). Seq 0 (nothing processed, where
-- every client starts) writes nothing: stream names are the clients' to choose, and a
-- receipt on a stream with no events must not create keys. Every other receipt, even an
-- ignored one, keeps the stream's receipts and the tenant's index alive for another TTL,
-- and the index sheds streams whose receipts have expired, so it never outgrows what it
-- lists.
-- KEYS: seq_key, receipts_key, index_key
-- ARGV: client, seq, stream, ttl (s)
-- Returns {1, seq} recorded; {0, stored} not newer than the stored one (or seq 0);
-- {-1, head} beyond head.
local seq_key, receipts_key, index_key = KEYS[1], KEYS[2], KEYS[3]
local client, seq, stream, ttl = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])

local head = tonumber(redis.call('GET', seq_key) or '0')
if seq > head then return {-1, head} end
local outcome
local stored = redis.call('HGET', receipts_key, client)
if seq == 0 then return {0, tonumber(stored or '0')} end
if stored and tonumber(stored) >= seq then
  outcome = {0, tonumber(stored)}
else
  redis.call('HSET', receipts_key, client, seq)
  outcome = {1, seq}
end
local now = tonumber(redis.call('TIME')[1])
redis.call('EXPIRE', receipts_key, ttl)
redis.call('ZADD', index_key, now, stream)
redis.call('ZREMRANGEBYSCORE', index_key, '-inf', '(' .. (now - ttl))
redis.call('EXPIRE', index_key, ttl)
return outcome
