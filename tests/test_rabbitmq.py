"""A RabbitMQ broker works too, with Redis for results and fleet state (FLEET_STATE_URL)."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

import pytest

from client import dispatch
from tests.fixtures import Workers, url_of

AMQP = os.environ.get("FLEET_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


def rabbitmq_up() -> bool:
    url = urlsplit(AMQP)
    try:
        with socket.create_connection((url.hostname or "127.0.0.1", url.port or 5672), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture
def amqp_fleet(fleet_env, fresh_redis, tmp_path, monkeypatch):
    if not rabbitmq_up():
        pytest.fail(
            f"RabbitMQ is not running at {urlsplit(AMQP).netloc.rpartition('@')[2]}: these tests"
            " need it (start it with `rabbitmq-server -detached`, or set FLEET_TEST_AMQP_URL)",
            pytrace=False,
        )
    state = url_of(fresh_redis)
    env = {**fleet_env, "FLEET_BROKER_URL": AMQP, "FLEET_STATE_URL": state}
    workers = Workers(env, tmp_path)
    try:
        for queue in ("subscription", "free"):
            workers.start(queue, name=f"amqp-{queue}", concurrency=4)
        workers.wait_ready()
        monkeypatch.setenv("FLEET_BROKER_URL", AMQP)
        monkeypatch.setenv("FLEET_STATE_URL", state)
        yield
    finally:
        workers.stop()


def test_jobs_travel_and_escalate_over_rabbitmq(amqp_fleet) -> None:
    # Given workers on a RabbitMQ broker with results and state in Redis
    handle = dispatch(
        {
            "task_class": "fast_general",
            "messages": [{"role": "user", "content": "[[sim:MiniMax-M2.1=503]] over amqp"}],
        }
    )
    # Then the job escalates from the subscription queue into the free one and answers
    result = handle.get(timeout=60)
    assert result.ok, result.error
    assert result.queue_path == ["subscription", "free"]
    assert result.job_id == handle.id
    assert [(a.worker or "").split("@")[0] for a in result.attempts] == [
        "amqp-subscription",
        "amqp-free",
    ]


def test_an_amqp_broker_without_a_state_url_is_refused(monkeypatch) -> None:
    from router.errors import ConfigError
    from workers.config import fleet_urls

    with pytest.raises(ConfigError, match="FLEET_STATE_URL must name a Redis server"):
        fleet_urls({"FLEET_BROKER_URL": AMQP})
