"""The fleet's Prometheus metrics (gateway/metrics.py), scraped as Prometheus does and
read back with prometheus_client's own parser, against a real redis-server holding the
fleet's queues and live state."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import LiveStateCollector
from tests.fixtures import url_of
from workers.state import keys
from workers.state.limits import FleetState


def scrape(collector: Any) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Each family's samples, by their labels, from the text Prometheus would read."""
    text = generate_latest(registry_of(collector)).decode()
    return {
        family.name: {tuple(sorted(s.labels.items())): s.value for s in family.samples}
        for family in text_string_to_metric_families(text)
    }


def test_live_state_metrics_count_queues_models_budgets_and_dead_letters(
    fresh_redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from client import dispatch_many
    from client.dispatch import current_catalog
    from workers.runtime.celery_app import create_app

    monkeypatch.setenv("FLEET_BROKER_URL", url_of(fresh_redis))
    catalog = current_catalog()
    app = create_app({"FLEET_BROKER_URL": url_of(fresh_redis)})
    state = FleetState(fresh_redis, catalog)
    # Given jobs waiting on the free queue at three priorities, a model cooling down, one
    # whose circuit is open, spend against the paid tier's budget, and a dead letter
    job = {"task_class": "cost_free", "messages": [{"role": "user", "content": "x"}]}
    dispatch_many([{**job, "priority": p} for p in (0, 5, 9, 9)], app=app)
    cooling, broken = catalog.models[0].id, catalog.models[1].id
    state.cool(cooling, 60, "test")
    fresh_redis.set(keys.circuit_open(broken), "1", ex=60)
    budget = next(b for b in state.budget_status() if b["period"] == "day")
    state.redis.incrbyfloat(keys.spend(budget["scope"], budget["name"], "day", _today()), 1.25)
    fresh_redis.zadd(keys.dead_letter_index("creative"), {"job-1": 1.0})
    # When the metrics are scraped
    found = scrape(LiveStateCollector(app, state, catalog))
    # Then each is there, with few labels and the figures the state holds
    assert found["fleet_queue_depth"][(("queue", "free"),)] == 4
    assert found["fleet_queue_depth"][(("queue", "local"),)] == 0
    states = found["fleet_model_state"]
    assert states[(("model", cooling), ("state", "cooldown"))] == 1
    assert states[(("model", cooling), ("state", "ok"))] == 0
    assert states[(("model", broken), ("state", "circuit_open"))] == 1
    assert sum(states.values()) == len(catalog.models)  # one state each
    left = found["fleet_budget_remaining_usd"]
    key = (("name", budget["name"]), ("period", "day"), ("scope", budget["scope"]))
    assert left[key] == pytest.approx(budget["cap_usd"] - 1.25)
    assert found["fleet_dead_letters"][(("task_class", "creative"),)] == 1
    # No label carries a job id
    assert not any("job" in name for f in found.values() for k in f for name, _ in k)


def _today() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).strftime("%Y-%m-%d")


def test_ledger_metrics_sum_to_the_ledgers_rows(tmp_path: Any) -> None:
    from collections import Counter

    from client.dispatch import current_catalog
    from gateway.metrics import LedgerCollector
    from tests.test_rollup import generated
    from workers.ledger.store import Ledger

    # Given a ledger of generated jobs (escalations, orphans, duplicates delivered twice)
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}", redis_url=None, spool_dir=tmp_path)
    rows, batches = generated(11, jobs=200)
    for batch in batches:
        ledger.insert(batch)
    # When its metrics are scraped
    found = scrape(LedgerCollector(ledger, current_catalog()))
    ledger.close()
    # Then spend, tokens, attempts and jobs are the rows' own sums
    unique = {(r["job_id"], r["attempt"]): r for r in rows}.values()
    assert sum(found["fleet_spend_usd"].values()) == pytest.approx(
        sum(r["cost_usd"] for r in unique), abs=1e-6
    )
    tokens = found["fleet_tokens"]
    assert sum(v for k, v in tokens.items() if ("direction", "prompt") in k) == sum(
        r["prompt_tokens"] for r in unique
    )
    assert sum(found["fleet_attempts"].values()) == len(unique)
    assert sum(found["fleet_jobs"].values()) == len({r["job_id"] for r in unique})
    by_outcome: Counter[str] = Counter()
    for labels, value in found["fleet_attempts"].items():
        by_outcome[dict(labels)["outcome"]] += int(value)
    assert by_outcome == Counter(r["outcome"] for r in unique)
    assert "fleet_escalations" in found and "fleet_saving_usd" in found
    # And the embedding cache's counters are the answers' inputs and tokens saved
    answers = [r for r in unique if r["outcome"] == "ok"]
    items = found["fleet_embedding_items"]
    for source, column in (("cache", "cached_items"), ("model", "items")):
        counted = sum(v for k, v in items.items() if ("source", source) in k)
        assert counted == sum(r[column] for r in answers) > 0, source
    saved = sum(found["fleet_embedding_cache_tokens_saved"].values())
    assert saved == sum(r["cached_tokens"] for r in answers) > 0


