"""`fleet doctor`: whether each catalog model can serve from here, and what to do if not.

Per model: its key variable set (asked of the provider registry, which raises `no_key`
exactly as a worker would), its base URL reachable (a TCP connect, all providers at once,
within REACH_TIMEOUT_S), a local MLX model present (a path, or a hub id in the hub cache,
offline) and loadable (its config names an architecture mlx-lm has, its weights are
there). With `probe`, one tiny real call per model through its adapter instead (a local
model is loaded for it; an embedding model embeds PROBE_INPUT rather than answering a
chat), each recorded in the ledger as an attempt of one job,
`doctor-<hex>`, of task class "doctor". Then the fleet's services (broker, state Redis,
ledger database), the workers consuming each queue, and per task class whether its chain
keeps a usable model (routing with the unusable ones skipped, as dispatch does).

Every problem comes with its fix: the variable to set, the command that fetches a model,
the command that starts what is missing. A class with no usable model makes the report
not ok (`fleet doctor` exits 1); services and workers are reported but do not: a fleet
not started yet is no reason to fail a check of what it could serve.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from router.catalog import QUEUES, TASK_CLASSES, Catalog, Model
from router.errors import FleetError
from router.policy import RouteQuery, route
from router.results import Attempt
from workers.config import broker_from_up, fleet_urls
from workers.providers.base import (
    Caller,
    CompletionRequest,
    EmbeddingRequest,
    ProviderError,
    Target,
    calling_for,
)
from workers.providers.mlx_local import _looks_like_local_path, local_model_dir
from workers.providers.registry import ProviderRegistry

REACH_TIMEOUT_S = 2.0  # a TCP connect to each provider's base URL, all at once
SERVICE_TIMEOUT_S = 2.0  # broker, state Redis, ledger database
INSPECT_TIMEOUT_S = 1.0  # Celery's ping of the workers (as `fleet status`)
PROBE_TIMEOUT_S = 20.0  # one probe call at most (the provider's own timeout if shorter)
PROBE_THREADS = 8
PROBE_MESSAGES = [{"role": "user", "content": "Reply with OK."}]
PROBE_INPUT = ["ping"]  # what an embedding model's probe embeds
PROBE_TASK_CLASS = "doctor"  # the ledger's task_class of a probe call


def fetch_command(model_id: str) -> str:
    """The command that puts a catalog's local model in the hub cache."""
    return f"fleet models pull {model_id}"


@dataclass
class ModelCheck:
    model: str
    provider: str
    queue: str
    kind: str  # openai or mlx
    key: str | None = None  # the variable holding the key (None: none needed)
    key_set: bool | None = None
    base_url: str | None = None
    reachable: bool | None = None
    local: str | None = None  # where the local model is (a directory), when found
    loadable: bool | None = None
    probe: dict[str, Any] | None = None  # outcome, error_kind, latency_ms of the probe call
    problems: list[dict[str, str]] = field(default_factory=list)  # {problem, fix}

    @property
    def usable(self) -> bool:
        return not self.problems

    def fail(self, problem: str, fix: str) -> None:
        self.problems.append({"problem": problem, "fix": fix})

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "usable": self.usable}


# --- models ----------------------------------------------------------------------------


def check_models(
    catalog: Catalog,
    environ: Mapping[str, str],
    *,
    probe: bool = False,
    ledger: Any = None,
    job_id: str | None = None,
) -> list[ModelCheck]:
    """Every catalog model's checks; with `probe`, one call each as attempts of `job_id`."""
    registry = ProviderRegistry(catalog, PROBE_THREADS, environ)
    try:
        checks = [_static_check(catalog, registry, m, environ) for m in catalog.models]
        _check_reach(catalog, checks, environ)
        if probe:
            _probe(catalog, registry, checks, ledger, job_id or probe_job_id())
        return checks
    finally:
        registry.close()


def _static_check(
    catalog: Catalog, registry: ProviderRegistry, model: Model, environ: Mapping[str, str]
) -> ModelCheck:
    provider = catalog.providers[model.provider]
    check = ModelCheck(model.id, model.provider, model.queue, provider.kind)
    if provider.kind == "mlx":
        _check_local(check, model.upstream, environ)
        return check
    check.key = provider.api_key_env
    check.base_url = provider.resolved_base_url(environ)
    try:
        registry(model.id)  # the worker's own lookup: no_key when the variable is unset
        check.key_set = True if check.key else None
    except ProviderError as exc:
        check.key_set = False
        if exc.kind == "no_key":
            check.fail(f"no key: {check.key} is not set", f"export {check.key}=<your key>")
        else:
            check.fail(f"{exc.kind}: {exc.message}", "see the catalog's provider entry")
    return check


