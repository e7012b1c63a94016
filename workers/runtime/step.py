"""One delivery of a job: try the next model of its chain and say what happens next.

Plain functions, no Celery: the task in `workers/runtime/tasks.py` feeds a delivery in and turns
the returned step into a Celery action (return, retry on another queue, or fail).

The job's route is computed once (at dispatch, or on first delivery for jobs enqueued by
name from elsewhere) and travels in `state`; rules 1-4 were applied to it then, so
escalation can never leave the allowed tiers. Each delivery makes at most one provider
call, so a delivery never outlives one attempt's timeout (and Redis' visibility timeout).

Order of tries: the chain, first to last, once each; then, once more, the models whose
failure was transient, each after its Retry-After (rate limit) or a short backoff. A model
whose key is unset is skipped without a call; an unusable model (bad key, unknown model)
is not tried again; a bad request ends the job at once. A model whose provider refuses a
capability the job needs (tools, a response format) is not tried again either, and rests
fleet-wide for that capability (Gate.rest_capability).

Each call carries the job's tuning fields (Job.tuning()) that the model can take: a field
whose capability (TUNING_NEEDS) the catalog does not give the model, or that the model's
adapter cannot take, is left out, and the Result lists what its answering model was not
sent (`dropped`).

A streaming job's delivery hands its call's deltas to a Sink (workers/state/streams.py's
StreamWriter) as they come. Until the first one, a failure moves down the chain as any
other would; after it, the call's error ends the stream (the caller has part of an
answer, and text from another model must not follow it), and the job goes on down its
chain unstreamed. A call whose deltas reach a revoked job (its client went away) stops
there: billed for what it wrote (estimated), the job ends revoked.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from router.catalog import Catalog
from router.costs import attempt_cost
from router.errors import InvalidJob, JobRevoked, NoRouteAvailable
from router.jobs import TUNING_NEEDS, Job, parse_job
from router.policy import route_job
from router.results import Delta, Result, encode_bytes
from router.slots import Block, earliest, horizon
from router.tokens import estimate_tokens
from router.travel import Attempt, Hop, TravellingState, travelling_state
from workers.providers.base import (
    CapabilityRefused,
    Completion,
    CompletionRequest,
    ProviderError,
    Retryable,
    StreamBroken,
    Target,
    accepted_options,
    current_caller,
    on_send,
)
from workers.runtime.embedding_call import Cache, cached_attempt, fresh_entries, try_embedding
from workers.state.inflight import Call
from workers.state.limits import Slot
from workers.state.vector_cache import Cached

TRIES_PER_MODEL = 2
RETRY_BACKOFF_S = 1.0  # before a second try of a model that gave no Retry-After


@dataclass(frozen=True)
class Done:
    result: Result


@dataclass(frozen=True)
class Failed:
    result: Result


@dataclass(frozen=True)
class Forward:
    """Send the job (with its updated state) to `queue`, after `countdown_s`."""

    queue: str
    countdown_s: float
    state: TravellingState


Step = Done | Failed | Forward


# model id -> Target; raises ProviderError when the model cannot be called from here
# (its key is unset, say).
ProviderLookup = Callable[[str], Target]


class Gate(Protocol):
    """The fleet's live state as a delivery sees it (workers/state/limits.py). `needs`:
    the job's capabilities (Job.needs()); a model resting for one of them is blocked."""

    def block(
        self,
        task_class: str,
        model_id: str,
        prompt_tokens: int,
        needs: frozenset[str] = frozenset(),
    ) -> Block | None: ...
    def admit(self, task_class: str, model_id: str, prompt_tokens: int) -> Slot | Block: ...
    def mark(self, call: Call) -> None: ...
    def settle(self, model_id: str, attempt: Attempt, cost_usd: float, probe: bool) -> None: ...
    def rest_capability(self, model_id: str, capability: str) -> None: ...


class Sink(Protocol):
    """Where a streaming job's deltas go (workers/state/streams.py's StreamWriter)."""

    @property
    def streamed(self) -> bool: ...  # whether text went out
    def start(self, model: str, queue: str) -> None: ...
    def add(self, delta: Delta) -> None: ...  # raises JobRevoked: the job was revoked
    def flush(self) -> None: ...
    def broke(self, message: str, kind: str) -> None: ...


