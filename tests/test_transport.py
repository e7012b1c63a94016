"""The fleet's broker transport (workers/runtime/transport.py): a job message is filed when
it is published, so a worker that pops it and dies before recording the delivery loses
nothing, where kombu's stock channel loses the message."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from client import dispatch
from tests.fixtures import url_of
from workers.ops.pools import worker_argv
from workers.ops.supervisor import Supervisor
from workers.runtime.celery_app import create_app
from workers.state import keys

JOB = {"task_class": "cost_free", "messages": [{"role": "user", "content": "hello"}]}
VISIBILITY_S = 3


def job_lists(client: Any) -> list[bytes]:
    return [k for k in client.scan_iter("free*") if client.type(k) == b"list"]


def queued(client: Any) -> int:
    return sum(int(client.llen(k)) for k in job_lists(client))


@pytest.fixture
def broker(
    fleet_env: dict[str, str], fresh_redis: Any, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, Any]]:
    """A Redis database of this test's own, which the test process dispatches to."""
    url = url_of(fresh_redis)
    monkeypatch.setenv("FLEET_BROKER_URL", url)
    monkeypatch.setenv("FLEET_CATALOG", fleet_env["FLEET_CATALOG"])
    monkeypatch.setenv("FLEET_VISIBILITY_TIMEOUT_S", str(VISIBILITY_S))
    monkeypatch.delenv("FLEET_STATE_URL", raising=False)
    yield url, fresh_redis


def start_worker(fleet_env: dict[str, str], url: str, tmp_path: Path, transport: str) -> Supervisor:
    env = {
        **fleet_env,
        "FLEET_BROKER_URL": url,
        "FLEET_VISIBILITY_TIMEOUT_S": str(VISIBILITY_S),
        "FLEET_BROKER_TRANSPORT": transport,
    }
    env.pop("FLEET_STATE_URL", None)
    sup = Supervisor(tmp_path / f"logs-{transport}", env)
    sup.start(
        "free",
        worker_argv(["free"], concurrency=2, name=f"transport-{transport}"),
        ready_marker=" ready.",
    )
    sup.wait_ready(60)
    return sup


def forgotten(client: Any, timeout_s: float = 5) -> bool:
    """Whether the message store empties (the ack comes just after the stored result)."""
    deadline = time.monotonic() + timeout_s
    while client.hlen(keys.BROKER_MESSAGES) or client.zcard(keys.BROKER_INDEX):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.parametrize("transport", ["fleet", "kombu"])
def test_a_message_popped_by_a_worker_that_died_at_once(
    transport: str,
    broker: tuple[str, Any],
    fleet_env: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, client = broker
    monkeypatch.setenv("FLEET_BROKER_TRANSPORT", transport)
    # Given a job sent while no worker runs
    handle = dispatch(JOB)
    assert queued(client) == 1
    # When a worker pops it, as its BRPOP does, and dies before recording the delivery
    popped = client.brpop(job_lists(client), timeout=1)
    assert popped is not None and queued(client) == 0
    sup = start_worker(fleet_env, url, tmp_path, transport)
    try:
        if transport == "fleet":
            # Then the fleet's transport had filed it at publish: the visibility sweep
            # puts it back, a worker answers it, and its ack forgets it
            assert handle.get(timeout=VISIBILITY_S * 10).ok
            assert forgotten(client)
        else:
            # Then kombu's stock channel has no trace of it: the job never ends
            with pytest.raises(TimeoutError):
                handle.get(timeout=VISIBILITY_S * 4)
            assert queued(client) == 0 and client.hlen("unacked") == 0
    finally:
        sup.stop(20)


def sweep(url: str) -> None:
    """One visibility sweep, as a worker's event loop runs it."""
    app = create_app({"FLEET_BROKER_URL": url, "FLEET_VISIBILITY_TIMEOUT_S": str(VISIBILITY_S)})
    with app.connection() as conn:
        conn.default_channel.qos.restore_visible(interval=1)


def age_every_message(client: Any, seconds: float) -> None:
    for tag in client.zrange(keys.BROKER_INDEX, 0, -1):
        client.zadd(keys.BROKER_INDEX, {tag: time.time() - seconds})


def test_a_backlog_waiting_past_the_visibility_timeout_is_not_doubled(
    broker: tuple[str, Any],
) -> None:
    url, client = broker
    # Given three jobs waiting in their list for longer than the visibility timeout
    handles = [dispatch(JOB) for _ in range(3)]
    age_every_message(client, 10 * VISIBILITY_S)
    # When the sweep runs, each is found where it waits: none is pushed again
    sweep(url)
    assert queued(client) == 3
    assert min(s for _, s in client.zrange(keys.BROKER_INDEX, 0, -1, withscores=True)) > (
        time.time() - VISIBILITY_S
    )  # and their clocks start again
    # But one popped by a worker that died is put back, at the front, once
    lists = job_lists(client)
    popped = client.rpop(lists[0])
    age_every_message(client, 10 * VISIBILITY_S)
    sweep(url)
    sweep(url)
    assert queued(client) == 3
    assert client.lindex(lists[0], -1) == popped
    assert client.hlen(keys.BROKER_MESSAGES) == len(handles)


def test_a_purged_queue_does_not_come_back(broker: tuple[str, Any]) -> None:
    url, client = broker
    for _ in range(2):
        dispatch(JOB)
    app = create_app({"FLEET_BROKER_URL": url})
    assert app.control.purge() == 2
    assert client.hlen(keys.BROKER_MESSAGES) == 0 and client.zcard(keys.BROKER_INDEX) == 0
    sweep(url)
    assert queued(client) == 0


def test_a_message_pushed_without_filing_is_filed_on_delivery_and_answered(
    broker: tuple[str, Any],
    fleet_env: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, client = broker
    # Given a job pushed by a producer that only LPUSHes (kombu's stock channel here)
    monkeypatch.setenv("FLEET_BROKER_TRANSPORT", "kombu")
    handle = dispatch(JOB)
    assert client.hlen(keys.BROKER_MESSAGES) == 0
    # Then a worker on the fleet's transport answers it, and its ack leaves nothing behind
    sup = start_worker(fleet_env, url, tmp_path, "fleet")
    try:
        assert handle.get(timeout=60).ok
        assert forgotten(client)
    finally:
        sup.stop(20)


def test_an_unknown_transport_is_refused_with_the_choices() -> None:
    from router.errors import ConfigError
    from workers.runtime.celery_app import celery_settings

    with pytest.raises(ConfigError, match="FLEET_BROKER_TRANSPORT must be one of fleet, kombu"):
        celery_settings({"FLEET_BROKER_TRANSPORT": "rabbit"})
    # an amqp:// broker keeps kombu's own transport whatever the setting
    assert (
        celery_settings({"FLEET_BROKER_URL": "amqp://x//", "FLEET_STATE_URL": "redis://x"})[
            "broker_transport"
        ]
        is None
    )
