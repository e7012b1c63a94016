"""A delivery whose first round trip cannot reach Redis (gone, or loading its data after a
restart) hands its message back instead of ending the job: a FAILURE stored there would
leave the job with no Result and no dead letter (found by the chaos audit)."""

from __future__ import annotations

from pathlib import Path

import pytest
from celery.exceptions import Reject

from workers.ops.redis_server import RedisServer


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
