-- Fragment: put a filed message back in its queue list (workers/runtime/transport.py).
-- Every list a filed message waits in has a zset of its filed messages, `queued`, scored
-- by position: a push at the back (LPUSH, the list's left) takes the list's next
-- position up, a push at the front (RPUSH, next to be popped) the next one down, below
-- zero. Read from the popping end, a list's messages therefore have rising positions,
-- and BRPOP always takes the lowest: a filed message scored below the one waiting at the
-- end of its list has been popped (broker_beat.lua finds it without reading the list).
-- positions: the hash of each list's last positions; queued: the list's zset.
local function push_filed(positions, queued, list, tag, payload, where)
  if where == 'front' then
    local at = -redis.call('HINCRBY', positions, list .. '|front', 1)
    redis.call('RPUSH', list, payload)
    redis.call('ZADD', queued, at, tag)
  else
    local at = redis.call('HINCRBY', positions, list, 1)
    redis.call('LPUSH', list, payload)
    redis.call('ZADD', queued, at, tag)
  end
  return 1
end

-- A filed message back in its list, from the store (tag -> message text). Returns 1, or
-- 0 when it is no longer filed (acked, purged).
local function requeue(messages, positions, queued_prefix, list, tag, where)
  local payload = redis.call('HGET', messages, tag)
  if not payload then return 0 end
  return push_filed(positions, queued_prefix .. list, list, tag, payload, where)
end
