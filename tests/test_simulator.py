"""The provider simulator, over real HTTP: answers, control API, faults, directives, CLI."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import email.utils
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types.chat import ChatCompletionMessageFunctionToolCall

from router.tokens import estimate_message_tokens, estimate_tokens
from tests.fixtures import wait_until
from workers.sim import schema_values
from workers.sim import simulator as simulator_module
from workers.sim.simulator import Simulator, check_fault

ROOT = Path(__file__).resolve().parents[1]
SECRET = "sk-sim-test-DO-NOT-LOG-7731"


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client


def chat(
    http: httpx.Client, sim: Simulator, model: str = "m", text: str = "hello", **extra: Any
) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": text}], **extra}
    return http.post(sim.url + "/chat/completions", json=body)


def raw_request(model: str = "m", text: str = "hi") -> bytes:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": text}]})
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: sim\r\nContent-Length: {len(body)}\r\n"
    return (head + "\r\n" + body).encode()


def read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """(head, body) of one HTTP response read from `sock`."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[
            1
        ]
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head, body


# --- normal answers -------------------------------------------------------------------------


def test_completion_has_the_openai_shape_and_estimated_usage(http, sim):
    response = chat(http, sim, model="zai/glm", text="Summarise the quarterly report please")
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "zai/glm"
    assert {"id", "created"} <= body.keys()
    text = "[sim zai/glm] Summarise the quarterly report please"
    assert body["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
    ]
    messages = [{"role": "user", "content": "Summarise the quarterly report please"}]
    prompt, completion = estimate_message_tokens(messages), estimate_tokens(text)
    assert body["usage"] == {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def test_answer_echoes_the_last_user_text_cut_to_60_chars(http, sim):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "text", "text": "x" * 100}]},
    ]
    body = http.post(sim.url + "/chat/completions", json={"model": "m", "messages": messages})
    assert body.json()["choices"][0]["message"]["content"] == "[sim m] " + "x" * 60


def test_max_tokens_caps_completion_tokens(http, sim):
    usage = chat(http, sim, text="a fairly long prompt to echo back", max_tokens=2).json()["usage"]
    assert usage["completion_tokens"] == 2


def test_base_url_with_or_without_v1_and_models_list(http, sim):
    sim.configure(models={"b": {}, "a": {"latency_ms": 0}})
    assert (
        http.post(
            sim.base_url + "/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        ).status_code
        == 200
    )
    for url in (sim.url + "/models", sim.base_url + "/models"):
        assert [m["id"] for m in http.get(url).json()["data"]] == ["a", "b"]


def test_bad_requests_to_the_simulator_get_400(http, sim):
    assert http.post(sim.url + "/chat/completions", content=b"{nope").status_code == 400
    assert http.post(sim.url + "/chat/completions", json={"model": "m"}).status_code == 400
    assert http.get(sim.url + "/nowhere").status_code == 404


def test_keep_alive_serves_several_requests_on_one_connection(sim):
    with socket.create_connection((sim.host, sim.port), timeout=5) as sock:
        for _ in range(3):
            sock.sendall(raw_request())
            head, body = read_response(sock)
            assert head.startswith(b"HTTP/1.1 200") and b"keep-alive" in head
            assert json.loads(body)["object"] == "chat.completion"


def test_expect_100_continue_is_honoured(sim):
    request = raw_request()
    head, _, body = request.partition(b"\r\n\r\n")
    with socket.create_connection((sim.host, sim.port), timeout=5) as sock:
        sock.sendall(head + b"\r\nExpect: 100-continue\r\n\r\n")
        assert sock.recv(25) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        assert read_response(sock)[0].startswith(b"HTTP/1.1 200")


# --- configuration and the control API ------------------------------------------------------


def test_fault_queue_is_consumed_in_order_then_normal(http, sim):
    sim.configure(models={"m": {"faults": ["503", "429:3"]}})
    statuses = [chat(http, sim).status_code for _ in range(4)]
    assert statuses == [503, 429, 200, 200]
    assert chat(http, sim, model="other").status_code == 200
    assert [r["fault"] for r in sim.requests()] == ["503", "429:3", None, None, None]


def test_sticky_fault_applies_to_every_request_of_that_model_only(http, sim):
    http.post(sim.base_url + "/_sim/config", json={"models": {"m": {"fault": "500"}}})
    assert [chat(http, sim).status_code for _ in range(3)] == [500, 500, 500]
    assert chat(http, sim, model="other").status_code == 200


def test_default_settings_apply_to_models_without_their_own(http, sim):
    sim.configure({"default": {"fault": "502"}, "models": {"good": {"fault": None}}})
    assert chat(http, sim, model="any").status_code == 502
    assert chat(http, sim, model="good").status_code == 200


def test_latency_delays_the_answer(http, sim):
    sim.configure(models={"slow": {"latency_ms": 300}})
    start = time.monotonic()
    assert chat(http, sim, model="slow").status_code == 200
    assert time.monotonic() - start >= 0.3


def test_usage_can_be_left_out_or_carry_a_cost(http, sim):
    sim.configure(models={"free": {"usage": False}, "paid": {"cost": 0.0042}})
    assert "usage" not in chat(http, sim, model="free").json()
    assert chat(http, sim, model="paid").json()["usage"]["cost"] == 0.0042


def test_config_api_refuses_unknown_faults_and_keys(http, sim):
    bad: dict[str, Any]
    for bad in (
        {"models": {"m": {"fault": "418"}}},
        {"models": {"m": {"latency": 5}}},
        {"modles": {}},
        {"default": {"faults": ["429:soon"]}},
    ):
        response = http.post(sim.base_url + "/_sim/config", json=bad)
        assert response.status_code == 400, bad
        assert "error" in response.json()
    assert http.get(sim.base_url + "/_sim/config").json() == {"models": {}, "default": {}}


def test_reset_clears_configuration_and_log(http, sim):
    sim.configure(models={"m": {"fault": "503"}})
    chat(http, sim)
    assert http.post(sim.base_url + "/_sim/reset").status_code == 200
    assert http.get(sim.base_url + "/_sim/requests").json() == []
    assert chat(http, sim).status_code == 200


def test_request_log_notes_authorization_without_its_value(http, sim):
    # Given one request with a key and one without
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.2}
    http.post(
        sim.url + "/chat/completions", json=body, headers={"Authorization": f"Bearer {SECRET}"}
    )
    chat(http, sim, model="n")
    # Then the log says whether a key came, and never what it was
    log = http.get(sim.base_url + "/_sim/requests").json()
    assert [(e["model"], e["authorization_present"]) for e in log] == [("m", True), ("n", False)]
    assert log[0]["temperature"] == 0.2 and log[0]["fault"] is None
    assert abs(log[0]["t"] - time.time()) < 60
    assert SECRET not in json.dumps(log)
    assert SECRET not in json.dumps(sim.requests())


