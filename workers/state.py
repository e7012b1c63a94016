"""Fleet-wide live state in Redis: rate limits, cooldowns, circuits, budgets, quota.

Rules 5 and 6 of DESIGN.md. Everything is counted in one place, the state Redis, so N
workers on M machines share one limit (counting per process would allow N times it), and
every check-and-take is one Lua script, so two workers never both take the last slot.
Times come from the Redis server's clock, so machines with skewed clocks still agree.

    blocks(job, models)  why each model cannot take the job now (and until when): cooldown,
                         open circuit, budget, quota reserve, rate limit — a dry run
    admit(job, model)    takes a slot in every window the model counts against, or says
                         until when it must wait
    settle(job, model, attempt, cost)
                         after a call: tokens, spend, and the model's health (a 429 cools
                         it for Retry-After; repeated failures open its circuit)
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from redis.exceptions import NoScriptError

from router.catalog import Catalog, Limits, Model
from router.results import Attempt
from workers import keys

log = logging.getLogger(__name__)

MINUTE_MS = 60_000
DAY_MS = 86_400_000
PROBE_TTL_MS = 120_000  # a probe call holds the half-open circuit at most this long
UNUSABLE_COOLDOWN_S = 300.0  # a bad key or unknown model: no point calling it for a while
SEEN_S = 1.0  # how long block()'s 'circuit closed' spares take_probe() a round trip

# KEYS: window sorted sets. ARGV: member, dry_run, then per key: limit, window_ms, amount,
# kind ('req' counts members, 'tok' sums the amount encoded after '|' in each member).
# Returns {1, now} when admitted (and, unless dry_run, recorded), else {0, now, until_ms,
# index of the first full window (1-based)}.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local member, dry = ARGV[1], ARGV[2] == '1'
local worst, worst_i = nil, 0
for i, key in ipairs(KEYS) do
  local base = 2 + (i - 1) * 4
  local limit, win = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2])
  local amount, kind = tonumber(ARGV[base + 3]), ARGV[base + 4]
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - win)
  local entries = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
  local used, sizes = 0, {}
  for j = 1, #entries, 2 do
    local size = 1
    if kind == 'tok' then size = tonumber(string.match(entries[j], '|(%d+)$')) or 0 end
    used = used + size
    sizes[#sizes + 1] = {size, tonumber(entries[j + 1])}
  end
  local full = (used + amount > limit and used > 0) or (amount == 0 and used >= limit)
  if full then
    local until_ms, freed = now + win, 0
    for _, e in ipairs(sizes) do
      freed = freed + e[1]
      if used - freed + amount <= limit and (amount > 0 or used - freed < limit) then
        until_ms = e[2] + win
        break
      end
    end
    if worst == nil or until_ms > worst then worst, worst_i = until_ms, i end
  end
end
if worst ~= nil then return {0, now, worst, worst_i} end
if not dry then
  for i, key in ipairs(KEYS) do
    local base = 2 + (i - 1) * 4
    local amount, kind = tonumber(ARGV[base + 3]), ARGV[base + 4]
    if amount > 0 then
      local m = member
      if kind == 'tok' then m = member .. '|' .. amount end
      redis.call('ZADD', key, now, m)
      redis.call('PEXPIRE', key, tonumber(ARGV[base + 2]))
    end
  end
end
return {1, now}
"""

# KEYS[1]: cooldown key. ARGV: duration ms, reason. A new cooldown never shortens a longer
# one already in force: the later deadline wins.
_COOL = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local until_ms = now + tonumber(ARGV[1])
local cur = redis.call('GET', KEYS[1])
if cur then
  local cur_until = tonumber(string.match(cur, '^(%d+)'))
  if cur_until and cur_until >= until_ms then return cur_until end