def _check_local(check: ModelCheck, upstream: str, environ: Mapping[str, str]) -> None:
    path = local_model_dir(upstream, environ)  # as a worker announces it (runtime/serving.py)
    if path is None:
        if _looks_like_local_path(upstream):
            where = Path(upstream).expanduser()
            check.fail(
                f"no MLX model at {where}", "put an MLX model there, or point upstream at one"
            )
        else:
            check.fail(f"{upstream} is not in the hub cache", fetch_command(check.model))
        return
    check.local = str(path)
    problem = unloadable(path)
    check.loadable = problem is None
    if problem is not None:
        fix = "fetch it again: " + fetch_command(check.model) if path != Path(upstream) else ""
        check.fail(problem, fix or "replace the model at that path")


def unloadable(path: Path) -> str | None:
    """Why mlx-lm could not load the model at `path`, short of loading it: its config,
    an architecture mlx-lm knows, its weights. None when nothing is in the way."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        return f"unreadable config.json at {path}: {type(exc).__name__}"
    if not any(path.glob("model*.safetensors")):
        return f"no weights (model*.safetensors) at {path}"
    try:
        from mlx_lm.utils import _get_classes
    except ImportError:
        return "mlx-lm is not installed (pip install 'modelfleet[local]')"
    try:
        _get_classes(config)
    except (KeyError, ValueError) as exc:
        return f"mlx-lm cannot load it: {exc}"
    return None


def _check_reach(catalog: Catalog, checks: list[ModelCheck], environ: Mapping[str, str]) -> None:
    """A TCP connect to every base URL in use, all at once: REACH_TIMEOUT_S at most."""
    urls = sorted({c.base_url for c in checks if c.base_url})
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(urls)))) as pool:
        futures = {url: pool.submit(_connect, url) for url in urls}
        wait(futures.values(), timeout=REACH_TIMEOUT_S + 1)
        problems = {
            url: (f.result() if f.done() else "no answer to a TCP connect")
            for url, f in futures.items()
        }
    for check in checks:
        if not check.base_url:
            continue
        problem = problems[check.base_url]
        check.reachable = problem is None
        if problem is not None:
            provider = catalog.providers[check.provider]
            var = provider.base_url_env
            fix = f"set {var} to a reachable server" if var else "start that server"
            check.fail(f"unreachable: {check.base_url}: {problem}", fix)


def _connect(url: str) -> str | None:
    parts = urlsplit(url)
    if not parts.hostname:
        return "not a URL"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=REACH_TIMEOUT_S):
            return None
    except OSError as exc:
        return (str(exc) or type(exc).__name__).splitlines()[0]


def _probe(
    catalog: Catalog,
    registry: ProviderRegistry,
    checks: list[ModelCheck],
    ledger: Any,
    job_id: str,
) -> None:
    """One tiny real call per model that passed its checks, each recorded in the ledger."""
    worker = f"doctor@{socket.gethostname()}"
    ready = [(n, c) for n, c in enumerate(checks, 1) if c.usable]
    with ThreadPoolExecutor(max_workers=PROBE_THREADS) as pool:
        attempts = list(
            pool.map(lambda nc: _probe_one(catalog, registry, job_id, worker, *nc), ready)
        )
    if ledger is not None and attempts:
        from workers.ledger.rows import attempt_row

        job = {"id": job_id, "task_class": PROBE_TASK_CLASS, "source": "app"}
        ledger.record([attempt_row(a, job, catalog) for a in attempts])


def probe_job_id() -> str:
    return f"doctor-{uuid.uuid4().hex[:12]}"


def _probe_one(
    catalog: Catalog,
    registry: ProviderRegistry,
    job_id: str,
    worker: str,
    number: int,
    check: ModelCheck,
) -> Attempt:
    model = catalog.model(check.model)
    target = registry(model.id)
    started = time.time()
    fields: dict[str, Any] = {"outcome": "ok"}
    try:
        with calling_for(Caller(job_id, message=1, delivery=number, process=worker)):
            fields.update(_probe_call(target, model.supports("embedding")))
    except ProviderError as exc:
        fields.update(outcome="error", error_kind=exc.kind, error=exc.message[:300])
        check.fail(f"probe call failed: {exc.kind}: {exc.message[:200]}", _probe_fix(exc, check))
    latency_ms = (time.time() - started) * 1000
    if check.kind == "mlx":
        check.loadable = fields["outcome"] == "ok" or fields.get("error_kind") != "not_found"
    check.probe = {
        "outcome": fields["outcome"],
        "error_kind": fields.get("error_kind"),
        "latency_ms": round(latency_ms, 1),
    }
    return Attempt(
        number=number,
        model=model.id,
        queue=model.queue,
        tier=model.tier,
        latency_ms=latency_ms,
        worker=worker,
        started_at=started,
        **fields,
    )


def _probe_call(target: Target, embeds: bool) -> dict[str, Any]:
    """One tiny call of the model (a chat of one token, or one short text embedded): the
    attempt's usage fields."""
    timeout_s = min(target.timeout_s, PROBE_TIMEOUT_S)
    if embeds:
        request = EmbeddingRequest(model=target.upstream, input=PROBE_INPUT, timeout_s=timeout_s)
        vectors = target.provider.embed(request)
        return {
            "prompt_tokens": vectors.prompt_tokens,
            "completion_tokens": 0,
            "tokens_estimated": vectors.tokens_estimated,
            "provider_cost_usd": vectors.provider_cost_usd,
            "items": len(PROBE_INPUT),
        }
    chat = CompletionRequest(
        model=target.upstream, messages=PROBE_MESSAGES, max_tokens=1, timeout_s=timeout_s
    )
    completion = target.provider.complete(chat)
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "tokens_estimated": completion.tokens_estimated,
        "provider_cost_usd": completion.provider_cost_usd,
    }


