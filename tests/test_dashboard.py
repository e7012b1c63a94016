"""The cost dashboard (gateway/dashboard.py) as a person and a script meet it: a real
headless browser (Debian's chromium, driven by Playwright) logs in through the form and
reads the page; httpx calls /api/usage with a bearer key. Behind them: the gateway
(`fleet serve`), the test fleet's real workers, its ledger writer and the simulator. Jobs
go through the gateway with two apps' keys, so their rows carry their app."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.ledger_db import PAID_EMBEDDER, embedding_rows
from tests.test_gateway import Gateway, ask, client, fleet, gateway_fixture, new_key
from workers.ledger.filters import Filters, parse_since
from workers.ledger.query import Usage
from workers.ledger.store import Ledger

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[1]

gateway = gateway_fixture("dashboard", 20)


def wait_for(check: Callable[[], Any], timeout_s: float = 20.0, what: str = "") -> Any:
    """check()'s first truthy answer, polled until `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(0.1)


class Run:
    """The module's jobs: app dash-a asks the subscription primary three times, app dash-b
    the paid profile twice and the primary once. Keys: an admin's and each app's."""

    def __init__(self, env: dict[str, str], gw: Gateway) -> None:
        self.env, self.gw = env, gw
        self.base = gw.url.removesuffix("/v1")
        self.since = datetime.now(UTC) - timedelta(seconds=1)
        self.admin = new_key(env, "dash-ops", "--admin")
        self.keys = {"dash-a": new_key(env, "dash-a"), "dash-b": new_key(env, "dash-b")}
        a, b = client(gw, self.keys["dash-a"]), client(gw, self.keys["dash-b"])
        for i in range(3):
            a.chat.completions.create(model="fleet/user_facing", messages=ask(f"hello {i}"))
        for i in range(2):
            b.chat.completions.create(model="profile/routing", messages=ask(f"route {i}"))
        b.chat.completions.create(model="fleet/user_facing", messages=ask("hello b"))
        self.ledger = Ledger(env["FLEET_LEDGER_URL"], redis_url=None)
        # The ledger writer writes the rows a moment after the jobs end: wait for them.
        for app in ("dash-a", "dash-b"):
            wait_for(partial(self.has_jobs, app, 3), what=f"the ledger has {app}'s 3 jobs")

    def has_jobs(self, app: str, jobs: int) -> bool:
        return bool(self.totals(app=app)["jobs"] == jobs)

    def totals(self, since: str = "7d", **filters: Any) -> dict[str, Any]:
        return Usage(self.ledger, Filters(since=parse_since(since), **filters)).totals()

    @property
    def every_key(self) -> list[str]:
        return [self.admin, *self.keys.values()]


@pytest.fixture(scope="module")
def run(fleet_env, gateway) -> Iterator[Run]:
    made = Run(fleet_env, gateway)
    yield made
    made.ledger.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM)
        yield launched
        launched.close()


class Visit:
    """A browser context that records every URL its pages request."""

    def __init__(self, browser: Any) -> None:
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.requests: list[str] = []
        self.context.on("request", lambda r: self.requests.append(r.url))
        self.page = self.context.new_page()

    def log_in(self, base: str, key: str, query: str = "") -> Any:
        self.page.goto(f"{base}/dashboard{query}")
        self.page.fill("#key", key)
        with self.page.expect_navigation():
            self.page.click("button[type=submit]")
        return self.page

    def figure(self, element_id: str) -> str:
        return str(self.page.inner_text(f"#{element_id}")).strip()

    def close(self) -> None:
        self.context.close()


def shown(visit: Visit) -> dict[str, Any]:
    """The page's headline totals, as numbers."""
    page = visit.page
    return {
        "cost_usd": float(page.get_attribute("#total-cost", "data-value")),
        "saving_usd": float(page.get_attribute("#total-saving", "data-value")),
        "jobs": int(visit.figure("total-jobs").replace(",", "")),
        "attempts": int(visit.figure("total-attempts").replace(",", "")),
    }


def of(totals: dict[str, Any]) -> dict[str, Any]:
    return {k: totals[k] for k in ("cost_usd", "saving_usd", "jobs", "attempts")}