end
redis.call('SET', KEYS[1], until_ms .. '|' .. ARGV[2], 'PXAT', until_ms)
return until_ms
"""

# KEYS: failures, circuit_open, cooldown, probe. ARGV: window ms, threshold, open ms, member.
# Records a transient failure; opens (or re-opens, for a failed probe) the circuit.
_FAIL = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local win, threshold, open_ms = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - win)
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('PEXPIRE', KEYS[1], win)
local probing = redis.call('EXISTS', KEYS[2]) == 1
if probing or redis.call('ZCARD', KEYS[1]) >= threshold then
  redis.call('SET', KEYS[2], '1')
  redis.call('DEL', KEYS[1], KEYS[4])
  local until_ms = now + open_ms
  local cur = redis.call('GET', KEYS[3])
  local cur_until = cur and tonumber(string.match(cur, '^(%d+)')) or 0
  if until_ms > cur_until then
    redis.call('SET', KEYS[3], until_ms .. '|circuit open', 'PXAT', until_ms)
  end
  return 1
end
return 0
"""


@dataclass(frozen=True)
class Block:
    """Why a model cannot take a job now, and when it may (None: not before a human acts)."""

    reason: str
    until: float | None = None  # unix seconds


@dataclass(frozen=True)
class _Window:
    key: str
    limit: int
    window_ms: int
    kind: str  # 'req' or 'tok'
    label: str