class OpenGate:
    """No live state: every model always usable (unit tests, a fleet without limits)."""

    def block(
        self,
        task_class: str,
        model_id: str,
        prompt_tokens: int,
        needs: frozenset[str] = frozenset(),
    ) -> Block | None:
        return None

    def admit(self, task_class: str, model_id: str, prompt_tokens: int) -> Slot | Block:
        return Slot()

    def mark(self, call: Call) -> None:
        return None

    def settle(self, model_id: str, attempt: Attempt, cost_usd: float, probe: bool) -> None:
        return None

    def rest_capability(self, model_id: str, capability: str) -> None:
        return None


def advance(
    catalog: Catalog,
    job_data: dict[str, Any],
    state: TravellingState | None,
    *,
    here: str | None,
    providers: ProviderLookup,
    gate: Gate | None = None,
    worker: str | None = None,
    admitted: Mapping[str, Slot | Block] | None = None,
    sink: Sink | None = None,
    cache: Cache | None = None,
    now: Callable[[], float] = time.time,
) -> Step:
    """Run this delivery of a job: at most one provider call. `admitted`: the answer to an
    admission already asked for (first_call's model, with the delivery's first round
    trip), used instead of asking the gate again. `sink`: where a streaming job's call
    sends its deltas (None: the call is made whole). `cache`: an embedding job's vectors
    known already (workers/runtime/embedding_call.py)."""
    started = _start(catalog, job_data, state, now())
    if isinstance(started, Failed):
        return started
    job, state = started
    delivery = _Delivery(catalog, job_data, job, state, gate or OpenGate(), now)
    delivery.admitted = dict(admitted or {})
    delivery.sink = sink
    delivery.cache = cache
    return delivery.run(here, providers, worker)


def first_call(
    job_data: dict[str, Any],
    state: TravellingState | None,
    *,
    here: str | None,
    providers: ProviderLookup,
    now: float,
) -> str | None:
    """The model this delivery will ask admission for first, when that is the first thing
    it does (the model is here, due now, callable from this worker, and the job not past
    its deadline): its slot can then be taken in the delivery's first round trip. None
    otherwise (the delivery looks and forwards, or routes a job that came without
    state, or is an embedding job: its first thing is the cache, which may answer it
    whole, and a slot taken before would be spent on no call)."""
    if state is None or not state.chain or _past(job_data.get("deadline"), now):
        return None
    if job_data.get("input") is not None:
        return None
    pick = _next_model(state.chain, state.attempts, {}, now)
    if pick is None or pick[0].queue != here or pick[1] > 0:
        return None
    try:
        providers(pick[0].model)
    except ProviderError:
        return None
    return pick[0].model


def _past(deadline: Any, now: float) -> bool:
    if not deadline:
        return False
    try:
        return datetime.fromisoformat(str(deadline).replace("Z", "+00:00")).timestamp() < now
    except ValueError:
        return True  # unreadable: let the delivery say so, without a slot taken


