"""The catalog's local (MLX) models on this machine: where each is, its size on disk,
whether mlx-lm can load it (`fleet models list`), and fetching them into the hub cache
(`fleet models pull`).

A local model's `upstream` is a hub repo id (looked up in the hub cache, offline) or a
path (looked at where it is; nothing to pull). Presence and loadability are fleet
doctor's own checks (workers/ops/doctor.py), so the two commands never disagree.

Pulling is huggingface_hub's `snapshot_download`: its progress bars go to stderr, an
interrupted download resumes, and a snapshot is only taken as complete once every file
of its listing is there. Offline (HF_HUB_OFFLINE=1) or with the hub unreachable it
writes nothing and the model is named, with the reason, in one line.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from router.catalog import Catalog, Model
from router.errors import FleetError
from workers.ops.doctor import fetch_command, unloadable
from workers.providers.mlx_local import hub_cache_dir, in_hub_cache


@dataclass
class LocalModel:
    model: str  # the catalog id (what `fleet models pull` takes)
    upstream: str  # the hub repo id or the path mlx-lm loads
    source: str  # "hub" or "path"
    present: bool
    path: str | None = None  # the directory that holds it, when present
    size_bytes: int | None = None  # on disk, when present
    loadable: bool | None = None  # None: not present, nothing to load
    problem: str | None = None
    fix: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Pulled:
    model: str
    upstream: str
    ok: bool
    path: str | None = None
    problem: str | None = None  # one line: what could not be reached, and why

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def local_models(catalog: Catalog) -> list[Model]:
    return [m for m in catalog.models if catalog.providers[m.provider].kind == "mlx"]


def select(catalog: Catalog, ids: Sequence[str]) -> list[Model]:
    """The local models `ids` name (a catalog id or its hub id), all of them when none;
    FleetError naming the valid ids for any other."""
    local = local_models(catalog)
    if not ids:
        return local
    by_name = {m.id: m for m in local} | {m.upstream: m for m in local}
    unknown = [i for i in ids if i not in by_name]
    if unknown:
        valid = ", ".join(m.id for m in local) or "none in this catalog"
        raise FleetError(f"not a local model of the catalog: {', '.join(unknown)} (valid: {valid})")
    return list({by_name[i].id: by_name[i] for i in ids}.values())


def _is_path(upstream: str) -> bool:
    from workers.providers.mlx_local import _looks_like_local_path

    return _looks_like_local_path(upstream)


# --- list -------------------------------------------------------------------------------


def list_models(
    models: Iterable[Model], environ: Mapping[str, str] = os.environ
) -> list[LocalModel]:
    """Each model's presence, size on disk and loadability, never asking the hub."""
    sizes = _hub_sizes(environ)
    return [_describe(m, environ, sizes) for m in models]


def _describe(model: Model, environ: Mapping[str, str], sizes: dict[str, int]) -> LocalModel:
    path: Path | None
    if _is_path(model.upstream):
        path = Path(model.upstream).expanduser()
        found = LocalModel(model.id, model.upstream, "path", present=False)
        if not (path / "config.json").is_file():
            found.problem = f"no MLX model at {path}"
            found.fix = "put an MLX model there, or point upstream at one"
            return found
        size = _dir_size(path)
    else:
        found = LocalModel(model.id, model.upstream, "hub", present=False)
        path = in_hub_cache(model.upstream, environ)
        if path is None:
            found.problem = f"{model.upstream} is not in the hub cache"
            found.fix = fetch_command(model.id)
            return found
        size = sizes.get(model.upstream, _dir_size(path))
    found.present, found.path, found.size_bytes = True, str(path), size
    found.problem = unloadable(path)
    found.loadable = found.problem is None
    if found.problem is not None:
        found.fix = (
            f"fetch it again: {fetch_command(model.id)}"
            if found.source == "hub"
            else "replace the model at that path"
        )
    return found


def _hub_sizes(environ: Mapping[str, str]) -> dict[str, int]:
    """Size on disk of every model repo in the hub cache (its blobs, counted once)."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(hub_cache_dir(environ))
    except CacheNotFound:
        return {}
    return {r.repo_id: r.size_on_disk for r in info.repos if r.repo_type == "model"}


def _dir_size(path: Path) -> int:
    # a hub snapshot holds links to blobs: count what they point at, each file once
    files = {p.resolve() for p in path.rglob("*") if p.is_file()}
    return sum(f.stat().st_size for f in files)


# --- pull -------------------------------------------------------------------------------


def pull(model: Model, environ: Mapping[str, str] = os.environ) -> Pulled:
    """Fetch one model's hub snapshot into the hub cache (a no-op when it is complete)."""
    if _is_path(model.upstream):
        path = Path(model.upstream).expanduser()
        there = (path / "config.json").is_file()
        problem = None if there else f"{model.id}: a path, not a hub id, and no model at {path}"
        return Pulled(model.id, model.upstream, there, str(path) if there else None, problem)
    from huggingface_hub import snapshot_download

    try:
        path_s = snapshot_download(model.upstream, cache_dir=hub_cache_dir(environ))
    except Exception as exc:  # whatever huggingface_hub and its HTTP client raise
        return Pulled(model.id, model.upstream, False, problem=_unreached(model, exc, environ))
    return Pulled(model.id, model.upstream, True, path_s)


def _unreached(model: Model, exc: BaseException, environ: Mapping[str, str]) -> str:
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    hub = constants.ENDPOINT
    where = f"{model.id}: could not reach {model.upstream} on {hub}"
    if isinstance(exc, GatedRepoError):
        return f"{where}: gated, log in with `hf auth login` and accept its terms"
    if isinstance(exc, RepositoryNotFoundError):
        return f"{model.id}: {model.upstream} is not on {hub} (check the catalog's upstream)"
    if constants.HF_HUB_OFFLINE:
        return f"{where}: offline (HF_HUB_OFFLINE is set)"
    cause = exc.__cause__ if isinstance(exc, LocalEntryNotFoundError) and exc.__cause__ else exc
    first = (str(cause).strip().splitlines() or [""])[0][:200]
    return f"{where}: {type(cause).__name__}" + (f": {first}" if first else "")
