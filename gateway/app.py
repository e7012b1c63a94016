"""The gateway's routes: an ASGI app on Starlette (served by uvicorn: gateway/serve.py).

    POST   /v1/chat/completions   an OpenAI chat completion, answered when the job ends,
                                  or streamed as it is written (`stream: true`)
    POST   /v1/embeddings         OpenAI's embeddings, through the embedding chain and the
                                  fleet's cache of vectors (gateway/embeddings.py)
    GET    /v1/models             every catalog model and route name
    POST   /v1/jobs               a fleet job nobody waits on: 202 and its id
    GET    /v1/jobs/{id}          its state, and its Result once it has one
    GET    /v1/jobs/{id}/stream   its answer as server-sent events, from the start or
                                  resumed after the record a Last-Event-ID names
    DELETE /v1/jobs/{id}          revoke it: at once if not yet delivered, else at its next
                                  step (a provider call in flight finishes)
    GET    /metrics               the fleet's Prometheus metrics (an admin key)
    GET    /dashboard, /api/usage the cost dashboard and its JSON (gateway/dashboard.py)

Every route needs a bearer key (gateway/keys.py). A request is checked whole before
anything is queued: the body, the model, the key's classes, then its budget and request
limit (one Redis script that also sets the worst case aside); only then is the job
dispatched. A refused request leaves nothing behind. The job, once queued, runs to its
end whether or not its caller waits; a streamed chat request whose client goes away
revokes its job, whose call stops at its next batch of tokens (docs/streaming.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from client.dispatch import current_catalog, stored_result
from gateway import dashboard, shapes
from gateway.embeddings import embedding_job, embedding_list
from gateway.errors import APIError, invalid_job, no_route
from gateway.keys import AppKey, KeyStore
from gateway.sender import Sender
from gateway.sse import Chunks, error_event
from gateway.streaming import Follower, StreamHub, valid_cursor
from gateway.waiter import ResultWaiter
from router.catalog import Catalog
from router.errors import InvalidJob, JobRevoked, NoRouteAvailable
from router.jobs import Job
from router.policy import route_job
from router.results import Result
from workers.config import fleet_urls
from workers.ledger.store import Ledger
from workers.runtime.resultstore import FleetRedisBackend
from workers.state import apps, keys, streams
from workers.state.apps import Owner
from workers.state.connections import redis_client

MAX_BODY_BYTES = 8 * 1024 * 1024
TIMEOUT_S = 300.0
SEND_THREADS = 64  # blocking calls at once: key checks, send batches, job reads


@dataclass(frozen=True)
class Settings:
    timeout_s: float = TIMEOUT_S  # how long a chat request waits for its job
    max_body_bytes: int = MAX_BODY_BYTES
    result_expires_s: int = 86_400

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        return cls(
            timeout_s=float(environ.get("FLEET_GATEWAY_TIMEOUT_S", TIMEOUT_S)),
            max_body_bytes=int(environ.get("FLEET_GATEWAY_MAX_BODY_BYTES", MAX_BODY_BYTES)),
            result_expires_s=int(environ.get("FLEET_RESULT_EXPIRES_S", 86_400)),
        )


class Gateway:
    """What the routes share: settings, keys, the waiter, the state Redis."""

    def __init__(self, settings: Settings, ledger: Ledger) -> None:
        self.settings = settings
        self.keys = KeyStore(ledger)
        self.redis = redis_client()
        self.waiter = ResultWaiter(fleet_urls()[1])
        self.limiter = anyio.CapacityLimiter(SEND_THREADS)
        self.sender = Sender(self.redis, self.blocking)
        self.results = _results_backend()
        self.hub = StreamHub(fleet_urls()[1], self.waiter)
        self.leaving: set[asyncio.Task[Any]] = set()  # revokes of streams whose client left

    async def blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await anyio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    async def key_of(self, request: Request) -> AppKey:
        header = request.headers.get("authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise APIError(401, "no key: send 'Authorization: Bearer <key>'", code="missing_key")
        presented = presented.strip()
        found = self.keys.cached(presented)  # most requests: no thread, no database
        if found is False:
            found = await self.blocking(self.keys.verify, presented)
        if not isinstance(found, AppKey):
            raise APIError(401, "the key is unknown or revoked", code="invalid_api_key")
        return found

    async def body(self, request: Request) -> Any:
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks) or b"null")
        except (ValueError, UnicodeDecodeError):
            raise APIError(400, "the body is not valid JSON", code="invalid_json") from None

    async def send(self, key: AppKey, job: Job, catalog: Catalog) -> Job:
        """Reserve the job's worst case on the key's budget and dispatch it: the job as
        sent. APIError (nothing queued, nothing reserved) when it cannot go."""
        if key.classes is not None and job.task_class not in key.classes:
            raise APIError(
                403,
                f"this key may not send {job.task_class!r} jobs"
                f" (allowed: {', '.join(sorted(key.classes))})",
                code="class_not_allowed",
                param="task_class",
            )
        try:
            decision = route_job(catalog, job)
        except NoRouteAvailable as exc:
            raise no_route(exc) from None
        except InvalidJob as exc:  # no model of the chain can serve what the job needs
            raise invalid_job(exc) from None
        worst = shapes.worst_cost(catalog, decision)
        if worst > 0 and decision.max_tokens is None and job.input is None:
            # bound what the reservation covers (an embedding job writes nothing)
            job = job.model_copy(update={"max_tokens": shapes.DEFAULT_MAX_TOKENS})
        return await self.sender.send(key, job, worst)


def _results_backend() -> FleetRedisBackend:
    """The fleet's result backend (workers/runtime/resultstore.py): what a final state the
    gateway stores itself (a revoked job's) is encoded by."""
    from workers.runtime.celery_app import get_app

    backend = get_app().backend
    assert isinstance(backend, FleetRedisBackend)
    return backend


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the body is larger than {limit} bytes", code="body_too_large")


def _gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


def _idempotency(request: Request, app: str) -> str | None:
    """The job's idempotency key for the request's `Idempotency-Key`, scoped to its app:
    two apps that pick the same key get a job each, and neither sees the other's."""
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if not 0 < len(key) <= 200:
        raise APIError(
            400, "header 'Idempotency-Key' must be 1 to 200 characters", code="invalid_header"
        )
    # hashed, so that the app's name and any key of 200 characters fit the Job's 200
    return f"{app}/{hashlib.sha256(key.encode()).hexdigest()}"


def _invalid(exc: InvalidJob) -> APIError:
    if isinstance(exc, shapes.UnknownModel):
        return APIError(404, str(exc), code="model_not_found", param="model")
    return invalid_job(exc)


# --- routes ----------------------------------------------------------------------------


async def chat_completions(request: Request) -> Response:
    gw = _gateway(request)
    key = await gw.key_of(request)
    body = await gw.body(request)
    catalog = current_catalog()
    try:
        chat = shapes.chat_request(body)
        job = shapes.chat_job(chat, key.app, catalog)
    except InvalidJob as exc:
        raise _invalid(exc) from None
    if (idem := _idempotency(request, key.app)) is not None:
        job = job.model_copy(update={"idempotency_key": idem})
    if chat.stream:
        job = job.model_copy(update={"stream": True})
    sent = await gw.send(key, job, catalog)
    timeout = min(chat.timeout_s or gw.settings.timeout_s, gw.settings.timeout_s)
    if chat.stream:
        # The client is this job's only reader: when it goes away, the job stops. (One
        # an Idempotency-Key led to an earlier job's stream leaves that job alone.)
        owner = None
        if sent.id == job.id and sent.reservation is not None:
            owner = Owner(key.app, sent.reservation, sent.task_class, sent.source)
        return await _stream(
            gw,
            _Streamed(sent.id, sent.task_class, sent.source, streams.START, chat.include_usage),
            timeout,
            stop_on_leave=owner,
            door_dropped=chat.door_dropped,
        )
    result = await _answer(gw, sent, timeout)
    headers = shapes.fleet_headers(result, chat.door_dropped)
    return JSONResponse(shapes.completion(result, catalog), headers=headers)


async def _answer(gw: Gateway, job: Job, timeout: float) -> Result:
    """The job's Result with its answer, waited for up to `timeout`: a 504 after it (the
    job goes on), the job's failure as an APIError."""
    meta = await gw.waiter.wait(job.id, max(0.0, timeout))
    if meta is None:
        message = (
            f"job {job.id} not finished after {timeout:g} s; it goes on: GET /v1/jobs/{job.id}"
        )
        raise APIError(504, message, code="timeout", extra={"job_id": job.id})
    result = stored_result(meta, job.id, job.task_class, job.source)
    if not result.ok:
        raise _failed(result)
    return result


async def embeddings(request: Request) -> Response:
    gw = _gateway(request)
    key = await gw.key_of(request)
    body = await gw.body(request)
    catalog = current_catalog()
    try:
        job, encoding = embedding_job(body, key.app, catalog)
    except InvalidJob as exc:
        raise _invalid(exc) from None
    if (idem := _idempotency(request, key.app)) is not None:
        job = job.model_copy(update={"idempotency_key": idem})
    result = await _answer(gw, await gw.send(key, job, catalog), gw.settings.timeout_s)
    return JSONResponse(
        embedding_list(result, encoding, catalog), headers=shapes.fleet_headers(result)
    )


@dataclass(frozen=True)
class _Streamed:
    """A job's stream as one request follows it."""

    job_id: str
    task_class: str
    source: str
    cursor: str  # after which record it starts ("0-0": from the start)
    include_usage: bool


async def _stream(
    gw: Gateway,
    streamed: _Streamed,
    timeout_s: float,
    stop_on_leave: Owner | None = None,
    door_dropped: list[str] | None = None,
) -> Response:
    """The job's stream as server-sent events. Nothing is committed before its first
    record: a job that fails before any text answers with the status a request that does
    not stream would get (502, 400, 504), and the headers name the model that streams."""
    follower = await gw.hub.follow(streamed.job_id, streamed.cursor)
    try:
        first = await follower.next(timeout_s)
        if first is None:
            message = (
                f"job {streamed.job_id}: nothing streamed after {timeout_s:g} s; it goes on:"
                f" GET /v1/jobs/{streamed.job_id}"
            )
            raise APIError(504, message, code="timeout", extra={"job_id": streamed.job_id})
        result = None
        if first.end is not None:
            result = stored_result(first.end, streamed.job_id, streamed.task_class, streamed.source)
            if not result.ok:
                raise _failed(result)
    except BaseException:
        follower.close()
        raise
    heading = first.heading or {}
    headers = {
        "x-fleet-job-id": streamed.job_id,
        "x-fleet-model": heading.get("model") or (result.model if result else "") or "",
        "x-fleet-queue": heading.get("queue", ""),
        "cache-control": "no-cache",
        "x-accel-buffering": "no",  # a proxy in front passes each event on at once
    }
    if door_dropped:
        headers["x-fleet-dropped"] = ",".join(door_dropped)
    events = _events(gw, streamed, follower, first, timeout_s, stop_on_leave, headers)
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)


