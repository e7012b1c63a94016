"""The adapters of one worker process: built on first use, shared by its threads.

One httpx client per process, its pool sized to the worker's concurrency, shared by every
OpenAI-compatible provider (connections are per host anyway); one loaded MLX model per
local model. Keys are read from the environment variable the catalog names, at the moment
of the call, and never leave this process. A model this process cannot serve raises
ModelUnusable before anything is built: `no_key` (its key variable is unset here) or
`model_missing` (a local model neither at its path nor in the hub cache); the step skips
it without a call, and `lacks()` says the same to the worker's announcement.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import Any

from router.catalog import Catalog, Provider
from workers.providers.base import ModelUnusable, Target


class ProviderRegistry:
    def __init__(
        self, catalog: Catalog, concurrency: int, environ: Mapping[str, str] = os.environ
    ) -> None:
        self.catalog = catalog
        self.concurrency = concurrency
        self.environ = environ
        self._lock = threading.Lock()
        self._client: Any = None
        self._http: dict[str, Any] = {}  # OpenAI-compatible adapters over the shared client
        self._local: dict[str, Any] = {}  # MLX adapters, one per loaded model
        self._found: set[str] = set()  # local models found on this machine

    def __call__(self, model_id: str) -> Target:
        model = self.catalog.model(model_id)
        provider = self.catalog.providers[model.provider]
        if provider.kind == "mlx":
            self._present(model.id, model.upstream)
            return Target(self._mlx(model.upstream), model.upstream, provider.timeout_s)
        key = self._key(provider)
        base_url = provider.resolved_base_url(self.environ)
        adapter = self._openai(model.provider, base_url or "", key)
        return Target(adapter, model.upstream, provider.timeout_s)

    def lacks(self, model_id: str) -> str | None:
        """What keeps this process from serving `model_id`, found without building an
        adapter or reaching anything: "no_key" (its key variable is unset here),
        "model_missing" (a local model neither at its path nor in the hub cache), or
        None. A few stat calls for a local model; the environment only for the rest."""
        model = self.catalog.model(model_id)
        provider = self.catalog.providers[model.provider]
        try:
            if provider.kind == "mlx":
                self._present(model.id, model.upstream)
            else:
                self._key(provider)
        except ModelUnusable as exc:
            return exc.kind
        return None

    def _present(self, model_id: str, upstream: str) -> None:
        """ModelUnusable `model_missing` unless the local model is on this machine (at its
        path, or in the hub cache: nothing is fetched at call time, `fleet models pull`
        does that). Once found, it is not looked for again."""
        from workers.providers.mlx_local import local_model_dir

        if upstream in self._found:
            return
        if local_model_dir(upstream, self.environ) is None:
            where = f"{upstream} is not on this machine (at its path, or in the hub cache)"
            raise ModelUnusable("model_missing", f"{where}: fleet models pull {model_id}")
        self._found.add(upstream)

    def _key(self, provider: Provider) -> str | None:
        """The provider's key from the environment (None: it needs none); ModelUnusable
        `no_key` when its variable is unset."""
        key = self.environ.get(provider.api_key_env) if provider.api_key_env else None
        if provider.api_key_env and not key:
            raise ModelUnusable("no_key", f"{provider.api_key_env} is not set")
        return key

    def _openai(self, name: str, base_url: str, key: str | None) -> Any:
        from workers.providers.openai_compat import OpenAICompatProvider, make_client

        cache_key = f"{name}|{base_url}|{hash(key)}"
        with self._lock:
            if self._client is None:
                self._client = make_client(self.concurrency)
            if cache_key not in self._http:
                self._http[cache_key] = OpenAICompatProvider(base_url, key, self._client)
            return self._http[cache_key]

    def _mlx(self, path: str) -> Any:
        from workers.providers.mlx_local import MLXProvider

        with self._lock:
            if path not in self._local:
                self._local[path] = MLXProvider(path)
            return self._local[path]

    def close(self) -> None:
        with self._lock:
            for adapter in self._local.values():
                adapter.close()
            if self._client is not None:
                self._client.close()
            self._local.clear()
            self._http.clear()
            self._client = None
