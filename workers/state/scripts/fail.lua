-- KEYS: failures, circuit_open, cooldown, probe. ARGV: window ms, threshold, open ms, member.
-- Records a transient failure; opens (or re-opens, for a failed probe) the circuit.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local win, threshold, open_ms = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - win)
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('PEXPIRE', KEYS[1], win)
local probing = redis.call('EXISTS', KEYS[2]) == 1
if probing or redis.call('ZCARD', KEYS[1]) >= threshold then
  redis.call('SET', KEYS[2], '1')
  redis.call('DEL', KEYS[1], KEYS[4])
  local until_ms = now + open_ms
  local cur = redis.call('GET', KEYS[3])
  local cur_until = cur and tonumber(string.match(cur, '^(%d+)')) or 0
  if until_ms > cur_until then
    redis.call('SET', KEYS[3], until_ms .. '|circuit open', 'PXAT', until_ms)
  end
  return 1
end
return 0
