-- Revoke a job its app no longer wants. A job not yet delivered ends now: REVOKED is
-- stored as its final state and what its app reserved for it is refunded. A job that a
-- worker holds (running, or waiting for a slot or a countdown) is marked: its next
-- delivery ends it as revoked (begin.lua), and a call already in flight finishes.
-- KEYS: the job's result key, its revoked marker[, its settled marker, the app's day and
--   month spend].
-- ARGV: the REVOKED state (Celery's JSON), expiry in s, the amount reserved ('' = none).
-- Returns 'REVOKED' (ended now), 'REVOKING' (marked), or 'ENDED <its final status>'.
--!include settle
local current = redis.call('GET', KEYS[1])
local status = nil
if current then
  local ok, meta = pcall(cjson.decode, current)
  status = ok and type(meta) == 'table' and meta['status']
end
if status == 'SUCCESS' or status == 'FAILURE' or status == 'REVOKED' then
  return 'ENDED ' .. status
end
redis.call('SET', KEYS[2], '1', 'EX', tonumber(ARGV[2]))
if status and status ~= 'PENDING' and status ~= 'RECEIVED' then return 'REVOKING' end
redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[2]))
redis.call('PUBLISH', KEYS[1], ARGV[1])
if ARGV[3] ~= '' then settle(KEYS[3], KEYS[4], KEYS[5], -tonumber(ARGV[3])) end
return 'REVOKED'