class _Delivery:
    """One delivery's walk down the chain: pick a model, take its slot, call it once."""

    def __init__(
        self,
        catalog: Catalog,
        job_data: dict[str, Any],
        job: Job,
        state: TravellingState,
        gate: Gate,
        now: Callable[[], float],
    ) -> None:
        self.catalog, self.job_data, self.job, self.state = catalog, job_data, job, state
        self.gate, self.now = gate, now
        self.attempts = list(state.attempts)
        self.tokens = state.prompt_tokens
        self.needs = job.needs()
        self.passed: dict[str, Block] = {}  # models found blocked in this delivery, and why
        self.admitted: dict[str, Slot | Block] = {}  # admissions asked for before the walk
        self.sink: Sink | None = None
        self.cache: Cache | None = None
        self.known: dict[str, list[Cached | None]] = {}  # an embedding job's, per model

    def run(self, here: str | None, providers: ProviderLookup, worker: str | None) -> Step:
        called = False
        while True:
            if self.job.deadline is not None and self.now() > self.job.deadline.timestamp():
                return Failed(self.end(error="deadline passed"))
            pick = _next_model(self.state.chain, self.attempts, self.passed, self.now())
            if pick is None:
                return self.wait_or_fail()
            hop, countdown = pick
            model = hop.model
            cached = self.from_cache(hop, worker)  # vectors the cache holds need no call
            if cached is not None:
                return Done(cached)
            # One provider call per delivery: a further try travels as a new message. It
            # is sent where it can be served: a look (no slot taken) skips a blocked model.
            if called or hop.queue != here or countdown > 0:
                if self.blocked(model):
                    continue
                return self.forward(hop.queue, countdown)
            # A model this worker cannot call (its key is unset here) is skipped before it
            # takes a slot or a probe.
            try:
                target = providers(model)
            except ProviderError as exc:
                self.skip(hop, exc, worker)
                continue
            admission = self.take(model)
            if admission is None:
                continue
            step = self.call(hop, target, worker, admission)
            if step is not None:
                return step
            called = True

    def look_up(self, model: str) -> list[Cached | None]:
        """The vectors the cache holds for this job's texts from `model` (once a delivery)."""
        if model not in self.known:
            texts = self.job.texts
            self.known[model] = (
                self.cache.get(model, self.job.dimensions, texts)
                if self.cache is not None
                else [None] * len(texts)
            )
        return self.known[model]

    def from_cache(self, hop: Hop, worker: str | None) -> Result | None:
        """An embedding job's answer when the cache holds every vector for `hop`'s model."""
        if self.job.input is None:
            return None
        hits = [f for f in self.look_up(hop.model) if f is not None]
        if len(hits) < len(self.job.texts):
            return None
        self.attempts.append(cached_attempt(hop, len(self.attempts) + 1, hits, worker, self.now()))
        return self.end(model=hop.model, vectors=[encode_bytes(f.vector) for f in hits])

    def blocked(self, model: str) -> bool:
        """Whether `model` cannot take the job now (a look: no slot taken); why is noted."""
        block = self.gate.block(self.job.task_class, model, self.tokens, needs=self.needs)
        if block is not None:
            self.passed[model] = block
        return block is not None

    def take(self, model: str) -> Slot | None:
        """A slot for a call to `model` now, or None when it is blocked (why is noted)."""
        # A job with needs looks first for a rest of the model for one of them (its
        # provider refused it lately): the dispatcher's view of rests may be a second old,
        # and a call would only be refused again. (A slot admitted already with the
        # delivery's first round trip is then left unused: it frees with its window.)
        if self.needs and self.blocked(model):
            return None
        # The check and the slot (and a half-open circuit's probe) in one round trip.
        admission = self.admitted.pop(model, None) or self.gate.admit(
            self.job.task_class, model, self.tokens
        )
        if isinstance(admission, Block):
            self.passed[model] = admission
            return None
        return admission

    def in_flight(self, hop: Hop, worker: str | None) -> Call | None:
        """The mark the call leaves in Redis, as it leaves, until its outcome is recorded
        (a redelivery that finds it bills the call as orphaned: workers/state/inflight.py),
        for the delivery the task is running (none outside a task)."""
        caller = current_caller()
        if caller is None:
            return None
        return Call(
            job_id=caller.job_id,
            sends=caller.message,
            delivery=caller.delivery,
            attempt=len(self.attempts) + 1,
            model=hop.model,
            queue=hop.queue,
            tier=hop.tier,
            prompt_tokens=self.tokens,
            worker=worker,
        )

    def skip(self, hop: Hop, exc: ProviderError, worker: str | None) -> None:
        skipped = Attempt(
            number=len(self.attempts) + 1,
            model=hop.model,
            queue=hop.queue,
            tier=hop.tier,
            outcome="skipped",
            worker=worker,
            started_at=self.now(),
            **_error_fields(exc),
        )
        self.attempts.append(skipped)
        if exc.kind == "no_key":  # said fleet-wide: status, dashboard, metrics
            self.gate.settle(hop.model, skipped, 0.0, False)

    def call(self, hop: Hop, target: Target, worker: str | None, slot: Slot) -> Step | None:
        call = self.in_flight(hop, worker)
        options, dropped = request_options(self.job, self.catalog, hop.model, target)
        if self.sink is not None:
            self.sink.start(hop.model, hop.queue)
        if self.job.input is not None:
            with on_send(lambda: self.gate.mark(call) if call else None):
                attempt, embedded = self.embed(hop, target, worker)
            self.attempts.append(attempt)
            self.gate.settle(hop.model, attempt, self._cost(hop, attempt), slot.probe)
            if not isinstance(embedded, ProviderError):
                vectors = [encode_bytes(v) for v in embedded]
                return Done(self.end(model=hop.model, vectors=vectors))
            return self.failed_call(hop, attempt, embedded)
        with on_send(lambda: self.gate.mark(call) if call else None):
            attempt, outcome = _try(
                self.job,
                self.state,
                hop,
                len(self.attempts) + 1,
                target,
                worker,
                self.now,
                options,
                self.sink,
            )
        self.attempts.append(attempt)
        self.gate.settle(hop.model, attempt, self._cost(hop, attempt), slot.probe)
        if isinstance(outcome, Completion):
            return Done(self.end(model=hop.model, dropped=dropped, **_answer(outcome)))
        if isinstance(outcome, JobRevoked):
            return Failed(self.end(error=REVOKED))
        if self.sink is not None and self.sink.streamed:
            # Part of an answer went out: end the stream; the job goes on unstreamed.
            self.sink.broke(f"{hop.model}: {outcome.message}", outcome.kind)
            self.sink = None
        return self.failed_call(hop, attempt, outcome)

    def _cost(self, hop: Hop, attempt: Attempt) -> float:
        return attempt_cost(self.catalog.model(hop.model), attempt).usd

    def embed(
        self, hop: Hop, target: Target, worker: str | None
    ) -> tuple[Attempt, list[bytes] | ProviderError]:
        """An embedding job's call for the texts the cache lacks; the new vectors kept."""
        found = self.look_up(hop.model)
        number = len(self.attempts) + 1
        attempt, embedded = try_embedding(
            self.job, hop, number, target, worker, self.now, found, _error_fields
        )
        if self.cache is not None and not isinstance(embedded, ProviderError):
            texts, entries = fresh_entries(self.job, found, embedded, attempt.prompt_tokens)
            self.cache.put(hop.model, self.job.dimensions, texts, entries)
        return attempt, embedded

    def failed_call(self, hop: Hop, attempt: Attempt, outcome: ProviderError) -> Step | None:
        """After a failed call: rest a refused capability; end the job if it must."""
        if isinstance(outcome, CapabilityRefused):
            self.gate.rest_capability(hop.model, outcome.capability)
        if attempt.action == "fail":
            return Failed(self.end(error=f"{hop.model}: {attempt.error}"))
        return None

    def end(self, **fields: Any) -> Result:
        return _result(self.job_data, self.state, self.attempts, self.now(), **fields)

    def forward(self, queue: str, countdown: float) -> Forward:
        # `sends` names the next message (workers/state/deliveries.py)
        update = {"attempts": tuple(self.attempts), "sends": self.state.sends + 1}
        return Forward(queue, countdown, self.state.model_copy(update=update))

    def wait_or_fail(self) -> Step:
        """No model can be called now: wait for the earliest slot if it comes soon enough."""
        if not self.passed:
            return Failed(self.end(error=_exhausted(self.attempts)))
        now = self.now()
        found = earliest(
            self.passed, horizon(now, self.catalog.policy.max_wait_s, self.job.deadline)
        )
        if found is None:
            reasons = "; ".join(f"{m}: {b.reason}" for m, b in self.passed.items())
            tried = f"; tried: {_exhausted(self.attempts)}" if self.attempts else ""
            return Failed(self.end(error=f"no usable model ({reasons}){tried}"))
        until, model = found
        return self.forward(self.state.hop_of(model).queue, max(0.0, until - now) + 0.01)


