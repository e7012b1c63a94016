-- A worker process's word on what it cannot serve (workers/state/serving.py), once a beat:
-- per queue it consumes, its field in the queue's hash becomes '<now + lapse ms>|<JSON>',
-- fields whose deadline passed (their worker stopped beating) are dropped, and the hash
-- expires with the latest deadline left in it.
-- KEYS: the queues' hashes. ARGV: this process, its lapse (ms), then per key the JSON of
--   what it cannot serve there ({model: "no_key" | "model_missing"}).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local me, deadline = ARGV[1], now + tonumber(ARGV[2])
for i, key in ipairs(KEYS) do
  local latest = deadline
  local fields = redis.call('HGETALL', key)
  for j = 1, #fields, 2 do
    local until_ms = tonumber(string.match(fields[j + 1], '^(%d+)|'))
    if fields[j] ~= me then
      if until_ms == nil or until_ms < now then
        redis.call('HDEL', key, fields[j])
      elseif until_ms > latest then
        latest = until_ms
      end
    end
  end
  redis.call('HSET', key, me, deadline .. '|' .. ARGV[2 + i])
  redis.call('PEXPIREAT', key, latest)
end
return now