async def _events(
    gw: Gateway,
    streamed: _Streamed,
    follower: Follower,
    first: streams.Record,
    timeout_s: float,
    stop_on_leave: Owner | None,
    headers: dict[str, str],
) -> AsyncIterator[bytes]:
    job_id = streamed.job_id
    chunks = Chunks(job_id, headers["x-fleet-model"], streamed.include_usage)
    seen = ended = False
    record: streams.Record | None = first
    try:
        while record is not None:
            if record.delta is not None:
                seen = True
                yield chunks.delta(record.id, record.delta)
            elif record.error is not None:
                ended = True
                message = f"{record.error.get('message')}; the job goes on: GET /v1/jobs/{job_id}"
                yield error_event(record.id, message, str(record.error.get("kind")), job_id)
                return
            elif record.end is not None:
                ended = True
                result = stored_result(record.end, job_id, streamed.task_class, streamed.source)
                if result.ok:
                    cost = shapes.cost_of(result, current_catalog())
                    yield chunks.end(record.id, result, cost, seen)
                else:
                    error = result.error or "the job ended without an answer"
                    yield error_event(record.id, error, "job_failed", job_id)
                return
            record = await follower.next(timeout_s)
        ended = True  # (the client is still here: the job goes on, as the event says)
        message = f"nothing new for {timeout_s:g} s; the job goes on: GET /v1/jobs/{job_id}"
        yield error_event(None, message, "timeout", job_id)
    finally:
        follower.close()
        if not ended and stop_on_leave is not None:  # its client went away mid-stream
            task = asyncio.get_running_loop().create_task(_revoke(gw, job_id, stop_on_leave))
            gw.leaving.add(task)
            task.add_done_callback(gw.leaving.discard)


