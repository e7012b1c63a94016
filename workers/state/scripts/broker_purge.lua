-- Empty queue lists and forget their filed messages (a purged message must not come back).
-- KEYS: the message store, then each list followed by its zset of filed messages.
-- Returns how many messages were waiting in the lists.
local removed = 0
for i = 2, #KEYS, 2 do
  local tags = redis.call('ZRANGE', KEYS[i + 1], 0, -1)
  for _, tag in ipairs(tags) do redis.call('HDEL', KEYS[1], tag) end
  removed = removed + redis.call('LLEN', KEYS[i])
  redis.call('DEL', KEYS[i], KEYS[i + 1])
end
return removed
