"""`fleet usage`, run as users run it (a subprocess), over a ledger with known rows, on a
SQLite file and on PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.ledger_db import (
    DATABASES,
    PAID_EMBEDDER,
    attempt,
    catalog,
    database,
    embedding_rows,
    rows,
)
from workers.ledger.filters import Filters
from workers.ledger.query import Usage
from workers.ledger.rows import attempt_row
from workers.ledger.store import Ledger
from workers.ledger.usage import parse_since

FLEET = str(Path(sys.executable).with_name("fleet"))
KIMI_IN, KIMI_OUT = 0.56, 2.94
EMBEDDING_REF = 0.02  # openai/text-embedding-3-small, $/1M tokens: an embedding's reference
NOW = time.time()
DAYS_AGO_3 = NOW - 3 * 86_400
KEYS = {"attempts", "jobs", "prompt_tokens", "completion_tokens", "cost_usd", "saving_usd"}
CACHE_KEYS = {
    "embedded_items",
    "cached_items",
    "cache_hit_rate",
    "cached_tokens",
    "cache_saved_usd",
    "cache_saved_vs_reference_usd",
}
JSON_KEYS = KEYS | {"orphaned", "orphaned_cost_usd"} | CACHE_KEYS


def kimi(tokens_in: int, tokens_out: int) -> float:
    return (tokens_in * KIMI_IN + tokens_out * KIMI_OUT) / 1e6


def known_rows() -> list[dict]:
    free = "openrouter/meta-llama/llama-3.1-405b-instruct:free"
    return [
        # A paid answer: 1M in, 0.5M out on litellm/kimi itself -> $2.03, saving 0.
        *rows(
            "paid", [attempt(1, "litellm/kimi", prompt_tokens=1_000_000, completion_tokens=500_000)]
        ),
        # A subscription failure, then a free answer.
        *rows(
            "escalated",
            [
                attempt(1, "zai/glm-4.7", outcome="error", error_kind="timeout"),
                attempt(2, free, prompt_tokens=2_000, completion_tokens=1_000),
            ],
            task_class="fast_general",
        ),
        # A free model whose provider reported a cost.
        *rows(
            "reported",
            [
                attempt(
                    1,
                    "openrouter/deepseek/deepseek-chat",
                    prompt_tokens=10_000,
                    completion_tokens=2_000,
                    provider_cost_usd=0.01,
                )
            ],
            task_class="reasoning_free",
            source="sub-agent",
        ),
        # A subscription answer.
        *rows("subscribed", [attempt(1, "zai/glm-4.7", prompt_tokens=300, completion_tokens=70)]),
        # Three days old: outside 24h, inside 7d.
        *rows(
            "old",
            [
                attempt(
                    1,
                    "local/qwen3-mlx",
                    prompt_tokens=40,
                    completion_tokens=8,
                    started_at=DAYS_AGO_3,
                )
            ],
            task_class="heartbeat",
            source="heartbeat",
        ),
    ]


@pytest.fixture(params=DATABASES)
def ledger_env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    with database(request.param, tmp_path) as url:
        ledger = Ledger(url, redis_url=None, spool_dir=tmp_path)
        ledger.insert(known_rows())
        ledger.close()
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
        yield {**env, "FLEET_LEDGER_URL": url, "FLEET_DATA_DIR": str(tmp_path / "data")}


def usage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FLEET, "usage", *args], capture_output=True, text=True, timeout=60, env=env, check=False
    )


def usage_json(*args: str, env: dict[str, str]) -> dict[str, dict]:
    done = usage(*args, "--json", env=env)
    assert done.returncode == 0, done.stderr
    listed = json.loads(done.stdout)
    assert isinstance(listed, list)
    by = args[args.index("--by") + 1] if "--by" in args else "model"
    assert all(set(row) == {by} | JSON_KEYS for row in listed)
    return {row[by]: row for row in listed}


def figures(attempts, jobs, tokens_in, tokens_out, cost) -> dict:
    return {
        "attempts": attempts,
        "jobs": jobs,
        "prompt_tokens": tokens_in,
        "completion_tokens": tokens_out,
        "cost_usd": pytest.approx(cost, abs=1e-9),
        "saving_usd": pytest.approx(kimi(tokens_in, tokens_out) - cost, abs=1e-9),
    }


def strip(row: dict) -> dict:
    return {k: row[k] for k in KEYS}


def test_usage_by_model_over_the_last_24h(ledger_env: dict[str, str]) -> None:
    got = usage_json(env=ledger_env)  # defaults: --since 24h --by model
    assert set(got) == {
        "litellm/kimi",
        "zai/glm-4.7",
        "openrouter/meta-llama/llama-3.1-405b-instruct:free",
        "openrouter/deepseek/deepseek-chat",
    }
    assert strip(got["litellm/kimi"]) == figures(1, 1, 1_000_000, 500_000, 2.03)
    assert got["litellm/kimi"]["saving_usd"] == 0
    # A job counts once, under its final attempt's model: the escalated job's failed
    # attempt on zai/glm-4.7 is an attempt there, not a job.
    assert strip(got["zai/glm-4.7"]) == figures(2, 1, 300, 70, 0.0)
    assert sum(row["jobs"] for row in got.values()) == 4
    free = got["openrouter/meta-llama/llama-3.1-405b-instruct:free"]
    assert strip(free) == figures(1, 1, 2_000, 1_000, 0.0)
    assert free["saving_usd"] == pytest.approx(0.00406, abs=1e-12)
    reported = got["openrouter/deepseek/deepseek-chat"]
    assert strip(reported) == figures(1, 1, 10_000, 2_000, 0.01)
    assert reported["saving_usd"] == pytest.approx(0.00148, abs=1e-12)
    # Ordered by cost, highest first.
    done = usage("--json", env=ledger_env)
    assert next(r["model"] for r in json.loads(done.stdout)) == "litellm/kimi"


def test_usage_by_tier_and_since(ledger_env: dict[str, str]) -> None:
    day = usage_json("--by", "tier", env=ledger_env)
    assert set(day) == {"paid", "subscription", "free"}
    assert strip(day["subscription"]) == figures(2, 1, 300, 70, 0.0)
    assert strip(day["free"]) == figures(2, 2, 12_000, 3_000, 0.01)
    week = usage_json("--by", "tier", "--since", "7d", env=ledger_env)
    assert strip(week["local"]) == figures(1, 1, 40, 8, 0.0)
    assert usage_json("--by", "tier", "--since", "1s", env=ledger_env) == {}
    since = (datetime.now(UTC) - timedelta(days=2)).strftime("%Y-%m-%d")
    assert set(usage_json("--by", "tier", "--since", since, env=ledger_env)) == set(day)


def test_usage_by_day_and_source(ledger_env: dict[str, str]) -> None:
    got = usage_json("--by", "day", "--since", "7d", env=ledger_env)
    old_day = datetime.fromtimestamp(DAYS_AGO_3, UTC).strftime("%Y-%m-%d")
    assert strip(got[old_day]) == figures(1, 1, 40, 8, 0.0)
    recent = {k: v for k, v in got.items() if k != old_day}
    assert sum(r["attempts"] for r in recent.values()) == 5
    assert sum(r["jobs"] for r in recent.values()) >= 4
    assert sum(r["cost_usd"] for r in recent.values()) == pytest.approx(2.04, abs=1e-9)
    assert list(got) == sorted(got)  # days in order
    sources = usage_json("--by", "source", env=ledger_env)
    assert strip(sources["sub-agent"]) == figures(1, 1, 10_000, 2_000, 0.01)
    assert sources["app"]["jobs"] == 3


def test_usage_table_has_a_total_row(ledger_env: dict[str, str]) -> None:
    done = usage("--by", "provider", env=ledger_env)
    assert done.returncode == 0, done.stderr
    assert "total" in done.stdout and "litellm" in done.stdout and "openrouter" in done.stdout
    total = next(line for line in done.stdout.splitlines() if "total" in line)
    assert "5" in total and "2.040000" in total  # 5 attempts (24h), $2.04


@pytest.mark.parametrize("kind", DATABASES)
def test_orphaned_calls_are_counted_and_shown_apart_as_estimated(kind: str, tmp_path: Path) -> None:
    from workers.runtime.orphans import ORPHAN_COMPLETION_TOKENS, orphaned_attempt
    from workers.state.inflight import Orphan

    # Given a job whose first call was in flight when its worker died (billed by the
    # redelivery as orphaned, estimated), then answered on redelivery
    lost = Orphan("0:1", 0, 1, 1, "litellm/kimi", "subscription", "paid", 1_000, "w@h", NOW - 60)
    estimated = orphaned_attempt(lost, None)
    answered = attempt(1, "litellm/kimi", prompt_tokens=900, completion_tokens=100)
    job = {"id": "killed", "task_class": "user_facing", "source": "app"}
    orphan_cost = kimi(1_000, ORPHAN_COMPLETION_TOKENS)
    with database(kind, tmp_path) as url:
        ledger = Ledger(url, redis_url=None, spool_dir=tmp_path)
        ledger.insert([*rows("killed", [answered]), attempt_row(estimated, job, catalog())])
        ledger.close()
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
        env = {**env, "FLEET_LEDGER_URL": url, "FLEET_DATA_DIR": str(tmp_path / "data")}
        # Then they count like any call, and are shown apart, with their estimated cost
        got = usage_json(env=env)["litellm/kimi"]
        assert strip(got) == figures(
            2, 1, 1_900, 100 + ORPHAN_COMPLETION_TOKENS, kimi(900, 100) + orphan_cost
        )
        assert got["orphaned"] == 1
        assert got["orphaned_cost_usd"] == pytest.approx(orphan_cost, abs=1e-9)
        table = usage(env=env)
    assert table.returncode == 0, table.stderr
    line = next(x for x in table.stdout.splitlines() if x.startswith("orphaned calls"))
    assert ": 1," in line and f"${orphan_cost:.6f}" in line and "estimated" in line


def test_no_orphaned_line_without_orphaned_calls(ledger_env: dict[str, str]) -> None:
    done = usage(env=ledger_env)
    assert done.returncode == 0 and "orphaned" not in done.stdout


def test_chat_only_usage_shows_no_cache_columns(ledger_env: dict[str, str]) -> None:
    done = usage("--by", "tier", env=ledger_env)
    assert done.returncode == 0, done.stderr
    assert "hit rate" not in done.stdout and "embedding cache" not in done.stdout
    assert "saving $ vs litellm/kimi" in done.stdout and "saving: against" not in done.stdout
    # --json carries the cache's fields always: none here
    for row in usage_json("--by", "tier", env=ledger_env).values():
        assert {k: row[k] for k in CACHE_KEYS} == {
            **dict.fromkeys(CACHE_KEYS, 0),
            "cache_hit_rate": None,
        }


@pytest.fixture(params=DATABASES)
def embedding_env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    with database(request.param, tmp_path) as url:
        ledger = Ledger(url, redis_url=None, spool_dir=tmp_path)
        ledger.insert(embedding_rows())
        ledger.close()
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
        yield {**env, "FLEET_LEDGER_URL": url, "FLEET_DATA_DIR": str(tmp_path / "data")}


def cache(embedded: int, cached: int, tokens: int, saved_usd: float) -> dict:
    return {
        "embedded_items": embedded,
        "cached_items": cached,
        "cache_hit_rate": cached / (cached + embedded) if cached + embedded else None,
        "cached_tokens": tokens,
        "cache_saved_usd": pytest.approx(saved_usd, abs=1e-12),
        "cache_saved_vs_reference_usd": pytest.approx(tokens * EMBEDDING_REF / 1e6, abs=1e-12),
    }


def test_usage_shows_the_embedding_caches_hits_and_savings(embedding_env: dict[str, str]) -> None:
    got = usage_json(env=embedding_env)
    # The answers' inputs: the failed attempt's 4 cache hits answered nothing
    assert {k: got["local/qwen3-embedding"][k] for k in CACHE_KEYS} == cache(2, 14, 140, 0.0)
    assert got["local/qwen3-embedding"]["attempts"] == 3
    assert {k: got["ollama/nomic-embed-text"][k] for k in CACHE_KEYS} == cache(5, 0, 0, 0.0)
    # On the paid model, the 100,000 tokens the cache saved are worth its $0.02/M
    paid = got[PAID_EMBEDDER]
    assert {k: paid[k] for k in CACHE_KEYS} == cache(3, 1, 100_000, 0.002)
    assert paid["cost_usd"] == pytest.approx(0.006, abs=1e-12)
    assert {k: got["litellm/kimi"][k] for k in CACHE_KEYS} == cache(0, 0, 0, 0.0)
    # The class's total: 15 of 25 inputs from the cache
    total = usage_json("--by", "task_class", env=embedding_env)["embedding"]
    assert {k: total[k] for k in CACHE_KEYS} == cache(10, 15, 100_140, 0.002)
    assert total["cache_hit_rate"] == 0.6
    # Its saving prices its tokens at a paid embedding model's price, not the chat primary's
    reference = (
        total["prompt_tokens"] * EMBEDDING_REF + total["completion_tokens"] * KIMI_OUT
    ) / 1e6
    assert total["saving_usd"] == pytest.approx(reference - total["cost_usd"], abs=1e-9)

    # The table shows them, and what the saved tokens were worth
    done = usage(env=embedding_env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()

    def last_four(name: str) -> list[str]:
        """The cache's four cells of the row of that name."""
        cells = next(c for x in lines if (c := [c for c in x.split() if c != "│"])[:1] == [name])
        return cells[-4:]

    head = next(x for x in lines if "hit rate" in x)
    assert "cache hits" in head and "tokens saved" in head
    assert last_four("local/qwen3-embedding") == ["14", "2", "87.5%", "140"]
    assert last_four("litellm/kimi") == ["–"] * 4  # no embeddings: nothing to say
    assert last_four("total") == ["15", "10", "60.0%", "100,140"]
    saved = next(x for x in lines if x.startswith("embedding cache:"))
    assert "100,140 prompt tokens saved: $0.002000 at their models' prices" in saved
    assert f"${100_140 * EMBEDDING_REF / 1e6:.6f} at openai/text-embedding-3-small's price" in saved
    assert "nothing on local, free and subscription models" in saved
    # its saving column has two references, named below the table
    assert "saving $ vs" not in head
    assert (
        "saving: against litellm/kimi's prices, embedding tokens against"
        " openai/text-embedding-3-small's" in lines
    )