# --- directives in the prompt ---------------------------------------------------------------


def test_directive_targets_one_model_and_is_not_echoed(http, sim):
    text = "plan the week [[sim:a=503]]"
    assert chat(http, sim, model="a", text=text).status_code == 503
    answer = chat(http, sim, model="b", text=text)
    assert answer.json()["choices"][0]["message"]["content"] == "[sim b] plan the week"


def test_directive_by_fleet_id_matches_the_upstream_name(http, sim):
    text = "[[sim:openrouter/meta-llama/llama:free=429:7]]"
    response = chat(http, sim, model="meta-llama/llama:free", text=text)
    assert (response.status_code, response.headers["retry-after"]) == (429, "7")


def test_wildcard_and_several_directives(http, sim):
    text = "[[sim:a=401]] [[sim:b=404]] go"
    assert [chat(http, sim, model=m, text=text).status_code for m in "abc"] == [401, 404, 200]
    assert chat(http, sim, model="z", text="[[sim:*=400]]").status_code == 400


def test_directive_wins_over_configured_faults(http, sim):
    sim.configure(models={"m": {"fault": "500"}})
    assert chat(http, sim, text="[[sim:m=403]]").status_code == 403


def test_directive_with_unknown_fault_is_refused_loudly(http, sim):
    response = chat(http, sim, text="[[sim:*=teapot]]")
    assert response.status_code == 400
    assert "unknown simulator fault" in response.json()["error"]["message"]


# --- faults ---------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 401, 403, 404, 408, 429, 500, 502, 503])
def test_status_faults_answer_openai_error_json(http, sim, status):
    response = chat(http, sim, text=f"[[sim:*={status}]]")
    assert response.status_code == status
    error = response.json()["error"]
    assert {"message", "type", "code"} <= error.keys()
    if status == 429:
        assert "retry-after" not in response.headers


def test_429_with_http_date(http, sim):
    before = time.time()
    response = chat(http, sim, text="[[sim:*=429:date:30]]")
    after = time.time()
    # The date is 30 s after the moment the simulator answered, in whole seconds
    when = email.utils.parsedate_to_datetime(response.headers["retry-after"]).timestamp()
    assert before + 29 <= when <= after + 30


def test_malformed_and_empty_answers(http, sim):
    malformed = chat(http, sim, text="[[sim:*=malformed]]")
    assert malformed.status_code == 200
    with pytest.raises(ValueError):
        malformed.json()
    empty = chat(http, sim, text="[[sim:*=empty]]")
    assert (empty.status_code, empty.json()["choices"]) == (200, [])


def test_timeout_fault_holds_the_client_without_blocking_others(http, sim):
    with httpx.Client(timeout=3.0) as slow, concurrent.futures.ThreadPoolExecutor(1) as pool:
        # Given a request that never gets its answer, held by the simulator
        pending = pool.submit(chat, slow, sim, "m", "[[sim:*=timeout]]")
        wait_until(sim.requests, 10, "the held request reaching the simulator")
        # Then other requests are answered meanwhile, while it is still held
        assert [chat(http, sim).status_code for _ in range(5)] == [200] * 5
        assert not pending.done()
        # And the held client times out on reading
        with pytest.raises(httpx.ReadTimeout):
            pending.result()


