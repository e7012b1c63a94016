"""Fleet-wide live state in Redis: rate limits, cooldowns, circuits, budgets, quota.

Everything is counted in one place, the state Redis, so N workers on M machines share one
limit (counting per process would allow N times it), and every check-and-take is one Lua
script, so two workers never both take the last slot. Times come from the Redis server's
clock, so machines with skewed clocks still agree.

The provider counts on its own clock, when each call arrives, and a call arrives some time
after its slot was taken here, a time that varies from call to call. So every window is
counted `margin_ms` longer than the limit's (FLEET_LIMIT_MARGIN_MS, workers/config.py): a
slot is free again only window + margin after it was taken, and calls that arrive up to
`margin_ms` later or earlier than one another still fit the provider's window.

    block(cls, model, needs) why the model cannot take a job now (and until when): a look;
                             with `needs`, a model resting for one of them is blocked too;
                             a model no live worker of its queue can serve is blocked for
                             good (serving.py)
    admit(cls, model, tok)   the same check, and the slot taken in every window the model
                             counts against (and the probe of a half-open circuit), in one
                             round trip (scripts/admit.lua): a Slot, or the Block
    admit_call(...)          that call's keys and args, for a script that admits as part of
                             something else (a delivery's begin.lua)
    mark(call)               a call about to leave, marked in flight (inflight.py)
    settle(model, attempt, cost, probe)
                             after a call, write-only: tokens, spend, and the model's
                             health (a 429 cools it for Retry-After; repeated failures open
                             its circuit; a probe's success closes it)
    rest_capability(model, cap)
                             the model's provider refused a capability the catalog claims:
                             jobs needing it skip the model for capability_rest_s
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from router.catalog import CAPABILITIES, Catalog, Limits, Model
from router.results import Attempt
from router.slots import Block
from workers.config import limit_margin_ms
from workers.state import inflight, keys, serving
from workers.state.connections import Pipeline

log = logging.getLogger(__name__)

MINUTE_MS = 60_000
DAY_MS = 86_400_000
PROBE_TTL_MS = 120_000  # a probe call holds the half-open circuit at most this long
UNUSABLE_COOLDOWN_S = 300.0  # a bad key or unknown model: no point calling it for a while
# A worker's skip for want of its key is shown this long after ("no key" in status).
NO_KEY_S = 600


@dataclass(frozen=True)
class Slot:
    """A call admitted: its slot is taken. `probe`: it is the one call a half-open
    circuit lets through, whose success closes the circuit."""

    probe: bool = False


@dataclass(frozen=True)
class AdmitCall:
    """One model's admit.lua call: its keys and args, and how to read its reply."""

    keys: list[str]
    args: list[Any]
    read: Callable[[Any], Slot | Block]


@dataclass(frozen=True)
class _Window:
    key: str
    limit: int
    window_ms: int  # the limit's own window (a minute, a day, a quota's hours)
    kind: str  # 'req' or 'tok'
    label: str  # for people: a Block's reason
    # A subscription's quota: a token quota counts prompt and completion alike, and its
    # admission checks what was used (the call's tokens are counted when it returns).
    quota: bool = False


@dataclass(frozen=True)
class _Cap:
    key: str
    usd: float
    period: str
    scope: str
    name: str


