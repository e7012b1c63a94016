-- The start of a delivery, in one round trip: count it, look for a final state and for a
-- later message of the job (workers/state/deliveries.py), and, when the delivery is to
-- go on, the admission of the model it will call first (admission.lua).
-- KEYS: this message's delivery counter, the job's result key, the next message's
--   counter, the job's revoked marker, then the admission's keys (none: count and look).
-- ARGV: how long a counter is kept (s), the most deliveries before a message is poisoned,
--   then the admission's args.
-- Returns {count, finished (0/1), superseded (0/1), revoked (0/1)[, admission's reply]}.
--!include admission
local count = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[1])
local finished = 0
local current = redis.call('GET', KEYS[2])
if current then
  local ok, meta = pcall(cjson.decode, current)
  local status = ok and type(meta) == 'table' and meta['status']
  if status == 'SUCCESS' or status == 'FAILURE' or status == 'REVOKED' then finished = 1 end
end
local later = redis.call('EXISTS', KEYS[3])
local revoked = redis.call('EXISTS', KEYS[4])
if finished == 1 or later == 1 or revoked == 1 or count > tonumber(ARGV[2]) or #KEYS == 4 then
  return {count, finished, later, revoked}
end
local K, A = {}, {}
for i = 5, #KEYS do K[#K + 1] = KEYS[i] end
for i = 3, #ARGV do A[#A + 1] = ARGV[i] end
local t = redis.call('TIME')
return {count, finished, later, revoked, admission(K, A, tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))}