def test_stall_sends_headers_and_part_of_the_body(sim):
    with socket.create_connection((sim.host, sim.port), timeout=0.5) as sock:
        sock.sendall(raw_request(text="[[sim:*=stall]]"))
        data = b""
        with pytest.raises(TimeoutError):
            while True:
                chunk = sock.recv(65536)
                assert chunk, "the server closed a stalled response"
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    length = int(
        next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[
            1
        ]
    )
    assert 0 < len(body) < length


def test_reset_closes_the_socket_without_answering(sim):
    with socket.create_connection((sim.host, sim.port), timeout=5) as sock:
        sock.sendall(raw_request(text="[[sim:*=reset]]"))
        with contextlib.suppress(ConnectionResetError):  # RST, or FIN if it raced
            assert sock.recv(65536) == b""


def test_check_fault_names():
    for name in ("429", "429:5", "429:date:5", "timeout", "stall", "reset", "empty", "503"):
        assert check_fault(name) == name
    for name in ("418", "429:date", "429:x:5", "slow"):
        with pytest.raises(ValueError):
            check_fault(name)


# --- capacity and lifecycle -----------------------------------------------------------------


def test_holds_1000_slow_requests_at_once(sim):
    # Given a model answering after 2 s (longer than 1,000 connections take to arrive)
    sim.configure(default={"latency_ms": 2000})
    request = raw_request()
    answered: list[float] = []

    async def one() -> bytes:
        reader, writer = await asyncio.open_connection(sim.host, sim.port)
        try:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            answered.append(time.time())
            return head
        finally:
            writer.close()
            await writer.wait_closed()

    async def burst() -> list[bytes]:
        return await asyncio.gather(*(one() for _ in range(1000)))

    # When 1,000 clients ask at once
    heads = asyncio.run(burst())
    assert all(h.startswith(b"HTTP/1.1 200") for h in heads)
    # Then the simulator held them at once: most requests had arrived (it logs one on
    # arrival) before the first answer came back; a simulator answering one at a time
    # would have let one arrive (on a loaded machine the last connections may come late,
    # so not all 1,000 are required)
    arrived = [r["t"] for r in sim.requests()]
    assert len(arrived) == 1000
    early = sum(t < min(answered) for t in arrived)
    assert early > 500, f"only {early} requests arrived before the first answer"


def test_stop_ends_held_requests_promptly():
    server = Simulator().start()
    port = server.port
    with httpx.Client(timeout=60) as client, concurrent.futures.ThreadPoolExecutor(3) as pool:
        # Given three requests the simulator holds (a `timeout` fault: an hour)
        held = [pool.submit(chat, client, server, "m", "[[sim:*=timeout]]") for _ in range(3)]
        wait_until(lambda: len(server.requests()) == 3, 10, "three held requests")
        # When it stops
        server.stop()
        # Then each held client is cut off by the server, not left to its own read timeout
        for future in held:
            with pytest.raises(httpx.TransportError) as caught:
                future.result(timeout=30)
            assert not isinstance(caught.value, httpx.TimeoutException), caught.value
    # And the port is free again
    Simulator(port=port).start().stop()


def test_start_reports_a_port_in_use():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(RuntimeError, match="failed to start"):
            Simulator(port=taken.getsockname()[1]).start()


def test_a_second_simulator_on_the_same_port_fails_to_start(http):
    with Simulator(port=0) as first:
        # When another simulator is started on the port the first one listens on
        with pytest.raises(RuntimeError) as caught:
            Simulator(port=first.port).start()
        # Then it says where and why it could not listen
        message = str(caught.value)
        assert f"127.0.0.1:{first.port}" in message
        assert "address already in use" in message.lower()
        assert isinstance(caught.value.__cause__, OSError)
        # And the first one still answers
        assert chat(http, first).status_code == 200


def test_start_fails_when_the_server_never_listens(monkeypatch):
    # Given a server that never gets to listen (and never fails either)
    async def never_listens(state, host, port, ready, stop):
        await stop.wait()

    monkeypatch.setattr(simulator_module, "serve", never_listens)
    # Then start() gives up after its timeout rather than return a simulator that is not there
    with pytest.raises(RuntimeError, match=r"did not start listening on 127\.0\.0\.1:0 within"):
        Simulator(port=0).start(timeout_s=0.5)


def test_config_given_at_construction(http):
    with Simulator(config={"models": {"m": {"faults": ["502"]}}}) as server:
        assert [chat(http, server).status_code for _ in range(2)] == [502, 200]


# --- command line ---------------------------------------------------------------------------


def start_cli(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "workers.sim.simulator",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line.startswith("simulator listening on http://127.0.0.1:"), line
    return proc, line.rsplit(" ", 1)[1]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_serves_with_a_yaml_config_and_exits_cleanly(tmp_path, http, sig):
    config = tmp_path / "sim.yaml"
    config.write_text("models:\n  m:\n    faults: ['503']\n    cost: 0.5\n")
    proc, url = start_cli("--config", str(config))
    try:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        assert http.post(url + "/v1/chat/completions", json=body).status_code == 503
        assert http.post(url + "/chat/completions", json=body).json()["usage"]["cost"] == 0.5
    finally:
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err


def test_cli_reads_json_config_and_default_latency(tmp_path, http):
    config = tmp_path / "sim.json"
    config.write_text(json.dumps({"default": {"usage": False}}))
    proc, url = start_cli("--config", str(config), "--latency-ms", "200")
    try:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        start = time.monotonic()
        assert "usage" not in http.post(url + "/v1/chat/completions", json=body).json()
        assert time.monotonic() - start >= 0.2
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
    assert proc.returncode == 0


def test_cli_refuses_a_bad_config(tmp_path):
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"models": {"m": {"fault": "nope"}}}))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "workers.sim.simulator", "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=30,
    )
    assert done.returncode == 2
    assert "unknown simulator fault" in done.stderr