def test_an_admin_sees_the_ledgers_totals_and_a_filter_narrows_them(run, browser, tmp_path) -> None:
    visit = Visit(browser)
    try:
        # When an admin logs in through the form
        page = visit.log_in(run.base, run.admin)
        assert page.url == f"{run.base}/dashboard", page.content()[-1500:]
        assert visit.figure("scope") == "whole fleet"

        # Then the page's totals are the ledger's over the same window (the default 7d)
        def same() -> bool:
            if shown(visit) == of(run.totals()):
                return True
            page.reload()
            return False

        wait_for(same, 10, "the page's totals equal the ledger's")
        assert shown(visit)["jobs"] >= 6

        # When an app is chosen in the filter form
        page.fill("input[name=app]", "dash-b")
        with page.expect_navigation():
            page.click("#filters button[type=submit]")
        # Then it is kept in the URL and the totals are that app's alone
        assert "app=dash-b" in page.url
        figures = shown(visit)
        assert figures == of(run.totals(app="dash-b"))
        assert figures["jobs"] == 3 and figures["cost_usd"] > 0  # the paid profile's jobs
        apps = page.locator("#by-app tr td:first-child").all_inner_texts()
        assert apps == ["dash-b"]

        # And a class filter narrows them further: dash-b's one user_facing job
        page.select_option("select[name=class]", "user_facing")
        with page.expect_navigation():
            page.click("#filters button[type=submit]")
        assert "app=dash-b" in page.url and "class=user_facing" in page.url
        assert shown(visit) == of(run.totals(app="dash-b", task_class="user_facing"))
        assert shown(visit)["jobs"] == 1

        # And the charts are inline SVG, the numbers are text, and no key is on the page
        page.goto(f"{run.base}/dashboard?since=7d")
        assert page.locator("#daily-chart rect").count() >= 1
        html = page.content()
        assert all(key not in html for key in run.every_key)
        page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
        assert (tmp_path / "dashboard.png").stat().st_size > 10_000
    finally:
        visit.close()

    # And every request the page made went to this machine, none carrying a key
    assert visit.requests and all(u.startswith("http://127.0.0.1:") for u in visit.requests)
    assert not [u for u in visit.requests for key in run.every_key if key in u]


def test_an_apps_key_sees_only_its_app(run, browser) -> None:
    visit = Visit(browser)
    try:
        # When app dash-a's key logs in
        page = visit.log_in(run.base, run.keys["dash-a"], "?since=24h")
        # Then it came back to the window it asked for, and sees its app's figures alone
        assert page.url == f"{run.base}/dashboard?since=24h"
        assert visit.figure("scope") == "app dash-a"
        assert shown(visit) == of(run.totals("24h", app="dash-a"))
        assert shown(visit)["jobs"] == 3
        assert page.locator("#by-app tr td:first-child").all_inner_texts() == ["dash-a"]
        assert page.locator("input[name=app]").count() == 0  # no app to choose
        assert page.locator("#dead-letters").count() == 0  # they hold other apps' jobs

        # And asking for another app is refused
        answer = page.goto(f"{run.base}/dashboard?app=dash-b")
        assert answer is not None and answer.status == 403
        assert "only app 'dash-a'" in visit.figure("message")

        # When it logs out, the page asks for a key again
        page.goto(f"{run.base}/dashboard")
        with page.expect_navigation():
            page.click("form[action='/dashboard/logout'] button")
        assert page.locator("#key").count() == 1
    finally:
        visit.close()


def test_the_api_gives_what_fleet_usage_json_gives(run) -> None:
    since = run.since.isoformat()
    until = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    for by, app in (("model", "dash-b"), ("app", None), ("tier", "dash-a")):
        args = ["usage", "--json", "--since", since, "--until", until, "--by", by]
        params = {"since": since, "until": until, "by": by}
        if app:
            args += ["--app", app]
            params["app"] = app
        cli = fleet(run.env, *args)
        assert cli.returncode == 0, cli.stderr
        api = httpx.get(
            f"{run.base}/api/usage",
            params=params,
            headers={"Authorization": f"Bearer {run.admin}"},
            timeout=30,
        )
        assert api.status_code == 200, api.text
        body = api.json()
        assert body["rows"] == json.loads(cli.stdout)
        assert body["total"]["jobs"] == sum(r["jobs"] for r in body["rows"])
    # An app's key gets its app's rows alone, without asking
    mine = httpx.get(
        f"{run.base}/api/usage",
        params={"since": since, "by": "app"},
        headers={"Authorization": f"Bearer {run.keys['dash-a']}"},
        timeout=30,
    ).json()
    assert [r["app"] for r in mine["rows"]] == ["dash-a"] and mine["total"]["jobs"] == 3


