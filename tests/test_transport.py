"""The fleet's broker transport (workers/runtime/transport.py): a job message is filed when
it is published, so a worker that pops it and dies before recording the delivery loses
nothing, where kombu's stock channel loses the message."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from client import dispatch
from tests.fixtures import url_of
from workers.ops.pools import worker_argv
from workers.ops.supervisor import Supervisor
from workers.runtime import liveness
from workers.runtime.celery_app import create_app
from workers.state import keys
from workers.state.connections import script

JOB = {"task_class": "cost_free", "messages": [{"role": "user", "content": "hello"}]}
VISIBILITY_S = 3
LAPSE_S = 1.0


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
        "FLEET_WORKER_LAPSE_S": str(LAPSE_S),
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
    """Whether the message store empties and no process holds anything (the ack comes
    just after the stored result)."""
    deadline = time.monotonic() + timeout_s
    while client.hlen(keys.BROKER_MESSAGES) or any(
        client.hlen(k) for k in client.scan_iter(keys.BROKER_HELD_PREFIX + "*")
    ):
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
            # Then the fleet's transport had filed it at publish: a worker's beat puts it
            # back after a lapse, a worker answers it, and its ack forgets it
            assert handle.get(timeout=10 + LAPSE_S * 3).ok
            assert forgotten(client)
        else:
            # Then kombu's stock channel has no trace of it: the job never ends
            with pytest.raises(TimeoutError):
                handle.get(timeout=VISIBILITY_S * 4)
            assert queued(client) == 0 and client.hlen("unacked") == 0
    finally:
        sup.stop(20)


def beat_on(url: str, lapse_s: float = LAPSE_S) -> liveness.Beat:
    """A worker process's beat on the broker at `url` (a process of its own: a new tag)."""
    address = urlparse(url)
    params = {"host": address.hostname, "port": address.port, "db": int(address.path[1:] or 0)}
    beat = liveness.Beat(params, lapse_s)
    beat.process = f"test-beat-{uuid.uuid4().hex[:8]}"
    return beat


def lists_of(client: Any) -> list[str]:
    return sorted(k.decode() for k in job_lists(client))


def test_a_backlog_is_never_touched_by_a_beat(broker: tuple[str, Any]) -> None:
    url, client = broker
    # Given three jobs waiting in their list
    handles = [dispatch(JOB) for _ in range(3)]
    lists = lists_of(client)
    before = {k: client.lrange(k, 0, -1) for k in lists}
    positions = {k: client.zrange(keys.broker_queued(k), 0, -1, withscores=True) for k in lists}
    beat = beat_on(url)
    # When beats run, over more than a lapse
    for _ in range(3):
        beat.beat(lists)
        time.sleep(LAPSE_S / 2)
    # Then nothing was pushed again or moved: waiting messages are not the beat's business
    assert {k: client.lrange(k, 0, -1) for k in lists} == before
    assert {
        k: client.zrange(keys.broker_queued(k), 0, -1, withscores=True) for k in lists
    } == positions
    assert client.hlen(keys.BROKER_POPPED) == 0
    # But one popped by a worker that died before recording it is seen, and after a lapse
    # put back at the front, once
    popped = client.rpop(lists[0])
    beat.beat(lists)
    assert queued(client) == 2 and client.hlen(keys.BROKER_POPPED) == 1
    time.sleep(LAPSE_S + 0.1)
    beat.beat(lists)
    beat.beat(lists)
    assert queued(client) == 3 and client.hlen(keys.BROKER_POPPED) == 0
    assert client.lindex(lists[0], -1) == popped
    assert client.hlen(keys.BROKER_MESSAGES) == len(handles)


def test_a_dead_processs_messages_go_back_at_its_lapse_and_not_before(
    broker: tuple[str, Any],
) -> None:
    url, client = broker
    # Given a process holding a message it took (a worker mid-call)...
    dispatch(JOB)
    lists = lists_of(client)
    holder, watcher = beat_on(url), beat_on(url)
    holder.beat(lists)
    popped = client.rpop(lists[0])
    tag = json.loads(popped)["properties"]["delivery_tag"]
    script(client, "broker_delivered")(  # its delivery, as the transport records it
        keys=[
            keys.BROKER_MESSAGES,
            keys.broker_queued(lists[0]),
            keys.BROKER_POPPED,
            keys.broker_held(holder.process),
            keys.BROKER_HOLDERS,
        ],
        args=[tag, lists[0], holder.lapse_ms, holder.process, ""],
    )
    # ...for longer than its lapse, beating all along: its message stays its own
    for _ in range(4):
        holder.beat(lists)
        watcher.beat(lists)
        time.sleep(LAPSE_S / 2)
    assert queued(client) == 0 and client.hexists(keys.broker_held(holder.process), tag)
    # When it stops beating (killed), the next beat after its lapse puts the message back
    time.sleep(LAPSE_S + 0.1)
    _, _, restored, *dead = watcher.beat(lists)
    assert restored == 1 and dead == [holder.process.encode(), 1]
    assert queued(client) == 1 and client.lindex(lists[0], -1) == popped
    assert not client.exists(keys.broker_held(holder.process))
    # And when it comes back (a partition healed), it learns it lapsed; its late ack
    # changes nothing
    new, holding, *_ = holder.beat(lists)
    assert (new, holding) == (1, 0)
    ack = script(client, "broker_ack")
    assert ack(keys=[keys.BROKER_MESSAGES, keys.broker_held(holder.process)], args=[tag, ""]) == 0
    assert client.hexists(keys.BROKER_MESSAGES, tag)


def test_a_purged_queue_does_not_come_back(broker: tuple[str, Any]) -> None:
    url, client = broker
    for _ in range(2):
        dispatch(JOB)
    lists = lists_of(client)
    app = create_app({"FLEET_BROKER_URL": url})
    assert app.control.purge() == 2
    assert client.hlen(keys.BROKER_MESSAGES) == 0
    assert not any(client.zcard(keys.broker_queued(k)) for k in lists)
    beat_on(url).beat(lists)
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


@pytest.mark.parametrize("value", ["0", "0.1", "abc", "601", "nan"])
def test_a_bad_lapse_is_refused_in_one_line(value: str) -> None:
    import subprocess
    import sys

    from router.errors import ConfigError
    from workers.runtime.celery_app import celery_settings

    with pytest.raises(ConfigError, match="FLEET_WORKER_LAPSE_S must be a number of seconds"):
        celery_settings({"FLEET_WORKER_LAPSE_S": value})
    assert (
        celery_settings({"FLEET_WORKER_LAPSE_S": "2.5"})["broker_transport_options"]["lapse_s"]
        == 2.5
    )
    # `fleet worker` says so in one line before it starts anything
    env = {**os.environ, "FLEET_WORKER_LAPSE_S": value}
    done = subprocess.run(
        [sys.executable, "-m", "workers.cli", "worker", "free"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].endswith(f"(got {value!r})"), done.stderr


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