# --- answering as a provider does: tools, structured output, sampling fields ----------------

WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "minLength": 12},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 3, "maximum": 7},
                "when": {"type": "string", "format": "date"},
                "at": {
                    "type": "object",
                    "properties": {
                        "lat": {"type": "number", "minimum": -90, "maximum": -10},
                        "lon": {"type": "number", "exclusiveMinimum": 100},
                    },
                    "required": ["lat", "lon"],
                    "additionalProperties": False,
                },
                "fields": {
                    "type": "array",
                    "items": {"type": "string", "enum": ["rain", "wind", "sun"]},
                    "minItems": 2,
                    "uniqueItems": True,
                },
            },
            "required": ["city", "unit", "at"],
            "additionalProperties": False,
        },
    },
}
CLOCK: Any = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": ["string", "null"]}},
            "required": ["zone"],
        },
    },
}
PING: Any = {"type": "function", "function": {"name": "ping"}}  # no parameters at all


_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def schema_errors(value: Any, schema: Any, root: Any = None, at: str = "$") -> list[str]:
    """Why `value` is not valid against `schema` (the JSON-schema keywords the simulator's
    generator claims to cover), as a list of messages; [] when it is valid."""
    root = schema if root is None else root
    if schema is True or schema == {}:
        return []
    if schema is False:
        return [f"{at}: no value allowed"]
    if "$ref" in schema:
        target = root
        for token in schema["$ref"].lstrip("#").split("/")[1:]:
            target = target[token]
        rest = {k: v for k, v in schema.items() if k != "$ref"}
        return schema_errors(value, target, root, at) + schema_errors(value, rest, root, at)
    kinds = schema.get("type")
    kinds = [kinds] if isinstance(kinds, str) else kinds
    if kinds and not any(_TYPES[k](value) for k in kinds):
        return [f"{at}: {value!r} is not of type {kinds}"]
    errors = _choice_errors(value, schema, root, at)
    if isinstance(value, dict):
        errors += _object_errors(value, schema, root, at)
    if isinstance(value, list):
        errors += _array_errors(value, schema, root, at)
    if isinstance(value, str):
        errors += _string_errors(value, schema, at)
    if _TYPES["number"](value):
        errors += _number_errors(value, schema, at)
    return errors


def _choice_errors(value: Any, schema: dict, root: Any, at: str) -> list[str]:
    errors = []
    if "const" in schema and value != schema["const"]:
        errors.append(f"{at}: {value!r} is not {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{at}: {value!r} not in {schema['enum']}")
    for sub in schema.get("allOf", []):
        errors += schema_errors(value, sub, root, at)
    if "anyOf" in schema and all(schema_errors(value, s, root, at) for s in schema["anyOf"]):
        errors.append(f"{at}: matches no anyOf branch")
    if "oneOf" in schema:
        matching = [s for s in schema["oneOf"] if not schema_errors(value, s, root, at)]
        if len(matching) != 1:
            errors.append(f"{at}: matches {len(matching)} oneOf branches")
    return errors


def _object_errors(value: dict, schema: dict, root: Any, at: str) -> list[str]:
    properties = schema.get("properties", {})
    errors = [f"{at}: misses {r}" for r in schema.get("required", []) if r not in value]
    for key, item in value.items():
        if key in properties:
            errors += schema_errors(item, properties[key], root, f"{at}.{key}")
        elif "additionalProperties" in schema:
            errors += schema_errors(item, schema["additionalProperties"], root, f"{at}.{key}")
    return errors


def _array_errors(value: list, schema: dict, root: Any, at: str) -> list[str]:
    errors = []
    if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", math.inf):
        errors.append(f"{at}: {len(value)} items")
    if schema.get("uniqueItems") and len({json.dumps(v) for v in value}) < len(value):
        errors.append(f"{at}: items repeat")
    prefix = schema.get("prefixItems", [])
    for i, item in enumerate(value):
        sub = prefix[i] if i < len(prefix) else schema.get("items", True)
        errors += schema_errors(item, sub, root, f"{at}[{i}]")
    return errors


def _string_errors(value: str, schema: dict, at: str) -> list[str]:
    errors = []
    if not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", math.inf):
        errors.append(f"{at}: length {len(value)}")
    if "pattern" in schema and not re.search(schema["pattern"], value):
        errors.append(f"{at}: {value!r} does not match {schema['pattern']}")
    if schema.get("format") == "date" and not re.fullmatch(r"\d{4}-\d\d-\d\d", value):
        errors.append(f"{at}: {value!r} is not a date")
    return errors