async def _revoke(gw: Gateway, job_id: str, owner: Owner) -> str:
    """Revoke the job: 'REVOKED' (no worker had it), 'REVOKING' (its worker stops it at
    its next step, or a streaming call at its next batch), or 'ENDED <status>'."""
    revoked = Result(
        job_id=job_id,
        task_class=owner.task_class,
        source=owner.source,
        ok=False,
        error=JobRevoked.MESSAGE,
        finished_at=time.time(),
    )
    state = gw.results.revoked_state(revoked)
    expires_s = gw.settings.result_expires_s
    answer: str = await gw.blocking(
        apps.revoke, gw.redis, job_id, state, expires_s, owner.app, owner.reservation
    )
    return answer


def _failed(result: Result) -> APIError:
    last = next((a for a in reversed(result.attempts) if a.outcome == "error"), None)
    extra = {
        "job_id": result.job_id,
        "attempts": [
            {"model": a.model, "outcome": a.outcome, "error_kind": a.error_kind, "error": a.error}
            for a in result.attempts
        ],
    }
    if last is not None and last.action == "fail":  # the provider refused the request itself
        return APIError(400, result.error or "bad request", code=last.error_kind, extra=extra)
    return APIError(
        502, result.error or "the job ended without an answer", code="upstream_failed", extra=extra
    )