@pytest.fixture(scope="module")
def embedded(run) -> str:
    """An app's embedding jobs (tests/ledger_db.py: 10 inputs embedded, 15 from the cache,
    100,140 prompt tokens saved, $0.002 of them on a paid model), written to the fleet's
    ledger as its writer writes them."""
    app = "dash-embed"
    run.ledger.insert(embedding_rows(app, prefix=f"{app}-{time.time_ns()}-"))
    return app


def test_the_embedding_cache_panel(run, browser, embedded) -> None:
    visit = Visit(browser)
    try:
        # When an admin looks at the app whose jobs embedded
        page = visit.log_in(run.base, run.admin, f"?since=24h&app={embedded}")
        assert page.url == f"{run.base}/dashboard?since=24h&app={embedded}"
        # Then the panel shows the cache's hit rate, its inputs and the tokens it saved
        assert visit.figure("cache-hit-rate") == "60.0%"
        assert visit.figure("cache-items") == "15 / 10"
        assert visit.figure("cache-tokens-saved") == "100,140"
        saved = float(page.get_attribute("#cache-saved", "data-value"))
        assert saved == pytest.approx(0.002, abs=1e-12)
        assert "$0.002003 at openai/text-embedding-3-small's price" in visit.figure(
            "embedding-cache"
        )
        rows = page.locator("#cache-by-model tr").all_inner_texts()
        cells = [r.split("\t") for r in rows[1:]]
        assert [[c.strip() for c in r] for r in cells] == [
            ["local/qwen3-embedding", "14", "2", "87.5%", "", "140", "$0.000000"],
            ["ollama/nomic-embed-text", "0", "5", "0.0%", "", "0", "$0.000000"],
            [PAID_EMBEDDER, "1", "3", "25.0%", "", "100,000", "$0.002000"],
        ]
        # And the figures are the query layer's
        totals = run.totals("24h", app=embedded)
        assert (totals["cached_items"], totals["embedded_items"]) == (15, 10)

        # And a model filter narrows the panel to that model
        page.goto(f"{run.base}/dashboard?since=24h&app={embedded}&model=local/qwen3-embedding")
        assert visit.figure("cache-hit-rate") == "87.5%"
        assert page.locator("#cache-by-model tr").count() == 2
        # And where no job embedded, there is no panel
        for query in ("?since=24h&app=dash-a", f"?since=24h&app={embedded}&class=user_facing"):
            page.goto(f"{run.base}/dashboard{query}")
            assert page.locator("#total-jobs").count() == 1
            assert page.locator("#embedding-cache").count() == 0, query
    finally:
        visit.close()


def test_the_api_gives_the_embedding_cache_as_fleet_usage_json_does(run, embedded) -> None:
    since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    args = ["usage", "--json", "--since", since, "--app", embedded]
    cli = fleet(run.env, *args)
    assert cli.returncode == 0, cli.stderr
    api = httpx.get(
        f"{run.base}/api/usage",
        params={"since": since, "app": embedded},
        headers={"Authorization": f"Bearer {run.admin}"},
        timeout=30,
    )
    assert api.status_code == 200, api.text
    body = api.json()
    assert body["rows"] == json.loads(cli.stdout)
    local = next(r for r in body["rows"] if r["model"] == "local/qwen3-embedding")
    assert (local["cached_items"], local["embedded_items"], local["cache_hit_rate"]) == (
        14,
        2,
        0.875,
    )
    total = body["total"]
    assert (total["cached_items"], total["embedded_items"], total["cache_hit_rate"]) == (
        15,
        10,
        0.6,
    )
    assert total["cached_tokens"] == 100_140
    assert total["cache_saved_usd"] == pytest.approx(0.002, abs=1e-12)


