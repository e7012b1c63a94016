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

from .harness import (
    FinalMonitor,
    JobRecord,
    Strikes,
    Struck,
    Tally,
    _audit_billing,
    _ending,
    _unwatched,
    billing,
    fate_of,
    process_of,
)

SERVED = {"zai/glm-4.7": "glm-4.7", "minimax/MiniMax-M2.1": "MiniMax-M2.1"}
HOST = "host-a"


def call(
    model: str = "glm-4.7",
    delivery: int = 1,
    pid: int = 100,
    t: float = 50.0,
    message: int = 0,
) -> dict[str, Any]:
    """A call from the simulator's log, made by process `pid` on HOST at `t` (epoch s)."""
    return {
        "model": model,
        "job": "j",
        "job_message": message,
        "job_delivery": delivery,
        "job_process": f"{HOST}:{pid}:{pid:08x}",
        "t": t,
    }


def row(model: str = "zai/glm-4.7", outcome: str = "ok") -> dict[str, Any]:
    return {"model": model, "outcome": outcome}


def never(_: dict[str, Any]) -> str | None:
    return None


# Process 100 killed at t=60 (it started at t=10); process 300 cut off from t=40 to t=70.
KILLED = Struck("killed", HOST, 100, 10.0, 60.0)
CUT = Struck("cut", HOST, 300, 40.0, 70.0)
FATE = fate_of([KILLED, CUT])


def test_billing_matches_calls_and_rows_model_by_model() -> None:
    calls = [call(), call("MiniMax-M2.1", message=1, pid=200)]
    rows = [row(outcome="error"), row("minimax/MiniMax-M2.1"), row("litellm/kimi", "skipped")]
    found = billing(calls, rows, SERVED, never)
    assert (found.unbilled, found.uncalled, found.unexplained(), found.twice) == (
        Counter(),
        Counter(),
        0,
        0,
    )


def test_a_call_the_ledger_misses_is_under_billed() -> None:
    found = billing([call(pid=200), call(pid=200, message=1)], [row()], SERVED, never)
    assert found.unbilled == Counter({"glm-4.7": 1})
    assert found.unexplained() == 1


def test_a_strike_takes_the_calls_of_its_process_in_its_span_only() -> None:
    assert FATE(call(pid=100, t=59.9)) == "killed"
    assert FATE(call(pid=100, t=9.0)) is None  # an earlier process with the same pid
    assert FATE(call(pid=100, t=61.0)) is None  # a later one
    assert FATE(call(pid=300, t=45.0)) == "cut"
    assert FATE(call(pid=300, t=30.0)) is None  # answered long before the cut
    assert FATE(call(pid=300, t=71.0)) is None  # after the heal: it lives again
    assert FATE(call(pid=200)) is None
    other_host = {**call(pid=100), "job_process": "host-b:100:00000064"}
    assert FATE(other_host) is None
    assert FATE({**call(), "job_process": None}) is None


def test_a_request_the_cut_held_back_is_the_cuts_when_its_mark_dates_it_so() -> None:
    # Written into the cut link at t=45, TCP sent it again after the heal: the provider
    # logged it at t=72. The orphaned row of its delivery was marked at t=45: the cut's.
    late = call(pid=300, delivery=1, t=72.0)
    marked = {"model": "zai/glm-4.7", "outcome": "orphaned", "attempt": 1001}
    assert fate_of([KILLED, CUT], [{**marked, "started_at": "1970-01-01T00:00:45"}])(late) == "cut"
    # Marked after the heal, or no mark at all: a call made after the heal, alive.
    after = [{**marked, "started_at": "1970-01-01T00:01:11"}]
    assert fate_of([KILLED, CUT], after)(late) is None
    assert FATE(late) is None
    # Another delivery's mark does not date it; nor does a kill's span reach past death.
    assert (
        fate_of([CUT], [{**marked, "attempt": 1002, "started_at": "1970-01-01T00:00:45"}])(late)
        is None
    )
    killed_late = call(pid=100, delivery=1, t=61.0)
    assert fate_of([KILLED], [{**marked, "started_at": "1970-01-01T00:00:50"}])(killed_late) is None


