-- The start of a delivery, in one round trip: count it and lay the death of its last
-- delivery at its door, look for a final state and for a later message of the job
-- (workers/state/deliveries.py), read the calls earlier deliveries of this message left
-- in flight (workers/state/inflight.py), and, when the delivery is to go on, the
-- admission of the model it will call first (admit.lua).
-- KEYS: this message's deliveries hash, the job's result key, the next message's hash,
--   the job's revoked marker, the job's in-flight hash, the previous message's hash, the
--   running set of this delivery's process, then the admission's keys (none: count and
--   look).
-- ARGV: how long a record is kept (s), the deaths that poison a message, the most
--   deliveries of a message, this message's number (`sends`), this delivery's process,
--   the running sets' key prefix, the job id, then the admission's args.
-- A process's running set is named from the process a delivery record names, so this
-- script reaches keys it is not given (KEYS): fine on one Redis, not on a cluster.
-- Returns {count, finished (0/1), superseded (0/1), revoked (0/1), poisoned (0/1), this
-- message's calls in flight (field, value, ...)[, admission's reply]}.
--!include admit
local keep, max_deaths, max_count = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local message, process, prefix, job = tonumber(ARGV[4]), ARGV[5], ARGV[6], ARGV[7]

-- A message delivered again: its last delivery never ended (its process died, or lost it
-- with Redis). Of the jobs that process held then, any one may have brought it down: this
-- one bears an equal share of that death. A pool process running one job at a time gives
-- it the whole death; a threads worker killed with 8 jobs in flight, an eighth to each.
local count = redis.call('HINCRBY', KEYS[1], 'n', 1)
local deaths = tonumber(redis.call('HGET', KEYS[1], 'deaths') or '0')
if count > 1 then
  local before = redis.call('HGET', KEYS[1], 'on')
  local held = before and redis.call('SCARD', prefix .. before) or 0
  deaths = tonumber(redis.call('HINCRBYFLOAT', KEYS[1], 'deaths', 1 / math.max(held, 1)))
end
redis.call('EXPIRE', KEYS[1], keep)

local finished = 0
local current = redis.call('GET', KEYS[2])
if current then
  local ok, meta = pcall(cjson.decode, current)
  local status = ok and type(meta) == 'table' and meta['status']
  if status == 'SUCCESS' or status == 'FAILURE' or status == 'REVOKED' then finished = 1 end
end
local later = redis.call('EXISTS', KEYS[3])
local revoked = redis.call('EXISTS', KEYS[4])
-- (a float sum of shares: 1/3 + 1/3 + 1/3 may fall a hair short of 1)
local poisoned = (deaths >= max_deaths - 1e-9 or count > max_count) and 1 or 0

-- Calls in flight: an earlier message's were recorded by the forward that sent this one
-- (its state carries their outcome): cleared. This message's were left by earlier
-- deliveries of it that died before recording them: returned, to be billed as orphaned.
local orphans = {}
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

if finished == 1 or later == 1 or revoked == 1 then
  return {count, finished, later, revoked, poisoned, orphans}
end
-- The process holds the job now: its previous message, forwarded from another delivery,
-- no longer holds it there.
local forwarded_from = redis.call('HGET', KEYS[6], 'on')
if forwarded_from then redis.call('SREM', prefix .. forwarded_from, job) end
redis.call('HSET', KEYS[1], 'on', process)
redis.call('SADD', KEYS[7], job)
redis.call('EXPIRE', KEYS[7], keep)
if poisoned == 1 or #KEYS == 7 then
  return {count, finished, later, revoked, poisoned, orphans}
end
local K, A = {}, {}
for i = 8, #KEYS do K[#K + 1] = KEYS[i] end
for i = 8, #ARGV do A[#A + 1] = ARGV[i] end
local t = redis.call('TIME')
return {count, finished, later, revoked, poisoned, orphans,
  admit(K, A, tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))}
