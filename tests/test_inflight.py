"""Calls in flight, against a real redis-server: a call is marked as it leaves (the
adapter's send hook, tests/test_caller_header.py), the job's final state or its next
message clears the mark,
and a redelivery of the same message finds it and bills it once, as an orphaned,
estimated ledger row (workers/state/inflight.py, workers/runtime/orphans.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from celery import states

from router.catalog import load_catalog
from router.travel import TravellingState
from workers.ledger.rows import decode_rows, encode_rows
from workers.runtime import orphans
from workers.runtime.resultstore import Bookkeeping, attach
from workers.runtime.step import OpenGate
from workers.state import deliveries, inflight, keys
from workers.state.inflight import Call
from workers.state.limits import FleetState, Slot

KIMI = "litellm/kimi"  # paid: $0.56 in, $2.94 out per 1M tokens
LLAMA = "openrouter/meta-llama/llama-3.1-405b-instruct:free"


def kimi_call(job_id: str, sends: int = 0, delivery: int = 1) -> Call:
    return Call(
        job_id=job_id,
        sends=sends,
        delivery=delivery,
        attempt=sends + 1,
        model=KIMI,
        queue="subscription",
        tier="paid",
        prompt_tokens=1_000,
        worker="w1@host",
    )


@pytest.fixture
def state(fresh_redis: Any) -> FleetState:
    return FleetState(fresh_redis, load_catalog())


def test_a_call_is_marked_on_redis_clock_and_an_admission_marks_nothing(
    fresh_redis: Any, state: FleetState
) -> None:
    mark = keys.inflight("j1")
    # A slot taken marks nothing: the call has not left yet
    assert state.admit("user_facing", KIMI, 1_000) == Slot()
    assert not fresh_redis.exists(mark)
    # The mark, as the call leaves, on Redis' clock
    seconds, micros = fresh_redis.time()
    state.mark(kimi_call("j1", delivery=1))
    marks = fresh_redis.hgetall(mark)
    assert list(marks) == [b"0:1"]  # message 0, delivery 1
    marked_ms, _, call = marks[b"0:1"].decode().partition("|")
    assert int(marked_ms) >= seconds * 1000 + micros // 1000
    assert json.loads(call) == {
        "model": KIMI,
        "queue": "subscription",
        "tier": "paid",
        "attempt": 1,
        "prompt_tokens": 1_000,
        "worker": "w1@host",
    }
    assert 0 < fresh_redis.pttl(mark) <= 86_400_000


def test_a_redelivery_finds_its_messages_calls_and_the_next_message_clears_them(
    fresh_redis: Any, state: FleetState
) -> None:
    mark = keys.inflight("j2")
    # Given delivery 1 of the job's first message, whose first round trip took the slot,
    # and whose call was marked as it left
    first = deliveries.begin(fresh_redis, "j2", 0, state.admit_call("user_facing", KIMI, 1_000))
    assert first.admitted == Slot() and first.orphans == () and first.count == 1
    inflight.mark(fresh_redis, kimi_call("j2", delivery=first.count))
    assert list(fresh_redis.hgetall(mark)) == [b"0:1"]
    # When its worker dies and the message is delivered again, that call is found
    again = deliveries.begin(fresh_redis, "j2", 0)
    assert [
        (o.sends, o.delivery, o.attempt, o.model, o.prompt_tokens, o.worker) for o in again.orphans
    ] == [(0, 1, 1, KIMI, 1_000, "w1@host")]
    # But once the job's next message is delivered (the forward that sent it carried the
    # outcome of message 0's calls), message 0's marks are cleared, not billed
    state.mark(kimi_call("j2", sends=0, delivery=2))
    following = deliveries.begin(fresh_redis, "j2", 1)
    assert following.orphans == () and not fresh_redis.exists(mark)


def test_an_orphan_is_billed_once_estimated_and_numbered_apart(
    fresh_redis: Any, state: FleetState
) -> None:
    catalog = load_catalog()
    job = {"id": "j3", "task_class": "user_facing", "source": "app", "app": "billing"}
    deliveries.begin(fresh_redis, "j3", 0, state.admit_call("user_facing", KIMI, 1_000))
    inflight.mark(fresh_redis, kimi_call("j3"))
    found = deliveries.begin(fresh_redis, "j3", 0).orphans
    # When the redelivery bills what it found
    billed = orphans.bill(
        fresh_redis, OpenGate(), catalog, job, TravellingState(max_tokens=100), found
    )
    # Then one orphaned row is spooled: tokens estimated (the request's max_tokens as the
    # completion), cost at the catalog's prices, flagged as estimated, numbered apart
    assert [a.number for a in billed] == [orphans.ORPHAN_ATTEMPTS_FROM + 1]
    (entry,) = fresh_redis.lrange(keys.LEDGER_SPOOL, 0, -1)
    (row,) = decode_rows(entry)
    assert {k: row[k] for k in ("job_id", "attempt", "model", "outcome", "error_kind")} == {
        "job_id": "j3",
        "attempt": 1001,
        "model": KIMI,
        "outcome": "orphaned",
        "error_kind": "worker_lost",
    }
    assert (row["prompt_tokens"], row["completion_tokens"], row["tokens_estimated"]) == (
        1_000,
        100,
        True,
    )
    assert row["cost_usd"] == pytest.approx((1_000 * 0.56 + 100 * 2.94) / 1e6)
    assert (row["cost_source"], row["app"], row["worker"]) == ("estimated", "billing", "w1@host")
    assert not fresh_redis.exists(keys.inflight("j3"))
    # And billing the same calls again (a second redelivery that read them first) adds none
    assert orphans.bill(fresh_redis, OpenGate(), catalog, job, None, found) == []
    assert fresh_redis.llen(keys.LEDGER_SPOOL) == 1


def test_with_no_max_tokens_an_orphan_is_billed_the_default_completion() -> None:
    from workers.state.inflight import Orphan

    orphan = Orphan("2:3", 2, 3, 3, LLAMA, "free", "free", 50, None, 0.0)
    attempt = orphans.orphaned_attempt(orphan, None)
    assert attempt.completion_tokens == orphans.ORPHAN_COMPLETION_TOKENS
    assert attempt.number == 1023  # message 2, delivery 3
    # and the number gives them back, for each delivery a message can have
    for sends, delivery in ((0, 1), (2, 3), (2, 10), (3, 1)):
        found = Orphan("", sends, delivery, 1, LLAMA, "free", "free", 50, None, 0.0)
        assert orphans.delivery_of(orphans.number(found)) == (sends, delivery)


def test_the_final_state_clears_the_jobs_marks_with_its_rows(
    fresh_redis: Any, state: FleetState
) -> None:
    from tests.fixtures import url_of
    from workers.runtime.celery_app import create_app

    backend = create_app({"FLEET_BROKER_URL": url_of(fresh_redis)}).backend
    state.mark(kimi_call("j4", delivery=1))
    # A non-final state leaves the mark: the call's outcome is not recorded yet
    backend.store_result("j4", None, states.STARTED)
    assert fresh_redis.exists(keys.inflight("j4"))
    # The final state, carrying the job's rows, clears it in the same step
    attach("j4", Bookkeeping(rows=encode_rows([])))
    backend.store_result("j4", {"ok": True}, states.SUCCESS)
    assert not fresh_redis.exists(keys.inflight("j4"))


def test_a_superseded_delivery_neither_calls_nor_stores_and_its_call_is_billed_once(
    fresh_redis: Any, state: FleetState
) -> None:
    from tests.fixtures import url_of
    from workers.runtime.celery_app import create_app

    # Given delivery 1 of a job's message, which marked its call, then lost the message
    # (its worker's beat lapsed) to delivery 2 on another worker
    assert deliveries.begin(fresh_redis, "j9", 0, process="w1").count == 1
    state.mark(kimi_call("j9", delivery=1))
    later = deliveries.begin(fresh_redis, "j9", 0, process="w2")
    assert later.count == 2 and [o.field for o in later.orphans] == ["0:1"]
    assert not deliveries.current(fresh_redis, "j9", 0, 1)
    # Then delivery 1 may not mark (so make) another call
    with pytest.raises(inflight.Superseded):
        state.mark(kimi_call("j9", delivery=1))
    # and its final state, with its rows, is not stored: the later delivery answers, and
    # bills delivery 1's marked call as orphaned (once: bill_orphans clears the mark)
    backend = create_app({"FLEET_BROKER_URL": url_of(fresh_redis)}).backend
    row = {"job_id": "j9", "attempt": 1, "model": KIMI}
    attach("j9", Bookkeeping(rows=encode_rows([row]), delivery=(keys.deliveries("j9", 0), 1)))
    backend.store_result("j9", {"ok": True}, states.SUCCESS)
    assert fresh_redis.get(keys.result("j9")) is None
    assert fresh_redis.llen(keys.LEDGER_SPOOL) == 0
    # while the current delivery's state is stored
    attach("j9", Bookkeeping(rows=encode_rows([row]), delivery=(keys.deliveries("j9", 0), 2)))
    backend.store_result("j9", {"ok": True}, states.SUCCESS)
    assert json.loads(fresh_redis.get(keys.result("j9")))["status"] == "SUCCESS"
    assert fresh_redis.llen(keys.LEDGER_SPOOL) == 1