def test_what_is_refused(run) -> None:
    base = run.base
    admin = {"Authorization": f"Bearer {run.admin}"}
    with httpx.Client(base_url=base, timeout=30) as http:
        # No key, or a wrong one: 401
        assert http.get("/api/usage").status_code == 401
        wrong = http.get("/api/usage", headers={"Authorization": "Bearer mf-000000000000-x"})
        assert wrong.status_code == 401
        page = http.get("/dashboard")
        assert page.status_code == 401 and 'name="key"' in page.text
        bad_login = http.post("/dashboard/login", data={"key": "mf-nope"})
        assert bad_login.status_code == 401 and "unknown or revoked" in bad_login.text
        # Another app's figures: 403
        other = http.get(
            "/api/usage",
            params={"app": "dash-b"},
            headers={"Authorization": f"Bearer {run.keys['dash-a']}"},
        )
        assert other.status_code == 403 and "only app 'dash-a'" in other.text
        # A bad filter: 400, one line naming the valid choices
        for params, valid in (
            ({"class": "nope"}, "user_facing"),
            ({"model": "nope"}, "litellm/kimi"),
            ({"since": "yesterday"}, "24h"),
            ({"by": "colour"}, "task_class"),
            ({"colour": "red"}, "since"),
            ({"from": "2026-13-01"}, "YYYY-MM-DD"),
        ):
            answer = http.get("/api/usage", params=params, headers=admin)
            message = answer.json()["error"]["message"]
            assert answer.status_code == 400 and valid in message and "\n" not in message
        page = http.get("/dashboard", params={"class": "nope"}, headers=admin)
        assert page.status_code == 400 and "valid: " in page.text


def test_a_session_ends_when_its_key_is_revoked(run, fleet_env) -> None:
    key = new_key(fleet_env, "dash-c")
    with httpx.Client(base_url=run.base, timeout=30) as http:
        # When a person logs in with the form
        login = http.post("/dashboard/login", data={"key": key, "next": "since=30d"})
        assert login.status_code == 303 and login.headers["location"] == "/dashboard?since=30d"
        cookie = login.headers["set-cookie"]
        # Then the cookie is a session id, HttpOnly and SameSite=Strict, not the key
        assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
        assert key not in cookie
        assert http.get("/dashboard").status_code == 200

        # When its key is revoked, the session stops within the key cache's 2 s
        revoked = fleet(fleet_env, "keys", "revoke", key.split("-")[1])
        assert revoked.returncode == 0, revoked.stderr
        at = time.monotonic()
        wait_for(lambda: http.get("/dashboard").status_code == 401, 5, "the session ends")
        assert time.monotonic() - at < 3.0


def test_no_key_reaches_the_gateways_log(run) -> None:
    log = run.gw.log()
    assert all(key not in log for key in run.every_key)


def test_fleet_dashboard_serves_the_page_where_no_gateway_runs(run, fleet_env, tmp_path) -> None:
    # When `fleet dashboard` starts on a free port
    import subprocess

    from tests.test_gateway import FLEET

    with open(tmp_path / "dashboard.log", "w+") as log:
        process = subprocess.Popen(
            [FLEET, "dashboard", "--port", "0"],
            env=fleet_env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            # Then it names the dashboard's URL, on loopback
            assert line.startswith("dashboard: serving on http://127.0.0.1:"), line
            url = line.split()[-1]
            assert url.endswith("/dashboard")
            # And serves the login form, and the page to an admin's bearer key
            assert httpx.get(url, timeout=30).status_code == 401
            page = httpx.get(url, headers={"Authorization": f"Bearer {run.admin}"}, timeout=30)
            assert page.status_code == 200 and 'id="total-cost"' in page.text
        finally:
            process.terminate()
            process.wait(20)
            if process.stdout is not None:
                process.stdout.close()


def test_dollars_show_their_sign_first_and_no_negative_zero() -> None:
    from gateway.dashboard import usd

    assert [usd(v) for v in (1234.5, -0.5, -0.0, -1e-9, 0.0000004)] == [
        "$1,234.500000",
        "-$0.500000",
        "$0.000000",
        "$0.000000",
        "$0.000000",
    ]