def request_options(
    job: Job, catalog: Catalog, model_id: str, target: Target
) -> tuple[dict[str, Any], list[str]]:
    """The job's tuning fields `model_id` is sent, and those it is not (sorted): a field
    whose capability (TUNING_NEEDS) the catalog does not give the model, tools for a model
    without them (a job whose tool_choice is "none" may reach one), and any field the
    model's adapter cannot take (its OPTIONS)."""
    model = catalog.by_id.get(model_id)
    has = model.supports if model is not None else (lambda capability: False)
    accepted = accepted_options(target.provider)
    kept: dict[str, Any] = {}
    dropped: list[str] = []
    for name, value in job.tuning().items():
        need = TUNING_NEEDS.get(name)
        if name in ("tools", "tool_choice"):
            need = "tools"
        if (need is not None and not has(need)) or (accepted is not None and name not in accepted):
            dropped.append(name)
        else:
            kept[name] = value
    return kept, sorted(dropped)


def _answer(completion: Completion) -> dict[str, Any]:
    """The Result's fields of an answer."""
    return {
        "text": completion.text,
        "tool_calls": completion.tool_calls,
        "finish_reason": completion.finish_reason,
        "refusal": completion.refusal,
        "logprobs": completion.logprobs,
        "reasoning": completion.reasoning,
    }