def _number_errors(value: float, schema: dict, at: str) -> list[str]:
    errors = []
    low, high = schema.get("minimum", -math.inf), schema.get("maximum", math.inf)
    above = schema.get("exclusiveMinimum", -math.inf)
    below = schema.get("exclusiveMaximum", math.inf)
    if not (low <= value <= high and above < value < below):
        errors.append(f"{at}: {value} out of bounds")
    step = schema.get("multipleOf")
    if step and (value / step) != int(value / step):
        errors.append(f"{at}: {value} is not a multiple of {step}")
    return errors


def test_schema_checker_catches_invalid_values():
    # The checker the tests below trust must fail on what does not fit
    params = WEATHER["function"]["parameters"]
    good = {"city": "Lisbon, Portugal", "unit": "celsius", "at": {"lat": -20, "lon": 101}}
    assert schema_errors(good, params) == []
    for bad in (
        {**good, "unit": "kelvin"},
        {**good, "city": "Lisbon"},
        {**good, "at": {"lat": 0, "lon": 101}},
        {**good, "at": {"lat": -20, "lon": 100}},
        {**good, "fields": ["rain", "rain"]},
        {**good, "days": 2.5},
        {"city": "Lisbon, Portugal", "unit": "celsius"},
        {**good, "extra": 1},
    ):
        assert schema_errors(bad, params), bad


def openai_client(sim: Simulator) -> openai.OpenAI:
    return openai.OpenAI(base_url=sim.url, api_key="sk-sim", max_retries=0)


def ask(http: httpx.Client, sim: Simulator, messages: Any, **extra: Any) -> dict[str, Any]:
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    response = http.post(
        sim.url + "/chat/completions", json={"model": "m", "messages": messages, **extra}
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_tool_call_arguments_follow_the_tool_schema(sim):
    client = openai_client(sim)
    # When a request carries a tool with a nested schema
    completion = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "weather?"}], tools=[WEATHER]
    )
    # Then the answer is one call of it, as OpenAI shapes one
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert isinstance(call, ChatCompletionMessageFunctionToolCall)
    assert call.function.name == "get_weather"
    assert re.fullmatch(r"call_\w{8,}", call.id)
    # And its arguments are JSON valid against the tool's parameters, optional ones included
    arguments = json.loads(call.function.arguments)
    assert schema_errors(arguments, WEATHER["function"]["parameters"]) == []
    assert {"days", "when", "fields"} <= arguments.keys()
    assert arguments["at"]["lat"] <= -10 and len(arguments["fields"]) >= 2
    # And the same request gets the same call (deterministic), counted in the usage
    again = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "weather?"}], tools=[WEATHER]
    )
    assert again.choices[0].message.tool_calls == [call]
    assert completion.usage is not None and completion.usage.completion_tokens > 0


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "string", "pattern": "^[A-Z]{2}$"},
        {"type": "integer", "multipleOf": 5, "minimum": 12, "maximum": 40},
        {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
        {"type": "number", "multipleOf": 0.25, "minimum": 2.1},
        {"type": "integer", "maximum": -3},
        {"type": ["null", "boolean"]},
        {"const": {"fixed": [1, 2]}},
        {"anyOf": [{"type": "string", "maxLength": 3}, {"type": "null"}]},
        {"oneOf": [{"type": "integer"}, {"type": "string"}]},
        {
            "allOf": [
                {"properties": {"a": {"type": "integer"}}, "required": ["a"]},
                {"properties": {"b": {"type": "boolean"}}, "required": ["b"]},
            ]
        },
        {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": False},
        {
            "type": "array",
            "items": {"type": "integer", "minimum": 0, "maximum": 9},
            "minItems": 4,
            "maxItems": 4,
            "uniqueItems": True,
        },
        {"type": "array", "maxItems": 0},
        {
            "type": "object",
            "properties": {"s": {"type": "string", "format": "date"}},
            "required": ["s"],
            "additionalProperties": False,
        },
        {
            "$defs": {
                "node": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "children": {"type": "array", "items": {"$ref": "#/$defs/node"}},
                    },
                    "required": ["name", "children"],
                    "additionalProperties": False,
                }
            },
            "$ref": "#/$defs/node",
        },
    ],
)
def test_generated_values_are_valid_against_their_schema(http, sim, schema):
    # Given a json_schema response format (strict, as the openai SDK's parse() sends it)
    fmt = {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}
    # Then the answer is a JSON value valid against it, and the same every time
    first = ask(http, sim, "fill it in", response_format=fmt)
    content = first["choices"][0]["message"]["content"]
    assert schema_errors(json.loads(content), schema) == []
    assert first["choices"][0]["finish_reason"] == "stop"
    again = ask(http, sim, "fill it in", response_format=fmt)
    assert again["choices"][0]["message"]["content"] == content


