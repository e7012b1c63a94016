-- KEYS: spool, claims, claim list; ARGV: batch size, now, token.
local items = redis.call('LRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
if #items == 0 then return items end
redis.call('LTRIM', KEYS[1], #items, -1)
redis.call('RPUSH', KEYS[3], unpack(items))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
return items
