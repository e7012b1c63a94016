-- Bill calls left in flight by a dead delivery (workers/state/inflight.py): for each
-- mark still in the job's hash, push its ledger row onto the spool and clear the mark, in
-- one step, so that a worker killed at any moment bills each call once.
-- KEYS: the job's in-flight hash, the ledger spool.
-- ARGV: field, spool entry, field, spool entry, ...
-- Returns the fields billed here (a mark already cleared, by another delivery, is not).
local billed = {}
for i = 1, #ARGV, 2 do
  if redis.call('HDEL', KEYS[1], ARGV[i]) == 1 then
    redis.call('RPUSH', KEYS[2], ARGV[i + 1])
    billed[#billed + 1] = ARGV[i]
  end
end
return billed
