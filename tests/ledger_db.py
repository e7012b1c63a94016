"""Helpers of the ledger tests: the real databases (a SQLite file, a fresh PostgreSQL schema),
rows built the way the task builds them, and a writer process for the concurrency test."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import yaml

from router.catalog import Catalog, catalog_path
from router.results import Attempt, Result
from workers.ledger.rows import rows_for
from workers.ledger.store import Ledger

# The machine's PostgreSQL, which the suite requires; override with FLEET_TEST_PG_URL.
PG_URL = os.environ.get("FLEET_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
DATABASES = ("sqlite", "postgresql")

_catalog: list[Catalog] = []
# A paid embedding model of the tests' own (the catalog's are local or free): the cache's
# saving in dollars is nothing on those. A paid model needs both prices.
PAID_EMBEDDER = "openrouter/openai/text-embedding-3-small"
PAID_EMBEDDER_USD_PER_MTOK = 0.02


def catalog() -> Catalog:
    """The default catalog, with PAID_EMBEDDER (in no chain: jobs name it)."""
    if not _catalog:
        data = yaml.safe_load(catalog_path().read_text(encoding="utf-8"))
        price = PAID_EMBEDDER_USD_PER_MTOK
        data["models"].append(
            {
                "id": PAID_EMBEDDER,
                "upstream": "openai/text-embedding-3-small",
                "queue": "free",
                "tier": "paid",
                "context_window": 8192,
                "capabilities": ["embedding"],
                "usd_per_mtok_in": price,
                "usd_per_mtok_out": price,
            }
        )
        _catalog.append(Catalog.model_validate(data))
    return _catalog[0]


def pg_admin() -> Any:
    """A SQLAlchemy engine on the test database; the test fails when it is unreachable."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import DBAPIError, SQLAlchemyError

    from workers.ledger.store import database_url

    engine = create_engine(database_url(PG_URL), connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        engine.dispose()
        cause = exc.orig if isinstance(exc, DBAPIError) else None  # the driver's own error
        why = str(cause or exc).splitlines()[0]
        pytest.fail(
            f"PostgreSQL not reachable at {PG_URL} ({why}): the ledger tests need it; start"
            " it, or point FLEET_TEST_PG_URL at a database this user may create schemas in",
            pytrace=False,
        )
    return engine


@contextmanager
def database(kind: str, tmp_path: Path) -> Iterator[str]:
    """A ledger URL on an empty database: a SQLite file, or a fresh PostgreSQL schema
    (dropped afterwards) reached through the URL's search_path."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
        return
    from sqlalchemy import text

    engine = pg_admin()
    schema = f"ledger_test_{uuid.uuid4().hex[:12]}"
    with engine.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{PG_URL}?options={quote(f'-csearch_path={schema}')}"
    finally:
        with engine.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()


def attempt(number: int, model: str, **fields: Any) -> Attempt:
    model_ = catalog().model(model)
    base: dict[str, Any] = {
        "outcome": "ok",
        "started_at": time.time() - 60,
        "latency_ms": 250.0,
        "worker": "test@host",
    }
    return Attempt(
        number=number, model=model, queue=model_.queue, tier=model_.tier, **{**base, **fields}
    )


def result(job_id: str, attempts: list[Attempt], **fields: Any) -> Result:
    base: dict[str, Any] = {"task_class": "user_facing", "source": "app", "ok": True}
    return Result(job_id=job_id, attempts=attempts, **{**base, **fields})


def rows(job_id: str, attempts: list[Attempt], job: dict | None = None, **fields: Any) -> list:
    return rows_for(result(job_id, attempts, **fields), job or {}, catalog())


def embedding_attempt(
    number: int, model: str, embedded: int, cached: int, tokens_per_item: int = 10, **fields: Any
) -> Attempt:
    """An embedding job's attempt that embedded `embedded` inputs by its call and took
    `cached` from the cache (each input `tokens_per_item` prompt tokens); an answer unless
    `fields` say otherwise."""
    return attempt(
        number,
        model,
        items=embedded,
        cached_items=cached,
        prompt_tokens=embedded * tokens_per_item,
        cached_tokens=cached * tokens_per_item,
        **fields,
    )


def embedding_rows(app: str = "search", prefix: str = "") -> list[dict[str, Any]]:
    """Embedding jobs of `app` (ids `prefix` + a name): a full hit, a partial hit and a
    miss on local models, one that failed on a local model after the cache answered part
    of it and was answered on PAID_EMBEDDER, and a chat job. Their answers: 10 inputs
    embedded, 15 from the cache (14 on local/qwen3-embedding, 1 on the paid model),
    100,140 prompt tokens saved."""
    local = "local/qwen3-embedding"

    def job(name: str, tries: list[Attempt], task_class: str = "embedding") -> list:
        return rows(prefix + name, tries, {"app": app}, task_class=task_class)

    failed = embedding_attempt(1, local, 0, 4, outcome="error", error_kind="server_error")
    chat = attempt(1, "litellm/kimi", prompt_tokens=1_000, completion_tokens=100)
    return [
        *job("hit", [embedding_attempt(1, local, 0, 8)]),  # 8 inputs from the cache
        *job("part", [embedding_attempt(1, local, 2, 6)]),
        *job("miss", [embedding_attempt(1, "ollama/nomic-embed-text", 5, 0)]),
        # 100,000 tokens an input on the paid model: 3 embedded, 1 from the cache
        *job("paid", [failed, embedding_attempt(2, PAID_EMBEDDER, 3, 1, 100_000)]),
        *job("chat", [chat], "user_facing"),
    ]


def simple_rows(job_id: str, n: int = 3) -> list[dict[str, Any]]:
    """`n` attempts of one job: free failures, then a paid answer."""
    free = "openrouter/meta-llama/llama-3.1-405b-instruct:free"
    tries = [attempt(i, free, outcome="error", error_kind="server_error") for i in range(1, n)]
    tries.append(attempt(n, "litellm/kimi", prompt_tokens=100 * n, completion_tokens=10 * n))
    return rows(job_id, tries)


def write_concurrently(
    url: str, spool_dir: str, proc: int, threads: int, batches: int, start_at: float, out: Any
) -> None:
    """A writer process: `threads` threads each record `batches` jobs, all starting at
    `start_at`; puts (proc, rows written, spooled entries, warnings logged) on `out`."""
    import logging

    warnings: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            warnings.append(record.getMessage())

    logging.getLogger("workers.ledger.store").addHandler(Catch(logging.WARNING))
    ledger = Ledger(url, redis_url=None, spool_dir=spool_dir)
    prepared = [[simple_rows(f"p{proc}-t{t}-b{b}") for b in range(batches)] for t in range(threads)]

    def run(jobs: list[list[dict[str, Any]]]) -> None:
        time.sleep(max(0.0, start_at - time.time()))
        for job_rows in jobs:
            ledger.record(job_rows)

    pool = [threading.Thread(target=run, args=(jobs,)) for jobs in prepared]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    written = sum(len(r) for jobs in prepared for r in jobs)
    out.put((proc, written, ledger.pending(), warnings))
    ledger.close()
