-- Put one tracked message back in its queue list, unless it is there already (a message
-- still waiting is never doubled), and start its visibility clock again.
-- KEYS: the message store (hash tag -> entry), its index (zset tag -> last touch).
-- ARGV: the delivery tag, now (s), 'front' (next to be popped) or 'back'.
-- An entry is the JSON array [payload, exchange, routing_key, list key]; the payload is
-- the exact text pushed, so LPOS finds it. Returns 1 if the message was pushed back.
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 0
end
local entry = cjson.decode(raw)
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
if redis.call('LPOS', entry[4], entry[1], 'RANK', -1) then return 0 end
if ARGV[3] == 'front' then
  redis.call('RPUSH', entry[4], entry[1])
else
  redis.call('LPUSH', entry[4], entry[1])
end
return 1