def _try(
    job: Job,
    state: TravellingState,
    hop: Hop,
    number: int,
    target: Target,
    worker: str | None,
    now: Callable[[], float],
    options: dict[str, Any],
    sink: Sink | None = None,
) -> tuple[Attempt, Completion | ProviderError | JobRevoked]:
    response_format = options.get("response_format") or {}
    base: dict[str, Any] = {
        "number": number,
        "worker": worker,
        "tools": bool(options.get("tools")),
        "json_schema": response_format.get("type") == "json_schema",
        **hop.as_dict(),
    }
    started = now()
    request = CompletionRequest(
        model=target.upstream,
        messages=job.wire_messages(),
        temperature=state.temperature,
        max_tokens=state.max_tokens,
        timeout_s=target.timeout_s,
        options=options,
    )
    clock = time.perf_counter()
    written: list[str] = []  # a stream's text so far: what a stopped call is billed for
    try:
        if sink is None:
            completion = target.provider.complete(request)
        else:
            completion = _streamed(target.provider.stream(request), sink, written)
    except ProviderError as exc:
        latency = (time.perf_counter() - clock) * 1000
        failed = Attempt(
            outcome="error",
            latency_ms=latency,
            started_at=started,
            **_error_fields(exc),
            **_partial_usage(exc),
            **base,
        )
        return failed, exc
    except JobRevoked as exc:  # its client went away mid-stream: the call was stopped
        stopped = Attempt(
            outcome="error",
            error_kind="revoked",
            error="revoked by its app mid-stream: the call was stopped",
            action="fail",
            prompt_tokens=state.prompt_tokens,
            completion_tokens=estimate_tokens("".join(written)),
            tokens_estimated=True,
            latency_ms=(time.perf_counter() - clock) * 1000,
            started_at=started,
            **base,
        )
        return stopped, exc
    latency = (time.perf_counter() - clock) * 1000
    ok = Attempt(
        outcome="ok",
        prompt_tokens=completion.prompt_tokens,
        completion_tokens=completion.completion_tokens,
        tokens_estimated=completion.tokens_estimated,
        provider_cost_usd=completion.provider_cost_usd,
        latency_ms=latency,
        started_at=started,
        **base,
    )
    return ok, completion


def _streamed(pieces: Iterator[Delta | Completion], sink: Sink, written: list[str]) -> Completion:
    """Send a stream's deltas to `sink` as they come (keeping their text in `written`);
    its Completion. Closing the stream on the way out ends the call (a revoked job's)."""
    try:
        for piece in pieces:
            if isinstance(piece, Completion):
                return piece
            written.append(piece.text + piece.reasoning)
            for call in piece.tool_calls:
                written.append(str(call.get("function", {}).get("arguments", "")))
            sink.add(piece)
    finally:
        close = getattr(pieces, "close", None)
        if close is not None:
            close()
        sink.flush()  # everything written goes out before the job's end
    raise Retryable("malformed", "the stream ended without its answer")


