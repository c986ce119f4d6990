-- Fragment: a new run waits in its tenant's fair queue (streams/fairness.py), and the
-- Celery message is a ticket for whichever run is fairly next. The ring is in a slot of
-- its own, so this only counts the push (the tenant's epoch) and says, by ring_epoch,
-- whether the queue was empty: the caller then tells the ring (FAIR_JOIN), and the ticket
-- goes with that call, so no worker takes it before the ring knows the tenant.
-- Expects locals: run_id, fair_tenant ('' = no fair queue: the message is the run's own
-- step), fair_weight, fair_queue_key, fair_state_key.
-- Leaves locals: ring_epoch (0: the ring need not be told).
local ring_epoch = 0
if fair_tenant ~= '' then
  local epoch = redis.call('HINCRBY', fair_state_key, 'epoch', 1)
  redis.call('HSET', fair_state_key, 'weight', fair_weight)
  if redis.call('LPUSH', fair_queue_key, run_id) == 1 then ring_epoch = epoch end
end