class FleetState:
    def __init__(self, redis: Any, catalog: Catalog) -> None:
        self.redis = redis
        self.catalog = catalog
        self._admit = redis.register_script(_ADMIT)
        self._cool = redis.register_script(_COOL)
        self._fail = redis.register_script(_FAIL)
        # Per thread: `closed` = (model, when block() last saw its circuit closed);
        # `admitted` = the model take_probe() let through on that sight, not as a probe.
        self._seen = threading.local()

    # --- reading ---------------------------------------------------------------------

    def blocks(
        self, task_class: str, models: list[str], prompt_tokens: int = 0
    ) -> dict[str, Block]:
        """Why each of `models` cannot take a job of `task_class` now (absent: it can)."""
        found = {}
        for model_id in models:
            block = self.block(task_class, model_id, prompt_tokens)
            if block is not None:
                found[model_id] = block
        return found

    def block(self, task_class: str, model_id: str, prompt_tokens: int = 0) -> Block | None:
        """Why `model_id` cannot take a job now (cooldown, half-open circuit, budget, a full
        window), or None. Every check is read in one pipelined round trip."""
        self._seen.closed = None
        model = self.catalog.model(model_id)
        now = datetime.now(UTC)
        caps = self._caps(model, now)
        windows = self._windows(task_class, model)
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(keys.cooldown(model_id))
        pipe.exists(keys.circuit_open(model_id))
        pipe.exists(keys.probe(model_id))
        for key, *_ in caps:
            pipe.get(key)
        if windows:
            window_keys, argv = _admit_args(windows, prompt_tokens, dry_run=True)
            pipe.evalsha(self._admit.sha, len(window_keys), *window_keys, *argv)
        replies = pipe.execute(raise_on_error=False)
        if windows and isinstance(replies[-1], NoScriptError):  # first use on this Redis
            replies[-1] = self._admit(keys=window_keys, args=argv)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        cooldown, circuit, probe, *rest = replies
        # A take_probe() right after this, in this thread, need not ask Redis again
        # whether the circuit is open: it was not, a moment ago.
        self._seen.closed = None if circuit else (model_id, time.monotonic())
        return (
            _cooldown_block(cooldown)
            or (_half_open_block() if circuit and probe else None)
            or _budget_block(caps, rest[: len(caps)], now)
            or (_windows_block(windows, rest[-1]) if windows else None)
        )

    def _cooldown(self, model_id: str) -> Block | None:
        return _cooldown_block(self.redis.get(keys.cooldown(model_id)))

    def _caps(self, model: Model, now: datetime) -> list[tuple[str, float, str, str, str]]:
        """(spend key, cap, period, scope, name) of every budget capping `model`."""
        return [
            (keys.spend(budget.scope, name, period, _stamp(now, period)), cap, period,
             budget.scope, name)
            for budget, name in self._budgets_of(model)
            for period, cap in (("day", budget.usd_per_day), ("month", budget.usd_per_month))
            if cap is not None
        ]  # fmt: skip

    def _budgets_of(self, model: Model) -> list[tuple[Any, str]]:
        names = {"model": model.id, "provider": model.provider, "tier": model.tier}
        return [(b, b.name) for b in self.catalog.policy.budgets if names[b.scope] == b.name]

    # --- taking a slot -----------------------------------------------------------------

    def admit(self, task_class: str, model_id: str, prompt_tokens: int) -> Block | None:
        """Take a slot for one call, fleet-wide; or the Block saying until when to wait."""
        model = self.catalog.model(model_id)
        return self._windows_full(task_class, model, prompt_tokens, dry_run=False)

    def _windows_full(
        self, task_class: str, model: Model, prompt_tokens: int, *, dry_run: bool
    ) -> Block | None:
        windows = self._windows(task_class, model)
        if not windows:
            return None
        window_keys, argv = _admit_args(windows, prompt_tokens, dry_run=dry_run)
        return _windows_block(windows, self._admit(keys=window_keys, args=argv))

    def _windows(self, task_class: str, model: Model) -> list[_Window]:
        provider = self.catalog.providers[model.provider]
        windows = _limit_windows("model", model.id, model.limits)
        windows += _limit_windows("provider", model.provider, provider.limits)
        quota = model.limits.quota if model.limits else None
        if quota is not None:
            policy = self.catalog.policy
            share = 1.0 if task_class in policy.quota_reserve_for else 1 - policy.quota_reserve
            measure, allowance = (
                ("req", quota.requests) if quota.requests else ("tok", quota.tokens)
            )
            assert allowance is not None
            label = (
                f"quota ({measure} per {quota.window_h:g} h)"
                if share == 1.0
                else f"quota reserve (the last {policy.quota_reserve:.0%} is kept for"
                f" {', '.join(sorted(policy.quota_reserve_for))})"
            )
            windows.append(
                _Window(
                    keys.window("model", model.id, measure, "quota"),
                    max(0, int(allowance * share)),
                    int(quota.window_h * 3_600_000),
                    measure,
                    label,
                )
            )
        return windows

    # --- after a call -----------------------------------------------------------------

    def settle(self, model_id: str, attempt: Attempt, cost_usd: float) -> None:
        """Count the call's tokens and spend; rest the model if it failed."""
        model = self.catalog.model(model_id)
        pipe = self.redis.pipeline()  # one round trip for the counts (and the circuit)
        self._count_tokens(model, attempt.completion_tokens, attempt.prompt_tokens, pipe)
        if cost_usd > 0:
            self._spend(model, cost_usd, pipe)
        admitted, self._seen.admitted = getattr(self._seen, "admitted", None), None
        if attempt.outcome == "ok" and admitted != model_id:
            # A probe (or a call made without block()/take_probe()): its success closes
            # the circuit. A call let through a closed circuit has nothing to close: one
            # probe decides a circuit that opened meanwhile.
            pipe.exists(keys.circuit_open(model_id))
            if pipe.execute()[-1]:
                self._close_circuit(model_id)
            return
        pipe.execute()  # (no round trip when nothing was queued)
        if attempt.outcome == "ok":
            return
        if attempt.error_kind == "rate_limited":
            wait = attempt.retry_after_s
            wait = wait if wait is not None else self.catalog.policy.cooldowns.rate_limited_s
            self.cool(model_id, wait, "rate limited")
        elif attempt.action == "next" and attempt.outcome == "error":
            self.cool(model_id, UNUSABLE_COOLDOWN_S, attempt.error_kind or "unusable")
        elif attempt.action == "retry":
            self._record_failure(model_id)

    def cool(self, model_id: str, seconds: float, reason: str) -> float:
        """Rest a model fleet-wide for `seconds` (never shortening a longer rest)."""
        until_ms = self._cool(keys=[keys.cooldown(model_id)], args=[int(seconds * 1000), reason])
        return int(until_ms) / 1000

    def take_probe(self, model_id: str) -> bool:
        """After an open circuit's cooldown, let exactly one call through to decide."""
        seen, self._seen.closed = getattr(self._seen, "closed", None), None
        if seen is not None and seen[0] == model_id and time.monotonic() - seen[1] < SEEN_S:
            self._seen.admitted = model_id  # not a probe: settle() need not close anything
            return True  # block() found the circuit closed just now, in this thread
        self._seen.admitted = None
        if not self.redis.exists(keys.circuit_open(model_id)):
            return True
        return bool(self.redis.set(keys.probe(model_id), "1", nx=True, px=PROBE_TTL_MS))

    def _record_failure(self, model_id: str) -> None:
        c = self.catalog.policy.cooldowns
        self._fail(
            keys=[
                keys.failures(model_id),
                keys.circuit_open(model_id),
                keys.cooldown(model_id),
                keys.probe(model_id),
            ],
            args=[
                int(c.circuit_window_s * 1000),
                c.circuit_failures,
                int(c.circuit_open_s * 1000),
                uuid.uuid4().hex,
            ],
        )

    def _close_circuit(self, model_id: str) -> None:
        if self.redis.exists(keys.circuit_open(model_id)):
            self.redis.delete(
                keys.circuit_open(model_id), keys.probe(model_id), keys.failures(model_id)
            )

    def _count_tokens(self, model: Model, completion: int, prompt: int, pipe: Any) -> None:
        """Add what the call really used to the token windows (its prompt was reserved)."""
        member = uuid.uuid4().hex
        now_ms = int(time.time() * 1000)
        for w in self._windows("", model):
            if w.kind != "tok":
                continue
            amount = prompt + completion if w.label.startswith("quota") else completion
            if amount > 0:
                pipe.zadd(w.key, {f"{member}|{amount}": now_ms})
                pipe.pexpire(w.key, w.window_ms)

    def _spend(self, model: Model, usd: float, pipe: Any) -> None:
        now = datetime.now(UTC)
        for scope, name in (
            ("model", model.id),
            ("provider", model.provider),
            ("tier", model.tier),
        ):
            for period, ttl in (("day", 2 * 86_400), ("month", 33 * 86_400)):
                key = keys.spend(scope, name, period, _stamp(now, period))
                pipe.incrbyfloat(key, usd)
                pipe.expire(key, ttl)

    # --- for `fleet status` ---------------------------------------------------------------

    def model_status(self, model_id: str) -> dict[str, Any]:
        model = self.catalog.model(model_id)
        windows = {}
        for w in self._windows("user_facing", model):
            entries = self.redis.zrangebyscore(w.key, int(time.time() * 1000) - w.window_ms, "+inf")
            used = (
                len(entries) if w.kind == "req" else sum(int(e.rsplit(b"|", 1)[1]) for e in entries)
            )
            windows[w.key.split(":", 2)[2]] = {"used": used, "limit": w.limit}
        cooldown = self._cooldown(model_id)
        now = datetime.now(UTC)
        spend = {
            period: float(
                self.redis.get(keys.spend("model", model_id, period, _stamp(now, period))) or 0
            )
            for period in ("day", "month")
        }
        return {
            "model": model_id,
            "cooldown": cooldown.reason if cooldown else None,
            "cooldown_until": cooldown.until if cooldown else None,
            "circuit_open": bool(self.redis.exists(keys.circuit_open(model_id))),
            "windows": windows,
            "spend_usd": spend,
        }


