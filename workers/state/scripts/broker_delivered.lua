-- A worker process took a message (workers/runtime/transport.py): it holds it now, until
-- its ack or its death. The message leaves its list's zset of waiting messages for the
-- process's held hash (tag -> '<delivered µs> <list>'), and the process's deadline in
-- the holders zset is pushed on (a delivery is a sign of life).
-- KEYS: the message store, the list's zset of filed messages, the popped-not-yet-held
--   hash, the process's held hash, the holders zset.
-- ARGV: the delivery tag, the list, the process's lapse (ms), the process, and, for a
--   message its producer pushed without filing it, its text ('' = look it up).
-- Returns the delivery's stamp (µs, for its ack), or 0: not filed and no text given.
if ARGV[5] == '' then
  if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[5])
end
local t = redis.call('TIME')
local stamp = t[1] .. string.sub('00000' .. t[2], -6)  -- µs, as text (a number would print as 1.8e+15)
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('HSET', KEYS[4], ARGV[1], stamp .. ' ' .. ARGV[2])
redis.call('ZADD', KEYS[5], 'GT', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[3]), ARGV[4])
return stamp
