-- Renew a tenant's traffic-recording switch while it is still this recording's
-- (loadtest/record.py): a recorder that stopped never extends another's.
-- KEYS: switch
-- ARGV: recording (the switch's value for this recording), lease_ms
-- Returns 1 renewed, 0 the switch is gone or another recording's.
local switch = KEYS[1]
local recording, lease_ms = ARGV[1], ARGV[2]

if redis.call('get', switch) == recording then
  return redis.call('pexpire', switch, lease_ms)
end
return 0
