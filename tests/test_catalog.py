"""The catalog file: every model of both seeds, and precise one-line refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from router.catalog import CAPABILITIES, default_catalog_path, load_catalog
from router.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent

SEED_MODELS = {
    # model-allocation strategy
    "zai/glm-4.7",
    "minimax/MiniMax-M2.1",
    "minimax/MiniMax-Vision-Video-01",
    "openrouter/meta-llama/llama-3.1-405b-instruct:free",
    "openrouter/nousresearch/hermes-3-llama-3.1-405b:free",
    "openrouter/nvidia/nemotron-nano-12b-v2-vl:free",
    "openrouter/deepseek/deepseek-chat",
    "moonshot/kimi-k2-0905-preview",
    # cost audit
    "local/qwen3-mlx",
    "local/qwen-cpu-fallback",
    "local/phi4-mini-local",
    "local/qwen3-local",
    "litellm/trinity-free",
    "litellm/qwen3-coder-free",
    "litellm/chimera-free",
    "litellm/qwen3-next-free",
    "litellm/glm-free",
    "litellm/deepseek-free",
    "litellm/nemotron-free",
    "litellm/gpt-oss-free",
    "litellm/gpt-oss-small-free",
    "litellm/kimi",
    "litellm/kimi-k2-thinking",
    # cost audit, recommendation 4: embeddings (the local and free ones not in seeds)
    "ollama/nomic-embed-text",
    "local/qwen3-embedding",
    "litellm/embedding-free",
}


def test_default_catalog_holds_every_seed_model_and_provider() -> None:
    catalog = load_catalog()
    assert set(catalog.by_id) == SEED_MODELS
    providers = {"zai", "minimax", "openrouter", "moonshot", "litellm", "ollama", "local"}
    assert set(catalog.providers) == providers
    assert catalog.providers["litellm"].base_url_env == "LITELLM_BASE_URL"
    assert catalog.providers["local"].kind == "mlx"
    # Ollama on this machine takes no key; every remote provider names its key's variable
    keyless = {"local", "ollama"}
    assert all(p.api_key_env for n, p in catalog.providers.items() if n not in keyless)


def test_seed_figures() -> None:
    by_id = load_catalog().by_id
    assert (by_id["litellm/kimi"].usd_per_mtok_in, by_id["litellm/kimi"].usd_per_mtok_out) == (
        0.56,
        2.94,
    )
    thinking = by_id["litellm/kimi-k2-thinking"]
    assert (thinking.usd_per_mtok_in, thinking.usd_per_mtok_out) == (0.56, 2.24)
    assert by_id["zai/glm-4.7"].context_window == 200_000
    assert by_id["minimax/MiniMax-Vision-Video-01"].context_window == 128_000
    assert by_id["openrouter/deepseek/deepseek-chat"].context_window == 64_000
    assert by_id["moonshot/kimi-k2-0905-preview"].context_window == 256_000
    assert by_id["litellm/qwen3-next-free"].context_window == 262_000
    for model in by_id.values():
        if model.tier in ("free", "local"):
            assert (model.usd_per_mtok_in, model.usd_per_mtok_out) == (0, 0)
    assert {m.tier for m in by_id.values() if m.provider == "local"} == {"local"}
    assert "vision" in by_id["openrouter/nvidia/nemotron-nano-12b-v2-vl:free"].capabilities


def test_fleet_catalog_env_overrides_the_default(tmp_path: Path, monkeypatch) -> None:
    data = yaml.safe_load(default_catalog_path().read_text())
    data["policy"]["long_context_above_tokens"] = 1234
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("FLEET_CATALOG", str(path))
    assert load_catalog().policy.long_context_above_tokens == 1234


def _broken(tmp_path: Path, edit) -> Path:
    data = yaml.safe_load(default_catalog_path().read_text())
    edit(data)
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _set(path: list, value):
    def edit(data):
        node = data
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return edit


BROKEN = {
    "unknown queue": (
        _set(["models", 0, "queue"], "gpu"),
        ["models.0.queue", "'local', 'free', 'subscription', 'vision' or 'long-context'", "'gpu'"],
    ),
    "unknown tier": (_set(["models", 1, "tier"], "gold"), ["models.1.tier", "'gold'", "'paid'"]),
    "unknown provider": (
        _set(["models", 0, "id"], "acme/glm"),
        ["models.0.id", "unknown provider 'acme'", "valid: litellm, local, minimax"],
    ),
    "duplicate id": (
        _set(["models", 1, "id"], "zai/glm-4.7"),
        ["models.1.id", "duplicate model id 'zai/glm-4.7'"],
    ),
    "chain names unknown model": (
        _set(["policy", "chains", "creative", 1], "zai/glm-9"),
        ["policy.chains.creative.1", "unknown model 'zai/glm-9'", "valid: "],
    ),
    "focus names unknown model": (
        _set(["policy", "focus", "data"], "litellm/nope"),
        ["policy.focus.data", "unknown model 'litellm/nope'"],
    ),
    "fallback names unknown model": (
        _set(["policy", "fallbacks", 0], "litellm/nope"),
        ["policy.fallbacks.0", "unknown model 'litellm/nope'"],
    ),
    "typo in a field": (_set(["models", 2, "contxt_window"], 5), ["models.2.contxt_window"]),
    "negative price": (
        _set(["models", 3, "usd_per_mtok_in"], -1),
        ["models.3.usd_per_mtok_in", "greater than or equal to 0", "-1"],
    ),
    "paid without a price": (
        _set(["models", 3, "usd_per_mtok_in"], 0),
        ["models.3", "a paid model needs"],
    ),
    "unknown task class chain": (
        _set(["policy", "chains", "poetry"], ["zai/glm-4.7"]),
        ["policy.chains.poetry", "complex_reasoning"],
    ),
    "bad capability": (
        _set(["models", 0, "capabilities"], ["telepathy"]),
        ["models.0.capabilities", "'vision'", "'telepathy'"],
    ),
    "bad provider kind": (
        _set(["providers", "zai", "kind"], "grpc"),
        ["providers.zai.kind", "'openai' or 'mlx'", "'grpc'"],
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_catalogs_are_refused_with_one_precise_line(tmp_path: Path, case: str) -> None:
    edit, needles = BROKEN[case]
    path = _broken(tmp_path, edit)
    with pytest.raises(ConfigError) as caught:
        load_catalog(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:")
    for needle in needles:
        assert needle in message, message


def test_error_names_the_line_of_the_bad_value(tmp_path: Path) -> None:
    text = default_catalog_path().read_text()
    path = tmp_path / "c.yaml"
    path.write_text(text.replace("queue: vision\n", "queue: visoin\n", 1))
    bad_line = path.read_text().splitlines().index("    queue: visoin") + 1
    with pytest.raises(ConfigError, match=rf"c.yaml:{bad_line}: models\.\d+\.queue"):
        load_catalog(path)


def test_unparseable_yaml_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("providers: [\n  zai: {\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: not valid YAML"):
        load_catalog(path)
    with pytest.raises(ConfigError, match="cannot read catalog"):
        load_catalog(tmp_path / "absent.yaml")
    path.write_text("- just a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_catalog(path)


def test_an_unknown_capability_is_refused_with_every_valid_one(tmp_path: Path) -> None:
    path = _broken(tmp_path, _set(["models", 0, "capabilities"], ["tools", "tool_calls"]))
    with pytest.raises(ConfigError) as caught:
        load_catalog(path)
    message = str(caught.value)
    assert "models.0.capabilities.1" in message and "(got 'tool_calls')" in message
    for valid in CAPABILITIES:
        assert f"'{valid}'" in message, message


def test_capabilities_read_through_supports() -> None:
    by_id = load_catalog().by_id
    assert by_id["zai/glm-4.7"].supports("tools")
    assert not by_id["zai/glm-4.7"].supports("json_schema")
    assert not by_id["zai/glm-4.7"].supports("telepathy")
    assert by_id["minimax/MiniMax-Vision-Video-01"].supports("video")
    for model in by_id.values():
        if model.tier == "local":
            assert not model.capabilities & {"tools", "json_object", "json_schema"}, model.id


def test_docs_say_where_each_models_capabilities_come_from() -> None:
    # docs/catalog.md's table lists every shipped remote model with the catalog's list.
    rows = {}
    for line in (ROOT / "docs" / "catalog.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 3 and "/" in cells[0]:
            rows[cells[0]] = cells[1]
    catalog = load_catalog()
    for model in catalog.models:
        if model.tier == "local":
            continue
        documented = rows.get(model.id)
        assert documented is not None, f"{model.id} missing from docs/catalog.md"
        listed = set() if documented == "(none)" else set(documented.split(", "))
        assert listed == set(model.capabilities), model.id