def test_every_request_field_reaches_the_log(http, sim):
    # Given a request with every sampling field and one the simulator does not know
    fields: Any = {
        "stop": ["END", "\n\n"],
        "top_p": 0.9,
        "seed": 7,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "logit_bias": {"50256": -100},
        "logprobs": True,
        "top_logprobs": 2,
        "reasoning_effort": "low",
        "user": "user-42",
        "response_format": {"type": "json_object"},
        "tools": [WEATHER],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
    }
    client = openai_client(sim)
    client.chat.completions.create(
        model="m",
        messages=[{"role": "developer", "content": "be brief"}, {"role": "user", "content": "x"}],
        temperature=0.1,
        max_tokens=50,
        extra_body={"provider": {"sort": "price"}},
        **fields,
    )
    # Then the log holds the body as sent, in process and over HTTP
    [entry] = sim.requests()
    [served] = http.get(sim.base_url + "/_sim/requests").json()
    for body in (entry["body"], served["body"]):
        assert {k: body[k] for k in fields} == fields
        assert body["provider"] == {"sort": "price"}
        assert body["messages"][0] == {"role": "developer", "content": "be brief"}
        assert (body["temperature"], body["max_tokens"]) == (0.1, 50)


def test_the_log_keeps_the_newest_bodies_only(http, sim, monkeypatch):
    monkeypatch.setattr(simulator_module, "BODIES_KEPT", 2)
    for text in ("one", "two", "three"):
        chat(http, sim, text=text)
    bodies = [e["body"] for e in sim.requests()]
    assert bodies[0] is None
    assert [b["messages"][0]["content"] for b in bodies[1:]] == ["two", "three"]


def called(body: dict[str, Any]) -> list[str]:
    """The function names of an answer's tool calls, in order."""
    return [c["function"]["name"] for c in body["choices"][0]["message"].get("tool_calls") or []]


def test_tool_choice_picks_the_call(http, sim):
    tools = [WEATHER, CLOCK, PING]
    named = {"type": "function", "function": {"name": "get_time"}}
    assert called(ask(http, sim, "hi", tools=tools, tool_choice=named)) == ["get_time"]
    assert called(ask(http, sim, "hi", tools=tools, tool_choice="required")) == ["get_weather"]
    assert called(ask(http, sim, "hi", tools=tools)) == ["get_weather"]  # auto: the first
    assert called(ask(http, sim, "run ping now", tools=tools)) == ["ping"]  # the one named
    # "none": a text answer even with tools
    plain = ask(http, sim, "hi", tools=tools, tool_choice="none")["choices"][0]
    assert plain["message"] == {"role": "assistant", "content": "[sim m] hi"}
    assert plain["finish_reason"] == "stop"


def test_a_tool_without_parameters_gets_empty_arguments(http, sim):
    message = ask(http, sim, "hi", tools=[PING])["choices"][0]["message"]
    assert message["tool_calls"][0]["function"]["arguments"] == "{}"


def test_parallel_directive_calls_every_tool_once(http, sim):
    tools = [WEATHER, CLOCK, PING]
    # When the last user message asks for parallel calls
    body = ask(http, sim, "all of them [[sim:parallel]]", tools=tools)
    # Then one answer carries one call per tool, with distinct ids, valid arguments
    assert called(body) == ["get_weather", "get_time", "ping"]
    calls = body["choices"][0]["message"]["tool_calls"]
    assert len({c["id"] for c in calls}) == 3
    for call, tool in zip(calls, tools, strict=True):
        schema = tool["function"].get("parameters", {})
        assert schema_errors(json.loads(call["function"]["arguments"]), schema) == []
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    # But not when the request turns parallel calls off, or names one function
    text = "all of them [[sim:parallel]]"
    assert called(ask(http, sim, text, tools=tools, parallel_tool_calls=False)) == ["get_weather"]
    named = {"type": "function", "function": {"name": "ping"}}
    assert called(ask(http, sim, text, tools=tools, tool_choice=named)) == ["ping"]
    # And only the last user message counts
    earlier = [
        {"role": "user", "content": "[[sim:parallel]]"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "now"},
    ]
    assert called(ask(http, sim, earlier, tools=tools)) == ["get_weather"]


def test_bad_tool_choice_is_refused_as_openai_does(http, sim):
    messages = [{"role": "user", "content": "hi"}]
    for extra in (
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        {"tool_choice": "required"},
        {"tools": [{"type": "function"}]},
    ):
        response = http.post(
            sim.url + "/chat/completions", json={"model": "m", "messages": messages, **extra}
        )
        assert response.status_code == 400, extra
        assert response.json()["error"]["type"] == "invalid_request_error"


def test_tool_round_trip_ends_with_an_answer_quoting_the_results(sim):
    client = openai_client(sim)
    tools: Any = [WEATHER, CLOCK]
    messages: Any = [{"role": "user", "content": "weather and time [[sim:parallel]]"}]
    # Given an answer calling two tools
    first = client.chat.completions.create(model="m", messages=messages, tools=tools)
    calls = first.choices[0].message.tool_calls or []
    assert len(calls) == 2
    # When the client sends the calls back with their results
    messages.append(first.choices[0].message.model_dump(exclude_none=True))
    results = ['{"temp": 21, "sky": "clear"}', "12:00 UTC"]
    for call, result in zip(calls, results, strict=True):
        messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    final = client.chat.completions.create(model="m", messages=messages, tools=tools)
    # Then the answer is text quoting each result by its function, and says it stopped
    choice = final.choices[0]
    assert choice.finish_reason == "stop" and not choice.message.tool_calls
    assert choice.message.content == (
        '[sim m] get_weather returned {"temp": 21, "sky": "clear"}; get_time returned 12:00 UTC'
    )
    # And the tool definitions count in the prompt the usage reports
    usage = final.usage
    assert usage is not None
    assert usage.prompt_tokens > estimate_message_tokens(messages)