def _cooldown_block(raw: bytes | None) -> Block | None:
    if not raw:
        return None
    until_ms, _, why = raw.decode().partition("|")
    until = int(until_ms) / 1000
    return Block(f"cooldown until {_clock(until)} ({why})", until)


def _half_open_block() -> Block:
    return Block("circuit half-open: a probe call is deciding", time.time() + 1)


def _budget_block(
    caps: list[tuple[str, float, str, str, str]], spent: list[Any], now: datetime
) -> Block | None:
    for (_, cap, period, scope, name), raw in zip(caps, spent, strict=True):
        used = float(raw or 0)
        if used >= cap:
            return Block(
                f"budget: ${used:.2f} of ${cap:.2f} per {period} spent by {scope} {name}",
                _period_end(now, period).timestamp(),
            )
    return None


def _admit_args(
    windows: list[_Window], prompt_tokens: int, *, dry_run: bool
) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of the _ADMIT script for these windows."""
    argv: list[Any] = [uuid.uuid4().hex, "1" if dry_run else "0"]
    for w in windows:
        amount = 1 if w.kind == "req" else prompt_tokens
        if w.label.startswith("quota") and w.kind == "tok":
            amount = 0  # token quota: check what was used; the call's tokens come later
        argv += [w.limit, w.window_ms, amount, w.kind]
    return [w.key for w in windows], argv


def _windows_block(windows: list[_Window], answer: Any) -> Block | None:
    """The _ADMIT script's answer as a Block (None: admitted)."""
    if int(answer[0]) == 1:
        return None
    now_ms, until_ms, index = int(answer[1]), int(answer[2]), int(answer[3])
    window = windows[index - 1]
    until = time.time() + (until_ms - now_ms) / 1000
    return Block(f"{window.label} full until {_clock(until)}", until)


