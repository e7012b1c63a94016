-- mark: a provider call about to leave, marked in flight (workers/state/inflight.py).
-- KEYS: the job's in-flight hash, the message's deliveries hash.
-- ARGV: field '<message>:<delivery>', the call (JSON), ms to keep the hash, this
--   delivery's number. The value is '<now ms>|<call>', on Redis' clock.
-- Returns now (ms), or -1 without marking when a later delivery of the message began:
-- this one's worker lost the message (its beat lapsed), and its call must not leave.
if tonumber(redis.call('HGET', KEYS[2], 'n') or '0') > tonumber(ARGV[4]) then return -1 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], now .. '|' .. ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return now
