"""The fleet wired to stand-ins: every remote provider pointed at the simulator, every
local model at the tiny generated MLX model. Used by `fleet demo`, the tests and bench."""

from __future__ import annotations

from pathlib import Path

import yaml

from router.catalog import default_catalog_path, load_catalog

PLACEHOLDER_KEY = "sim-placeholder-key"  # the simulator checks presence, not value


def write_simulated_catalog(
    sim_base_url: str,
    model_dir: Path,
    path: Path,
    timeout_s: float = 10,
    embedding_dir: Path | None = None,
) -> Path:
    """A copy of the default catalog aimed at the stand-ins; validated before use. Local
    embedding models use `embedding_dir` (a tiny qwen3 body:
    tiny_model.build_tiny_embedding_model) when given, else the chat model's body."""
    data = yaml.safe_load(default_catalog_path().read_text(encoding="utf-8"))
    for provider in data["providers"].values():
        if provider["kind"] == "openai":
            provider["base_url"] = sim_base_url
            provider.pop("base_url_env", None)  # a user's *_BASE_URL must not leak in
            provider["timeout_s"] = timeout_s
    for model in data["models"]:
        if model["id"].startswith("local/"):
            embeds = "embedding" in model.get("capabilities", ())
            model["upstream"] = str(embedding_dir if embeds and embedding_dir else model_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    load_catalog(path)
    return path


def simulated_env(
    sim_base_url: str,
    model_dir: Path,
    data_dir: Path,
    timeout_s: float = 10,
    embedding_dir: Path | None = None,
) -> dict[str, str]:
    """Environment for fleet processes that talk to the stand-ins only."""
    catalog = write_simulated_catalog(
        sim_base_url, model_dir, data_dir / "catalog.yaml", timeout_s, embedding_dir
    )
    env = {"FLEET_CATALOG": str(catalog)}
    for provider in load_catalog(catalog).providers.values():
        if provider.api_key_env:
            env[provider.api_key_env] = PLACEHOLDER_KEY
    return env
