-- Fragment: a stream's live notification. The loader (streams/scripts.py) resolves the
-- command by the client: PUBLISH on a single Redis; SPUBLISH, the sharded publish, on a
-- Redis Cluster, where it goes only to the shard of the channel's slot, which the stream's
-- channel shares with the stream's keys (streams/keys.py), so a script may publish there.
-- Leaves locals: publish(channel, message).
local function publish(channel, message)
  redis.call('PUBLISH', channel, message)
end
