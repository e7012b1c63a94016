-- The visibility sweep (workers/runtime/transport.py): every tracked message untouched
-- for the visibility timeout is either still waiting in its list (a backlog: its clock
-- starts again) or was popped and never acked: its worker died, before or after it
-- recorded the delivery. Those go back to the front of their list.
-- Still-waiting messages are the oldest in their list, near its tail, where LPOS with
-- RANK -1 starts looking.
-- KEYS: the message store (hash tag -> entry), its index (zset tag -> last touch).
-- ARGV: the cutoff (s: untouched since), now (s), the most entries to look at.
-- Returns {looked at, pushed back}.
local due = redis.call('ZRANGE', KEYS[2], '-inf', ARGV[1], 'BYSCORE', 'LIMIT', 0, tonumber(ARGV[3]))
local restored = 0
for _, tag in ipairs(due) do
  local raw = redis.call('HGET', KEYS[1], tag)
  if not raw then
    redis.call('ZREM', KEYS[2], tag)
  else
    local entry = cjson.decode(raw)
    redis.call('ZADD', KEYS[2], ARGV[2], tag)
    if not redis.call('LPOS', entry[4], entry[1], 'RANK', -1) then
      redis.call('RPUSH', entry[4], entry[1])
      restored = restored + 1
    end
  end
end
return {#due, restored}
