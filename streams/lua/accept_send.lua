-- A client's `send`, all or nothing: the message event (deduplicated by client message
-- id), the run record, its deadline, its place in its tenant's fair queue and its first
-- task. Every key is the tenant's (one hash slot) but Celery's queue; the fair ring is
-- told separately (FAIR_JOIN) when this run made the tenant's queue non-empty.
-- KEYS: seq_key, log_key, dedupe_key, run_key, deadlines_key (the tenant's), queue_key
--       (Celery's, single Redis only), inflight_key (the connection's runs in flight),
--       queued_key (the tenant's runs queued), fair_queue_key, fair_state_key,
--       tokens_day_key, tokens_month_key (the tenant's tokens used today and this month:
--       ADD_USAGE)
-- ARGV: channel, prefix, suffix, maxlen, dedupe_ttl (s), event_id,
--       run_id, deadline (epoch s), run_ttl (s), celery_message ('' = the caller enqueues),
--       max_in_flight, max_queued (both -1 = not counted), counted_until (epoch s),
--       fair_tenant ('' = no fair queue: the message is the run's own step), fair_weight,
--       daily_budget, monthly_budget (tokens; 0 = no budget),
--       then run_fields: the run's fields as name/value pairs
-- Returns {1, "SEQ EVENT_ID RUN_ID", ring_epoch} accepted (ring_epoch: the tenant's fair
-- queue was empty, so the caller tells the ring, FAIR_JOIN, with the ticket; else 0);
-- {0, receipt} duplicate; {-1, wait_ms} the connection has max_in_flight runs
-- unfinished; {-2, wait_ms} the tenant has max_queued runs waiting for a worker;
-- {-3, 'day' or 'month'} the tenant's token budget for the period is spent. wait_ms:
-- until the earliest of those runs' deadlines (-1: the limit is 0).
local seq_key, log_key, dedupe_key = KEYS[1], KEYS[2], KEYS[3]
local run_key, deadlines_key, queue_key = KEYS[4], KEYS[5], KEYS[6]
local inflight_key, queued_key = KEYS[7], KEYS[8]
local fair_queue_key, fair_state_key = KEYS[9], KEYS[10]
local tokens_day_key, tokens_month_key = KEYS[11], KEYS[12]
local channel, prefix, suffix, maxlen = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local dedupe_ttl, event_id = ARGV[5], ARGV[6]
local run_id, deadline, run_ttl, celery_message = ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local max_in_flight, max_queued = tonumber(ARGV[11]), tonumber(ARGV[12])
local counted_until = tonumber(ARGV[13])
local fair_tenant, fair_weight = ARGV[14], ARGV[15]
local daily_budget, monthly_budget = tonumber(ARGV[16]), tonumber(ARGV[17])
local run_fields = {unpack(ARGV, 18)}

local existing = redis.call('GET', dedupe_key)
if existing then return {0, existing} end

-- Token budgets (streams/usage.py): usage is counted as model calls end, so a send is
-- refused once the period's spending has reached the budget; runs already accepted finish.
if daily_budget > 0 and tonumber(redis.call('GET', tokens_day_key) or '0') >= daily_budget then
  return {-3, 'day'}
end
if monthly_budget > 0
    and tonumber(redis.call('GET', tokens_month_key) or '0') >= monthly_budget then
  return {-3, 'month'}
end

-- Flow control (realtime/admission.py). After the dedupe check (a repeat always gets its
-- ack) and before any write (a refused send leaves no trace). A run counts in its
-- connection's in-flight set until FINALIZE_RUN and in its tenant's queued set until its
-- first CLAIM_STEP (or FINALIZE_RUN); each member's score is counted_until, its deadline
-- plus a grace, after which a run whose record was lost stops counting.
local function count_run() end
do
  local clock = redis.call('TIME')
  local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
  -- nil when there is room, else the ms until the earliest counted run's deadline.
  local function full(key, max)
    if max < 0 then return nil end
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    if redis.call('ZCARD', key) < max then return nil end
    local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    if #first == 0 then return -1 end
    local earliest = tonumber(first[2]) - (counted_until - tonumber(deadline))
    return math.max(0, math.ceil((earliest - now) * 1000))
  end
  local wait = full(inflight_key, max_in_flight)
  if wait then return {-1, wait} end
  wait = full(queued_key, max_queued)
  if wait then return {-2, wait} end
  local function add(key, max)
    if max < 0 then return end
    redis.call('ZADD', key, counted_until, run_id)
    local left = math.ceil(counted_until - now)
    if redis.call('TTL', key) < left then redis.call('EXPIRE', key, left) end
  end
  count_run = function()
    add(inflight_key, max_in_flight)
    add(queued_key, max_queued)
  end
end
-- #include stream_append.lua
local receipt = seq .. ' ' .. event_id .. ' ' .. run_id
redis.call('SET', dedupe_key, receipt, 'EX', dedupe_ttl)
count_run()
local fields = {'status', 'queued', 'emitted', 0, 'attempt', 0, 'message_seq', seq}
-- #include run_create.lua
-- #include fair_queue_insert.lua
if celery_message ~= '' and ring_epoch == 0 then
  redis.call('LPUSH', queue_key, celery_message)
end
return {1, receipt, ring_epoch}
