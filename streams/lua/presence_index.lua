-- Fragment: a tenant's presence index (a sorted set of its streams) says when a stream next
-- needs a sweep: its earliest member expiry; a stream with no member leaves it.
local function reindex_stream(index, members, index_member)
  local first = redis.call('ZRANGE', members, 0, 0, 'WITHSCORES')
  if #first == 0 then
    redis.call('ZREM', index, index_member)
  else
    redis.call('ZADD', index, first[2], index_member)
  end
end
