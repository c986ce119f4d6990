-- A gateway renews its one lease (realtime/admission.py) and reads everyone's: which
-- gateways are alive (their counts count) and which have lapsed (their counts are to be
-- reaped). A lease that lapsed is never renewed: its id is dead for good and the process
-- goes on under a new one, so a reaper can never remove a live gateway's counts.
-- KEYS: leases (gateway -> lease expiry ms, Redis clock)
-- ARGV: gateway, lease_ms, create (1: a new id, whose lease is created), dead_max (how
--       many dead gateways to return)
-- Returns {lost, {dead ids...}, {live ids...}}: lost is 1 when this (not new) gateway's
-- lease was gone or had lapsed, and was left so.
local leases = KEYS[1]
local gateway, lease_ms = ARGV[1], tonumber(ARGV[2])
local create, dead_max = ARGV[3] == '1', tonumber(ARGV[4])

-- #include redis_now_ms.lua
local expiry = redis.call('ZSCORE', leases, gateway)
local lost = 0
if not create and (not expiry or tonumber(expiry) <= now) then
  lost = 1
else
  redis.call('ZADD', leases, string.format('%d', now + lease_ms), gateway)
end
local dead = redis.call('ZRANGEBYSCORE', leases, '-inf', string.format('%d', now),
  'LIMIT', 0, dead_max)
local live = redis.call('ZRANGEBYSCORE', leases, string.format('(%d', now), '+inf')
return {lost, dead, live}
