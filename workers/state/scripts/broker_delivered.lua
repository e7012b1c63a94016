-- A tracked message was delivered to a worker (workers/runtime/transport.py): its
-- visibility clock starts again now. The message has been in Redis' care since it was
-- published, so nothing else is written; a message some other producer pushed without
-- tracking it is reported (0) and the caller files it.
-- KEYS: the message store (hash tag -> entry), its index (zset tag -> last touch).
-- ARGV: the delivery tag, now (s).
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
  return 1
end
return 0
