-- KEYS[1]: cooldown key. ARGV: duration ms, reason. A new cooldown never shortens a longer
-- one already in force: the later deadline wins.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local until_ms = now + tonumber(ARGV[1])
local cur = redis.call('GET', KEYS[1])
if cur then
  local cur_until = tonumber(string.match(cur, '^(%d+)'))
  if cur_until and cur_until >= until_ms then return cur_until end
end
redis.call('SET', KEYS[1], until_ms .. '|' .. ARGV[2], 'PXAT', until_ms)
return until_ms
