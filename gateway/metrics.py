"""The fleet's Prometheus metrics, read at scrape time from what the whole fleet shares:
the broker's queues, the live state on the state Redis, and the ledger's rollups
(workers/ledger/query.py). So each figure is counted once fleet-wide, whichever worker
did the work, and any process that can reach them (the gateway's `/metrics`, `fleet
dashboard`) serves the same numbers. The ledger's are counters: its totals since it began.

Labels are few and bounded: queue, model, tier, task class, state, scope; never a job
id, an app's key or a prompt.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from router.catalog import Catalog
from workers.ledger.query import Usage
from workers.ledger.store import Ledger
from workers.runtime.celery_app import queue_depths
from workers.state import deadletter
from workers.state.limits import FleetState

MODEL_STATES = ("ok", "no_key", "model_missing", "cooldown", "circuit_open")


class LiveStateCollector(Collector):
    """Queue depths, each model's state, budgets and subscription quota, dead letters."""

    def __init__(self, app: Any, state: FleetState, catalog: Catalog) -> None:
        self.app, self.state, self.catalog = app, state, catalog

    def collect(self) -> Iterator[Metric]:
        yield self._queues()
        yield from self._models()
        yield self._budgets()
        yield self._dead_letters()

    def _queues(self) -> Metric:
        depth = GaugeMetricFamily(
            "fleet_queue_depth",
            "Jobs waiting on a queue, every priority counted",
            labels=["queue"],
        )
        for queue, waiting in queue_depths(self.app).items():
            depth.add_metric([queue], waiting)
        return depth

    def _models(self) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            "fleet_model_state",
            "1 for the state each model is in now (ok; no_key: no live worker of its queue"
            " has its key, or a worker skipped it lately for want of it; model_missing: no"
            " live worker of its queue has the local model; cooldown; circuit_open)",
            labels=["model", "state"],
        )
        quota = GaugeMetricFamily(
            "fleet_quota_remaining",
            "What a model's limit window still allows (requests or tokens)",
            labels=["model", "window"],
        )
        for model in self.catalog.models:
            found = self.state.model_status(model.id)
            now = "ok"
            if found["unservable"]:
                now = found["unservable"]["kind"]
            elif found["circuit_open"]:
                now = "circuit_open"
            elif found["cooldown"]:
                now = "cooldown"
            elif found["no_key"]:
                now = "no_key"
            for name in MODEL_STATES:
                state.add_metric([model.id, name], 1.0 if name == now else 0.0)
            for window, figures in found["windows"].items():
                quota.add_metric([model.id, window], max(0, figures["limit"] - figures["used"]))
        yield state
        yield quota

    def _budgets(self) -> Metric:
        remaining = GaugeMetricFamily(
            "fleet_budget_remaining_usd",
            "What a budget of the policy still allows this UTC day or month",
            labels=["scope", "name", "period"],
        )
        for budget in self.state.budget_status():
            left = max(0.0, budget["cap_usd"] - budget["spent_usd"])
            remaining.add_metric([budget["scope"], budget["name"], budget["period"]], left)
        return remaining

    def _dead_letters(self) -> Metric:
        held = GaugeMetricFamily(
            "fleet_dead_letters", "Dead letters held per task class", labels=["task_class"]
        )
        for row in deadletter.summary(self.state.redis, self.catalog.policy.dead_letters):
            held.add_metric([row["task_class"]], row["held"])
        return held


class LedgerCollector(Collector):
    """Jobs, attempts, tokens, spend, escalations and the embedding cache's hits, from the
    ledger since it began.

    A job counts once, under its final attempt's queue and outcome (the query layer's
    definition); an attempt under its model, outcome and error kind."""

    def __init__(self, ledger: Ledger, catalog: Catalog) -> None:
        self.ledger, self.catalog = ledger, catalog

    def collect(self) -> Iterator[Metric]:
        usage = Usage(self.ledger, catalog=self.catalog)
        jobs = CounterMetricFamily(
            "fleet_jobs",
            "Jobs ended, by class and their final attempt's queue and outcome",
            labels=["task_class", "queue", "outcome"],
        )
        for row in usage.by("task_class", "queue", "outcome"):
            if row["jobs"]:
                jobs.add_metric([row["task_class"], row["queue"], row["outcome"]], row["jobs"])
        yield jobs
        attempts = CounterMetricFamily(
            "fleet_attempts",
            "Attempts by model, outcome (ok, error, skipped, orphaned) and error kind",
            labels=["model", "outcome", "error_kind"],
        )
        for row in usage.by("model", "outcome", "error_kind"):
            labels = [row["model"], row["outcome"], row["error_kind"] or ""]
            attempts.add_metric(labels, row["attempts"])
        yield attempts
        tokens = CounterMetricFamily(
            "fleet_tokens",
            "Tokens by model, tier and direction",
            labels=["model", "tier", "direction"],
        )
        spend = CounterMetricFamily(
            "fleet_spend_usd", "Spend in USD by model and tier", labels=["model", "tier"]
        )
        for row in usage.by("model", "tier"):
            tokens.add_metric([row["model"], row["tier"], "prompt"], row["prompt_tokens"])
            tokens.add_metric([row["model"], row["tier"], "completion"], row["completion_tokens"])
            spend.add_metric([row["model"], row["tier"]], row["cost_usd"])
        yield tokens
        yield spend
        saving = GaugeMetricFamily(
            "fleet_saving_usd",
            "What the ledger's tokens would have cost on the paid primary (embedding tokens"
            " on a paid embedding model), minus their cost",
        )
        saving.add_metric([], usage.totals()["saving_usd"])
        yield saving
        escalations = CounterMetricFamily(
            "fleet_escalations",
            "Jobs moved from one model to the next",
            labels=["from_model", "to_model"],
        )
        for row in usage.escalations(by=("from_model", "to_model")):
            escalations.add_metric([row["from_model"], row["to_model"]], row["escalations"])
        yield escalations
        yield from self._embedding_cache(usage)

    def _embedding_cache(self, usage: Usage) -> Iterator[Metric]:
        items = CounterMetricFamily(
            "fleet_embedding_items",
            "Inputs of embedding answers by model and source: the embedding cache (cache) or"
            " a call (model); the cache's hit rate is cache over both",
            labels=["model", "source"],
        )
        saved = CounterMetricFamily(
            "fleet_embedding_cache_tokens_saved",
            "Prompt tokens the embedding cache saved, by model",
            labels=["model"],
        )
        for row in usage.embedding_cache():
            items.add_metric([row["model"], "cache"], row["cached_items"])
            items.add_metric([row["model"], "model"], row["embedded_items"])
            saved.add_metric([row["model"]], row["cached_tokens"])
        yield items
        yield saved
