"""Delivery counting against a real redis-server (workers/state/deliveries.py): a worker
process that dies lays an equal share of its death on each job it held, so a job is
poisoned for deaths it caused, not for deaths it witnessed. Processes are played by
name: `begin(..., process=P)` is a delivery in P, and a redelivery in another process is
P's death."""

from __future__ import annotations

from typing import Any

import pytest

from workers.state import deliveries, keys
from workers.state.deliveries import MAX_DEATHS, MAX_DELIVERIES


def deaths(redis: Any, job: str, sends: int = 0) -> float:
    return deliveries.record(redis, job, sends).deaths


def test_a_job_that_dies_alone_in_its_process_is_poisoned_at_its_fourth_delivery(
    fresh_redis: Any,
) -> None:
    # A pool process runs one job at a time: a job that kills it bears each death whole
    seen = [deliveries.begin(fresh_redis, "j", 0, process=f"pool-{n}") for n in range(4)]
    assert [d.count for d in seen] == [1, 2, 3, 4]
    assert [d.poisoned for d in seen] == [False, False, False, True]
    assert deaths(fresh_redis, "j") == MAX_DEATHS
    assert deliveries.record(fresh_redis, "j", 0) == deliveries.DeliveryRecord(4, "pool-3", 3.0)


def test_jobs_that_die_together_share_each_death(fresh_redis: Any) -> None:
    # Four jobs in a threads worker killed again and again (a deploy, the OOM killer):
    # none caused it, and none is poisoned after three deaths, nor after nine
    jobs = ["a", "b", "c", "d"]
    for death in range(MAX_DELIVERIES):
        seen = [deliveries.begin(fresh_redis, j, 0, process=f"threads-{death}") for j in jobs]
        assert not any(d.poisoned for d in seen), death
    assert deaths(fresh_redis, "a") == pytest.approx((MAX_DELIVERIES - 1) / 4)
    # But a message delivered more than MAX_DELIVERIES times is poisoned whatever its
    # share: a job that brings down a busy worker is still stopped
    last = [deliveries.begin(fresh_redis, j, 0, process="threads-last") for j in jobs]
    assert all(d.poisoned and d.count == MAX_DELIVERIES + 1 for d in last)


def test_a_job_that_finished_no_longer_shares_its_process_death(fresh_redis: Any) -> None:
    from celery import states

    from tests.fixtures import url_of
    from workers.runtime.celery_app import create_app

    backend = create_app({"FLEET_BROKER_URL": url_of(fresh_redis)}).backend
    here = deliveries.this_process()  # the backend stores from this process
    deliveries.begin(fresh_redis, "stays", 0, process=here)
    deliveries.begin(fresh_redis, "ends", 0, process=here)
    assert fresh_redis.smembers(keys.running(here)) == {b"stays", b"ends"}
    # When one job's final state is stored, it leaves the process's running set
    backend.store_result("ends", {"ok": True}, states.SUCCESS)
    assert fresh_redis.smembers(keys.running(here)) == {b"stays"}
    # So when the process dies, the job it still held bears the whole death
    deliveries.begin(fresh_redis, "stays", 0, process="next")
    assert deaths(fresh_redis, "stays") == 1.0


def test_a_forwarded_job_leaves_the_process_it_was_forwarded_from(fresh_redis: Any) -> None:
    deliveries.begin(fresh_redis, "moved", 0, process="p1")
    deliveries.begin(fresh_redis, "left", 0, process="p1")
    # The job's next message (a forward) is delivered in another process
    deliveries.begin(fresh_redis, "moved", 1, process="p2")
    assert fresh_redis.smembers(keys.running("p1")) == {b"left"}
    assert fresh_redis.smembers(keys.running("p2")) == {b"moved"}
    # p1 dies: the job left in it bears the whole death, the moved one none
    deliveries.begin(fresh_redis, "left", 0, process="p3")
    assert deaths(fresh_redis, "left") == 1.0 and deaths(fresh_redis, "moved", 1) == 0


def test_a_stale_copy_is_not_recorded_as_held(fresh_redis: Any) -> None:
    fresh_redis.set(keys.result("done"), '{"status": "SUCCESS"}')
    assert deliveries.begin(fresh_redis, "done", 0, process="p1").finished
    assert not fresh_redis.exists(keys.running("p1"))


def test_this_process_is_named_anew_in_a_forked_child() -> None:
    import os

    here = deliveries.this_process()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child reports its own name
        os.write(write, deliveries.this_process().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 200).decode()
    assert child != here and child.split(":")[1] == str(pid)
    assert deliveries.this_process() == here