def test_json_object_answer_is_a_json_object(http, sim):
    fmt = {"type": "json_object"}
    content = ask(http, sim, "as JSON please", response_format=fmt)["choices"][0]["message"]
    assert json.loads(content["content"]) == {"answer": "[sim m] as JSON please"}


def test_json_schema_after_a_tool_result_still_follows_the_schema(http, sim):
    schema = {
        "type": "object",
        "properties": {"summary": {"type": "string"}, "score": {"type": "integer"}},
        "required": ["summary", "score"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": True}}
    messages = [
        {"role": "user", "content": "check"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": CALL["id"], "content": "ok"},
    ]
    body = ask(http, sim, messages, tools=[PING], response_format=fmt)
    content = json.loads(body["choices"][0]["message"]["content"])
    assert schema_errors(content, schema) == []


CALL = {"id": "call_1", "type": "function", "function": {"name": "ping", "arguments": "{}"}}


def test_model_without_tools_answers_openrouters_404(http):
    # Given a simulator started with one model that takes no tools
    with Simulator(no_tools=["plain/model"]) as server:
        for _ in range(2):  # a reset does not forget it: it describes the provider
            # Then a request with tools to that model gets OpenRouter's 404
            response = chat(http, server, model="plain/model", tools=[PING])
            assert response.status_code == 404
            assert response.json() == {
                "error": {
                    "message": "No endpoints found that support tool use. To learn more about "
                    "provider routing, visit: https://openrouter.ai/docs/provider-routing",
                    "code": 404,
                }
            }
            # And the request is in the log, with its tools
            assert server.requests()[-1]["body"]["tools"] == [PING]
            # But the same model answers without tools, and other models take tools
            assert chat(http, server, model="plain/model").status_code == 200
            assert called(chat(http, server, model="other", tools=[PING]).json()) == ["ping"]
            server.reset()


def test_model_setting_turns_tools_off(http, sim):
    sim.configure(models={"m": {"tools": False}})
    assert chat(http, sim, tools=[PING]).status_code == 404
    assert chat(http, sim, model="n", tools=[PING]).status_code == 200
    bad = http.post(sim.base_url + "/_sim/config", json={"models": {"m": {"tools": "no"}}})
    assert bad.status_code == 400


def test_no_tools_from_the_environment(http, monkeypatch):
    monkeypatch.setenv("SIM_NO_TOOLS", " a , b ")
    with Simulator() as server:
        statuses = [chat(http, server, model=m, tools=[PING]).status_code for m in "abc"]
    assert statuses == [404, 404, 200]
    with Simulator(no_tools=[]) as server:  # given explicitly, the environment is ignored
        assert chat(http, server, model="a", tools=[PING]).status_code == 200


def test_max_tokens_cutting_the_answer_says_length(http, sim):
    short = ask(http, sim, "a fairly long prompt to echo back", max_tokens=2)["choices"][0]
    assert short["finish_reason"] == "length"
    roomy = ask(http, sim, "a fairly long prompt to echo back", max_tokens=200)["choices"][0]
    assert roomy["finish_reason"] == "stop"


def test_logprobs_when_asked(http, sim):
    choice = ask(http, sim, "hello there", logprobs=True, top_logprobs=3)["choices"][0]
    content = choice["logprobs"]["content"]
    assert "".join(t["token"] for t in content) == choice["message"]["content"]
    for entry in content:
        assert entry["logprob"] < 0 and bytes(entry["bytes"]).decode() == entry["token"]
        top = entry["top_logprobs"]
        assert len(top) == 3 and top[0]["token"] == entry["token"]
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
    assert "logprobs" not in ask(http, sim, "hello there")["choices"][0]
    # A tool-call answer has no text to give logprobs for
    calls = ask(http, sim, "hi", tools=[PING], logprobs=True)["choices"][0]
    assert calls["logprobs"] == {"content": None, "refusal": None}


def test_reasoning_effort_adds_reasoning_content(sim):
    client = openai_client(sim)
    completion = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "why?"}], reasoning_effort="high"
    )
    message = completion.choices[0].message.model_dump()
    assert message["reasoning_content"] == "[sim m] thinking (high): why?"
    assert message["content"] == "[sim m] why?"
    # And the usage counts the reasoning among the completion's tokens, and apart
    reasoning = estimate_tokens(message["reasoning_content"])
    usage = completion.usage
    assert usage is not None and usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == reasoning
    assert usage.completion_tokens == reasoning + estimate_tokens(message["content"])
    plain = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert "reasoning_content" not in plain.choices[0].message.model_dump()


