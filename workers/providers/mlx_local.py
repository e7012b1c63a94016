"""MLX in-process provider for the `local` queue: one model, loaded once per process.

All MLX work (loading, templating, generation) runs on ONE long-lived thread owned by the
provider. `complete()` may be called from any thread: it queues a job and waits for it.
`stream()` queues the same job, which also hands each piece of text to the caller through
a queue as it is made; the caller yields them as Deltas, then the Completion with the real
token counts. A stop string is never streamed: text that may be the start of one is held
back until the next token says it is not.

Why one thread: mlx-lm generates on a thread-local stream, so every thread that generates
creates MLX streams of its own; on Linux the process may abort at exit (SIGABRT, exit code
134) unless each such thread calls `mx.clear_streams()` before it ends. A single worker
thread that calls it once on its way out (on `close()` or at interpreter exit, via
atexit) keeps exits clean, and also serialises access to the model, which a Celery
worker with `--pool threads` or `solo` would share anyway.

Errors are mapped onto the provider error tree at this boundary:
    model path missing / unloadable -> ModelUnusable("not_found")
    image or malformed messages     -> Permanent("bad_request")
    exception while generating      -> Retryable("server_error")
    no answer within timeout_s      -> Retryable("timeout")
    either, once text was streamed  -> StreamBroken (its partial: the text, real counts)
    an input longer than the model's
      positions, more dimensions than
      its hidden size                -> Permanent("bad_request")
    a model with no transformer body
      to pool (embed)                -> CapabilityRefused("embedding")

`embed()` gives a vector per text as Qwen3-Embedding makes them: the text's tokens and an
end-of-text token (`<|endoftext|>`, else the tokenizer's eos; not twice when the tokenizer
appends it already), run through the model's transformer body (`model.model`, the final
norm included, no LM head), the last token's hidden state taken (last-token pooling) and
L2-normalised; `dimensions` keeps the first n numbers, normalised again (Matryoshka).
Texts run several at once, padded on the right: under the causal mask a text's last
token never sees the padding after it, so its vector is the one it gets alone. A long
text goes through in steps of EMBED_CHUNK_TOKENS positions over a KV cache, so memory
stays bounded by the step rather than the square of its length. `prompt_tokens` counts
the tokens run, the end tokens included.

Loading is mlx-lm's (`mlx_lm.utils.load_model` and `load_tokenizer`, as `mlx_lm.load`
does), with one addition: a checkpoint of the transformer body alone, saved without the
`model.` prefix (Qwen3-Embedding's `embed_tokens.weight`, `layers.0...`), has its names
prefixed so the causal-LM class mlx-lm builds for its config takes it.

Of a request's options it honours `stop` (the answer ends before the first stop string),
`top_p` (nucleus sampling) and `seed` (MLX's random seed, for a reproducible sample);
the step drops every other option before the call (OPTIONS) and the job's Result lists
them. A developer message is given to the chat template as a system message.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import functools
import logging
import os
import queue
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

from workers.providers.base import (
    CapabilityRefused,
    Completion,
    CompletionRequest,
    Delta,
    EmbeddingRequest,
    Embeddings,
    ModelUnusable,
    Permanent,
    ProviderError,
    Retryable,
    StreamBroken,
    about_to_send,
)

log = logging.getLogger(__name__)
_T = TypeVar("_T")

DEFAULT_MAX_TOKENS = 256
DEFAULT_LOAD_TIMEOUT_S = 600.0
END_OF_TEXT = "<|endoftext|>"  # the token Qwen3-Embedding ends each text with, pooled there
EMBED_BATCH_TOKENS = 8192  # texts run at once while their count times the longest fits
EMBED_CHUNK_TOKENS = 512  # positions per forward pass of a long text (over a KV cache)

_TEXT_PART_TYPES = {"text", "input_text"}
_IMAGE_PART_TYPES = {"image_url", "input_image", "image"}


# Debian's libopenblas0-pthread; the mlx-cpu wheel bundles the slow reference BLAS.
OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
)
_openblas_lock = threading.Lock()
_openblas_done = False
_openblas_path: str | None = None


def preload_openblas() -> str | None:
    """Load OpenBLAS globally before mlx is imported, so mlx's BLAS calls bind to it.

    The mlx-cpu wheel links a bundled reference (netlib) BLAS: ~5 GFLOP/s for a 1024
    sgemm on this kind of machine against ~80 with OpenBLAS. Symbols are bound at first
    use and a library loaded with RTLD_GLOBAL comes first, so preloading is enough.
    MODELFLEET_OPENBLAS=0 disables it; =PATH picks the library. Has no effect (and
    returns None) once mlx.core is imported or when no OpenBLAS is installed.
    Returns the path loaded.
    """
    global _openblas_done, _openblas_path
    with _openblas_lock:
        if _openblas_done:
            return _openblas_path
        _openblas_done = True
        setting = os.environ.get("MODELFLEET_OPENBLAS", "auto").strip()
        if setting.lower() in {"0", "off", "false", "no"} or "mlx.core" in sys.modules:
            return None
        candidates = OPENBLAS_CANDIDATES if setting.lower() in {"", "auto", "1"} else (setting,)
        for candidate in candidates:
            if os.path.exists(candidate):
                import ctypes

                try:
                    ctypes.CDLL(candidate, mode=ctypes.RTLD_GLOBAL)
                except OSError:
                    log.debug("cannot preload %s", candidate, exc_info=True)
                    continue
                _openblas_path = candidate
                log.info("preloaded OpenBLAS from %s for mlx", candidate)
                break
        return _openblas_path


@dataclass(frozen=True)
class _Piece:
    """Text the generation thread hands to a streaming caller, with the counts so far."""

    text: str
    prompt_tokens: int
    completion_tokens: int


_Emit = Callable[[_Piece], None]


@dataclass
class _Job:
    fn: Callable[[threading.Event], Any]
    future: concurrent.futures.Future[Any] = field(default_factory=concurrent.futures.Future)
    cancel: threading.Event = field(default_factory=threading.Event)


def _looks_like_local_path(model: str) -> bool:
    """Absolute or explicitly relative: never a hub repo id, so never try the hub."""
    return model.startswith(("/", "./", "../", "~")) or Path(model).expanduser().exists()


def hub_cache_dir(environ: Mapping[str, str]) -> str | None:
    """The hub cache `environ` names (HF_HUB_CACHE, else HF_HOME/hub); None: the default
    huggingface_hub reads from the process's own environment."""
    return environ.get("HF_HUB_CACHE") or (
        str(Path(environ["HF_HOME"]) / "hub") if environ.get("HF_HOME") else None
    )