class FleetState:
    def __init__(self, redis: Any, catalog: Catalog, margin_ms: int | None = None) -> None:
        """`margin_ms`: how much longer than its limit's window each window is counted
        (default: FLEET_LIMIT_MARGIN_MS)."""
        self.redis = redis
        self.catalog = catalog
        self.margin_ms = limit_margin_ms() if margin_ms is None else margin_ms
        # What a model counts against follows from the catalog alone: worked out once.
        self._windows_of: dict[tuple[str, str], list[_Window]] = {}

    # --- looking and taking -------------------------------------------------------------

    def block(
        self,
        task_class: str,
        model_id: str,
        prompt_tokens: int = 0,
        needs: frozenset[str] = frozenset(),
    ) -> Block | None:
        """Why `model_id` cannot take a job now (cooldown, half-open circuit, budget, a full
        window, a rest for a capability in `needs`), or None. Takes nothing."""
        found = self.blocks(task_class, [model_id], prompt_tokens, needs)
        return found.get(model_id)

    def blocks(
        self,
        task_class: str,
        models: list[str],
        prompt_tokens: int = 0,
        needs: frozenset[str] = frozenset(),
    ) -> dict[str, Block]:
        """Why each of `models` cannot take a job of `task_class` that needs `needs` now
        (absent: it can), all looked at in one round trip."""
        batch = Pipeline(self.redis)
        looks = [self.admit_call(task_class, m, prompt_tokens, take=False) for m in models]
        for look in looks:
            batch.script("admit", look.keys, look.args)
        rests = [(m, cap) for m in models for cap in sorted(needs)]
        for model_id, cap in rests:
            batch.pipe.pttl(keys.lacks(model_id, cap))
        queues = sorted({self.catalog.model(m).queue for m in models})
        serving.look(batch.pipe, queues)  # what the queues' live workers cannot serve
        replies = batch.execute()
        found: dict[str, Block] = {}
        for model_id, look, reply in zip(models, looks, replies, strict=False):
            answer = look.read(reply)
            if isinstance(answer, Block):
                found[model_id] = answer
        now = time.time()
        ttls = replies[len(looks) : len(looks) + len(rests)]
        for (model_id, cap), ttl_ms in zip(rests, ttls, strict=True):
            if int(ttl_ms) == -2:  # no such key: not resting for `cap`
                continue
            until = now + int(ttl_ms) / 1000 if int(ttl_ms) >= 0 else None
            refused = Block(f"refused {cap}", until)
            if _later(refused, found.get(model_id)):
                found[model_id] = refused
        announced = serving.announced(queues, replies[len(looks) + len(rests) :])
        for model_id in models:
            gone = serving.unservable(self.catalog, model_id, announced)
            if gone is not None:  # no wait frees it: a person must act
                found[model_id] = Block(gone.reason)
        return found

    def admit(self, task_class: str, model_id: str, prompt_tokens: int) -> Slot | Block:
        """Take a slot for one call, fleet-wide; or the Block saying until when to wait."""
        call = self.admit_call(task_class, model_id, prompt_tokens)
        batch = Pipeline(self.redis)
        batch.script("admit", call.keys, call.args)
        return call.read(batch.execute()[0])

    def admit_call(
        self,
        task_class: str,
        model_id: str,
        prompt_tokens: int,
        *,
        take: bool = True,
    ) -> AdmitCall:
        """The admit.lua call for one model (a look only, unless `take`)."""
        model = self.catalog.model(model_id)
        now = datetime.now(UTC)
        caps = self._caps(model, now)
        windows = self._windows(task_class, model)
        script_keys = [keys.cooldown(model_id), keys.circuit_open(model_id), keys.probe(model_id)]
        script_keys += [c.key for c in caps] + [w.key for w in windows]
        args: list[Any] = [uuid.uuid4().hex, "0" if take else "1", PROBE_TTL_MS, len(caps)]
        args += [c.usd for c in caps] + _window_args(windows, prompt_tokens, self.margin_ms)
        return AdmitCall(script_keys, args, lambda reply: _answer(reply, caps, windows, now))

    def _caps(self, model: Model, now: datetime) -> list[_Cap]:
        """Every budget capping `model`, with the spend counter of its current period."""
        names = {"model": model.id, "provider": model.provider, "tier": model.tier}
        return [
            _Cap(
                keys.spend(b.scope, b.name, period, _stamp(now, period)),
                cap,
                period,
                b.scope,
                b.name,
            )
            for b in self.catalog.policy.budgets
            if names[b.scope] == b.name
            for period, cap in (("day", b.usd_per_day), ("month", b.usd_per_month))
            if cap is not None
        ]

    def _windows(self, task_class: str, model: Model) -> list[_Window]:
        key = (task_class, model.id)
        if key not in self._windows_of:
            self._windows_of[key] = self._windows_uncached(task_class, model)
        return self._windows_of[key]

    def _windows_uncached(self, task_class: str, model: Model) -> list[_Window]:
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
                    quota=True,
                )
            )
        return windows

    # --- after a call -----------------------------------------------------------------

    def mark(self, call: inflight.Call) -> None:
        inflight.mark(self.redis, call)

    def settle(self, model_id: str, attempt: Attempt, cost_usd: float, probe: bool = False) -> None:
        """Count the call's tokens and spend, and rest the model if it failed: one
        write-only round trip."""
        batch = Pipeline(self.redis)
        self.settle_in(batch, model_id, attempt, cost_usd, probe)
        batch.execute()

    def settle_in(
        self, batch: Pipeline, model_id: str, attempt: Attempt, cost_usd: float, probe: bool
    ) -> None:
        """Queue settle()'s writes in `batch`."""
        if attempt.outcome == "skipped":  # no call: only a missing key is worth saying
            self._skipped_in(batch, model_id, attempt)
            return
        model = self.catalog.model(model_id)
        self._count_tokens(batch.pipe, model, attempt.completion_tokens, attempt.prompt_tokens)
        if cost_usd > 0:
            self._spend(batch.pipe, model, cost_usd)
        if attempt.outcome == "ok":
            if probe:  # the half-open circuit's one call answered: close it
                batch.pipe.delete(
                    keys.circuit_open(model_id), keys.probe(model_id), keys.failures(model_id)
                )
            return
        if probe:  # whatever follows, the probe is over
            batch.pipe.delete(keys.probe(model_id))
        if attempt.error_kind == "rate_limited":
            wait = attempt.retry_after_s
            wait = wait if wait is not None else self.catalog.policy.cooldowns.rate_limited_s
            self._cool_in(batch, model_id, wait, "rate limited")
        elif attempt.error_kind == "unsupported":
            pass  # the model refused a capability: rest_capability() rests it for that only
        elif attempt.action == "next" and attempt.outcome == "error":
            self._cool_in(batch, model_id, UNUSABLE_COOLDOWN_S, attempt.error_kind or "unusable")
        elif attempt.action == "retry":
            self._fail_in(batch, model_id)

    @staticmethod
    def _skipped_in(batch: Pipeline, model_id: str, attempt: Attempt) -> None:
        if attempt.error_kind == "no_key":
            batch.pipe.set(keys.no_key(model_id), attempt.worker or "a worker", ex=NO_KEY_S)

    def rest_capability(self, model_id: str, capability: str) -> None:
        """Rest `model_id` fleet-wide for jobs that need `capability` (its provider refused
        it although the catalog claims it), for policy.cooldowns.capability_rest_s; jobs
        that do not need it still use the model. A later refusal starts the rest again."""
        seconds = self.catalog.policy.cooldowns.capability_rest_s
        self.redis.set(keys.lacks(model_id, capability), "1", px=int(seconds * 1000))

    def cool(self, model_id: str, seconds: float, reason: str) -> float:
        """Rest a model fleet-wide for `seconds` (never shortening a longer rest)."""
        batch = Pipeline(self.redis)
        self._cool_in(batch, model_id, seconds, reason)
        return int(batch.execute()[0]) / 1000

    def _cool_in(self, batch: Pipeline, model_id: str, seconds: float, reason: str) -> None:
        batch.script("cool", [keys.cooldown(model_id)], [int(seconds * 1000), reason])

    def _fail_in(self, batch: Pipeline, model_id: str) -> None:
        c = self.catalog.policy.cooldowns
        script_keys = [
            keys.failures(model_id),
            keys.circuit_open(model_id),
            keys.cooldown(model_id),
            keys.probe(model_id),
        ]
        args = [
            int(c.circuit_window_s * 1000),
            c.circuit_failures,
            int(c.circuit_open_s * 1000),
            uuid.uuid4().hex,
        ]
        batch.script("fail", script_keys, args)

    def _count_tokens(self, pipe: Any, model: Model, completion: int, prompt: int) -> None:
        """Add what the call really used to the token windows (its prompt was reserved)."""
        member = uuid.uuid4().hex
        now_ms = int(time.time() * 1000)
        for w in self._windows("", model):
            if w.kind != "tok":
                continue
            amount = prompt + completion if w.quota else completion
            if amount > 0:
                pipe.zadd(w.key, {f"{member}|{amount}": now_ms})
                pipe.pexpire(w.key, w.window_ms + self.margin_ms)

    def _spend(self, pipe: Any, model: Model, usd: float) -> None:
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

    def budget_status(self) -> list[dict[str, Any]]:
        """Each budget of the policy in its current UTC day and month: cap and spent."""
        now = datetime.now(UTC)
        found = [
            {
                "scope": b.scope,
                "name": b.name,
                "period": period,
                "cap_usd": cap,
                "key": keys.spend(b.scope, b.name, period, _stamp(now, period)),
            }
            for b in self.catalog.policy.budgets
            for period, cap in (("day", b.usd_per_day), ("month", b.usd_per_month))
            if cap is not None
        ]
        spent = self.redis.mget([f.pop("key") for f in found]) if found else []
        for figures, usd in zip(found, spent, strict=True):
            figures["spent_usd"] = float(usd or 0)
        return found

    def model_status(self, model_id: str) -> dict[str, Any]:
        model = self.catalog.model(model_id)
        windows = {}
        for w in self._windows("user_facing", model):
            since = int(time.time() * 1000) - w.window_ms - self.margin_ms  # as admission counts
            entries = self.redis.zrangebyscore(w.key, since, "+inf")
            used = (
                len(entries) if w.kind == "req" else sum(int(e.rsplit(b"|", 1)[1]) for e in entries)
            )
            windows[w.key.split(":", 2)[2]] = {"used": used, "limit": w.limit}
        cooldown = _cooldown_block(self.redis.get(keys.cooldown(model_id)))
        batch = self.redis.pipeline(transaction=False)
        for cap in CAPABILITIES:
            batch.exists(keys.lacks(model_id, cap))
        refused = [cap for cap, there in zip(CAPABILITIES, batch.execute(), strict=True) if there]
        now = datetime.now(UTC)
        spend = {
            period: float(
                self.redis.get(keys.spend("model", model_id, period, _stamp(now, period))) or 0
            )
            for period in ("day", "month")
        }
        no_key = self.redis.get(keys.no_key(model_id))
        pipe = self.redis.pipeline(transaction=False)
        serving.look(pipe, [model.queue])
        gone = serving.unservable(
            self.catalog, model_id, serving.announced([model.queue], pipe.execute())
        )
        return {
            "model": model_id,
            # no live worker of its queue can serve it: {kind: no_key | model_missing,
            # reason} (None: one can, or none has said)
            "unservable": {"kind": gone.kind, "reason": gone.reason} if gone else None,
            # the worker that skipped it lately for want of its key (None: none did)
            "no_key": no_key.decode() if isinstance(no_key, bytes) else no_key,
            "cooldown": cooldown.reason if cooldown else None,
            "cooldown_until": cooldown.until if cooldown else None,
            "circuit_open": bool(self.redis.exists(keys.circuit_open(model_id))),
            "refused": refused,  # capabilities the model rests for
            "windows": windows,
            "spend_usd": spend,
        }