def test_refusal_and_content_filter_flags(http, sim):
    refused = ask(http, sim, "do it [[sim:refuse]]")["choices"][0]
    assert refused["message"]["content"] is None
    assert refused["message"]["refusal"] == "[sim m] I can't help with that."
    assert refused["finish_reason"] == "stop"
    filtered = ask(http, sim, "do it [[sim:filter]]")["choices"][0]
    assert (filtered["message"]["content"], filtered["finish_reason"]) == ("", "content_filter")


def test_cli_no_tools_flag_and_env(http):
    body = {"model": "x", "messages": [{"role": "user", "content": "hi"}], "tools": [PING]}
    proc, url = start_cli("--no-tools", "x,y")
    try:
        assert http.post(url + "/v1/chat/completions", json=body).status_code == 404
        assert http.post(url + "/v1/chat/completions", json={**body, "model": "z"}).is_success
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
    proc, url = start_cli(env={"SIM_NO_TOOLS": "x"})
    try:
        assert http.post(url + "/v1/chat/completions", json=body).status_code == 404
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


# --- the schema value generator, fuzzed -------------------------------------------------------

KEYWORDS = [
    "type",
    "properties",
    "required",
    "items",
    "prefixItems",
    "additionalProperties",
    "enum",
    "const",
    "anyOf",
    "oneOf",
    "allOf",
    "$ref",
    "$defs",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "minItems",
    "maxItems",
    "uniqueItems",
    "minLength",
    "maxLength",
    "pattern",
    "format",
    "maxProperties",
]
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6)


def junk_schemas() -> st.SearchStrategy[Any]:
    """Any JSON, biased to look like a schema: keywords with nonsense values."""
    keys = st.sampled_from(KEYWORDS) | st.text(max_size=4)
    refs = st.sampled_from(["#", "#/$defs/a", "#/properties/x", "http://x", "#/nope/0"])
    leaves = SCALARS | refs | st.sampled_from(["object", "array", "integer", "number", "null"])
    return st.recursive(
        leaves,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=4),
        max_leaves=25,
    )


@settings(max_examples=300, deadline=None)
@given(junk_schemas())
def test_generator_answers_any_json_without_raising(schema):
    value = schema_values.value_for(schema)
    json.dumps(value)
    assert isinstance(json.loads(schema_values.arguments_for(schema)), dict)


def well_formed_schemas() -> st.SearchStrategy[Any]:
    """Satisfiable schemas over the keywords the generator claims to meet exactly."""
    integers = st.builds(
        lambda low, span, step: {
            "type": "integer",
            "minimum": low,
            "maximum": low + span + step,
            "multipleOf": step,
        },
        st.integers(-1000, 1000),
        st.integers(0, 50),
        st.integers(1, 7),
    )
    numbers = st.builds(
        lambda low, width: {
            "type": "number",
            "exclusiveMinimum": low,
            "exclusiveMaximum": low + width,
        },
        st.integers(-1000, 1000),
        st.integers(1, 100),
    )
    strings = st.builds(
        lambda low, extra: {"type": "string", "minLength": low, "maxLength": low + extra},
        st.integers(0, 20),
        st.integers(0, 5),
    ) | st.just({"type": "string", "format": "date"})
    # a schema is JSON: its enum values are finite (JSON has no NaN or infinity)
    json_scalars = (
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=6)
    )
    enums = st.lists(json_scalars, min_size=1, max_size=3).map(lambda values: {"enum": values})
    leaves = (
        integers
        | numbers
        | strings
        | enums
        | st.sampled_from([{"type": "boolean"}, {"type": "null"}, {"const": [1, {"a": None}]}, {}])
    )

    def containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        objects = st.dictionaries(st.text(min_size=1, max_size=5), inner, max_size=4).flatmap(
            lambda props: st.builds(
                lambda required, closed: {
                    "type": "object",
                    "properties": props,
                    "required": required,
                    **({"additionalProperties": False} if closed else {}),
                },
                st.lists(st.sampled_from(sorted(props)), unique=True) if props else st.just([]),
                st.booleans(),
            )
        )
        arrays = st.builds(
            lambda items, low, extra: {
                "type": "array",
                "items": items,
                "minItems": low,
                "maxItems": low + extra,
            },
            inner,
            st.integers(0, 3),
            st.integers(0, 3),
        )
        either = st.lists(inner, min_size=1, max_size=3).map(lambda b: {"anyOf": b})
        return objects | arrays | either

    return st.recursive(leaves, containers, max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(well_formed_schemas())
def test_generated_values_fit_fuzzed_schemas(schema):
    value = schema_values.value_for(schema)
    assert schema_errors(value, schema) == [], (schema, value)
    assert schema_values.value_for(schema) == value  # deterministic


def test_strange_tool_schemas_still_get_an_answer(http, sim):
    tools = [
        {"type": "function", "function": {"name": "a", "parameters": {"allOf": [{"$ref": "#"}]}}},
        {"type": "function", "function": {"name": "b", "parameters": ["not", "a", "schema"]}},
        {"type": "function", "function": {"name": "c", "parameters": {"minItems": 10**12}}},
    ]
    body = ask(http, sim, "all [[sim:parallel]]", tools=tools)
    calls = body["choices"][0]["message"]["tool_calls"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{}, {}, {}]