def test_usage_json_is_the_query_layers_for_the_same_filters(ledger_env: dict[str, str]) -> None:
    # The CLI and the dashboard's query layer agree by construction: same filters, same rows
    ledger = Ledger(ledger_env["FLEET_LEDGER_URL"], redis_url=None)
    since = datetime.now(UTC) - timedelta(days=7)
    for args, filters, by in [
        ([], Filters(), "model"),
        (["--class", "user_facing"], Filters(task_class="user_facing"), "tier"),
        (["--model", "zai/glm-4.7"], Filters(model="zai/glm-4.7"), "source"),
        (["--app", "nobody"], Filters(app="nobody"), "model"),
    ]:
        iso = since.isoformat()
        got = usage_json("--since", iso, "--by", by, *args, env=ledger_env)
        window = Filters(since, None, filters.task_class, filters.app, filters.model)
        want = Usage(ledger, window, catalog()).by(by)
        assert got == {row[by]: {k: row[k] for k in JSON_KEYS | {by}} for row in want}, args
    ledger.close()


def test_usage_until_and_utc_days(ledger_env: dict[str, str]) -> None:
    old_day = datetime.fromtimestamp(DAYS_AGO_3, UTC)
    day = old_day.strftime("%Y-%m-%d")
    next_day = (old_day + timedelta(days=1)).strftime("%Y-%m-%d")
    # One UTC day, midnight to midnight: the three-day-old job's, and nothing of the days
    # around it
    got = usage_json("--since", day, "--until", next_day, "--by", "day", env=ledger_env)
    assert list(got) == [day] and strip(got[day]) == figures(1, 1, 40, 8, 0.0)
    shown = usage("--since", day, "--until", next_day, env=ledger_env)
    assert shown.returncode == 0 and f"until {next_day} 00:00 UTC" in shown.stdout


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--since", "yesterday"], "24h"),
        (["--since", "12x"], "7d"),
        (["--by", "colour"], "model"),
        (["--by"], "--by"),
    ],
)
def test_bad_input_exits_2_with_one_line(args: list[str], names: str, tmp_path: Path) -> None:
    env = {**os.environ, "FLEET_LEDGER_URL": f"sqlite:///{tmp_path / 'l.db'}"}
    done = usage(*args, env=env)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and names in done.stderr
    assert "Traceback" not in done.stderr


def test_bad_ledger_url_exits_2(tmp_path: Path) -> None:
    done = usage(env={**os.environ, "FLEET_LEDGER_URL": "mysql://u:pw@h/db"})
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "valid: sqlite, postgresql" in done.stderr


def test_unreachable_ledger_exits_1_without_the_password() -> None:
    from workers.ops.redis_server import free_port

    url = f"postgresql://fleet:s3cret@127.0.0.1:{free_port()}/test"
    done = usage(env={**os.environ, "FLEET_LEDGER_URL": url})
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert "cannot read the ledger" in done.stderr and "s3cret" not in done.stderr


def test_parse_since() -> None:
    now = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
    assert parse_since("30m", now) == now - timedelta(minutes=30)
    assert parse_since("7d", now) == now - timedelta(days=7)
    assert parse_since("2025-05-31", now) == datetime(2025, 5, 31, tzinfo=UTC)
    assert parse_since("2025-05-31T10:00:00+02:00", now) == datetime(2025, 5, 31, 8, tzinfo=UTC)
    with pytest.raises(ValueError, match="30m, 24h, 7d"):
        parse_since("soon", now)
