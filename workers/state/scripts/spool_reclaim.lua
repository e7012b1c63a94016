-- KEYS: spool, claims; ARGV: cutoff (claims at or before it go back), claim key prefix.
local tokens = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
for _, token in ipairs(tokens) do
  local key = ARGV[2] .. token
  local items = redis.call('LRANGE', key, 0, -1)
  for _, item in ipairs(items) do redis.call('LPUSH', KEYS[1], item) end
  redis.call('DEL', key)
  redis.call('ZREM', KEYS[2], token)
end
return #tokens