def _limit_windows(scope: str, name: str, limits: Limits | None) -> list[_Window]:
    if limits is None:
        return []
    found = []
    for limit, period, ms, kind in (
        (limits.requests_per_min, "min", MINUTE_MS, "req"),
        (limits.requests_per_day, "day", DAY_MS, "req"),
        (limits.tokens_per_min, "min", MINUTE_MS, "tok"),
    ):
        if limit is not None:
            measure = "requests" if kind == "req" else "tokens"
            found.append(
                _Window(
                    keys.window(scope, name, kind, period),
                    limit,
                    ms,
                    kind,
                    f"{scope} limit {measure}/{period} ({limit})",
                )
            )
    return found


def _stamp(now: datetime, period: str) -> str:
    return now.strftime("%Y-%m-%d" if period == "day" else "%Y-%m")


def _period_end(now: datetime, period: str) -> datetime:
    start = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return start + timedelta(days=1)
    first = start.replace(day=1)
    return (first + timedelta(days=32)).replace(day=1)


def _clock(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%H:%M:%S UTC")


class FailOpen:
    """FleetState that lets calls through when the state Redis cannot be reached.

    A job already in a worker's hands is answered rather than stalled; limits resume as
    soon as Redis answers again. (Without Redis the broker is usually down too, so little
    new work arrives meanwhile.)
    """

    def __init__(self, state: FleetState) -> None:
        self.state = state

    def _safe(self, default: Any, fn: Any, *args: Any) -> Any:
        import redis

        try:
            return fn(*args)
        except redis.RedisError as exc:
            log.warning("fleet state unreachable, not enforcing limits: %s", type(exc).__name__)
            return default

    def block(self, task_class: str, model_id: str, prompt_tokens: int) -> Block | None:
        return self._safe(None, self.state.block, task_class, model_id, prompt_tokens)

    def admit(self, task_class: str, model_id: str, prompt_tokens: int) -> Block | None:
        return self._safe(None, self.state.admit, task_class, model_id, prompt_tokens)

    def take_probe(self, model_id: str) -> bool:
        return bool(self._safe(True, self.state.take_probe, model_id))

    def settle(self, model_id: str, attempt: Attempt, cost_usd: float) -> None:
        self._safe(None, self.state.settle, model_id, attempt, cost_usd)
