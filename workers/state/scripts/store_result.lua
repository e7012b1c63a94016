-- A job's state, stored for its caller, and its bookkeeping, in one atomic step.
-- KEYS: the job's result key, the ledger spool, the dead-letter hash[, then, for a job an
--   app's budget reserved for: its settled marker, the app's day and month spend].
-- ARGV: value (Celery's JSON), expiry in s (0: none), final ('1' for SUCCESS or FAILURE),
--   the job's ledger rows ('' = none), job id, its dead letter ('' = none), the
--   reservation's settlement (real cost minus reserved, USD; '' = none).
-- SUCCESS is never replaced (Celery's own rule, which it checks with a read before the
-- write), and a non-final state (STARTED, RETRY) never replaces FAILURE either: Celery
-- writes them from different workers and they can land out of order
-- (workers/runtime/resultstore.py).
-- With a final state go the job's attempt rows onto the ledger spool, for a failed job its
-- dead letter, and for a job an app reserved budget for the settlement of that
-- reservation: a worker killed at any moment leaves all of them or none.
--!include settle
local current = redis.call('GET', KEYS[1])
if current then
  local ok, meta = pcall(cjson.decode, current)
  local status = ok and type(meta) == 'table' and meta['status']
  if status == 'SUCCESS' or (status == 'FAILURE' and ARGV[3] == '0') then
    return 0
  end
end
local ttl = tonumber(ARGV[2])
if ttl and ttl > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ttl)
else
  redis.call('SET', KEYS[1], ARGV[1])
end
if ARGV[4] ~= '' then redis.call('RPUSH', KEYS[2], ARGV[4]) end
if ARGV[6] ~= '' then redis.call('HSET', KEYS[3], ARGV[5], ARGV[6]) end
if ARGV[7] ~= nil and ARGV[7] ~= '' and ARGV[3] == '1' then
  settle(KEYS[4], KEYS[5], KEYS[6], tonumber(ARGV[7]))
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
