-- Fragment: publish(channel, message) sends a live notification on a stream's channel.
local function publish(channel, message)
  return redis.call('PUBLISH', channel, message)
end
