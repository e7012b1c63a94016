"""The fleet's result backend: Celery's Redis backend, except that a job's final state,
once stored, stays final.

Celery writes a job's state several times: STARTED when a delivery starts, RETRY when a
delivery forwards the job to its next model, SUCCESS or FAILURE at the end. Those writes
come from different workers and can land out of order: the RETRY of the delivery that
forwarded a job is written after the forward is sent, so the next delivery can finish
first and its SUCCESS be overwritten by a late RETRY (seen by the chaos suite while
Redis restarted), and a stale copy of a failed job, delivered again after its worker
died before acking, writes STARTED over the FAILURE. Either way the final word is lost:
callers wait forever and the stale-copy check no longer sees the job finished. Celery
guards SUCCESS only, with a read before the write. Here a non-final state never replaces
SUCCESS or FAILURE, checked and written in one Lua script.
"""

from __future__ import annotations

from typing import Any

from celery import states
from celery.backends.redis import RedisBackend
from celery.exceptions import BackendStoreError

# KEYS[1]: the job's result key. ARGV: value, expiry in s (0: none), '1' if final.
_SET_UNLESS_FINAL = """
local current = redis.call('GET', KEYS[1])
if current and ARGV[3] == '0' then
  local ok, meta = pcall(cjson.decode, current)
  local status = ok and type(meta) == 'table' and meta['status']
  if status == 'SUCCESS' or status == 'FAILURE' then
    return 0
  end
end
local ttl = tonumber(ARGV[2])
if ttl and ttl > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ttl)
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"""


class FleetRedisBackend(RedisBackend):
    def _set_with_state(self, key: Any, value: Any, state: str) -> Any:
        if isinstance(value, str) and len(value) > self._MAX_STR_VALUE_SIZE:
            raise BackendStoreError("value too large for Redis backend")
        expires = self.failure_expires if state == states.FAILURE else self.expires
        final = state in states.READY_STATES
        return self.ensure(self._set_unless_final, (key, value, expires, final))

    def _set_unless_final(self, key: Any, value: Any, expires: Any, final: bool) -> Any:
        ttl = int(expires) if expires else 0
        return self.client.eval(_SET_UNLESS_FINAL, 1, key, value, ttl, "1" if final else "0")
