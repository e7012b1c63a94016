"""The HTTP gateway (`fleet serve`) driven as apps drive it: the official `openai` package
for chat completions and the model list, plain HTTP for the job API; behind it the test
fleet's real workers, redis-server and the provider simulator."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from router.jobs import TUNING_FIELDS
from tests.fixtures import reset_live_state, url_of

FLEET = str(Path(sys.executable).with_name("fleet"))
ROOT = Path(__file__).resolve().parents[1]


def fleet(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FLEET, *args], env=env, capture_output=True, text=True, timeout=60)


def new_key(env: dict[str, str], app: str, *options: str) -> str:
    made = fleet(env, "keys", "create", app, *options)
    assert made.returncode == 0, made.stderr
    return made.stdout.strip()


class Gateway:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log_path = log
        self.log_file = open(log, "w+")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [FLEET, "serve", "--port", "0"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=self.log_file,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        found = re.search(r"(http://127\.0\.0\.1:\d+/v1)", line)
        if not found:
            self.stop()
            raise RuntimeError(f"fleet serve did not start: {line!r} {log.read_text()[-2000:]}")
        self.url = found.group(1)

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        for c in _clients:
            c.close()
        _clients.clear()
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.log_file.close()


def gateway_fixture(name: str, timeout_s: int) -> Any:
    """A module's `gateway` fixture: `fleet serve` in front of the test fleet, its chat
    requests waiting at most `timeout_s`."""

    @pytest.fixture(scope="module")
    def gateway(fleet_env, fleet_workers, tmp_path_factory) -> Iterator[Gateway]:
        env = {**fleet_env, "FLEET_GATEWAY_TIMEOUT_S": str(timeout_s)}
        gw = Gateway(env, tmp_path_factory.mktemp(name) / "gateway.log")
        yield gw
        gw.stop()

    return gateway


gateway = gateway_fixture("gateway", 20)


@pytest.fixture(scope="module")
def app_key(fleet_env) -> str:
    return new_key(fleet_env, "tests-app")


_clients: list[openai.OpenAI] = []  # closed with the gateway


def client(gateway: Gateway, key: str) -> openai.OpenAI:
    made = openai.OpenAI(base_url=gateway.url, api_key=key, max_retries=0, timeout=60)
    _clients.append(made)
    return made


def ask(text: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": text}]


def test_a_chat_completion_through_the_fleet(gateway, app_key) -> None:
    # When an app asks with the official client, naming a task class as the model
    raw = client(gateway, app_key).chat.completions.with_raw_response.create(
        model="fleet/user_facing", messages=ask("Say hello to the user"), temperature=0.2
    )
    completion = raw.parse()
    # Then the fleet's primary answers, in OpenAI's shape, with the fleet's headers
    assert completion.model == "zai/glm-4.7"
    assert completion.choices[0].message.content and completion.choices[0].finish_reason
    usage = completion.usage
    assert usage is not None and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.model_extra is not None and usage.model_extra["cost"] == 0.0  # subscription
    job_id = raw.headers["x-fleet-job-id"]
    assert completion.id == f"chatcmpl-{job_id}"
    assert raw.headers["x-fleet-model"] == "zai/glm-4.7"
    assert (
        raw.headers["x-fleet-attempts"] == "1" and raw.headers["x-fleet-queues"] == "subscription"
    )


def test_a_paid_profile_reports_its_cost_and_an_escalation_its_path(gateway, app_key) -> None:
    c = client(gateway, app_key)
    paid = c.chat.completions.create(model="profile/routing", messages=ask("Route this"))
    assert paid.model == "litellm/kimi"
    usage = paid.usage
    assert usage is not None and usage.model_extra is not None
    cost = usage.model_extra["cost"]
    expected = (usage.prompt_tokens * 0.56 + usage.completion_tokens * 2.94) / 1e6
    assert cost == pytest.approx(expected, rel=1e-6) and cost > 0
    raw = c.chat.completions.with_raw_response.create(
        model="fleet/fast_general", messages=ask("[[sim:MiniMax-M2.1=503]] quick")
    )
    assert raw.headers["x-fleet-queues"] == "subscription,free"
    assert raw.headers["x-fleet-attempts"] == "2"


def test_the_model_list_names_every_model_and_route(gateway, app_key) -> None:
    listed = {m.id: m for m in client(gateway, app_key).models.list()}
    assert {"fleet/user_facing", "fleet/heartbeat", "profile/code", "focus/trader"} <= set(listed)
    kimi = listed["litellm/kimi"].model_extra
    assert kimi is not None and kimi["tier"] == "paid" and kimi["usd_per_mtok_out"] == 2.94
    assert kimi["queue"] and kimi["context_window"] > 0


def test_each_refusal_is_the_sdks_own_typed_error(gateway, app_key, fleet_env) -> None:
    c = client(gateway, app_key)
    with pytest.raises(openai.AuthenticationError):
        client(gateway, "mf-000000000000-" + "x" * 43).models.list()
    with pytest.raises(openai.NotFoundError, match="GET /v1/models lists them"):
        c.chat.completions.create(model="nope/nothing", messages=ask("hi"))
    with pytest.raises(openai.BadRequestError, match="temperature") as hot:
        c.chat.completions.create(model="fleet/creative", messages=ask("hi"), temperature=7)
    assert hot.value.param == "temperature"
    with pytest.raises(openai.BadRequestError, match="only one choice") as many:
        c.chat.completions.create(model="fleet/creative", messages=ask("hi"), n=2)
    assert many.value.param == "n"
    narrow = client(gateway, new_key(fleet_env, "narrow-app", "--classes", "cost_free"))
    with pytest.raises(openai.PermissionDeniedError, match="allowed: cost_free"):
        narrow.chat.completions.create(model="fleet/creative", messages=ask("hi"))
    slow = client(gateway, new_key(fleet_env, "one-a-minute", "--requests-per-min", "1"))
    slow.chat.completions.create(model="fleet/cost_free", messages=ask("first"))
    with pytest.raises(openai.RateLimitError) as limited:
        slow.chat.completions.create(model="fleet/cost_free", messages=ask("second"))
    assert 0 < int(limited.value.response.headers["retry-after"]) <= 60
    with pytest.raises(openai.APIStatusError) as big:
        c.chat.completions.create(model="fleet/long_context", messages=ask("x" * 9_000_000))
    assert big.value.status_code == 413


def test_no_usable_model_is_503_with_every_reason(gateway, app_key, fleet_env) -> None:
    import redis

    client_ = redis.Redis.from_url(fleet_env["FLEET_BROKER_URL"])
    until = int((time.time() + 3600) * 1000)
    chain = [
        "local/qwen3-mlx",
        "local/phi4-mini-local",
        "local/qwen-cpu-fallback",
        "litellm/gpt-oss-small-free",
    ]
    try:
        for model in chain:
            client_.set(f"fleet:cooldown:{model}", f"{until}|test", px=3_600_000)
        time.sleep(1.1)  # the dispatcher's view of live state is a second old at most
        with pytest.raises(openai.InternalServerError) as caught:
            client(gateway, app_key).chat.completions.create(
                model="fleet/heartbeat",
                messages=ask("ping"),
                extra_body={"source": "heartbeat"},
            )
        assert caught.value.status_code == 503
        body = caught.value.body
        assert isinstance(body, dict) and [m["model"] for m in body["models"]] == chain
    finally:
        reset_live_state(fleet_env)
        client_.close()


def test_a_request_that_outlives_its_wait_is_504_and_the_job_goes_on(
    gateway, app_key, simulator
) -> None:
    simulator.configure(models={"meta-llama/llama-3.1-405b-instruct:free": {"latency_ms": 2500}})
    try:
        with pytest.raises(openai.InternalServerError) as caught:
            client(gateway, app_key).chat.completions.create(
                model="fleet/cost_free", messages=ask("slow one"), extra_body={"timeout_s": 0.5}
            )
        assert caught.value.status_code == 504
        job_id = caught.value.body["job_id"]  # type: ignore[index]
        headers = {"Authorization": f"Bearer {app_key}"}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            state = httpx.get(f"{gateway.url}/jobs/{job_id}", headers=headers).json()
            if state["status"] == "success":
                break
            time.sleep(0.2)
        assert state["status"] == "success" and state["result"]["ok"]
    finally:
        simulator.reset()


def test_the_job_api(gateway, app_key, fleet_env) -> None:
    headers = {"Authorization": f"Bearer {app_key}"}
    job = {"task_class": "cost_free", "messages": ask("a job nobody waits on")}
    created = httpx.post(f"{gateway.url}/jobs", json=job, headers=headers)
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    deadline = time.monotonic() + 30
    while (state := httpx.get(f"{gateway.url}/jobs/{job_id}", headers=headers).json())[
        "status"
    ] != "success" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert state["result"]["ok"] and state["result"]["job_id"] == job_id
    # Another app's key does not see it
    other = {"Authorization": f"Bearer {new_key(fleet_env, 'other-app')}"}
    assert httpx.get(f"{gateway.url}/jobs/{job_id}", headers=other).status_code == 404
    # A finished job cannot be revoked; a job may not name its own app
    assert httpx.delete(f"{gateway.url}/jobs/{job_id}", headers=headers).status_code == 409
    forged = httpx.post(f"{gateway.url}/jobs", json={**job, "app": "x"}, headers=headers)
    assert forged.status_code == 400 and "set by the gateway" in forged.text


def test_a_repeated_idempotency_key_follows_the_first_job_and_leaves_no_other(
    gateway, fleet_env
) -> None:
    import redis

    headers = {"Authorization": f"Bearer {new_key(fleet_env, 'repeater')}", "Idempotency-Key": "k1"}
    job = {"task_class": "cost_free", "messages": ask("once only")}
    first = httpx.post(f"{gateway.url}/jobs", json=job, headers=headers)
    again = httpx.post(f"{gateway.url}/jobs", json=job, headers=headers)
    assert first.status_code == again.status_code == 202, (first.text, again.text)
    assert again.json()["id"] == first.json()["id"]
    state = redis.Redis.from_url(fleet_env["FLEET_BROKER_URL"])
    try:
        owned = [
            k.decode().rsplit(":", 1)[1]
            for k in state.scan_iter("fleet:gateway:owner:*")
            if json.loads(state.get(k) or "{}").get("app") == "repeater"
        ]
    finally:
        state.close()
    assert owned == [first.json()["id"]]


def test_an_idempotency_key_is_the_apps_own(gateway, fleet_env) -> None:
    # Given two apps that happen to send the same Idempotency-Key
    job = {"task_class": "cost_free", "messages": ask("mine alone")}
    ids = []
    for app in ("keeper-a", "keeper-b"):
        headers = {"Authorization": f"Bearer {new_key(fleet_env, app)}", "Idempotency-Key": "k"}
        reply = httpx.post(f"{gateway.url}/jobs", json=job, headers=headers)
        assert reply.status_code == 202, reply.text
        ids.append(reply.json()["id"])
    # Then each has its own job: neither is handed the other's (nor its answer)
    assert ids[0] != ids[1]


def test_a_revoked_job_never_runs(gateway, fleet_env, simulator) -> None:
    import redis

    key = new_key(fleet_env, "revoker")
    headers = {"Authorization": f"Bearer {key}"}
    state = redis.Redis.from_url(fleet_env["FLEET_BROKER_URL"])
    until = int((time.time() + 4) * 1000)
    chain = [
        "openrouter/meta-llama/llama-3.1-405b-instruct:free",
        "openrouter/nousresearch/hermes-3-llama-3.1-405b:free",
        "litellm/deepseek-free",
        "litellm/gpt-oss-free",
        "local/qwen3-mlx",
    ]
    try:
        # Given a job whose every model rests for a few seconds: a worker holds it,
        # waiting for the first to be free again
        for model in chain:
            state.set(f"fleet:cooldown:{model}", f"{until}|test", px=4000)
        time.sleep(1.1)
        job = {"task_class": "cost_free", "messages": ask("revoke me while I wait")}
        created = httpx.post(f"{gateway.url}/jobs", json=job, headers=headers).json()
        time.sleep(0.5)
        # When its app revokes it
        gone = httpx.delete(f"{gateway.url}/jobs/{created['id']}", headers=headers)
        assert gone.status_code == 202 and gone.json()["status"] == "revoking", gone.text
        # Then its next step ends it as revoked, and no provider ever sees it
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            status = httpx.get(f"{gateway.url}/jobs/{created['id']}", headers=headers).json()
            if status["status"] != "started":
                break
            time.sleep(0.2)
        assert status["status"] == "revoked", status
        assert status["result"]["task_class"] == "cost_free", status
        assert status["result"]["error"] == "revoked by its app", status
        assert not [r for r in simulator.requests() if "revoke me" in json.dumps(r)]
        again = httpx.delete(f"{gateway.url}/jobs/{created['id']}", headers=headers)
        assert again.status_code == 409
    finally:
        reset_live_state(fleet_env)
        state.close()


def test_a_job_revoked_before_any_worker_takes_it_keeps_its_class_and_source(
    fleet_env, fresh_redis, tmp_path
) -> None:
    # Given a gateway of a fleet no worker serves: the jobs it sends wait in their queues
    env = {
        **fleet_env,
        "FLEET_BROKER_URL": url_of(fresh_redis),
        "FLEET_LEDGER_URL": f"sqlite:///{tmp_path / 'ledger.db'}",
    }
    lonely = Gateway(env, tmp_path / "gateway.log")
    try:
        headers = {"Authorization": f"Bearer {new_key(env, 'early-revoker')}"}
        job = {"task_class": "creative", "source": "sub-agent", "messages": ask("never run")}
        created = httpx.post(f"{lonely.url}/jobs", json=job, headers=headers)
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]
        # When its app revokes it before any worker has taken it
        gone = httpx.delete(f"{lonely.url}/jobs/{job_id}", headers=headers)
        assert gone.status_code == 200 and gone.json()["status"] == "revoked", gone.text
        # Then the job API reports it revoked as the job it was: its class, its source
        state = httpx.get(f"{lonely.url}/jobs/{job_id}", headers=headers).json()
        assert state["status"] == "revoked", state
        result = state["result"]
        assert (result["job_id"], result["task_class"], result["source"]) == (
            job_id,
            "creative",
            "sub-agent",
        ), result
        assert not result["ok"] and result["error"] == "revoked by its app", result
        assert result["attempts"] == []
    finally:
        lonely.stop()


def test_keys_are_hashed_listed_without_the_key_and_revocable(gateway, fleet_env) -> None:
    key = new_key(fleet_env, "short-lived")
    key_id = key.split("-")[1]
    listed = json.loads(fleet(fleet_env, "keys", "list", "--json").stdout)
    mine = [k for k in listed if k["key_id"] == key_id]
    assert mine and mine[0]["app"] == "short-lived" and key not in json.dumps(listed)
    assert mine[0]["admin"] is False
    admin_id = new_key(fleet_env, "operators", "--admin").split("-")[1]
    listed = json.loads(fleet(fleet_env, "keys", "list", "--json").stdout)
    assert [k["admin"] for k in listed if k["key_id"] == admin_id] == [True]
    lines = fleet(fleet_env, "keys", "list").stdout.splitlines()
    assert [x.endswith("; admin") for x in lines if x.startswith(admin_id)] == [True]
    assert not any(x.endswith("; admin") for x in lines if x.startswith(key_id))
    ledger = Path(fleet_env["FLEET_LEDGER_URL"].removeprefix("sqlite:///")).read_bytes()
    assert key.encode() not in ledger
    c = client(gateway, key)
    c.models.list()
    assert fleet(fleet_env, "keys", "revoke", key_id).returncode == 0
    time.sleep(2.2)  # keys are cached for 2 s
    with pytest.raises(openai.AuthenticationError):
        c.models.list()
    bad = fleet(fleet_env, "keys", "revoke", "nosuchkey")
    assert bad.returncode == 2 and "no active key 'nosuchkey'" in bad.stderr
    assert key not in gateway.log()


def test_metrics_are_for_admin_keys_and_parse_as_prometheus_text(gateway, fleet_env) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    url = gateway.url.removesuffix("/v1") + "/metrics"
    app_key, admin_key = new_key(fleet_env, "no-metrics"), new_key(fleet_env, "ops", "--admin")
    assert httpx.get(url).status_code == 401
    refused = httpx.get(url, headers={"Authorization": f"Bearer {app_key}"})
    assert refused.status_code == 403 and "--admin" in refused.json()["error"]["message"]
    scraped = httpx.get(url, headers={"Authorization": f"Bearer {admin_key}"})
    assert scraped.status_code == 200 and scraped.headers["content-type"].startswith("text/plain")
    names = {f.name for f in text_string_to_metric_families(scraped.text)}
    assert {"fleet_queue_depth", "fleet_model_state", "fleet_dead_letters"} <= names
    assert {"fleet_jobs", "fleet_attempts", "fleet_tokens", "fleet_escalations"} <= names
    assert admin_key not in scraped.text and app_key not in scraped.text
    # and after a paid call, its spend is the ledger's (read before and after the scrape:
    # other tests' jobs may still be ending)
    from workers.ledger.query import Filters, Usage
    from workers.ledger.store import Ledger

    paid = client(gateway, app_key).chat.completions.create(
        model="litellm/kimi", messages=ask("a paid call"), max_tokens=20
    )
    ledger = Ledger(fleet_env["FLEET_LEDGER_URL"], redis_url=None)
    try:
        deadline = time.monotonic() + 20
        while not Usage(ledger, Filters(app="no-metrics")).totals()["cost_usd"]:
            assert time.monotonic() < deadline, f"{paid.id} not in the ledger"
            time.sleep(0.2)
        for _ in range(20):
            before = Usage(ledger).totals()["cost_usd"]
            scraped = httpx.get(url, headers={"Authorization": f"Bearer {admin_key}"})
            if Usage(ledger).totals()["cost_usd"] == before:
                break
            time.sleep(0.5)
    finally:
        ledger.close()
    spend = [
        s.value
        for f in text_string_to_metric_families(scraped.text)
        if f.name == "fleet_spend_usd"
        for s in f.samples
    ]
    assert before > 0 and sum(spend) == pytest.approx(before, abs=1e-6)


def test_the_gateway_binds_to_loopback_by_default() -> None:
    help_text = subprocess.run([FLEET, "serve", "--help"], capture_output=True, text=True)
    assert "default loopback" in help_text.stdout
    assert os.environ.get("FLEET_GATEWAY_HOST") is None


def test_concurrent_requests_never_spend_past_a_keys_budget(gateway, fleet_env) -> None:
    import concurrent.futures

    from sqlalchemy import func, select

    from workers.ledger.schema import attempts
    from workers.ledger.store import Ledger

    # Given a key capped at 2 cents a day, and 200 requests sent at once, each on a paid
    # model and costing about 0.23 cents (a 4,000-token prompt, 20 tokens out)
    cap = 0.02
    c = client(gateway, new_key(fleet_env, "racer", "--usd-per-day", str(cap)))
    prompt = "Count the words in this text, please. " * 420

    def one(_: int) -> str:
        try:
            c.chat.completions.create(model="litellm/kimi", messages=ask(prompt), max_tokens=20)
            return "ok"
        except openai.RateLimitError:
            return "429"

    with concurrent.futures.ThreadPoolExecutor(200) as pool:
        outcomes = list(pool.map(one, range(200)))
    answered = outcomes.count("ok")
    # Then some were answered and the rest refused with 429
    assert answered >= 1 and outcomes.count("429") == 200 - answered
    # And the ledger's spend for the key's app never passes the cap
    ledger = Ledger(fleet_env["FLEET_LEDGER_URL"], redis_url=None)
    try:
        query = select(func.count(), func.sum(attempts.c.cost_usd)).where(attempts.c.app == "racer")
        deadline = time.monotonic() + 15
        while True:
            with ledger.engine.connect() as conn:
                rows, spent = conn.execute(query).one()
            if rows >= answered or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        ledger.close()
    assert rows == answered
    assert 0 < spent <= cap
    assert spent > cap / 2, f"the budget was barely used: ${spent:.5f} of ${cap}"
    # (`fleet usage --by app` shows the same figure)
    usage = json.loads(fleet(fleet_env, "usage", "--by", "app", "--json").stdout)
    assert [row["cost_usd"] for row in usage if row["app"] == "racer"] == [
        pytest.approx(spent, abs=1e-9)
    ]


# The request fields a provider is sent (OpenAI's names), and the fleet's own, which it is not
PROVIDER_FIELDS = ("temperature", "max_tokens", "max_completion_tokens", *TUNING_FIELDS)
FLEET_FIELDS = ("task_class", "source", "priority", "deadline", "metadata", "timeout_s")
UNKNOWN_FIELDS = ("x_fleet_probe", "store", "verbosity", "service_tier")
EVERY_FIELD = {  # one request setting every field a provider may be sent
    "model": "fleet/cost_free",
    "messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "x"}],
    "temperature": 0.3,
    "max_completion_tokens": 50,
    "tools": [{"type": "function", "function": {"name": "get_a", "parameters": {}}}],
    "tool_choice": "auto",
    "parallel_tool_calls": False,
    "response_format": {"type": "json_object"},
    "stop": ["\n\n\n"],
    "top_p": 0.9,
    "seed": 7,
    "presence_penalty": 0.1,
    "frequency_penalty": 0.2,
    "logit_bias": {"50256": -100},
    "logprobs": True,
    "top_logprobs": 2,
    "reasoning_effort": "low",
    "user": "fuzz-user",
    "stream": False,
    "stream_options": {"include_usage": True},
    "x_fleet_probe": {"a": [1, None]},
    "store": False,
}


def chat_fields(values: Any) -> dict[str, Any]:
    """A hypothesis strategy per chat request field: mostly a value OpenAI takes, sometimes
    one it refuses."""
    from hypothesis import strategies as st

    names = st.sampled_from(["get_a", "get_b"])
    tool = st.fixed_dictionaries(
        {
            "type": st.just("function"),
            "function": st.fixed_dictionaries(
                {"name": names},
                optional={
                    "description": st.text(max_size=20),
                    "parameters": st.just(
                        {"type": "object", "properties": {"q": {"type": "string"}}}
                    ),
                    "strict": st.booleans(),
                },
            ),
        }
    )
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    return {
        "temperature": st.floats(-0.5, 2.5),
        "max_tokens": st.integers(-1, 400),
        "max_completion_tokens": st.integers(-1, 400),
        "tools": st.lists(tool, max_size=2, unique_by=lambda t: t["function"]["name"]),
        "tool_choice": st.sampled_from(["none", "auto", "required", "sometimes"])
        | st.builds(lambda n: {"type": "function", "function": {"name": n}}, names),
        "parallel_tool_calls": st.booleans(),
        "response_format": st.sampled_from(
            [
                {"type": "text"},
                {"type": "json_object"},
                {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
                {
                    "type": "json_schema",
                    "json_schema": {"name": "s", "schema": schema, "strict": True},
                },
                {"type": "yaml"},
            ]
        ),
        "stop": st.text(min_size=1, max_size=5)
        | st.lists(st.text(min_size=1, max_size=5), max_size=5),
        "top_p": st.floats(-0.5, 1.5),
        "seed": st.integers(-(2**40), 2**40),
        "presence_penalty": st.floats(-2.5, 2.5),
        "frequency_penalty": st.floats(-2.5, 2.5),
        "logit_bias": st.dictionaries(
            st.sampled_from(["50256", "11", "x"]), st.integers(-120, 120), max_size=2
        ),
        "logprobs": st.booleans(),
        "top_logprobs": st.integers(-1, 22),
        "reasoning_effort": st.sampled_from(["minimal", "low", "medium", "high", "extreme"]),
        "user": st.text(max_size=12),
        "stream": st.sampled_from([False, True]),
        "stream_options": st.just({"include_usage": True}),
        **{name: values for name in UNKNOWN_FIELDS},
    }


def arrived(simulator: Any, body: dict[str, Any], reply: httpx.Response) -> list[str]:
    """Each provider field the request set: on the answering model's call as sent, or
    listed in x-fleet-dropped and not sent."""
    job_id = reply.headers["x-fleet-job-id"]
    calls = [r["body"] for r in simulator.requests() if r.get("job") == job_id]
    assert calls, f"no provider call for job {job_id}"
    got = calls[-1]
    dropped = set(reply.headers.get("x-fleet-dropped", "").split(","))
    fields = [f for f in (*PROVIDER_FIELDS, *UNKNOWN_FIELDS) if body.get(f) is not None]
    for field in fields:
        wire = "max_tokens" if field == "max_completion_tokens" else field
        if field in dropped:
            assert wire not in got, (field, got)
        elif field != "max_tokens" or body.get("max_completion_tokens") is None:
            assert got.get(wire) == body[field], (field, body[field], got.get(wire))
    for field in FLEET_FIELDS:
        assert field not in got, (field, got)
    if body.get("stream_options") is not None:
        assert "stream_options" in dropped and "stream_options" not in got
    return fields


def test_fuzzed_bodies_and_headers_never_get_a_500_and_a_refusal_queues_nothing(
    gateway, fleet_env, simulator
) -> None:
    import redis
    from hypothesis import HealthCheck, example, given, settings
    from hypothesis import strategies as st

    key = new_key(fleet_env, "fuzzer")
    state = redis.Redis.from_url(fleet_env["FLEET_BROKER_URL"])
    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
    values = st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
        ),
        max_leaves=8,
    )
    fields = st.sampled_from(
        [
            "model",
            "messages",
            "n",
            "stream",
            "stream_options",
            "app",
            "reservation",
            "id",
            *PROVIDER_FIELDS,
            *FLEET_FIELDS,
            *UNKNOWN_FIELDS,
        ]
    )
    field_values = chat_fields(values)
    optional = {name: strategy | values for name, strategy in field_values.items()}
    message = st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "system", "developer", "tool", "assistant", 3]),
            "content": st.text(max_size=40) | values,
        }
    )
    routes = st.sampled_from(["fleet/cost_free", "fleet/user_facing"])
    body = st.one_of(
        values,
        st.dictionaries(fields, values, max_size=6),
        st.fixed_dictionaries(
            {
                "model": routes | st.sampled_from(["fleet/x", "profile/code", "zz"]),
                "messages": st.lists(message, min_size=1, max_size=2),
            },
            optional={**optional, "priority": values},
        ),
        # A few fields at a time, each mostly a value OpenAI takes: most are answered
        st.lists(st.sampled_from(sorted(field_values)), max_size=5, unique=True).flatmap(
            lambda names: st.fixed_dictionaries(
                {
                    "model": routes,
                    "messages": st.just([{"role": "user", "content": "fuzz"}]),
                    **{name: field_values[name] for name in names},
                }
            )
        ),
    )
    printable = st.characters(min_codepoint=33, max_codepoint=126)
    headers = st.fixed_dictionaries(
        {},
        optional={
            "Idempotency-Key": st.text(printable, max_size=250),
            "Content-Type": st.sampled_from(["application/json", "text/plain", "x/y"]),
        },
    )
    accepted: list[str] = []
    reached: list[str] = []  # every provider field of an answered request, sent or dropped

    slow_ok = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]

    @settings(max_examples=200, deadline=None, suppress_health_check=slow_ok)
    @given(path=st.sampled_from(["/chat/completions", "/jobs"]), body=body, extra=headers)
    @example(path="/chat/completions", body=EVERY_FIELD, extra={})
    def door(path: str, body: Any, extra: dict[str, str]) -> None:
        sent = {"Authorization": f"Bearer {key}", **extra}
        reply = httpx.post(
            f"{gateway.url}{path}", content=json.dumps(body), headers=sent, timeout=60
        )
        assert reply.status_code < 500 or reply.status_code in (502, 503, 504), reply.text
        if reply.headers.get("content-type", "").startswith("text/event-stream"):
            accepted.append(reply.headers["x-fleet-job-id"])  # streamed (test_gateway_streaming)
            return
        answer = reply.json()
        followed = False  # an Idempotency-Key led it to an earlier request's job
        if reply.status_code < 400:
            followed = answer["id"].removeprefix("chatcmpl-") in accepted
            accepted.append(answer["id"].removeprefix("chatcmpl-"))
        elif "job_id" in answer["error"]:  # queued, then failed upstream or outlived its wait
            accepted.append(answer["error"]["job_id"])
        else:
            assert answer["error"]["message"]
        if path == "/chat/completions" and reply.status_code == 200 and not followed:
            reached.extend(arrived(simulator, body, reply))

    try:
        door()
        owned = [
            k
            for k in state.scan_iter("fleet:gateway:owner:*")
            if json.loads(state.get(k) or "{}").get("app") == "fuzzer"
        ]
        # Every job the fuzzer's key queued was one it was told was accepted
        assert sorted(k.decode().rsplit(":", 1)[1] for k in owned) == sorted(set(accepted))
        # And the fuzz answered requests that set the new fields, not only refused them
        assert {"tools", "response_format", "seed", "logprobs", "x_fleet_probe"} <= set(reached)
    finally:
        state.close()