def in_hub_cache(repo_id: str, environ: Mapping[str, str]) -> Path | None:
    """The snapshot directory of `repo_id` in the hub cache (HF_HOME / HF_HUB_CACHE as
    huggingface_hub reads them), never asking the hub."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json", cache_dir=hub_cache_dir(environ))
    except ValueError:  # not a valid repo id
        return None
    return Path(found).parent if isinstance(found, str) else None


def local_model_dir(upstream: str, environ: Mapping[str, str]) -> Path | None:
    """The directory holding the local model `upstream` on this machine (a path with its
    config.json, or its snapshot in the hub cache), None when it is not there. Offline:
    a few stat calls, never the hub. Whether mlx-lm can load it is another question
    (fleet doctor's)."""
    if _looks_like_local_path(upstream):
        path = Path(upstream).expanduser()
        return path if (path / "config.json").is_file() else None
    return in_hub_cache(upstream, environ)


def _part_text(i: int, part: Any) -> str:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in _TEXT_PART_TYPES:
        return str(part.get("text") or "")
    if kind in _IMAGE_PART_TYPES:
        raise Permanent("bad_request", "image input is not supported by the local MLX model")
    raise Permanent("bad_request", f"message {i}: unsupported content part {kind!r}")


def flatten_messages(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """OpenAI-style messages -> [{role, content: str}] for a text-only chat template.

    List-of-parts content is flattened to its text parts joined by newlines; image parts
    (or any part type other than text) raise Permanent("bad_request").
    """
    if not messages:
        raise Permanent("bad_request", "messages must not be empty")
    out: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise Permanent("bad_request", f"message {i} has no role")
        content = message.get("content")
        if content is None:
            text = ""
        elif isinstance(content, str):
            text = content
        elif isinstance(content, list):
            text = "\n".join(_part_text(i, part) for part in content)
        else:
            raise Permanent("bad_request", f"message {i}: content must be a string or parts")
        role = "system" if message["role"] == "developer" else message["role"]
        out.append({"role": role, "content": text})
    return out


class MLXProvider:
    """A Provider that runs one mlx-lm model in this process.

    `model` is a local directory or a Hugging Face repo id (the catalog field); a repo id
    is resolved by `mlx_lm.load` (from the local HF cache when HF_HUB_OFFLINE=1).
    The model loads once, lazily on the first `complete()` or eagerly with `load()`.
    """

    # the request options this adapter honours (base.accepted_options)
    OPTIONS = frozenset({"stop", "top_p", "seed"})

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
        default_temperature: float = 0.0,
        load_timeout_s: float = DEFAULT_LOAD_TIMEOUT_S,
    ) -> None:
        self.model = os.fspath(model)
        self.default_max_tokens = default_max_tokens
        self.default_temperature = default_temperature
        self.load_timeout_s = load_timeout_s
        self.load_seconds: float | None = None  # wall time of the successful load
        self._model: Any = None
        self._tokenizer: Any = None
        self._lock = threading.Lock()  # guards the thread/queue below
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._current: _Job | None = None
        self._pid = os.getpid()
        _live_providers.add(self)

    # -- public API -------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self, timeout_s: float | None = None) -> None:
        """Load model + tokenizer now (on the provider thread); no-op once loaded."""
        if self._model is not None and self._pid == os.getpid():
            return
        self._run(lambda _cancel: self._load_on_thread(), timeout_s or self.load_timeout_s)

    def complete(self, request: CompletionRequest) -> Completion:
        messages, max_tokens, temperature, sampling = self._checked(request)
        self.load()
        about_to_send()
        return self._run(
            lambda cancel: self._generate_on_thread(
                messages, max_tokens, temperature, sampling, cancel
            ),
            request.timeout_s,
        )

    def stream(self, request: CompletionRequest) -> Iterator[Delta | Completion]:
        """The text as the generation thread makes it, then the Completion. `timeout_s`
        bounds the whole generation, as in complete(); a caller that stops reading stops
        the generation at its next token."""
        messages, max_tokens, temperature, sampling = self._checked(request)
        self.load()
        about_to_send()
        pieces: queue.Queue[_Piece | None] = queue.Queue()  # None: the job is done
        job = _Job(
            lambda cancel: self._generate_on_thread(
                messages, max_tokens, temperature, sampling, cancel, emit=pieces.put
            )
        )
        job.future.add_done_callback(lambda _: pieces.put(None))
        deadline = time.monotonic() + request.timeout_s
        self._submit(job)
        last: _Piece | None = None
        written: list[str] = []
        try:
            while (piece := self._next_piece(pieces, job, deadline, request.timeout_s)) is not None:
                last = piece
                written.append(piece.text)
                yield Delta(text=piece.text)
            completion = self._outcome(job)
        except ProviderError as exc:
            if last is None:
                raise
            partial = Completion(
                text="".join(written),
                prompt_tokens=last.prompt_tokens,
                completion_tokens=last.completion_tokens,
                raw_model=self.model,
            )
            raise StreamBroken(f"after {len(written)} deltas, {exc}", partial) from exc
        finally:
            job.cancel.set()  # stops a generation whose caller went away or gave up
            job.future.cancel()  # or one still queued
        yield completion

    def embed(self, request: EmbeddingRequest) -> Embeddings:
        """A unit vector per text, in order, by last-token pooling (the module's doc).
        `timeout_s` bounds the whole call, as in complete()."""
        texts, dimensions = _checked_embedding(request)
        self.load()
        about_to_send()
        return self._run(
            lambda cancel: self._embed_on_thread(texts, dimensions, cancel), request.timeout_s
        )

    @staticmethod
    def _next_piece(
        pieces: queue.Queue[_Piece | None], job: _Job, deadline: float, timeout_s: float
    ) -> _Piece | None:
        """The next piece, None at the end; Retryable("timeout") once the deadline passed
        with the generation still running (a slow reader of a finished one reads on)."""
        left = deadline - time.monotonic()
        try:
            if job.future.done():
                return pieces.get(timeout=1)  # all there, the end (None) included
            if left > 0:
                return pieces.get(timeout=left)
        except queue.Empty:
            pass
        raise Retryable("timeout", f"local MLX model gave no answer within {timeout_s:g}s")

    def _checked(
        self, request: CompletionRequest
    ) -> tuple[list[dict[str, str]], int, float, _Sampling]:
        """The request's messages and settings, or Permanent("bad_request")."""
        messages = flatten_messages(request.messages)
        max_tokens = self.default_max_tokens if request.max_tokens is None else request.max_tokens
        if max_tokens <= 0:
            raise Permanent("bad_request", f"max_tokens must be positive, got {max_tokens}")
        temperature = (
            self.default_temperature if request.temperature is None else request.temperature
        )
        if temperature < 0:
            raise Permanent("bad_request", f"temperature must be >= 0, got {temperature}")
        return messages, max_tokens, temperature, _Sampling.of(request.options)

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the provider thread (it clears its MLX streams on the way out).

        Queued requests fail with Retryable("unavailable"); a running one stops at its
        next token. The model stays loaded: a later call starts a fresh thread.
        """
        with self._lock:
            thread, self._thread = self._thread, None
            old_queue, self._queue = self._queue, queue.Queue()
            current = self._current
        if thread is None:
            return
        if current is not None:
            current.cancel.set()
        while True:
            try:
                job = old_queue.get_nowait()
            except queue.Empty:
                break
            if job is not None and job.future.set_running_or_notify_cancel():
                job.future.set_exception(Retryable("unavailable", "MLX provider closed"))
        old_queue.put(None)
        if thread is not threading.current_thread():
            thread.join(timeout_s)
            if thread.is_alive():
                log.warning("MLX provider thread did not stop within %.1fs", timeout_s)

    # -- the provider thread ----------------------------------------------------------

    def _submit(self, job: _Job) -> None:
        """Queue `job` for the provider thread, starting the thread if needed.

        The put happens under the lock, so close() (which swaps the queue under the same
        lock) either sees the job and fails it, or the job lands on the new queue.
        """
        with self._lock:
            if self._pid != os.getpid():  # forked: the parent's thread does not exist here
                self._pid = os.getpid()
                self._thread = None
                self._queue = queue.Queue()
                self._model = self._tokenizer = None
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._thread_main,
                    args=(self._queue,),
                    name=f"mlx-provider:{Path(self.model).name}",
                    daemon=True,
                )
                self._thread.start()
            self._queue.put(job)

    def _thread_main(self, jobs: queue.Queue[_Job | None]) -> None:
        try:
            while True:
                job = jobs.get()
                if job is None:
                    return
                if not job.future.set_running_or_notify_cancel():
                    continue  # the caller gave up while it was queued
                self._current = job
                try:
                    job.future.set_result(job.fn(job.cancel))
                except BaseException as exc:  # handed to the caller
                    job.future.set_exception(exc)
                finally:
                    self._current = None
        finally:
            try:
                import mlx.core as mx

                mx.clear_streams()
            except Exception:  # best effort on the way out
                log.debug("mx.clear_streams() failed", exc_info=True)

    def _run(self, fn: Callable[[threading.Event], _T], timeout_s: float) -> _T:
        job = _Job(fn)
        self._submit(job)
        try:
            answer: _T = job.future.result(timeout=timeout_s)
            return answer
        except concurrent.futures.TimeoutError:
            job.cancel.set()
            job.future.cancel()
            raise Retryable(
                "timeout", f"local MLX model gave no answer within {timeout_s:g}s"
            ) from None
        except ProviderError:
            raise
        except Exception as exc:
            raise Retryable("server_error", f"{type(exc).__name__}: {exc}") from exc

    @staticmethod
    def _outcome(job: _Job) -> Any:
        """The result of a finished job, or its error on the provider error tree (as
        _run maps it)."""
        try:
            return job.future.result(timeout=0)
        except ProviderError:
            raise
        except Exception as exc:
            raise Retryable("server_error", f"{type(exc).__name__}: {exc}") from exc

    def _load_on_thread(self) -> None:
        if self._model is not None:
            return
        if _looks_like_local_path(self.model):
            path = Path(self.model).expanduser()
            if not (path / "config.json").is_file():
                raise ModelUnusable("not_found", f"no MLX model at {path}")
            source = str(path)
        else:
            source = self.model
        preload_openblas()
        started = time.perf_counter()
        try:
            model, tokenizer = _load_mlx(source)
        except Exception as exc:  # FileNotFoundError, hub errors, bad config, bad weights
            raise ModelUnusable(
                "not_found", f"cannot load MLX model {self.model!r}: {type(exc).__name__}: {exc}"
            ) from exc
        self._model, self._tokenizer = model, tokenizer
        self.load_seconds = time.perf_counter() - started
        log.info("loaded MLX model %s in %.2fs", self.model, self.load_seconds)

    def _prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        tokenizer = self._tokenizer
        try:
            if getattr(tokenizer, "has_chat_template", False):
                ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            else:  # a base model: plain concatenation, as mlx_lm.server does
                text = "\n".join(m["content"] for m in messages)
                ids = tokenizer.encode(text)
        except Exception as exc:  # jinja TemplateError (e.g. roles out of order) and kin
            raise Permanent("bad_request", f"cannot build the prompt: {exc}") from exc
        if hasattr(ids, "get") and "input_ids" in ids:  # a BatchEncoding, defensively
            ids = ids["input_ids"]
        return [int(i) for i in ids]

    def _embed_on_thread(
        self, texts: list[str], dimensions: int | None, cancel: threading.Event
    ) -> Embeddings:
        import mlx.core as mx

        body = getattr(self._model, "model", None)
        if not callable(body):
            raise CapabilityRefused(
                "embedding", f"{self.model}: no transformer body (model.model) to pool"
            )
        args = getattr(self._model, "args", None)
        width = getattr(args, "hidden_size", None)
        if dimensions is not None and isinstance(width, int) and dimensions > width:
            raise Permanent("bad_request", f"dimensions {dimensions} is more than {width}")
        end = self._end_id()
        ids = [self._embedding_ids(text, end) for text in texts]
        limit = getattr(args, "max_position_embeddings", None)
        for i, seq in enumerate(ids):
            if isinstance(limit, int) and len(seq) > limit:
                raise Permanent(
                    "bad_request", f"input {i} is {len(seq)} tokens, more than the model's {limit}"
                )
        pooled: list[Any] = [None] * len(ids)
        try:
            for batch in _batches([len(seq) for seq in ids], EMBED_BATCH_TOKENS):
                states = self._last_states([ids[i] for i in batch], cancel)
                for i, state in zip(batch, states, strict=True):
                    pooled[i] = state
            vectors = mx.stack(pooled).astype(mx.float32)
            if dimensions is not None:
                vectors = vectors[:, :dimensions]
            norms = mx.linalg.norm(vectors, axis=1, keepdims=True)
            found = (vectors / mx.maximum(norms, 1e-12)).tolist()
        except ProviderError:
            raise
        except Exception as exc:
            raise Retryable("server_error", f"MLX embedding failed: {exc}") from exc
        return Embeddings(
            vectors=cast(list[list[float]], found),
            prompt_tokens=sum(map(len, ids)),
            raw_model=self.model,
        )

    def _embedding_ids(self, text: str, end: int | None) -> list[int]:
        """The text's tokens, ended by the end-of-text token (once)."""
        ids = [int(i) for i in self._tokenizer.encode(text)]
        if end is not None and (not ids or ids[-1] != end):
            ids.append(end)
        return ids

    def _end_id(self) -> int | None:
        """<|endoftext|>'s id, else the eos token's (a tokenizer may answer its unknown
        token's id for a token it lacks: the id is checked)."""
        tokenizer = self._tokenizer
        found = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
        if found is None or tokenizer.convert_ids_to_tokens(found) != END_OF_TEXT:
            found = getattr(tokenizer, "eos_token_id", None)
        return int(found) if found is not None else None

    def _last_states(self, seqs: list[list[int]], cancel: threading.Event) -> list[Any]:
        """The final hidden state of each token sequence's last token: the sequences
        padded on the right and run together, EMBED_CHUNK_TOKENS positions at a time."""
        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache

        longest = max(map(len, seqs))
        pad = seqs[0][-1]  # any token: the causal mask keeps it from every pooled one
        tokens = mx.array([seq + [pad] * (longest - len(seq)) for seq in seqs])
        cache = make_prompt_cache(self._model)
        lasts = [len(seq) - 1 for seq in seqs]
        found: list[Any] = [None] * len(seqs)
        for start in range(0, longest, EMBED_CHUNK_TOKENS):
            if cancel.is_set():
                raise Retryable("timeout", "embedding cancelled")
            states = self._model.model(tokens[:, start : start + EMBED_CHUNK_TOKENS], cache=cache)
            mx.eval(states)
            for row, last in enumerate(lasts):
                if start <= last < start + states.shape[1]:
                    found[row] = states[row, last - start]
        return found

    def _generate_on_thread(
        self,
        messages: list[dict[str, str]],
        max_tokens: int,
        temperature: float,
        sampling: _Sampling,
        cancel: threading.Event,
        emit: _Emit | None = None,
    ) -> Completion:
        import mlx.core as mx
        from mlx_lm import stream_generate
        from mlx_lm.sample_utils import make_sampler

        prompt = self._prompt_ids(messages)
        pieces: list[str] = []
        last = None
        stopped = False
        emitted = 0  # characters of the text handed to `emit` so far
        if sampling.seed is not None:
            mx.random.seed(sampling.seed % 2**32)
        try:
            responses = stream_generate(
                self._model,
                self._tokenizer,
                prompt,
                max_tokens=max_tokens,
                sampler=make_sampler(temp=temperature, top_p=sampling.top_p),
            )
            try:
                for last in responses:
                    pieces.append(last.text)
                    if sampling.stop and _cut_at_stop(pieces, sampling.stop):
                        stopped = True
                        break
                    if cancel.is_set():
                        break
                    if emit is not None and last.text:
                        emitted = _emit(emit, pieces, emitted, sampling.stop, last)
            finally:
                responses.close()
        except Exception as exc:
            raise Retryable("server_error", f"MLX generation failed: {exc}") from exc
        if cancel.is_set():
            raise Retryable("timeout", "generation cancelled")
        if last is None:
            raise Retryable("server_error", "MLX generation produced no output")
        if emit is not None:  # the text held back, now known to hold no stop string
            _emit(emit, pieces, emitted, (), last)
        finish_reason = "stop" if stopped else last.finish_reason
        return Completion(
            text="".join(pieces),
            prompt_tokens=int(last.prompt_tokens),
            completion_tokens=int(last.generation_tokens),
            raw_model=self.model,
            finish_reason=finish_reason,
            extra={
                "finish_reason": finish_reason,
                "prompt_tps": float(last.prompt_tps),
                "generation_tps": float(last.generation_tps),
                "peak_memory_gb": float(last.peak_memory),
            },
        )


def _checked_embedding(request: EmbeddingRequest) -> tuple[list[str], int | None]:
    """The request's texts and dimensions, or Permanent("bad_request")."""
    texts = request.input
    if not isinstance(texts, list) or not texts:
        raise Permanent("bad_request", "input must be a non-empty list of texts")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise Permanent("bad_request", f"input {i} is a {type(text).__name__}, not a text")
    dimensions = request.dimensions
    if dimensions is not None and (
        isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1
    ):
        raise Permanent("bad_request", f"dimensions must be a positive integer, got {dimensions!r}")
    return texts, dimensions


def _batches(lengths: list[int], budget: int) -> list[list[int]]:
    """The indexes of `lengths` in batches run together: shortest first, a batch taking
    texts while their count times the longest stays within `budget` tokens (a longer
    text alone)."""
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if batches and (len(batches[-1]) + 1) * lengths[i] <= budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def _load_mlx(source: str) -> tuple[Any, Any]:
    """Model and tokenizer, as `mlx_lm.load(source)` gives them, a checkpoint of the
    transformer body alone included (the module's doc). Leans on mlx-lm's private
    `_download` (the hub id or path to a directory, as mlx_lm.load resolves it)."""
    from mlx_lm.utils import _download, load_model, load_tokenizer

    path = _download(source)
    model, config = load_model(path, get_model_classes=_model_classes)
    eos = config.get("eos_token_id")
    tokenizer = load_tokenizer(path, eos_token_ids=eos)  # type: ignore[no-untyped-call]
    return model, tokenizer


def _model_classes(config: dict[str, Any]) -> tuple[type, type]:
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    return _taking_bare_bodies(model_class), args_class


@functools.cache
def _taking_bare_bodies(model_class: type) -> type:
    """`model_class`, its weights' names given the `model.` prefix when the checkpoint
    holds the transformer body alone (`embed_tokens.weight` at the top)."""

    def sanitize(self: Any, weights: dict[str, Any]) -> dict[str, Any]:
        if "embed_tokens.weight" in weights and "model.embed_tokens.weight" not in weights:
            weights = {
                name if name.startswith("lm_head.") else f"model.{name}": value
                for name, value in weights.items()
            }
        inner = getattr(model_class, "sanitize", None)
        return inner(self, weights) if inner is not None else weights

    return type(model_class.__name__, (model_class,), {"sanitize": sanitize})


@dataclass(frozen=True)
class _Sampling:
    """The request options this adapter honours."""

    stop: tuple[str, ...] = ()
    top_p: float = 0.0  # 0: no nucleus filtering (mlx-lm's default)
    seed: int | None = None

    @classmethod
    def of(cls, options: dict[str, Any]) -> _Sampling:
        stop = options.get("stop")
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        top_p = options.get("top_p")
        seed = options.get("seed")
        return cls(
            stop=tuple(s for s in stops if s),
            top_p=float(top_p) if top_p is not None else 0.0,
            seed=int(seed) if seed is not None else None,
        )


def _emit(emit: _Emit, pieces: list[str], emitted: int, stops: tuple[str, ...], last: Any) -> int:
    """Hand out the text after the first `emitted` characters, but for an end that may be
    the start of a stop string; return how many characters are out now."""
    text = "".join(pieces)
    ready = len(text) - _stop_prefix(text, stops)
    if ready > emitted:
        emit(_Piece(text[emitted:ready], int(last.prompt_tokens), int(last.generation_tokens)))
    return max(ready, emitted)


def _stop_prefix(text: str, stops: tuple[str, ...]) -> int:
    """The length of the longest end of `text` that begins a stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


def _cut_at_stop(pieces: list[str], stops: tuple[str, ...]) -> bool:
    """True when the text so far holds a stop string: `pieces` is then cut to the text
    before the first one, as OpenAI's API does (the stop string is not returned)."""
    text = "".join(pieces)
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    if not found:
        return False
    pieces[:] = [text[: min(found)]]
    return True


# -- every provider of the process, closed at exit ---------------------------------------

_live_providers: weakref.WeakSet[MLXProvider] = weakref.WeakSet()


@atexit.register
def _close_all_at_exit() -> None:
    # atexit runs before the interpreter stops daemon threads, so the provider threads
    # can still wake up, call mx.clear_streams() and end: no abort (134) at exit.
    for provider in list(_live_providers):
        try:
            provider.close(timeout_s=5.0)
        except Exception:
            log.debug("closing MLX provider at exit failed", exc_info=True)