def _answer(reply: Any, caps: list[_Cap], windows: list[_Window], now: datetime) -> Slot | Block:
    """admit.lua's reply as a Slot or a Block."""
    if int(reply[0]) == 1:
        return Slot(probe=int(reply[2]) == 1)
    now_ms, until_ms, why = int(reply[1]), int(reply[2]), _text(reply[3])
    if why == "cooldown":
        block = _cooldown_block(reply[4])
        assert block is not None
        return block
    if why == "half-open":
        return Block("circuit half-open: a probe call is deciding", time.time() + 1)
    if why == "budget":
        cap = caps[int(reply[4]) - 1]
        spent = float(_text(reply[5]))
        return Block(
            f"budget: ${spent:.2f} of ${cap.usd:.2f} per {cap.period} spent by"
            f" {cap.scope} {cap.name}",
            _period_end(now, cap.period).timestamp(),
        )
    window = windows[int(reply[4]) - 1]
    until = time.time() + (until_ms - now_ms) / 1000
    return Block(f"{window.label} full until {_clock(until)}", until)


def _later(block: Block, than: Block | None) -> bool:
    """`block` lasts longer than `than` (None: no block; an until of None: until a human
    acts)."""
    if than is None or block.until is None:
        return True
    return than.until is not None and block.until > than.until


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _cooldown_block(raw: bytes | str | None) -> Block | None:
    if not raw:
        return None
    until_ms, _, why = _text(raw).partition("|")
    until = int(until_ms) / 1000
    return Block(f"cooldown until {_clock(until)} ({why})", until)


