-- mark: a provider call about to leave, marked in flight (workers/state/inflight.py).
-- KEYS: the job's in-flight hash. ARGV: field '<message>:<delivery>', the call (JSON), ms
-- to keep the hash. The value is '<now ms>|<call>', on Redis' clock. Returns now (ms).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], now .. '|' .. ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return now
