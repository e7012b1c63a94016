"""Jobs travel through Redis to real worker processes that call the simulator over HTTP
(or the tiny MLX model) and fall back down their chain."""

from __future__ import annotations

import pytest

from client import dispatch
from router import InvalidJob, JobFailed

TIMEOUT_S = 60


def ask(text: str, **fields):
    return {"messages": [{"role": "user", "content": text}], **fields}


def test_a_user_facing_job_is_answered_by_its_primary(fleet_app, simulator) -> None:
    handle = dispatch(ask("Say hello to the user", task_class="user_facing"))
    result = handle.get(timeout=TIMEOUT_S)
    assert result.ok and result.job_id == handle.id
    assert result.model == "zai/glm-4.7"
    assert result.text and "glm-4.7" in result.text
    assert [a.queue for a in result.attempts] == ["subscription"]
    assert result.attempts[0].prompt_tokens > 0 and result.attempts[0].completion_tokens > 0
    assert result.total_tokens == result.prompt_tokens + result.completion_tokens


def test_escalation_across_queues_keeps_the_task_id(fleet_app, simulator) -> None:
    handle = dispatch(ask("[[sim:MiniMax-M2.1=503]] quick one", task_class="fast_general"))
    result = handle.get(timeout=TIMEOUT_S)
    assert result.ok, result.error
    assert result.job_id == handle.id
    assert result.queue_path == ["subscription", "free"]
    first, second = result.attempts
    assert (first.outcome, first.error_kind, first.action) == ("error", "server_error", "retry")
    assert second.model == "openrouter/meta-llama/llama-3.1-405b-instruct:free"
    assert first.worker != second.worker  # really another queue's worker


def test_heartbeat_runs_on_the_local_mlx_model(fleet_app) -> None:
    handle = dispatch(ask("ping", task_class="heartbeat", source="heartbeat", max_tokens=8))
    result = handle.get(timeout=TIMEOUT_S)
    assert result.ok, result.error
    assert result.model == "local/qwen3-mlx"
    assert result.queue_path == ["local"]
    assert 0 < result.attempts[0].completion_tokens <= 8
    assert not result.attempts[0].tokens_estimated


def test_bad_job_is_refused_before_anything_is_queued(fleet_app) -> None:
    with pytest.raises(InvalidJob):
        dispatch({"task_class": "nope", "messages": []})


def test_cron_job_never_escalates_into_subscription(fleet_app) -> None:
    handle = dispatch(ask("[[sim:*=503]] digest", task_class="creative", source="cron"))
    with pytest.raises(JobFailed) as caught:
        handle.get(timeout=TIMEOUT_S)
    result = caught.value.result
    tiers = {a["tier"] for a in result["attempts"]}
    assert tiers <= {"free", "local"}
    assert "every model failed" in result["error"]


def test_a_batch_sent_in_one_round_trip_is_answered_job_by_job(fleet_app, simulator) -> None:
    from client import dispatch_many

    handles = dispatch_many([ask(f"batch item {i}", task_class="cost_free") for i in range(5)])
    results = [h.get(timeout=TIMEOUT_S) for h in handles]
    assert [r.job_id for r in results] == [h.id for h in handles]
    assert all(r.ok and r.queue_path == ["free"] for r in results)
