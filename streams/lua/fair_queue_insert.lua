-- Fragment: a new run waits in its tenant's fair queue (streams/fairness.py), and the
-- Celery message is a ticket for whichever run is fairly next. A tenant is in the ring
-- exactly while its queue is not empty.
-- Expects locals: run_id, fair_tenant ('' = no fair queue: the message is the run's own
-- step), fair_weight, fair_queue_key, fair_ring_key, fair_weights_key.
if fair_tenant ~= '' then
  if redis.call('LPUSH', fair_queue_key, run_id) == 1 then
    redis.call('RPUSH', fair_ring_key, fair_tenant)
  end
  redis.call('HSET', fair_weights_key, fair_tenant, fair_weight)
end
