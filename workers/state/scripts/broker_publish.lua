-- Publish job messages, filed (workers/runtime/transport.py): each pushed at the back of
-- the list and kept in the message store until its ack, in one atomic step. This is also
-- the way for producers in other languages (docs/enqueue-from-any-language.md), so it
-- stands alone (no --!include): send this file's text as it is, with EVAL.
-- KEYS: the list (the queue, or its priority list), the message store
--   (`fleet:broker:messages`), the positions hash (`fleet:broker:positions`), the list's
--   zset of filed messages (`fleet:broker:queued:<list>`).
-- ARGV: a message's text, its delivery tag (properties.delivery_tag)[, the next's, ...],
--   pushed in that order (the first is popped first).
-- A back push takes the list's next position up (broker_requeue.lua says why).
-- Returns how many were published.
for i = 1, #ARGV, 2 do
  local at = redis.call('HINCRBY', KEYS[3], KEYS[1], 1)
  redis.call('HSET', KEYS[2], ARGV[i + 1], ARGV[i])
  redis.call('LPUSH', KEYS[1], ARGV[i])
  redis.call('ZADD', KEYS[4], at, ARGV[i + 1])
end
return #ARGV / 2
