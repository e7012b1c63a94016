"""The X-Fleet-Job header: a provider call names the job and delivery it is made for, and
the simulator's request log records it (the chaos audit holds that log against the
ledger)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx
import pytest

from workers.providers.base import (
    Caller,
    CompletionRequest,
    calling_for,
    current_caller,
    on_send,
)
from workers.providers.openai_compat import OpenAICompatProvider, make_client
from workers.sim.simulator import Simulator

HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator() as server:
        yield server


@pytest.fixture
def provider(sim: Simulator) -> Iterator[OpenAICompatProvider]:
    client = make_client(4)
    yield OpenAICompatProvider(sim.url, "sk-test", client)
    client.close()


def test_a_call_made_for_a_job_names_it(sim: Simulator, provider: OpenAICompatProvider) -> None:
    provider.complete(CompletionRequest("m", HELLO))  # outside any job: no header
    with calling_for(Caller("job-7:a", 2, 3)):
        provider.complete(CompletionRequest("m", HELLO))
    provider.complete(CompletionRequest("m", HELLO))  # the block is over
    logged = [(r["job"], r["job_message"], r["job_delivery"]) for r in sim.requests()]
    assert logged == [(None, None, None), ("job-7:a", 2, 3), (None, None, None)]


def test_a_non_ascii_job_id_travels_percent_encoded(
    sim: Simulator, provider: OpenAICompatProvider
) -> None:
    # Job ids are [\w.:-]+, and \w admits non-ASCII letters: an HTTP header is ASCII.
    caller = Caller("reçu-été", 0, 1)
    assert caller.header() == "re%C3%A7u-%C3%A9t%C3%A9; message=0; delivery=1"
    with calling_for(caller):
        provider.complete(CompletionRequest("m", HELLO))
    assert sim.requests()[-1]["job"] == "reçu-été"


def test_a_call_names_the_process_that_makes_it(
    sim: Simulator, provider: OpenAICompatProvider
) -> None:
    # (the chaos audit tells a killed process's calls from a live one's by it)
    caller = Caller("job-8", 0, 2, "host-a:4242:1f2e3d4c")
    assert caller.header() == "job-8; message=0; delivery=2; process=host-a:4242:1f2e3d4c"
    odd = Caller("job-9", 1, 1, "h;x=1:7:ab")  # nothing in it can split the header
    with calling_for(caller):
        provider.complete(CompletionRequest("m", HELLO))
    with calling_for(odd):
        provider.complete(CompletionRequest("m", HELLO))
    provider.complete(CompletionRequest("m", HELLO))
    logged = [(r["job"], r["job_delivery"], r["job_process"]) for r in sim.requests()]
    assert logged == [
        ("job-8", 2, "host-a:4242:1f2e3d4c"),
        ("job-9", 1, "h;x=1:7:ab"),
        (None, None, None),
    ]


def test_the_caller_belongs_to_its_thread() -> None:
    seen: list[Caller | None] = []
    with calling_for(Caller("mine", 0, 1)):
        thread = threading.Thread(target=lambda: seen.append(current_caller()))
        thread.start()
        thread.join()
        assert current_caller() == Caller("mine", 0, 1)
    assert seen == [None]
    assert current_caller() is None


def test_the_simulator_reads_a_partial_or_odd_header(sim: Simulator) -> None:
    body = {"model": "m", "messages": HELLO}
    with httpx.Client(timeout=10) as http:
        for header in ("abc; message=x; delivery=2", "abc", "; message=1"):
            http.post(sim.url + "/chat/completions", json=body, headers={"X-Fleet-Job": header})
    logged = [(r["job"], r["job_message"], r["job_delivery"]) for r in sim.requests()]
    assert logged == [("abc", None, 2), ("abc", None, None), (None, 1, None)]


def test_the_send_hook_runs_once_a_request_as_it_leaves(
    sim: Simulator, provider: OpenAICompatProvider
) -> None:
    # The fleet marks a call in flight in this hook: once for each request, before the
    # provider has it (how many requests the provider had logged when the hook ran)
    seen: list[int] = []
    with on_send(lambda: seen.append(len(sim.requests()))):
        provider.complete(CompletionRequest("m", HELLO))
        provider.complete(CompletionRequest("m", HELLO))  # on the kept-alive connection
    provider.complete(CompletionRequest("m", HELLO))  # the block is over
    assert seen == [0, 1] and len(sim.requests()) == 3


def test_a_request_that_never_connects_runs_no_send_hook() -> None:
    import socket

    from workers.providers.base import Retryable

    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    client = make_client(1)
    provider = OpenAICompatProvider(f"http://127.0.0.1:{port}/v1", "sk-test", client)
    seen: list[str] = []
    with on_send(lambda: seen.append("sent")), pytest.raises(Retryable, match="Connect"):
        provider.complete(CompletionRequest("m", HELLO))
    client.close()
    assert seen == []  # never left: nothing to bill


def test_a_send_hook_that_fails_stops_the_call() -> None:
    import socket

    # A server that takes connections (the kernel completes them) and reads nothing yet
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = make_client(1)
        provider = OpenAICompatProvider(f"http://127.0.0.1:{port}/v1", "sk-test", client)

        def refuse() -> None:
            raise RuntimeError("cannot mark the call")

        with on_send(refuse), pytest.raises(RuntimeError, match="cannot mark"):
            provider.complete(CompletionRequest("m", HELLO))
        client.close()
        # The connection was made, and closed without a byte of the request
        connection, _ = listener.accept()
        with connection:
            connection.settimeout(5)
            assert connection.recv(1024) == b""
