"""The gateway's batched send (gateway/sender.py): requests sent together are still each
admitted, refused or sent on their own, and what does not go leaves nothing behind."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest

from client.dispatch import current_catalog
from gateway.errors import APIError
from gateway.keys import AppKey
from gateway.sender import Sender
from router.jobs import Job
from router.policy import route_job
from tests.fixtures import url_of
from workers.state import keys
from workers.state.apps import AppLimits
from workers.state.limits import FleetState
from workers.state.live import forget_views

ASK = [{"role": "user", "content": "hello"}]


def app_key(app: str, **limits: Any) -> AppKey:
    return AppKey(f"k-{app}", app, AppLimits(**limits), None, datetime.now(UTC))


def queued(client: Any) -> int:
    return sum(int(client.llen(k)) for k in client.scan_iter("*") if client.type(k) == b"list")


async def blocking(fn: Any, *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args)


@pytest.fixture
def broker(fleet_env: dict[str, str], fresh_redis: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("FLEET_BROKER_URL", url_of(fresh_redis))
    monkeypatch.setenv("FLEET_CATALOG", fleet_env["FLEET_CATALOG"])
    monkeypatch.delenv("FLEET_STATE_URL", raising=False)
    return fresh_redis


def test_a_batch_sends_each_request_on_its_own_merits(broker: Any) -> None:
    # Given three requests reaching the send together: one fine, one over its key's
    # budget, one for a model that went down after the request was routed
    late_job = Job(task_class="user_facing", messages=ASK)
    catalog = current_catalog()
    for hop in route_job(catalog, late_job).chain:
        FleetState(broker, catalog).cool(hop.model, 3600, "test: down")
    forget_views()
    requests = [
        (app_key("fine"), Job(task_class="cost_free", messages=ASK), 0.0),
        (app_key("broke", usd_per_day=0.001), Job(task_class="user_facing", messages=ASK), 0.01),
        (app_key("late"), late_job, 0.01),
    ]
    sender = Sender(broker, blocking)

    async def all_at_once() -> list[Any]:
        sends = [sender.send(key, job, worst) for key, job, worst in requests]
        return await asyncio.gather(*sends, return_exceptions=True)

    fine, broke, late = asyncio.run(all_at_once())
    # Then the first is queued, the second refused for its budget, the third for its model
    assert isinstance(fine, Job) and fine.id == requests[0][1].id
    assert isinstance(broke, APIError) and broke.status == 429
    assert isinstance(late, APIError) and late.status == 503 and late.code == "no_usable_model"
    assert queued(broker) == 1
    # And the refused ones hold nothing: no owner, nothing set aside
    assert not broker.exists(keys.owner(requests[1][1].id))
    assert not broker.exists(keys.owner(requests[2][1].id))
    spent = list(broker.scan_iter("fleet:app:late:spend:*"))
    assert spent and all(float(broker.get(k) or 0) == 0 for k in spent)