def _probe_fix(exc: ProviderError, check: ModelCheck) -> str:
    if exc.kind == "auth":
        return f"check the key in {check.key}"
    if exc.kind == "not_found":
        return "check the model's upstream name in the catalog"
    return "try again later; `fleet status` shows its cooldowns"


# --- services and workers --------------------------------------------------------------


def check_services(environ: Mapping[str, str]) -> list[dict[str, Any]]:
    """The broker, the state Redis and the ledger database: reachable or not, with a fix."""
    from workers.ledger.store import default_url, redacted

    out: list[dict[str, Any]] = []
    try:
        broker, state = fleet_urls(environ)
    except FleetError as exc:
        bad = {"ok": False, "problem": str(exc), "fix": "set FLEET_STATE_URL to a Redis URL"}
        return [{"service": "broker", "url": "?", **bad}, {"service": "state", "url": "?", **bad}]
    start = "start the fleet (fleet up), or set FLEET_BROKER_URL"
    out.append(_service("broker", redacted(broker), _reach_broker(broker), start))
    state_fix = "start the fleet (fleet up), or set FLEET_STATE_URL"
    out.append(_service("state", redacted(state), _reach_redis(state), state_fix))
    ledger = default_url(environ)
    out.append(
        _service("ledger", redacted(ledger), _reach_ledger(ledger, environ), "set FLEET_LEDGER_URL")
    )
    return out


def _service(name: str, url: str, problem: str | None, fix: str) -> dict[str, Any]:
    return {
        "service": name,
        "url": url,
        "ok": problem is None,
        "problem": problem,
        "fix": fix if problem else None,
    }


def _reach_redis(url: str) -> str | None:
    import redis

    client = redis.Redis.from_url(
        url, socket_connect_timeout=SERVICE_TIMEOUT_S, socket_timeout=SERVICE_TIMEOUT_S
    )
    try:
        client.ping()
        return None
    except redis.RedisError as exc:
        return _line(exc)
    finally:
        client.close()


def _reach_broker(url: str) -> str | None:
    if url.startswith(("redis://", "rediss://", "redis+socket://")):
        return _reach_redis(url)
    from kombu.connection import Connection

    try:
        with Connection(url, connect_timeout=SERVICE_TIMEOUT_S) as conn:  # type: ignore[no-untyped-call]
            conn.ensure_connection(max_retries=1, timeout=SERVICE_TIMEOUT_S)
        return None
    except Exception as exc:  # whatever the transport's library raises
        return _line(exc)


def _reach_ledger(url: str, environ: Mapping[str, str]) -> str | None:
    """Whether the ledger's database answers. A SQLite file not made yet is fine while its
    directory can be made: the first recorded job creates it."""
    from sqlalchemy import text
    from sqlalchemy.exc import SQLAlchemyError

    from workers.ledger.store import Ledger

    try:
        ledger = Ledger(url, redis_url=None, environ=environ)
    except FleetError as exc:
        return str(exc)
    try:
        path = ledger._sqlite_path()
        if path is not None and not path.exists():
            parent = next(p for p in path.parents if p.exists())
            return None if os.access(parent, os.W_OK) else f"{parent} is not writable"
        with ledger.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return None
    except SQLAlchemyError as exc:
        return _line(exc)
    finally:
        ledger.close()


