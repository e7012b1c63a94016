-- Admit one request of an app at the gateway, or say which of its key's limits is full:
-- its requests per minute, its USD per day and per month, counting what its jobs in
-- flight have reserved. Admitted, the request's slot and its worst-case cost are taken,
-- and the job is recorded as the app's, atomically: concurrent requests never spend past
-- a cap.
-- KEYS: requests window, day spend, month spend, job owner.
-- (The owner value, ARGV[8], is JSON: the app, its reservation, the job's class and
-- source, for the job API and a later revoke: apps.Owner.)
-- ARGV: member, requests per minute (0: no limit), worst-case USD, USD per day (-1: no
--   cap), USD per month (-1: no cap), day ttl s, month ttl s, owner value, owner ttl s.
-- Returns {1} admitted, or {0, which ('requests', 'day', 'month'), retry after ms (-1:
-- when the period ends, which the caller knows), spent so far (USD, as text)}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rpm, worst = tonumber(ARGV[2]), tonumber(ARGV[3])
if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 60000)
  local used = redis.call('ZCARD', KEYS[1])
  if used >= rpm then
    local oldest = redis.call('ZRANGE', KEYS[1], used - rpm, used - rpm, 'WITHSCORES')
    return {0, 'requests', tonumber(oldest[2]) + 60000 - now, tostring(used)}
  end
end
local caps = {{KEYS[2], tonumber(ARGV[4]), 'day'}, {KEYS[3], tonumber(ARGV[5]), 'month'}}
for _, cap in ipairs(caps) do
  local spent = tonumber(redis.call('GET', cap[1]) or '0')
  if cap[2] >= 0 and spent + worst > cap[2] then
    return {0, cap[3], -1, tostring(spent)}
  end
end
if rpm > 0 then
  redis.call('ZADD', KEYS[1], now, ARGV[1])
  redis.call('PEXPIRE', KEYS[1], 60000)
end
redis.call('INCRBYFLOAT', KEYS[2], worst)
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[6]))
redis.call('INCRBYFLOAT', KEYS[3], worst)
redis.call('EXPIRE', KEYS[3], tonumber(ARGV[7]))
redis.call('SET', KEYS[4], ARGV[8], 'EX', tonumber(ARGV[9]))
return {1}
