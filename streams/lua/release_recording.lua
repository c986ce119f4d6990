-- Turn a tenant's traffic-recording switch off while it is still this recording's
-- (loadtest/record.py).
-- KEYS: switch
-- ARGV: recording (the switch's value for this recording)
-- Returns 1 deleted, 0 the switch is gone or another recording's.
local switch = KEYS[1]
local recording = ARGV[1]

if redis.call('get', switch) == recording then
  return redis.call('del', switch)
end
return 0