def check_queues(environ: Mapping[str, str], broker_ok: bool) -> list[dict[str, Any]]:
    """Per queue, the live workers consuming it (Celery's inspect, as `fleet status`)."""
    if not broker_ok:
        workers: dict[str, list[str]] = {q: [] for q in QUEUES}
    else:
        from workers.runtime.celery_app import get_app

        app = get_app(environ)
        replies = app.control.inspect(timeout=INSPECT_TIMEOUT_S).active_queues() or {}
        workers = {q: [] for q in QUEUES}
        for worker, queues in sorted(replies.items()):
            for queue in queues:
                workers.setdefault(queue["name"], []).append(worker)
    return [
        {
            "queue": q,
            "workers": workers[q],
            "ok": bool(workers[q]),
            "fix": None if workers[q] else f"fleet up, or fleet worker {q}",
        }
        for q in QUEUES
    ]


def _line(exc: BaseException) -> str:
    inner = getattr(exc, "orig", None) or exc
    first = (str(inner).strip().splitlines() or [""])[0]
    return f"{type(inner).__name__}: {first[:200]}" if first else type(inner).__name__


# --- task classes and the whole report ---------------------------------------------------


def check_classes(catalog: Catalog, checks: list[ModelCheck]) -> list[dict[str, Any]]:
    """Per task class: the models its route keeps once the unusable ones are skipped."""
    skip = {c.model: c.problems[0]["problem"] for c in checks if not c.usable}
    out = []
    for task_class in TASK_CLASSES:
        try:
            kept = [hop.model for hop in route(catalog, RouteQuery(task_class), skip).chain]
        except FleetError:
            kept = []
        chain = catalog.policy.chains[task_class]  # type: ignore[index]
        # each unusable model's first fix (a key, a model to fetch) is the one that matters
        by_id = {c.model: c for c in checks}
        fixes = [] if kept else [by_id[m].problems[0]["fix"] for m in chain if by_id[m].problems]
        out.append(
            {
                "task_class": task_class,
                "usable": bool(kept),
                "models": kept,
                "fixes": list(dict.fromkeys(fixes)),
            }
        )
    return out


def diagnose(
    catalog: Catalog,
    environ: Mapping[str, str] = os.environ,
    *,
    probe: bool = False,
    ledger: Any = None,
) -> dict[str, Any]:
    """The whole report: models, services, queues, classes; `ok` when every task class
    keeps a usable model."""
    environ = {**environ, **broker_from_up(environ)}
    job_id = probe_job_id() if probe else None
    checks = check_models(catalog, environ, probe=probe, ledger=ledger, job_id=job_id)
    services = check_services(environ)
    broker_ok = services[0]["service"] == "broker" and services[0]["ok"]
    queues = check_queues(environ, broker_ok)
    classes = check_classes(catalog, checks)
    return {
        "ok": all(c["usable"] for c in classes),
        "probe": probe,
        "probe_job": job_id,  # the ledger's job id of the probe calls
        "models": [c.as_dict() for c in checks],
        "services": services,
        "queues": queues,
        "classes": classes,
    }


def summary(report: dict[str, Any]) -> list[str]:
    """One or two lines for `fleet up`'s banner."""
    classes, models = report["classes"], report["models"]
    usable = sum(c["usable"] for c in classes)
    serving = sum(m["usable"] for m in models)
    first = (
        f"doctor: {usable} of {len(classes)} task classes usable,"
        f" {serving} of {len(models)} models can serve"
    )
    unserved = [q["queue"] for q in report["queues"] if not q["ok"]]
    down = [s["service"] for s in report["services"] if not s["ok"]]
    if unserved:
        first += f"; no worker on {', '.join(unserved)}"
    if down:
        first += f"; unreachable: {', '.join(down)}"
    if serving == len(models) and not unserved and not down:
        return [first]
    no_key = sorted({m["key"] for m in models if m["key_set"] is False})
    missing = [m["model"] for m in models if m["kind"] == "mlx" and not m["usable"]]
    parts = []
    if no_key:
        parts.append(f"keys not set: {', '.join(no_key)}")
    if missing:
        parts.append(f"local models missing: {len(missing)}")
    parts.append("`fleet doctor` says how to fix each")
    return [first, "  " + "; ".join(parts)]
