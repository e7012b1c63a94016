"""A delivery whose first round trip cannot reach Redis (gone, or loading its data after a
restart) hands its message back instead of ending the job: a FAILURE stored there would
leave the job with no Result and no dead letter (found by the chaos audit). So does one
that cannot mark its call in flight: the call does not leave (found by the chaos audit
too: a worker cut off from Redis sent it anyway, after it had lost the message)."""

from __future__ import annotations

from pathlib import Path

import pytest
from celery.exceptions import Reject

from workers.ops.redis_server import RedisServer
from workers.sim.simulator import Simulator


def test_a_delivery_that_cannot_reach_redis_hands_its_message_back(
    fleet_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gone = RedisServer(tmp_path / "redis", appendonly=False).start()
    gone.stop()  # its port now refuses
    monkeypatch.setenv("FLEET_BROKER_URL", gone.url)
    monkeypatch.setenv("FLEET_CATALOG", fleet_env["FLEET_CATALOG"])
    monkeypatch.delenv("FLEET_STATE_URL", raising=False)
    from workers.runtime.tasks import run_job

    job = {
        "id": "first-trip-1",
        "task_class": "cost_free",
        "messages": [{"role": "user", "content": "hello"}],
    }
    with pytest.raises(Reject) as refused:
        run_job.run(job, None)
    assert refused.value.requeue, "the message must go back, not be dropped"


def test_a_call_that_cannot_be_marked_in_flight_does_not_leave(
    fleet_env: dict[str, str],
    simulator: Simulator,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from workers.runtime import tasks
    from workers.state.limits import FleetState

    server = RedisServer(tmp_path / "redis", appendonly=False).start()
    for name, value in fleet_env.items():  # the simulator's URLs and keys
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("FLEET_BROKER_URL", server.url)
    monkeypatch.setattr(tasks, "_process", tasks._Process())  # its state on this Redis
    marked = FleetState.mark

    def redis_goes_as_it_marks(self: FleetState, call: object) -> None:
        server.stop()  # between the delivery's first round trip and its call
        marked(self, call)  # type: ignore[arg-type]

    monkeypatch.setattr(FleetState, "mark", redis_goes_as_it_marks)
    job = {
        "id": "unmarked-1",
        "task_class": "cost_free",
        "messages": [{"role": "user", "content": "hello"}],
    }
    tasks.run_job.push_request(delivery_info={"routing_key": "free"})  # its first hop's
    try:
        with pytest.raises(Reject) as refused:
            tasks.run_job.run(job, None)
    finally:
        tasks.run_job.pop_request()
        server.stop()
    assert refused.value.requeue, "the message must go back, not be dropped"
    assert not [r for r in simulator.requests() if r["job"] == "unmarked-1"]
