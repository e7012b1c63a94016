-- A worker process leaves (a clean exit, or it consumes nothing and holds nothing): the
-- messages it still holds go back to the front of their lists at once, and it is no
-- longer a holder (workers/runtime/liveness.py).
-- KEYS: the holders zset, the message store, the positions hash, its held hash.
-- ARGV: the process, the lists' zsets' prefix. Returns how many went back.
--!include broker_requeue
local entries = redis.call('HGETALL', KEYS[4])
local back = 0
for i = 1, #entries, 2 do
  local list = string.match(entries[i + 1], '^%d+ (.*)$')
  back = back + requeue(KEYS[2], KEYS[3], ARGV[2], list, entries[i], 'front')
end
redis.call('DEL', KEYS[4])
redis.call('ZREM', KEYS[1], ARGV[1])
return back
