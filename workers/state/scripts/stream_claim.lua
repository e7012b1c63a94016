-- Whether a delivery of a streaming job may stream it (workers/state/streams.py): only
-- while its stream holds nothing. A stream with text and no last record (`end` or
-- `error`) was left open by a delivery that died or lost the job mid-stream: it is ended
-- here with an `error` record, so that its reader learns no more text comes.
-- KEYS: the job's stream.
-- ARGV: the stream's bound (MAXLEN ~), its TTL in s, the `error` record's JSON.
-- Returns 1 (the stream is empty: this delivery may stream) or 0.
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
if not last then return 1 end
local fields = last[2]
for i = 1, #fields, 2 do
  if fields[i] == 'end' or fields[i] == 'error' then return 0 end
end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'error', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 0
