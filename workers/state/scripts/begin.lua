-- The start of a delivery, in one round trip: count it, look for a final state and for a
-- later message of the job (workers/state/deliveries.py), read the calls earlier
-- deliveries of this message left in flight (workers/state/inflight.py), and, when the
-- delivery is to go on, the admission of the model it will call first (admission.lua).
-- KEYS: this message's delivery counter, the job's result key, the next message's
--   counter, the job's revoked marker, the job's in-flight hash, then the admission's
--   keys (none: count and look).
-- ARGV: how long a counter is kept (s), the most deliveries before a message is poisoned,
--   this message's number (`sends`), then the admission's args.
-- Returns {count, finished (0/1), superseded (0/1), revoked (0/1), this message's calls
-- in flight (field, value, ...)[, admission's reply]}.
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

-- Calls in flight: an earlier message's were recorded by the forward that sent this one
-- (its state carries their outcome): cleared. This message's were left by earlier
-- deliveries of it that died before recording them: returned, to be billed as orphaned.
local message, orphans = tonumber(ARGV[3]), {}
local marks = redis.call('HGETALL', KEYS[5])
for i = 1, #marks, 2 do
  local of = tonumber(string.match(marks[i], '^(%d+):'))
  if of == message then
    orphans[#orphans + 1] = marks[i]
    orphans[#orphans + 1] = marks[i + 1]
  elseif of ~= nil and of < message then
    redis.call('HDEL', KEYS[5], marks[i])
  end
end

if finished == 1 or later == 1 or revoked == 1 or count > tonumber(ARGV[2]) or #KEYS == 5 then
  return {count, finished, later, revoked, orphans}
end
local K, A = {}, {}
for i = 6, #KEYS do K[#K + 1] = KEYS[i] end
for i = 4, #ARGV do A[#A + 1] = ARGV[i] end
local t = redis.call('TIME')
return {count, finished, later, revoked, orphans,
  admission(K, A, tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))}
