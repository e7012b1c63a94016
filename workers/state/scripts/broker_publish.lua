-- Publish job messages, filed (workers/runtime/transport.py): each pushed at the back of
-- the list and kept in the message store until its ack, in one atomic step. This is also
-- the way for producers in other languages (docs/enqueue-from-any-language.md).
-- KEYS: the list (the queue, or its priority list), the message store, the positions
--   hash, the list's zset of filed messages (`fleet:broker:queued:<list>`).
-- ARGV: a message's text, its delivery tag (properties.delivery_tag)[, the next's, ...],
--   pushed in that order (the first is popped first).
-- Returns how many were published.
--!include broker_requeue
for i = 1, #ARGV, 2 do
  redis.call('HSET', KEYS[2], ARGV[i + 1], ARGV[i])
  push_filed(KEYS[3], KEYS[4], KEYS[1], ARGV[i + 1], ARGV[i], 'back')
end
return #ARGV / 2
