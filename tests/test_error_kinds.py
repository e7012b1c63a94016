"""Each provider error kind's action, end to end: real worker processes call the simulator
over HTTP, classify its fault, and escalate (or not) down the job's chain.

A user_facing job's chain is zai/glm-4.7, minimax/MiniMax-M2.1, litellm/kimi,
litellm/qwen3-next-free (all on the simulator). A `[[sim:glm-4.7=FAULT]]` directive makes
the primary fail with FAULT; the job must then be answered by MiniMax-M2.1 (action "retry"
or "next"), or end at once (action "fail").

Failures also leave fleet-wide live state in Redis (cooldowns, circuit counts), which
would make later jobs skip the primary: each job here starts from a clean state, and the
state is cleared again when the module is done.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from client import JobHandle, dispatch
from router import JobFailed, Result, load_catalog
from tests.fixtures import reset_live_state
from workers.providers.registry import ProviderRegistry
from workers.runtime.step import Done, advance

TIMEOUT_S = 30
PRIMARY, SECOND = "zai/glm-4.7", "minimax/MiniMax-M2.1"
UPSTREAM = {
    "zai/glm-4.7": "glm-4.7",
    "minimax/MiniMax-M2.1": "MiniMax-M2.1",
    "litellm/kimi": "kimi",
    "litellm/qwen3-next-free": "qwen3-next-free",
}

RETRY = {  # fault -> error kind; transient: the job moves on to the next model
    "429": "rate_limited",
    "429:1": "rate_limited",
    "429:date:1": "rate_limited",
    "500": "server_error",
    "502": "server_error",
    "503": "server_error",
    "408": "timeout",
    "timeout": "timeout",  # no answer within the provider's 2 s timeout
    "stall": "timeout",  # half a body, then silence
    "malformed": "malformed",
    "empty": "empty",
    "reset": "connection",
}
NEXT = {"401": "auth", "403": "auth", "404": "not_found"}  # the model is unusable
FAIL = {"400": "bad_request"}  # the request is wrong: no model would do better
ALL = {**RETRY, **NEXT, **FAIL}


def ask(text: str, **fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], **fields}


def sim_requests(simulator: Any, since: float, until: float) -> list[dict[str, Any]]:
    return [r for r in simulator.requests() if since <= r["t"] <= until]


class Outcome:
    def __init__(self, handle: JobHandle, result: Result, tag: str, calls: list[Any]) -> None:
        self.handle, self.result, self.tag = handle, result, tag
        self.primary_calls = calls  # the simulator's log of the primary's requests


# The two slow faults (2 s each) run together; every other job alone, from a clean state.
BATCHES = [("timeout", "stall"), *((f,) for f in ALL if f not in ("timeout", "stall"))]


@pytest.fixture(scope="module")
def outcomes(fleet_env, fleet_workers, simulator) -> Iterator[dict[str, Outcome]]:
    """One user_facing job per fault."""
    done: dict[str, Outcome] = {}
    with pytest.MonkeyPatch.context() as mp:
        for key in ("FLEET_BROKER_URL", "FLEET_CATALOG"):
            mp.setenv(key, fleet_env[key])
        try:
            for batch in BATCHES:
                reset_live_state(fleet_env)
                started = time.time()
                sent = {}
                for fault in batch:
                    tag = f"kinds-{uuid.uuid4().hex[:8]}"
                    prompt = f"[[sim:glm-4.7={fault}]] {tag} answer briefly"
                    sent[fault] = (dispatch(ask(prompt, task_class="user_facing")), tag)
                results = {
                    f: h.get(timeout=TIMEOUT_S, propagate=False) for f, (h, _) in sent.items()
                }
                log = sim_requests(simulator, started, time.time())
                for fault, (handle, tag) in sent.items():
                    calls = [r for r in log if r["model"] == "glm-4.7" and r["fault"] == fault]
                    done[fault] = Outcome(handle, results[fault], tag, calls)
        finally:
            reset_live_state(fleet_env)  # a 401 rests the primary for minutes: not for others
    yield done


@pytest.fixture
def sim_faults(simulator, fleet_env) -> Iterator[Any]:
    """The simulator, reset after the test (its fault queues are process-global), and a
    clean live state before and after."""
    simulator.reset()
    reset_live_state(fleet_env)
    yield simulator
    simulator.reset()
    reset_live_state(fleet_env)


@pytest.mark.parametrize("fault", sorted(RETRY))
def test_transient_error_is_retried_later_and_the_next_model_answers(outcomes, fault) -> None:
    job = outcomes[fault]
    result = job.result
    assert result.ok, result.error
    assert result.job_id == job.handle.id
    assert result.model == SECOND  # answered by the next model of the chain
    assert job.tag in (result.text or "")
    first, second = result.attempts
    assert (first.model, first.outcome) == (PRIMARY, "error")
    assert (first.error_kind, first.action) == (RETRY[fault], "retry")
    assert (second.model, second.outcome) == (SECOND, "ok")
    # The primary was called exactly once: the job did not wait to try it again.
    assert len(job.primary_calls) == 1


def test_retry_after_is_parsed_from_seconds_and_http_dates(outcomes) -> None:
    first = {f: outcomes[f].result.attempts[0] for f in ("429", "429:1", "429:date:1")}
    assert first["429"].retry_after_s is None
    assert first["429:1"].retry_after_s == 1.0
    # An HTTP-date has whole seconds: "now + 1 s" rounds down to between 0 and 1 s ahead.
    date_wait = first["429:date:1"].retry_after_s
    assert date_wait is not None and 0.0 <= date_wait <= 1.0


def test_timeouts_give_up_at_the_provider_timeout(outcomes) -> None:
    # The call waited for the provider's 2 s timeout, and gave up then (the simulator holds
    # such a request for an hour; the job's result came within TIMEOUT_S)
    for fault in ("timeout", "stall"):
        first = outcomes[fault].result.attempts[0]
        assert 1_900 <= first.latency_ms < TIMEOUT_S * 1000, (fault, first.latency_ms)


@pytest.mark.parametrize("fault", sorted(NEXT))
def test_unusable_model_is_left_for_the_next_one(outcomes, fault) -> None:
    job = outcomes[fault]
    result = job.result
    assert result.ok, result.error
    assert result.model == SECOND
    first, second = result.attempts
    assert (first.model, first.outcome) == (PRIMARY, "error")
    assert (first.error_kind, first.action) == (NEXT[fault], "next")
    assert second.outcome == "ok"
    assert len(job.primary_calls) == 1


def test_bad_request_fails_the_job_at_once(outcomes) -> None:
    job = outcomes["400"]
    result = job.result
    assert not result.ok
    with pytest.raises(JobFailed) as caught:
        job.handle.get(timeout=TIMEOUT_S)
    assert caught.value.result["error"] == result.error
    (only,) = result.attempts  # no other model was tried
    assert (only.model, only.outcome) == (PRIMARY, "error")
    assert (only.error_kind, only.action) == ("bad_request", "fail")
    assert result.error and result.error.startswith(f"{PRIMARY}: HTTP 400")
    assert len(job.primary_calls) == 1


RETRY_AFTER_S = 3  # longer than a hop between models takes, even on a loaded machine


def test_retry_after_is_honoured_before_a_model_is_tried_again(fleet_app, sim_faults) -> None:
    """Every model of the chain rate-limits once with Retry-After: 3 s. The job walks the
    chain without waiting that long, then comes back to the primary no sooner than 3 s
    after its first attempt ended, and that second try answers."""
    fault = f"429:{RETRY_AFTER_S}"
    sim_faults.configure(models={up: {"faults": [fault]} for up in UPSTREAM.values()})
    tag = f"retry-after-{uuid.uuid4().hex[:8]}"
    result = dispatch(ask(f"{tag} wait for me", task_class="user_facing")).get(timeout=TIMEOUT_S)
    assert result.ok, result.error
    assert [a.model for a in result.attempts] == [*UPSTREAM, PRIMARY]
    assert [a.outcome for a in result.attempts] == ["error"] * 4 + ["ok"]
    assert all(
        a.retry_after_s == RETRY_AFTER_S and a.action == "retry" for a in result.attempts[:4]
    )

    def ended(attempt: Any) -> float:
        return float(attempt.started_at + attempt.latency_ms / 1000)

    first, *others, again = result.attempts
    # Moving on to a different model: at once, not after the Retry-After.
    for before, after in zip([first, *others], others, strict=False):
        assert after.started_at - ended(before) < RETRY_AFTER_S, (before.model, after.model)
    # The same model again: after its Retry-After (a little slack for clock rounding).
    assert again.started_at - ended(first) >= RETRY_AFTER_S - 0.02
    assert result.model == PRIMARY and tag in (result.text or "")


def test_a_model_without_its_key_is_skipped_without_a_call(fleet_env, simulator) -> None:
    """A worker whose environment lacks ZAI_API_KEY skips zai/glm-4.7 (reason no_key)
    without calling it, and the same delivery goes on to MiniMax-M2.1 on its queue."""
    catalog = load_catalog(fleet_env["FLEET_CATALOG"])
    environ = {k: v for k, v in fleet_env.items() if k != "ZAI_API_KEY"}
    registry = ProviderRegistry(catalog, 4, environ=environ)
    tag = f"no-key-{uuid.uuid4().hex[:8]}"
    job = {"id": tag, **ask(f"{tag} hello", task_class="user_facing")}
    started = time.time()
    try:
        step = advance(catalog, job, None, here="subscription", providers=registry, worker="t")
    finally:
        registry.close()
    calls = sim_requests(simulator, started, time.time())
    assert isinstance(step, Done), step
    skipped, answered = step.result.attempts
    assert (skipped.model, skipped.outcome) == (PRIMARY, "skipped")
    assert (skipped.error_kind, skipped.action) == ("no_key", "next")
    assert skipped.error == "ZAI_API_KEY is not set"
    assert (answered.model, answered.outcome) == (SECOND, "ok")
    assert step.result.model == SECOND and step.result.queue_path == ["subscription"]
    assert [c["model"] for c in calls if c["model"] == "glm-4.7"] == []
    (call,) = [c for c in calls if c["model"] == "MiniMax-M2.1"]
    assert call["authorization_present"]