def test_a_missing_row_is_excused_only_for_a_killed_or_cut_process() -> None:
    # Killed mid-call, then answered by another worker: the killed call has no row.
    calls = [call(pid=100, delivery=1), call(pid=200, delivery=2)]
    found = billing(calls, [row()], SERVED, FATE)
    assert (found.excused, found.unexplained(), found.twice) == (Counter({"killed": 1}), 0, 0)
    # Its worker alive (another process, or the same pid after the kill): not excused,
    # however many times the message was delivered since.
    calls = [call(pid=200, delivery=1), call(pid=400, delivery=2)]
    found = billing(calls, [row()], SERVED, FATE)
    assert (sum(found.excused.values()), found.unexplained()) == (0, 1)
    # A cut process: excused as cut.
    calls = [call(pid=300, delivery=1, t=45.0), call(pid=200, delivery=2)]
    found = billing(calls, [row()], SERVED, FATE)
    assert (found.excused, found.unexplained()) == (Counter({"cut": 1}), 0)


def test_excuses_are_at_most_one_per_struck_delivery() -> None:
    # One killed delivery that (against the rule) called twice, no row for either: one
    # call excused, the other under-billed and counted called twice.
    calls = [call(pid=100, t=50.0), call(pid=100, t=51.0)]
    found = billing(calls, [], SERVED, FATE)
    assert (found.excused, found.unexplained(), found.twice) == (Counter({"killed": 1}), 1, 1)
    # Two killed deliveries and a cut one, one row (the live answer's): three excused,
    # by kind.
    calls = [
        call(pid=100, delivery=1, t=20.0),
        call(pid=300, delivery=2, t=45.0),
        call(pid=100, delivery=3, t=55.0),
        call(pid=200, delivery=4, t=80.0),
    ]
    found = billing(calls, [row()], SERVED, FATE)
    assert (found.excused, found.unexplained(), found.twice) == (
        Counter({"killed": 2, "cut": 1}),
        0,
        0,
    )
    # An excuse is for the model its call went to: the killed glm-4.7 call has its
    # (orphaned) row, the live MiniMax call has none.
    calls = [call(pid=100), call("MiniMax-M2.1", pid=200, delivery=2)]
    found = billing(calls, [row(outcome="orphaned")], SERVED, FATE)
    assert (found.excused, found.unexplained()) == (Counter(), 1)
    assert found.unbilled == Counter({"MiniMax-M2.1": 1})


def test_a_message_called_twice_while_its_workers_lived_is_flagged() -> None:
    # Two live deliveries of one message (its worker alive, a second worker ran it too):
    # billed or not, that is a second execution.
    calls = [call(pid=200, delivery=1), call(pid=400, delivery=2)]
    found = billing(calls, [row(), row()], SERVED, FATE)
    assert (found.twice, found.unexplained()) == (1, 0)
    # A cut worker calling again after the heal is alive again: flagged.
    calls = [call(pid=300, delivery=1, t=45.0), call(pid=200, delivery=2), call(pid=300, t=75.0)]
    assert billing(calls, [row(), row()], SERVED, FATE).twice == 1
    # One call per message, messages apart (a job forwarded): not.
    calls = [call(pid=200, message=0), call(pid=200, message=1), call(pid=400, message=2)]
    assert billing(calls, [row()] * 3, SERVED, FATE).twice == 0
    # Killed twice, then answered: one live call.
    calls = [call(pid=100, delivery=1, t=20.0), call(pid=100, delivery=2), call(pid=200)]
    assert billing(calls, [row(outcome="orphaned"), row()], SERVED, FATE).twice == 0


def test_an_orphaned_row_bills_the_call_of_a_killed_delivery() -> None:
    calls = [call(delivery=1), call(pid=200, delivery=2)]
    found = billing(calls, [row("zai/glm-4.7", "orphaned"), row()], SERVED, FATE)
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


def test_the_audit_counts_each_problem_and_lists_the_excuses_by_kind() -> None:
    tally = Tally("t")
    _audit_billing(tally, "j1", [call(pid=100), call(pid=200, delivery=2)], [row()], SERVED, FATE)
    _audit_billing(
        tally, "j2", [call(pid=300, t=45.0), call(pid=200, delivery=2)], [row()], SERVED, FATE
    )
    _audit_billing(tally, "j3", [call(pid=200), call(pid=400, delivery=2)], [row()], SERVED, FATE)
    assert (tally.excused_unbilled, tally.unbilled_calls) == (2, 3)
    assert tally.excuses() == "excused: cut 1, killed 1"
    assert (tally.called_twice, tally.under_billed) == (1, 1)
    assert not tally.clean
    assert [p.split(":")[0] for p in tally.problems] == ["called_twice", "under_billed"]


def test_a_worker_process_is_named_host_pid_tag() -> None:
    assert process_of("host-a:4242:1f2e3d4c") == ("host-a", 4242)
    assert process_of("host-a") is None
    assert process_of(None) is None
    assert process_of("host-a:x:1") is None


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
