-- A process hands back a message it holds (kombu's reject with requeue, the messages it
-- prefetched at a clean shutdown): to the front of its list, or the back.
-- KEYS: the message store, the positions hash, the process's held hash.
-- ARGV: the delivery tag, 'front' or 'back', the prefix of the lists' zsets.
-- Returns 1 if pushed back, 0 if this process did not hold it (it lapsed: others have it).
--!include broker_requeue
local held = redis.call('HGET', KEYS[3], ARGV[1])
if not held then return 0 end
redis.call('HDEL', KEYS[3], ARGV[1])
local list = string.match(held, '^%d+ (.*)$')
return requeue(KEYS[1], KEYS[2], ARGV[3], list, ARGV[1], ARGV[2])
