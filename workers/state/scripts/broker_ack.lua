-- A held message is done with (acked, or rejected without requeue): forget it, if this
-- process still holds this delivery of it. A process whose beat lapsed lost its messages
-- to others (broker_beat.lua): its late ack must not take a message another worker now
-- holds or waits to take.
-- KEYS: the message store, the process's held hash.
-- ARGV: the delivery tag, the delivery's stamp ('' = any delivery this process holds).
-- Returns 1 if forgotten, 0 if this process no longer held it.
local held = redis.call('HGET', KEYS[2], ARGV[1])
if not held then return 0 end
if ARGV[2] ~= '' and string.match(held, '^(%d+) ') ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
