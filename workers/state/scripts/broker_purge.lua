-- Empty queue lists and forget their tracked messages (a purged message must not come
-- back from the visibility sweep).
-- KEYS: the message store, its index, then the lists. Returns how many were removed.
local removed = 0
for i = 3, #KEYS do
  local items = redis.call('LRANGE', KEYS[i], 0, -1)
  for _, item in ipairs(items) do
    local ok, message = pcall(cjson.decode, item)
    local tag = ok and type(message) == 'table' and type(message['properties']) == 'table'
      and message['properties']['delivery_tag']
    if type(tag) == 'string' then
      redis.call('HDEL', KEYS[1], tag)
      redis.call('ZREM', KEYS[2], tag)
    end
  end
  removed = removed + #items
  redis.call('DEL', KEYS[i])
end
return removed
