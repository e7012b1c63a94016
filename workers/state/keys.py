"""Every Redis key the fleet writes or reads, in one place, with its owner and lifetime.

All live state is fleet-wide: every worker on every machine reads and writes these keys
on the one state Redis (FLEET_STATE_URL, or the broker when it is Redis). The table in
docs/architecture.md lists them; keep the two together.
"""

from __future__ import annotations

PREFIX = "fleet"


# --- limits and health (workers/state/limits.py) ---------------------------------------


def window(scope: str, name: str, measure: str, period: str) -> str:
    """A sliding window of requests or tokens: a sorted set of (member, arrival ms),
    expiring one window after its last arrival."""
    return f"{PREFIX}:window:{scope}:{name}:{measure}:{period}"


def cooldown(model: str) -> str:
    """'<until ms>|<reason>' while the model rests; expires at that moment."""
    return f"{PREFIX}:cooldown:{model}"


def lacks(model: str, capability: str) -> str:
    """Set while the model rests for one capability (its provider refused tools, say):
    jobs that need the capability skip it, others still use it. Expires after
    policy.cooldowns.capability_rest_s."""
    return f"{PREFIX}:lacks:{model}:{capability}"


def no_key(model: str) -> str:
    """A model a worker skipped lately because its key is unset there (the worker's name;
    NO_KEY_S in workers/state/limits.py): `fleet status`, the dashboard and /metrics say
    "no key" instead of "ok"."""
    return f"{PREFIX}:nokey:{model}"


def serving(queue: str) -> str:
    """What the live workers of a queue cannot serve, as each announces it every beat
    (workers/state/serving.py): hash process -> '<deadline ms>|<JSON {model: why}>'; a
    field whose deadline passed is dropped by the next announcement, and the hash
    expires with its latest deadline."""
    return f"{PREFIX}:serving:{queue}"


def failures(model: str) -> str:
    """Recent transient failures (sorted set by ms): enough of them open the circuit."""
    return f"{PREFIX}:circuit:failures:{model}"


def circuit_open(model: str) -> str:
    """Set while the circuit is open or half-open: the next call after the cooldown probes.
    No expiry: a probe's success deletes it."""
    return f"{PREFIX}:circuit:open:{model}"


def probe(model: str) -> str:
    """Held by the one call allowed through a half-open circuit (expires after
    limits.PROBE_TTL_MS, should its worker die)."""
    return f"{PREFIX}:circuit:probe:{model}"


def spend(scope: str, name: str, period: str, stamp: str) -> str:
    """USD spent by a model, provider or tier in one UTC day (kept 2 days) or month (33)."""
    return f"{PREFIX}:spend:{scope}:{name}:{period}:{stamp}"


# --- jobs (state/deliveries.py, inflight.py, idempotency.py, deadletter.py, beathealth.py) -


def deliveries(job_id: str, sends: int) -> str:
    """One message of a job (its `sends`-th), as its deliveries went: hash `n` (how many
    times delivered), `on` (the process its latest delivery ran in), `deaths` (the share
    of its deliveries' deaths laid on it: workers/state/deliveries.py); kept a day."""
    return f"{PREFIX}:deliveries:{job_id}:{sends}"


RUNNING_PREFIX = f"{PREFIX}:running:"


def running(process: str) -> str:
    """The jobs whose deliveries one worker process holds, or held when it died (a set of
    job ids): added by a delivery's first round trip, removed with the job's final state
    or by its next message's first round trip; kept a day after the last addition."""
    return f"{RUNNING_PREFIX}{process}"


def stream(job_id: str) -> str:
    """A job's streamed output (a Redis Stream): batches of deltas as its worker makes them,
    then one final record; bounded in length, kept STREAM_KEEP_S after its last record
    (workers/state/streams.py)."""
    return f"{PREFIX}:stream:{job_id}"


def inflight(job_id: str) -> str:
    """A job's provider calls in flight: hash '<message>:<delivery>' -> '<marked ms>|<JSON
    call>', one field per call (a delivery makes at most one), written as the call leaves
    and cleared once the call's outcome is recorded; a field of
    its own message found by a redelivery is an orphaned call (workers/state/inflight.py).
    Kept a day after the last call."""
    return f"{PREFIX}:inflight:{job_id}"


def idempotency(key: str) -> str:
    """The id of the job first dispatched with this idempotency key; kept a day."""
    return f"{PREFIX}:idempotency:{key}"


DEAD_LETTER = f"{PREFIX}:dead-letter"  # hash: job id -> the failed job and its reasons
# hash: task class -> dead letters its retention took out; '<class>:at' -> the last time
DEAD_LETTER_TRIMMED = f"{PREFIX}:dead-letter:trimmed"


