-- KEYS: spool, claims, claim list; ARGV: token. A drainer hands its claim back.
local items = redis.call('LRANGE', KEYS[3], 0, -1)
for _, item in ipairs(items) do redis.call('LPUSH', KEYS[1], item) end
redis.call('DEL', KEYS[3])
redis.call('ZREM', KEYS[2], ARGV[1])
return #items
