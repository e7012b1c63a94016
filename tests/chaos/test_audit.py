"""The chaos audit's own checks, on made-up evidence: each must catch what it is there to
catch (a check that cannot fail would make the scenarios' zeros say nothing)."""

from __future__ import annotations

import itertools
import json
import random
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import redis

from router.results import Result
from workers.ops.redis_server import RedisServer

from .harness import FinalMonitor, JobRecord, Strikes, Tally, _ending, _unwatched, billing

SERVED = {"zai/glm-4.7": "glm-4.7", "minimax/MiniMax-M2.1": "MiniMax-M2.1"}


def call(model: str = "glm-4.7", delivery: int = 1) -> dict[str, Any]:
    return {"model": model, "job": "j", "job_message": 0, "job_delivery": delivery}


def row(model: str = "zai/glm-4.7", outcome: str = "ok") -> dict[str, Any]:
    return {"model": model, "outcome": outcome}


def never(_: dict[str, Any]) -> bool:
    return False


def test_billing_matches_calls_and_rows_model_by_model() -> None:
    calls = [call(), call("MiniMax-M2.1")]
    rows = [row(outcome="error"), row("minimax/MiniMax-M2.1"), row("litellm/kimi", "skipped")]
    found = billing(calls, rows, SERVED, never)
    assert (found.unbilled, found.uncalled, found.unexplained()) == (Counter(), Counter(), 0)


def test_a_call_the_ledger_misses_is_under_billed() -> None:
    found = billing([call(), call()], [row()], SERVED, never)
    assert found.unbilled == Counter({"glm-4.7": 1})
    assert found.unexplained() == 1


def test_a_missing_row_is_explained_only_by_a_redelivered_delivery() -> None:
    calls = [call(delivery=1), call(delivery=2)]
    found = billing(calls, [row()], SERVED, lambda c: c["job_delivery"] == 1)
    assert (found.redelivered, found.unexplained()) == (1, 0)
    # Two rows missing, one redelivered call: one stays unexplained.
    found = billing(calls, [], SERVED, lambda c: c["job_delivery"] == 1)
    assert (found.redelivered, found.unexplained()) == (1, 1)


def test_an_orphaned_row_bills_the_call_of_a_killed_delivery() -> None:
    found = billing(
        [call(delivery=1), call(delivery=2)], [row("zai/glm-4.7", "orphaned"), row()], SERVED, never
    )
    assert not found.unbilled and not found.uncalled


def test_a_row_with_no_call_is_over_billed() -> None:
    found = billing([call()], [row(), row(), row("minimax/MiniMax-M2.1")], SERVED, never)
    assert found.uncalled == Counter({"glm-4.7": 1, "MiniMax-M2.1": 1})


def test_an_orphan_may_bill_a_call_that_never_left() -> None:
    # (its worker died after taking the slot, before sending: the fleet cannot know)
    found = billing([], [row(outcome="orphaned"), row()], SERVED, never)
    assert (sum(found.uncalled.values()), found.orphans, found.overbilled()) == (2, 1, 1)


def test_a_model_the_simulator_does_not_serve_has_no_witness() -> None:
    # (a provider pointed at a closed port: its refused attempts reach no log)
    found = billing([], [row("moonshot/kimi-k2-0905-preview", "error")], SERVED, never)
    assert not found.uncalled


def test_a_job_whose_ending_nobody_saw_published_is_flagged() -> None:
    fleet: Any = SimpleNamespace(redis_down_at=[1_000.0])
    for done, explained in (("1970-01-01T00:16:39.8+00:00", True), ("1970-01-01T00:16:30", False)):
        tally = Tally("t")
        _unwatched(tally, "j", {"date_done": done}, fleet)
        assert (tally.unwatched, tally.unwatched_at_outage) == (1, int(explained))
        assert bool(tally.problems) is not explained
    result = Result(job_id="j", task_class="cost_free", source="app", ok=True, text="hi")
    caller = JobRecord(job={}, handle=None, got=result, gets=1)  # type: ignore[arg-type]
    assert _ending([caller], {}, result, None, publications=1) == ("", None)
    assert _ending([caller], {}, result, None, publications=2)[0] == "duplicated"


def test_strikes_come_at_random_moments_of_their_window_and_apart() -> None:
    for seed in range(50):
        at = Strikes(random.Random(seed), [lambda: ""] * 3, (1.0, 9.0), gap_s=2.0).at
        assert at[0] >= 1.0 and at[-1] <= 9.0
        assert all(b - a >= 2.0 - 1e-9 for a, b in itertools.pairwise(at))
    firsts = {round(Strikes(random.Random(s), [lambda: ""], (1.0, 9.0)).at[0]) for s in range(50)}
    assert len(firsts) > 4  # not one chosen moment
    with pytest.raises(ValueError):
        Strikes(random.Random(0), [lambda: ""] * 3, (1.0, 4.0), gap_s=2.0)


def test_strikes_run_in_order_and_a_failing_one_is_raised() -> None:
    done: list[int] = []

    def strike(n: int) -> Callable[[], str]:
        def run() -> str:
            done.append(n)
            return f"strike {n}"

        return run

    with Strikes(
        random.Random(0),
        [strike(1), strike(2)],
        (0.0, 0.1),
        gap_s=0.01,
    ) as strikes:
        pass
    assert done == [1, 2] and len(strikes.log) == 2

    def boom() -> str:
        raise OSError("no such process")

    with (
        pytest.raises(RuntimeError, match="no such process"),
        Strikes(random.Random(0), [boom], (0.0, 0.01)),
    ):
        pass


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A TCP server that accepts connections and never answers: a Redis that does not
    confirm subscriptions."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        sock.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"redis://127.0.0.1:{sock.getsockname()[1]}/0"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    sock.close()


def test_the_listener_refuses_to_start_unsubscribed(silent_server: str) -> None:
    with pytest.raises(RuntimeError, match="no psubscribe confirmation"):
        FinalMonitor(silent_server).start(timeout_s=1)


def test_the_listener_counts_distinct_final_states(redis_server: RedisServer) -> None:
    monitor = FinalMonitor(redis_server.url).start()
    try:
        assert monitor.subscriptions == 1
        job = uuid.uuid4().hex
        client = redis.Redis.from_url(redis_server.url)
        for status in ("STARTED", "SUCCESS", "SUCCESS", "FAILURE"):  # a retry, a second end
            meta = {"task_id": job, "status": status, "result": None}
            client.publish(f"celery-task-meta-{job}", json.dumps(meta))
        deadline = time.monotonic() + 5
        while monitor.finals[job] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert monitor.finals[job] == 2
        client.close()
    finally:
        monitor.stop()
