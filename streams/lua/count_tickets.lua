-- Count, read-only, the tickets ticket reconciliation compares with the runs queued
-- (orchestration/tickets.py, which counts those tenant by tenant first): tickets waiting
-- in the runs queue, and tickets a worker reserved recently. Stops counting tickets once
-- they cover the queued runs (nothing is missing then), so a long queue with its tickets
-- costs little. Every key is kombu's, in the single Redis that is also the broker.
-- KEYS: unacked, unacked_index (kombu's), then queue_lists: each list of the runs queue
-- ARGV: queued (runs queued, counted before), reserved_since (epoch s), chunk (messages per
--       LRANGE/HMGET), then marks: what a ticket contains
-- Returns {waiting, reserved}.
local unacked, unacked_index = KEYS[1], KEYS[2]
local queue_lists = {unpack(KEYS, 3)}
local queued, reserved_since, chunk = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local marks = {unpack(ARGV, 4)}

local function is_ticket(message)
  for _, mark in ipairs(marks) do
    if string.find(message, mark, 1, true) then return true end
  end
  return false
end
if queued == 0 then return {0, 0} end
local reserved = 0
local tags = redis.call('ZRANGEBYSCORE', unacked_index, reserved_since, '+inf')
for first = 1, #tags, chunk do
  local last = math.min(first + chunk - 1, #tags)
  local messages = redis.call('HMGET', unacked, unpack(tags, first, last))
  for _, message in ipairs(messages) do
    if message and is_ticket(message) then reserved = reserved + 1 end
  end
end
local waiting = 0
for _, queue_list in ipairs(queue_lists) do
  local length = redis.call('LLEN', queue_list)
  for start = 0, length - 1, chunk do
    for _, message in ipairs(redis.call('LRANGE', queue_list, start, start + chunk - 1)) do
      if is_ticket(message) then waiting = waiting + 1 end
    end
    if waiting + reserved >= queued then return {waiting, reserved} end
  end
end
return {waiting, reserved}