def dead_letter_index(bucket: str) -> str:
    """One task class's dead letters (sorted set: job id -> filed at, unix s on Redis'
    clock), so that its oldest are found and trimmed without reading the hash."""
    return f"{PREFIX}:dead-letter:index:{bucket}"


# hash: beat entry -> JSON: failing since when, why, repeats not filed, recovered when
BEAT_HEALTH = f"{PREFIX}:beat:health"


def result(job_id: str) -> str:
    """Celery's own key for a job's state and Result (the result backend writes it through
    store_result.lua; kept FLEET_RESULT_EXPIRES_S)."""
    return f"celery-task-meta-{job_id}"


# --- the broker's own bookkeeping (runtime/transport.py, runtime/liveness.py) -------------

# Every job message from its publish to its ack, so that no moment between Redis' pop and
# a worker's record of the delivery can lose it (kombu's stock channel records a message
# only after the pop, and a worker killed in between loses it).
# hash: delivery tag -> the message's text
BROKER_MESSAGES = f"{PREFIX}:broker:messages"
# hash: list -> its last back position; '<list>|front' -> its last front position (negated)
BROKER_POSITIONS = f"{PREFIX}:broker:positions"
# hash: delivery tag -> when first seen popped with no process holding it (ms)
BROKER_POPPED = f"{PREFIX}:broker:popped"
# zset: worker process -> the deadline of its beat (ms, Redis' clock)
BROKER_HOLDERS = f"{PREFIX}:broker:holders"
# hash: pulse (the fleet's last beat, ms), calm_until (no deaths declared before, ms)
BROKER_LIVENESS = f"{PREFIX}:broker:liveness"
BROKER_QUEUED_PREFIX = f"{PREFIX}:broker:queued:"
BROKER_HELD_PREFIX = f"{PREFIX}:broker:held:"


def broker_queued(list_key: str) -> str:
    """A queue list's filed messages, waiting or popped and not yet held (zset: delivery
    tag -> position in the list, scripts/broker_requeue.lua)."""
    return f"{BROKER_QUEUED_PREFIX}{list_key}"


def broker_held(process: str) -> str:
    """The messages a worker process holds (hash: delivery tag -> '<delivered µs> <list>'),
    from its delivery to its ack, or to the process's lapse."""
    return f"{BROKER_HELD_PREFIX}{process}"


# --- the ledger spool (filled by runtime/resultstore.py, drained by ledger/store.py) ------

LEDGER_SPOOL = f"{PREFIX}:ledger:spool"  # list: one JSON entry of attempt rows per job
LEDGER_CLAIMS = f"{PREFIX}:ledger:spool:claims"  # zset: claim token -> claimed at (unix s)
LEDGER_CLAIM_PREFIX = f"{PREFIX}:ledger:spool:claim:"  # + token: the entries one drainer holds


# --- apps behind the gateway (workers/state/apps.py) -------------------------------------


def app_requests(app: str) -> str:
    """An app's requests of the last minute (sorted set by arrival ms), for its key's
    requests_per_min; expires a minute after the last."""
    return f"{PREFIX}:app:{app}:requests"


def app_spend(app: str, period: str, stamp: str) -> str:
    """USD an app's jobs have set aside (reserved at the door, settled to their real cost
    when they end) in one UTC day (kept 2 days) or month (33)."""
    return f"{PREFIX}:app:{app}:spend:{period}:{stamp}"


def settled(job_id: str) -> str:
    """Set once a job's reservation was settled (by its final state, or refunded by the
    gateway for a job that never ran), so that it is settled once; kept a day."""
    return f"{PREFIX}:app:settled:{job_id}"


def revoked(job_id: str) -> str:
    """Set when a job's app revoked it while a worker held it: its next delivery ends it
    (workers/state/scripts/begin.lua); kept a day."""
    return f"{PREFIX}:gateway:revoked:{job_id}"


def owner(job_id: str) -> str:
    """The app that sent a job through the gateway (only it may read or revoke the job);
    kept a day."""
    return f"{PREFIX}:gateway:owner:{job_id}"


def dashboard_session(digest: str) -> str:
    """A dashboard session (gateway/dashboard.py): the key id it was opened with, under the
    SHA-256 of its cookie's random id (so the state Redis holds no usable cookie); expires
    with the session."""
    return f"{PREFIX}:gateway:session:{digest}"


# --- embedding cache (workers/state/vector_cache.py) ------------------------------------


def vector(model: str, dimensions: int | None, digest: str) -> str:
    """One text's vector from one model at one length: its token count (4 bytes) and the
    vector (little-endian float32). Expires after policy.embedding_cache.ttl_s."""
    return f"{PREFIX}:vec:{model}:{dimensions or 0}:{digest}"


def vector_index() -> str:
    """Every cached vector's key by its last use (ms): past max_entries, the least
    recently used go."""
    return f"{PREFIX}:vec:index"