def _partial_usage(exc: ProviderError) -> dict[str, Any]:
    """A broken stream's usage: the tokens it made before it broke are billed."""
    if not isinstance(exc, StreamBroken):
        return {}
    partial = exc.partial
    return {
        "prompt_tokens": partial.prompt_tokens,
        "completion_tokens": partial.completion_tokens,
        "tokens_estimated": partial.tokens_estimated,
        "provider_cost_usd": partial.provider_cost_usd,
    }


def _error_fields(exc: ProviderError) -> dict[str, Any]:
    return {
        "error_kind": exc.kind,
        "error": exc.message[:300],
        "action": exc.action,
        "retry_after_s": exc.retry_after_s,
    }


def poisoned(job_data: dict[str, Any], state: TravellingState | None, deliveries: int) -> Failed:
    """A message delivered again and again without finishing (its worker died each time)."""
    error = f"delivered {deliveries} times without finishing: a worker died on it each time"
    return Failed(_result(job_data, state, _attempts(state), time.time(), error=error))


REVOKED = JobRevoked.MESSAGE


def revoked(job_data: dict[str, Any], state: TravellingState | None) -> Result:
    """The Result of a job its app revoked: no answer, the attempts made before."""
    return _result(job_data, state, _attempts(state), time.time(), error=REVOKED)


def _attempts(state: TravellingState | None) -> list[Attempt]:
    return list(state.attempts) if state is not None else []


def _start(
    catalog: Catalog, job_data: dict[str, Any], state: TravellingState | None, now: float
) -> tuple[Job, TravellingState] | Failed:
    """The job and its travelling state (routed now if it arrived without one)."""
    try:
        job = parse_job(job_data)
        return job, state or travelling_state(route_job(catalog, job), now)
    except (InvalidJob, NoRouteAvailable) as exc:
        return Failed(_result(job_data, None, [], now, error=str(exc)))


def _next_model(
    chain: Sequence[Hop],
    attempts: Sequence[Attempt],
    passed: Mapping[str, Block],
    now: float,
) -> tuple[Hop, float] | None:
    """The first model the chain still offers that this delivery has not found blocked,
    and how long until it may be tried."""
    for hop, ready_at in _candidates(chain, attempts):
        if hop.model not in passed:
            return hop, max(0.0, ready_at - now)
    return None


def _candidates(chain: Sequence[Hop], attempts: Sequence[Attempt]) -> Iterator[tuple[Hop, float]]:
    """The models still to try, in order, each with when it may be tried (unix seconds):
    every model once, then those whose failure was transient, after their Retry-After."""
    tried: dict[str, list[Attempt]] = {}
    for attempt in attempts:
        tried.setdefault(attempt.model, []).append(attempt)
    for hop in chain:
        if hop.model not in tried:
            yield hop, 0.0
    for hop in chain:
        history = tried.get(hop.model, [])
        last = history[-1] if history else None
        if last and last.action == "retry" and len(history) < TRIES_PER_MODEL:
            wait = last.retry_after_s if last.retry_after_s is not None else RETRY_BACKOFF_S
            yield hop, last.started_at + last.latency_ms / 1000 + wait


def _exhausted(attempts: list[Attempt]) -> str:
    reasons = "; ".join(f"{a.model}: {a.error_kind} ({a.error})" for a in attempts)
    return f"every model failed: {reasons}" if attempts else "no model left to try"


def _result(
    job_data: dict[str, Any],
    state: TravellingState | None,
    attempts: list[Attempt],
    finished_at: float,
    *,
    model: str | None = None,
    error: str | None = None,
    **answer: Any,
) -> Result:
    """`answer`: the answer's fields (text, tool_calls, finish_reason, ..., dropped)."""
    return Result(
        job_id=str(job_data.get("id", "")),
        task_class=str(job_data.get("task_class", "")),
        source=str(job_data.get("source", "app")),
        ok=error is None,
        model=model,
        error=error,
        **answer,
        attempts=attempts,
        metadata=job_data.get("metadata") or {},
        dispatched_at=state.dispatched_at if state is not None else None,
        finished_at=finished_at,
    )
