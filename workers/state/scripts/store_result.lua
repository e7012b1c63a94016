-- A job's state, stored for its caller, and its bookkeeping, in one atomic step.
-- KEYS: the job's result key, the ledger spool, the dead-letter hash, the dead-letter index
--   of the job's class, the dead-letter trimmed counts, the beat-health hash, the job's
--   in-flight hash, the running set of the process storing it, the deliveries hash of
--   the message whose delivery stores it (any key when none), the job's output stream
--   (any key when it does not stream)[, then, for a job an app's budget reserved for:
--   its settled marker, the app's day and month spend].
-- ARGV: value (Celery's JSON), expiry in s (0: none), final ('1' for SUCCESS or FAILURE),
--   the job's ledger rows ('' = none), job id, its dead letter ('' = none), the
--   reservation's settlement (real cost minus reserved, USD; '' = none), the dead
--   letter's class, that class's max count and max age in s, the beat run of a job beat
--   fired (JSON, beat.lua; '' = none), the storing delivery's number ('' = none), '1'
--   for a job that streams (else ''), its stream's bound (MAXLEN ~) and TTL in s.
-- SUCCESS is never replaced (Celery's own rule, which it checks with a read before the
-- write), and a non-final state (STARTED, RETRY) never replaces FAILURE either: Celery
-- writes them from different workers and they can land out of order
-- (workers/runtime/resultstore.py).
-- With a final state go the job's attempt rows onto the ledger spool (and its calls' in-flight
-- marks are cleared: the rows record them; workers/state/inflight.py), for a failed job its
-- dead letter, and for a job an app reserved budget for the settlement of that
-- reservation: a worker killed at any moment leaves all of them or none. A final state
-- also takes the job out of its process's running set (deliveries.py). Filing a dead
-- letter trims its class to its retention (deadletter.lua); a beat job failing for a
-- cause its entry already failed with is counted there, not filed (beat.lua).
-- A delivery superseded by a later delivery of its message (its worker's beat lapsed and
-- the message went to another: workers/runtime/liveness.py) stores nothing: the later
-- one answers, and bills this one's call, marked in flight, as orphaned.
-- A streaming job's final state also ends its stream, as its `end` record, unless an
-- `error` record ended it already (workers/state/streams.py).
-- Returns 0 (not written), 1, or for a beat job {event, its entry's health}.
--!include settle
--!include deadletter
--!include beat
if ARGV[12] ~= '' and tonumber(redis.call('HGET', KEYS[9], 'n') or '0') > tonumber(ARGV[12]) then
  return 0
end
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
if ARGV[4] ~= '' then
  redis.call('RPUSH', KEYS[2], ARGV[4])
  if ARGV[3] == '1' then redis.call('DEL', KEYS[7]) end
end
if ARGV[3] == '1' then redis.call('SREM', KEYS[8], ARGV[5]) end
local beat = nil
if ARGV[11] ~= '' and ARGV[3] == '1' then beat = beat_run(KEYS[6], ARGV[5], ARGV[11], now_s()) end
if ARGV[6] ~= '' and (not beat or beat[1] == 'failing' or beat[1] == 'another') then
  file_dead_letter(KEYS[3], KEYS[4], KEYS[5], ARGV[5], ARGV[6], ARGV[8], tonumber(ARGV[9]),
    tonumber(ARGV[10]))
end
if ARGV[7] ~= '' and ARGV[3] == '1' then
  settle(KEYS[11], KEYS[12], KEYS[13], tonumber(ARGV[7]))
end
if ARGV[13] == '1' and ARGV[3] == '1' then
  local last = redis.call('XREVRANGE', KEYS[10], '+', '-', 'COUNT', 1)[1]
  local ended = false
  for i = 1, last and #last[2] or 0, 2 do
    if last[2][i] == 'end' or last[2][i] == 'error' then ended = true end
  end
  if not ended then
    redis.call('XADD', KEYS[10], 'MAXLEN', '~', ARGV[14], '*', 'end', ARGV[1])
    redis.call('EXPIRE', KEYS[10], tonumber(ARGV[15]))
  end
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return beat or 1