async def models(request: Request) -> Response:
    await _gateway(request).key_of(request)
    return JSONResponse(shapes.model_list(current_catalog()))


async def create_job(request: Request) -> Response:
    gw = _gateway(request)
    key = await gw.key_of(request)
    body = await gw.body(request)
    try:
        job = shapes.fleet_job(body, key.app)
    except InvalidJob as exc:
        raise _invalid(exc) from None
    if (idem := _idempotency(request, key.app)) is not None:
        job = job.model_copy(update={"idempotency_key": idem})
    job = await gw.send(key, job, current_catalog())
    return JSONResponse(
        {"id": job.id, "object": "fleet.job", "status": "queued"},
        status_code=202,
        headers={"Location": f"/v1/jobs/{job.id}"},
    )


async def _owned(request: Request) -> tuple[Gateway, str, Owner]:
    """The job the path names, if the key's app sent it (else 404, as if there were none)."""
    gw = _gateway(request)
    key = await gw.key_of(request)
    job_id = request.path_params["job_id"]
    owner = apps.owner_of(await gw.waiter.client.get(keys.owner(job_id)))
    if owner is None or owner.app != key.app:
        raise APIError(404, f"no job {job_id!r} sent with this app's keys", code="job_not_found")
    return gw, job_id, owner


async def get_job(request: Request) -> Response:
    gw, job_id, owner = await _owned(request)
    meta = await gw.waiter.stored(job_id)
    status = (meta or {}).get("status") or "PENDING"
    body: dict[str, Any] = {"id": job_id, "object": "fleet.job", "status": status.lower()}
    if status in streams.FINAL_STATES:
        result = stored_result(meta or {}, job_id, owner.task_class, owner.source)
        body["result"] = result.summary()
    return JSONResponse(body)