def _window_args(windows: list[_Window], prompt_tokens: int, margin_ms: int) -> list[Any]:
    """admit.lua's ARGV for these windows: limit, window ms counted (the limit's window
    plus the margin), amount, kind, each."""
    argv: list[Any] = []
    for w in windows:
        amount = 1 if w.kind == "req" else prompt_tokens
        if w.quota and w.kind == "tok":
            amount = 0  # token quota: check what was used; the call's tokens come later
        argv += [w.limit, w.window_ms + margin_ms, amount, w.kind]
    return argv


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
    new work arrives meanwhile.) Save the mark: a call that cannot be marked in flight
    does not leave (`mark`).
    """

    def __init__(self, state: FleetState) -> None:
        self.state = state

    def block(
        self,
        task_class: str,
        model_id: str,
        prompt_tokens: int,
        needs: frozenset[str] = frozenset(),
    ) -> Block | None:
        try:
            return self.state.block(task_class, model_id, prompt_tokens, needs)
        except Exception as exc:
            _unreachable(exc)
            return None

    def admit(self, task_class: str, model_id: str, prompt_tokens: int) -> Slot | Block:
        try:
            return self.state.admit(task_class, model_id, prompt_tokens)
        except Exception as exc:
            _unreachable(exc)
            return Slot()

    def mark(self, call: inflight.Call) -> None:
        """The one check that fails closed: a call that cannot be marked does not leave
        (inflight.Unmarked)."""
        import redis

        try:
            self.state.mark(call)
        except redis.RedisError as exc:
            raise inflight.Unmarked(f"job {call.job_id}: {type(exc).__name__}") from exc

    def settle(self, model_id: str, attempt: Attempt, cost_usd: float, probe: bool) -> None:
        try:
            self.state.settle(model_id, attempt, cost_usd, probe)
        except Exception as exc:
            _unreachable(exc)

    def rest_capability(self, model_id: str, capability: str) -> None:
        try:
            self.state.rest_capability(model_id, capability)
        except Exception as exc:  # the job moves on anyway; only the rest is lost
            _unreachable(exc)


def _unreachable(exc: Exception) -> None:
    import redis

    if not isinstance(exc, redis.RedisError):
        raise exc
    log.warning("fleet state unreachable, not enforcing limits: %s", type(exc).__name__)