def test_embedding_cache_metrics_per_model(tmp_path: Any) -> None:
    from client.dispatch import current_catalog
    from gateway.metrics import LedgerCollector
    from tests.ledger_db import PAID_EMBEDDER, embedding_rows
    from workers.ledger.store import Ledger

    # Given full, partial and no cache hits, a failed attempt's hits, and a chat job
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}", redis_url=None, spool_dir=tmp_path)
    ledger.insert(embedding_rows())
    # When the metrics are scraped
    collector = LedgerCollector(ledger, current_catalog())
    found = scrape(collector)
    text = generate_latest(registry_of(collector)).decode()
    ledger.close()
    # Then each embedding model has its inputs by source and its tokens saved; a chat
    # model none
    items = {tuple(v for _, v in k): n for k, n in found["fleet_embedding_items"].items()}
    assert items == {
        ("local/qwen3-embedding", "cache"): 14,  # the failed attempt's 4 answered nothing
        ("local/qwen3-embedding", "model"): 2,
        ("ollama/nomic-embed-text", "cache"): 0,
        ("ollama/nomic-embed-text", "model"): 5,
        (PAID_EMBEDDER, "cache"): 1,
        (PAID_EMBEDDER, "model"): 3,
    }
    saved = {dict(k)["model"]: n for k, n in found["fleet_embedding_cache_tokens_saved"].items()}
    assert saved == {"local/qwen3-embedding": 140, "ollama/nomic-embed-text": 0, PAID_EMBEDDER: 1e5}
    # Counters, in Prometheus' names, with no job id among their labels
    assert "job_id" not in text
    assert "fleet_embedding_items_total{" in text
    assert "fleet_embedding_cache_tokens_saved_total{" in text


def registry_of(collector: Any) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(collector)
    return registry


def test_a_model_a_worker_skipped_for_want_of_its_key_shows_no_key(
    fresh_redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from client.dispatch import current_catalog
    from workers.providers.base import ModelUnusable, Target
    from workers.runtime.celery_app import create_app
    from workers.runtime.step import Forward, advance

    monkeypatch.setenv("FLEET_BROKER_URL", url_of(fresh_redis))
    catalog = current_catalog()
    state = FleetState(fresh_redis, catalog)

    def no_keys_here(model: str) -> Target:
        raise ModelUnusable("no_key", f"{model}: its key variable is unset on this worker")

    # Given a worker without keys taking a job of a class whose chain starts on its queue
    job = {"id": "k1", "task_class": "cost_free", "messages": [{"role": "user", "content": "x"}]}
    step = advance(
        catalog, job, None, here="free", providers=no_keys_here, gate=state, worker="keyless@host"
    )
    attempts = step.state.attempts if isinstance(step, Forward) else step.result.attempts
    skipped = [a for a in attempts if a.outcome == "skipped"]
    first = skipped[0].model if skipped else None
    assert first is not None and skipped[0].error_kind == "no_key"
    # Then the fleet's live state says which worker lacks it, where it said "ok"
    assert state.model_status(first)["no_key"] == "keyless@host"
    found = scrape(
        LiveStateCollector(create_app({"FLEET_BROKER_URL": url_of(fresh_redis)}), state, catalog)
    )
    assert found["fleet_model_state"][(("model", first), ("state", "no_key"))] == 1
    assert found["fleet_model_state"][(("model", first), ("state", "ok"))] == 0