async def job_stream(request: Request) -> Response:
    gw, job_id, owner = await _owned(request)
    cursor = request.headers.get("last-event-id") or request.query_params.get("after") or ""
    if cursor and not valid_cursor(cursor):
        raise APIError(
            400,
            f"Last-Event-ID {cursor[:40]!r} is not an event id of this stream"
            " (valid: an id it sent, like 1765000000000-0)",
            code="invalid_header",
        )
    streamed = _Streamed(job_id, owner.task_class, owner.source, cursor or streams.START, True)
    return await _stream(gw, streamed, gw.settings.timeout_s)


async def delete_job(request: Request) -> Response:
    gw, job_id, owner = await _owned(request)
    # Its final state if no worker has taken it yet (else a worker's next step writes it)
    answer = await _revoke(gw, job_id, owner)
    if answer == "REVOKING":  # a worker holds it: its next step ends it, a call finishes
        return JSONResponse(
            {"id": job_id, "object": "fleet.job", "status": "revoking"}, status_code=202
        )
    if answer != "REVOKED":
        ended = answer.removeprefix("ENDED ").lower()
        raise APIError(
            409, f"job {job_id} cannot be revoked: it has ended ({ended})", code="job_ended"
        )
    return JSONResponse({"id": job_id, "object": "fleet.job", "status": "revoked"})


async def metrics(request: Request) -> Response:
    """The fleet's Prometheus metrics (gateway/metrics.py), for an admin key."""
    from prometheus_client import CONTENT_TYPE_LATEST

    gw = _gateway(request)
    key = await gw.key_of(request)
    if not key.admin:
        raise APIError(
            403,
            "this key may not read the fleet's metrics: an admin key may"
            " (fleet keys create NAME --admin)",
            code="admin_only",
        )
    return Response(await gw.blocking(_exposition, gw.keys.ledger), media_type=CONTENT_TYPE_LATEST)


def _exposition(ledger: Ledger) -> bytes:
    from prometheus_client import CollectorRegistry, generate_latest

    from gateway.metrics import LedgerCollector, LiveStateCollector
    from workers.runtime.celery_app import get_app
    from workers.state.limits import FleetState

    catalog = current_catalog()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LiveStateCollector(get_app(), FleetState(redis_client(), catalog), catalog))
    registry.register(LedgerCollector(ledger, catalog))
    return generate_latest(registry)


async def _api_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return exc.response()


async def _unavailable(_request: Request, exc: Exception) -> Response:
    """The fleet's Redis or broker cannot be reached: 503, the request may be retried."""
    return APIError(
        503,
        f"the fleet's state is not reachable ({type(exc).__name__})",
        code="state_unavailable",
        headers={"Retry-After": "2"},
    ).response()


async def _http_error(_request: Request, exc: Exception) -> Response:
    status = int(getattr(exc, "status_code", 400))
    detail = str(getattr(exc, "detail", "")) or "not found"
    return APIError(status, detail, code="route_not_found" if status == 404 else None).response()


def create_app(settings: Settings | None = None, ledger: Ledger | None = None) -> Starlette:
    settings = settings or Settings.from_env()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        gateway = Gateway(settings, ledger or Ledger())
        gateway.keys.ledger.ensure_schema()  # a bad ledger URL is said at start
        app.state.gateway = gateway
        try:
            yield
        finally:
            await gateway.hub.close()
            await gateway.waiter.close()

    from starlette.exceptions import HTTPException

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/v1/jobs", create_job, methods=["POST"]),
            Route("/v1/jobs/{job_id}", get_job, methods=["GET"]),
            Route("/v1/jobs/{job_id}/stream", job_stream, methods=["GET"]),
            Route("/v1/jobs/{job_id}", delete_job, methods=["DELETE"]),
            *dashboard.routes(),  # /dashboard, its login and logout, /api/usage
        ],
        exception_handlers={
            APIError: _api_error,
            HTTPException: _http_error,
            RedisError: _unavailable,
        },
        lifespan=lifespan,
    )
