"""The `fleet` CLI contract, run as users run it: a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

FLEET = str(Path(sys.executable).with_name("fleet"))


def fleet(*args: str, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FLEET, *args], capture_output=True, text=True, timeout=60, env=env, check=False
    )


def test_route_json_contract() -> None:
    done = fleet("route", "--class", "user_facing", "--profile", "routing", "--json")
    assert done.returncode == 0, done.stderr
    obj = json.loads(done.stdout)
    assert set(obj) == {"task_class", "queue", "chain", "temperature", "max_tokens"}
    assert obj["task_class"] == "user_facing"
    assert obj["queue"] == obj["chain"][0]["queue"] == "subscription"
    assert obj["chain"][0] == {"model": "litellm/kimi", "queue": "subscription", "tier": "paid"}
    assert (obj["temperature"], obj["max_tokens"]) == (0.3, 512)
    assert done.stdout.count("\n") == 1


def test_route_image_and_prompt_tokens_and_source() -> None:
    image = json.loads(fleet("route", "--class", "creative", "--image", "--json").stdout)
    assert image["queue"] == "vision"
    long = json.loads(
        fleet("route", "--class", "creative", "--prompt-tokens", "250000", "--json").stdout
    )
    assert long["chain"][0]["model"] == "moonshot/kimi-k2-0905-preview"
    cron = json.loads(fleet("route", "--class", "creative", "--source", "cron", "--json").stdout)
    assert {hop["tier"] for hop in cron["chain"]} == {"free"}


def test_route_human_table_names_skipped_models() -> None:
    done = fleet("route", "--class", "creative", "--source", "cron")
    assert done.returncode == 0
    assert "litellm/trinity-free" in done.stdout
    assert "skipped zai/glm-4.7: tier subscription not allowed" in done.stdout


def test_route_with_no_usable_model_exits_1_with_every_reason() -> None:
    done = fleet("route", "--class", "creative", "--prompt-tokens", "300000", "--json")
    assert done.returncode == 1
    assert done.stdout == ""
    assert "moonshot/kimi-k2-0905-preview: context too small" in done.stderr


def test_route_tools_starts_at_the_first_model_with_tools_and_says_why() -> None:
    done = fleet("route", "--class", "cost_free", "--tools")
    assert done.returncode == 0, done.stderr
    assert "needs: tools" in done.stdout
    # Printed as written: no emoji code made of ':free:'
    assert "skipped openrouter/meta-llama/llama-3.1-405b-instruct:free: lacks tools" in done.stdout
    assert "skipped local/qwen3-mlx: lacks tools" in done.stdout
    obj = json.loads(fleet("route", "--class", "cost_free", "--tools", "--json").stdout)
    assert set(obj) == {"task_class", "queue", "chain", "temperature", "max_tokens"}
    assert [hop["model"] for hop in obj["chain"]] == [
        "litellm/deepseek-free",
        "litellm/gpt-oss-free",
    ]


def test_route_json_schema_and_tools_compose_with_image() -> None:
    schema = json.loads(
        fleet("route", "--class", "complex_reasoning", "--json-schema", "--json").stdout
    )
    assert [hop["model"] for hop in schema["chain"]] == ["openrouter/deepseek/deepseek-chat"]
    both = fleet("route", "--class", "complex_reasoning", "--tools", "--json-schema", "--json")
    assert json.loads(both.stdout)["chain"] == schema["chain"]
    done = fleet("route", "--class", "creative", "--image", "--tools", "--json")
    # A chain no model can serve: exit 1 (no usable model), the one-line reason on stderr
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith("fleet: no model of chain vision can serve tools: ")
    assert "minimax/MiniMax-Vision-Video-01 (lacks tools)" in done.stderr


def test_catalog_json() -> None:
    done = fleet("catalog", "--json")
    rows = json.loads(done.stdout)
    assert len(rows) == 26
    keys = {"id", "provider", "queue", "tier", "context_window", "capabilities"}
    assert set(rows[0]) == keys | {"usd_per_mtok_in", "usd_per_mtok_out"}
    kimi = next(r for r in rows if r["id"] == "litellm/kimi")
    assert (kimi["provider"], kimi["usd_per_mtok_out"]) == ("litellm", 2.94)
    human = fleet("catalog")
    assert human.returncode == 0 and "openrouter/deepseek/deepseek-chat" in human.stdout


def test_check_config(tmp_path: Path) -> None:
    from router.catalog import default_catalog_path

    ok = fleet("check-config", str(default_catalog_path()))
    assert ok.returncode == 0 and "ok (7 providers, 26 models, 10 chains)" in ok.stdout
    broken = tmp_path / "c.yaml"
    broken.write_text(default_catalog_path().read_text().replace("tier: paid", "tier: pricey", 1))
    bad = fleet("check-config", str(broken))
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    assert "tier: Input should be 'local', 'free', 'subscription' or 'paid'" in bad.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["route", "--class", "poetry"], "invalid choice: 'poetry' (choose from 'complex_"),
        (["route", "--class", "creative", "--focus", "x"], "unknown focus 'x' (valid: creative,"),
        (["route", "--class", "creative", "--profile", "x"], "unknown profile 'x' (valid: anal"),
        (["route", "--class", "creative", "--model", "a/b"], "unknown model 'a/b' (valid: "),
        (["route", "--class", "creative", "--source", "web"], "invalid choice: 'web' (choose from"),
        (["route", "--class", "creative", "--prompt-tokens", "-5"], "must be 0 or more (got -5)"),
        (["route", "--class", "creative", "--prompt-tokens", "lots"], "not a whole number: 'lots'"),
        (["check-config", "/nonexistent/c.yaml"], "cannot read catalog"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_input_exits_2_with_one_line(args: list[str], needle: str) -> None:
    done = fleet(*args)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1, done.stderr
    assert needle in done.stderr
    assert "Traceback" not in done.stderr


def test_broken_fleet_catalog_is_one_line_too(tmp_path: Path) -> None:
    import os

    path = tmp_path / "c.yaml"
    path.write_text("providers: {}\n")
    done = fleet("route", "--class", "creative", env={**os.environ, "FLEET_CATALOG": str(path)})
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and str(path) in done.stderr
