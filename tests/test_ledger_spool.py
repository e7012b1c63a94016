"""The ledger off the task's path: a finished job's rows go onto the Redis spool in the
same atomic step as its final state, so a worker killed right after answering loses no
row, and the writer drains the spool into the database later."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from celery import states

from client import dispatch
from router import JobFailed
from tests.ledger_db import simple_rows
from workers.ledger.rows import encode_rows
from workers.ledger.store import Ledger
from workers.ops.pools import worker_argv
from workers.ops.supervisor import Supervisor
from workers.runtime.resultstore import Bookkeeping, FleetRedisBackend, attach
from workers.state import keys


def url_of(client: Any) -> str:
    kwargs = client.connection_pool.connection_kwargs
    return f"redis://127.0.0.1:{kwargs['port']}/{kwargs['db']}"


def backend_on(client: Any) -> FleetRedisBackend:
    from workers.runtime.celery_app import create_app

    return create_app({"FLEET_BROKER_URL": url_of(client)}).backend


def test_a_final_state_carries_its_rows_and_dead_letter_in_one_step(fresh_redis) -> None:
    backend = backend_on(fresh_redis)
    rows = encode_rows(simple_rows("j1", 2))
    # Given a failed job's bookkeeping attached to its coming final state
    attach("j1", Bookkeeping(rows=rows, dead_letter=json.dumps({"job": {"id": "j1"}})))
    # When a non-final state is written first, nothing goes with it
    backend.store_result("j1", None, states.STARTED)
    assert fresh_redis.llen(keys.LEDGER_SPOOL) == 0
    # Then the final state takes the rows and the dead letter along, once
    backend.store_result("j1", JobFailed("every model failed", {"ok": False}), states.FAILURE)
    assert fresh_redis.lrange(keys.LEDGER_SPOOL, 0, -1) == [rows.encode()]
    assert fresh_redis.hexists(keys.DEAD_LETTER, "j1")
    # And a late RETRY neither replaces the final state nor spools anything again
    backend.store_result("j1", None, states.RETRY)
    assert json.loads(fresh_redis.get(keys.result("j1")))["status"] == states.FAILURE
    assert fresh_redis.llen(keys.LEDGER_SPOOL) == 1


def test_a_worker_killed_after_answering_loses_no_row(
    fleet_env: dict[str, str], simulator: Any, fresh_redis: Any, tmp_path: Path, monkeypatch: Any
) -> None:
    # Given a worker of its own (on a Redis database of its own) whose ledger database
    # cannot be reached: its writer cannot drain the spool
    broker = url_of(fresh_redis)
    monkeypatch.setenv("FLEET_BROKER_URL", broker)
    monkeypatch.setenv("FLEET_CATALOG", fleet_env["FLEET_CATALOG"])
    env = {
        **fleet_env,
        "FLEET_BROKER_URL": broker,
        "FLEET_LEDGER_URL": "postgresql://nobody@127.0.0.1:1/none",
    }
    sup = Supervisor(tmp_path / "logs", env)
    argv = worker_argv(["vision"], concurrency=2, name="spool-kill")
    child = sup.start("vision", argv, ready_marker=" ready.")
    try:
        sup.wait_ready()
        # When it answers a job that escalated once, and is killed -9 at once
        job = {
            "task_class": "vision",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "[[sim:MiniMax-Vision-Video-01=503]] look"},
                        {
                            "type": "image_url",
                            "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="},
                        },
                    ],
                }
            ],
        }
        result = dispatch(job).get(timeout=60)
        assert result.ok and len(result.attempts) == 2
        assert child.process is not None
        child.process.kill()
        child.process.wait()
    finally:
        sup.stop()
    # Then a writer with a reachable database finds both attempts on the spool
    assert fresh_redis.llen(keys.LEDGER_SPOOL) == 1
    good = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}", redis_url=broker)
    try:
        assert good.drain() == 2
        from sqlalchemy import select

        from workers.ledger.schema import attempts

        with good.engine.connect() as conn:
            got = conn.execute(
                select(attempts.c.attempt, attempts.c.outcome).where(
                    attempts.c.job_id == result.job_id
                )
            ).all()
    finally:
        good.close()
    assert sorted(got) == [(1, "error"), (2, "ok")]


def test_a_success_is_never_replaced_nor_billed_twice(fresh_redis) -> None:
    backend = backend_on(fresh_redis)
    attach("j2", Bookkeeping(rows=encode_rows(simple_rows("j2", 1))))
    backend.store_result("j2", {"ok": True}, states.SUCCESS)
    # A second run of the same job (a duplicate delivery) ends after the first
    attach("j2", Bookkeeping(rows=encode_rows(simple_rows("j2", 1)), dead_letter="{}"))
    backend.store_result("j2", JobFailed("late", {"ok": False}), states.FAILURE)
    assert json.loads(fresh_redis.get(keys.result("j2")))["status"] == states.SUCCESS
    assert fresh_redis.llen(keys.LEDGER_SPOOL) == 1
    assert not fresh_redis.hexists(keys.DEAD_LETTER, "j2")
