"""Generate a tiny, real, randomly initialised chat model that `mlx_lm.load` can load, and
a tiny embedding model laid out as Qwen3-Embedding is.

Nothing comes from a model hub: the byte-level BPE tokenizer is trained here, offline,
on a small built-in English corpus, and the weights of a 2-layer llama are drawn from a
seeded normal distribution. `fleet demo` and the tests use it as a stand-in for a real
local model (its answers are gibberish, but real tokens, real counts, real latency).

The embedding model (`build_tiny_embedding_model`, `--embedding`) is a 2-layer qwen3 with
the same tokenizer, laid out as Qwen/Qwen3-Embedding-0.6B is on the hub: its weights are
the transformer body alone, without the `model.` prefix (which plain `mlx_lm.load`
refuses and the MLX provider's loader takes), and its tokenizer ends every text with
`<|endoftext|>`, the token whose hidden state is the text's vector.

    python -m workers.sim.tiny_model DIR [--seed N] [--force] [--embedding]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

# Bump when the generated files change, so an old directory is rebuilt.
FORMAT_VERSION = 1
MARKER_FILE = "modelfleet_tiny.json"  # written last: its presence means "complete"
REQUIRED_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
END_OF_TEXT = "<|endoftext|>"
SPECIAL_TOKENS = (END_OF_TEXT, IM_START, IM_END)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

VOCAB_TARGET = 768  # BPE stops earlier when the corpus runs out of merges (~580)
HIDDEN_SIZE = 64
NUM_LAYERS = 2
NUM_HEADS = 4
NUM_KV_HEADS = 2
INTERMEDIATE_SIZE = 128
MAX_POSITIONS = 2048
# The embedding model's config over the chat model's: Qwen3-Embedding's architecture
# (qwen3: q/k norms, no attention bias), as its hub config names it.
EMBEDDING_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
}
WEIGHT_STD = 0.5
# Rows of the (tied) embedding for tokens the model should (almost) never emit: byte
# tokens outside printable ASCII and the two non-eos specials. Scaling them down keeps
# their logits near zero, so sampled text decodes to clean ASCII.
QUIET_SCALE = 0.02

_CORPUS = """\
The fleet runs many small jobs at once. Each job asks a model a question and waits for
the answer. When a model is busy, the job moves on to the next model in its chain, and
when every model is busy, it waits a little and then tries again.
A worker takes a job from the queue, sends the request, and writes down how many tokens
went in and how many came out. The router reads those numbers to decide where the next
job should go. Cheap models answer first; the expensive ones are kept for hard work.
Good morning! How are you today? I am fine, thank you. What would you like to know?
Please tell me a short story about a cat who lived on a boat. The cat liked the sea,
the wind and the fish that the sailors gave her every evening at sunset.
Write a poem about the rain. The rain falls on the roof, soft and slow, and the garden
drinks it in. Summer is over, and the leaves turn red and gold in the cold wind.
Explain why the sky is blue. Sunlight is made of many colours. Blue light is scattered
more than red light by the air, so the sky looks blue during the day.
Translate this sentence into French. Summarise the following text in one line. Answer
the question with yes or no. List three reasons why testing matters. Give an example.
The quick brown fox jumps over the lazy dog. A stitch in time saves nine. Every cloud
has a silver lining. Practice makes perfect. Actions speak louder than words.
Numbers: one, two, three, four, five, six, seven, eight, nine, ten. 1 2 3 4 5 6 7 8 9 0.
Dates and times: Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday.
In the morning we plan the work; in the afternoon we build it; in the evening we check
that it still works. If a test fails, we read the error, fix the code and run it again.
The system has a queue, a router, a catalog of models and a set of workers. Each model
has a price per million tokens, a context window and a limit on requests per minute.
def add(a, b):
    return a + b
for item in items:
    print(item)
{"role": "user", "content": "Hello!"} {"role": "assistant", "content": "Hi there."}
Question: What is the capital of France? Answer: Paris is the capital of France.
Question: How many legs does a spider have? Answer: A spider has eight legs.
Question: What colour is grass? Answer: Grass is green because of chlorophyll.
You are a helpful assistant. Be brief, be clear, and be kind. If you do not know the
answer, say so. Think step by step, then give the final answer on its own line.
"""


def _corpus_lines() -> list[str]:
    """The training text: the corpus above, plus a few generated lines for variety."""
    lines = [line for line in _CORPUS.splitlines() if line.strip()]
    subjects = ["The model", "A worker", "The router", "Our team", "This job", "The queue"]
    verbs = ["answers", "reads", "writes", "checks", "sends", "waits for", "counts"]
    objects = ["the request", "every token", "a short reply", "the next task", "the result"]
    for i, subject in enumerate(subjects):
        for j, verb in enumerate(verbs):
            obj = objects[(i + j) % len(objects)]
            lines.append(f"{subject} {verb} {obj} in {i + j + 1} seconds.")
    return lines


def _build_tokenizer(vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_lines(), trainer=trainer)
    return tok


def _quiet_token_ids(tok: Any) -> list[int]:
    """Ids of tokens the model should not emit: specials (but eos) and non-ASCII bytes."""
    from tokenizers import decoders

    byte_decoder = decoders.ByteLevel()
    quiet = []
    for token, idx in tok.get_vocab().items():
        if token in SPECIAL_TOKENS:
            if token != IM_END:
                quiet.append(idx)
            continue
        text = byte_decoder.decode([token])
        if not text or any(not (32 <= ord(c) < 127 or c == "\n") for c in text):
            quiet.append(idx)
    return sorted(quiet)


def _config(vocab_size: int, eos_id: int, pad_id: int, embedding: bool) -> dict[str, Any]:
    if embedding:  # Qwen3-Embedding's config: a qwen3 causal LM, tied embeddings
        return {**_config(vocab_size, eos_id, pad_id, False), **EMBEDDING_CONFIG}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN_SIZE,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": NUM_HEADS,
        "num_key_value_heads": NUM_KV_HEADS,
        "head_dim": HIDDEN_SIZE // NUM_HEADS,
        "intermediate_size": INTERMEDIATE_SIZE,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab_size,
        "max_position_embeddings": MAX_POSITIONS,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "bos_token_id": None,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": "float32",
    }


def _build_weights(config: dict[str, Any], quiet_ids: list[int], seed: int) -> dict[str, Any]:
    import importlib

    import mlx.core as mx
    from mlx.utils import tree_flatten

    arch: Any = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = arch.Model(arch.ModelArgs.from_dict(config))  # (mlx_lm is untyped)
    key = mx.random.key(seed)
    weights: dict[str, Any] = {}
    params: list[tuple[str, Any]] = tree_flatten(model.parameters())  # type: ignore[assignment]
    for name, param in params:
        if param.ndim >= 2:  # embeddings and projections; norms keep their ones
            key, sub = mx.random.split(key)
            param = WEIGHT_STD * mx.random.normal(param.shape, dtype=mx.float32, key=sub)
            if name == "model.embed_tokens.weight" and quiet_ids:
                scale = mx.ones((param.shape[0], 1), dtype=mx.float32)
                scale[mx.array(quiet_ids)] = QUIET_SCALE
                param = param * scale
        weights[name] = param
    # Load through the model class so a shape/name mismatch fails here, not at load time.
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return dict(tree_flatten(model.parameters()))


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_json(path: Path, obj: Any) -> None:
    _write_atomic(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode())


def is_complete(path: Path, *, seed: int = 0, embedding: bool = False) -> bool:
    """True when `path` already holds a tiny model of this format and kind built with
    `seed`."""
    path = Path(path)
    try:
        marker = json.loads((path / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    if marker.get("format_version") != FORMAT_VERSION or marker.get("seed") != seed:
        return False
    if marker.get("kind", "chat") != ("embedding" if embedding else "chat"):
        return False
    return all((path / name).is_file() for name in REQUIRED_FILES)


def build_tiny_model(path: Path, *, seed: int = 0, force: bool = False) -> Path:
    """Write a tiny llama chat model into `path` (created if needed) and return `path`.

    Idempotent: a directory that already holds a complete model built with the same seed
    is left as it is unless `force`. Each file is written atomically and the marker file
    last, so concurrent builders and interrupted builds never leave a half model that
    looks complete. Deterministic for a given seed.
    """
    return _build(Path(path), seed=seed, force=force, embedding=False)


def build_tiny_embedding_model(path: Path, *, seed: int = 0, force: bool = False) -> Path:
    """Write a tiny qwen3 embedding model into `path`, laid out as Qwen3-Embedding is (the
    module's doc), and return `path`; idempotent and deterministic as build_tiny_model."""
    return _build(Path(path), seed=seed, force=force, embedding=True)


def _build(path: Path, *, seed: int, force: bool, embedding: bool) -> Path:
    import mlx.core as mx

    if not force and is_complete(path, seed=seed, embedding=embedding):
        return path
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER_FILE).unlink(missing_ok=True)

    tok = _build_tokenizer(VOCAB_TARGET)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    eos_id = tok.token_to_id(IM_END)
    pad_id = tok.token_to_id(END_OF_TEXT)
    config = _config(vocab_size, eos_id, pad_id, embedding)
    weights = _build_weights(config, _quiet_token_ids(tok), seed)
    if embedding:
        weights = _body_alone(weights)
        tok.post_processor = _appending_end_of_text(tok)

    # mx.save_safetensors wants a path ending in .safetensors: write a temp of that form.
    tmp = path / f".model.{os.getpid()}.tmp.safetensors"
    try:
        mx.save_safetensors(str(tmp), weights, metadata={"format": "mlx"})
        os.replace(tmp, path / "model.safetensors")
    finally:
        tmp.unlink(missing_ok=True)

    _write_atomic(path / "tokenizer.json", tok.to_str(pretty=True).encode())
    added_tokens_decoder = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    _write_json(
        path / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "chat_template": CHAT_TEMPLATE,
            "bos_token": None,
            "eos_token": IM_END,
            "pad_token": END_OF_TEXT,
            "unk_token": None,
            "additional_special_tokens": [IM_START, IM_END],
            "added_tokens_decoder": added_tokens_decoder,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": MAX_POSITIONS,
        },
    )
    _write_json(
        path / "special_tokens_map.json",
        {
            "eos_token": IM_END,
            "pad_token": END_OF_TEXT,
            "additional_special_tokens": [IM_START, IM_END],
        },
    )
    _write_json(path / "generation_config.json", {"eos_token_id": eos_id, "pad_token_id": pad_id})
    _write_json(path / "config.json", config)
    marker: dict[str, Any] = {"format_version": FORMAT_VERSION, "seed": seed}
    if embedding:
        marker["kind"] = "embedding"
    _write_json(path / MARKER_FILE, marker)
    return path


def _body_alone(weights: dict[str, Any]) -> dict[str, Any]:
    """The transformer body's weights named as Qwen3-Embedding's checkpoint names them
    (`layers.0...`, not `model.layers.0...`); tied embeddings: no LM head to drop."""
    return {name.removeprefix("model."): value for name, value in weights.items()}


def _appending_end_of_text(tok: Any) -> Any:
    """Qwen3-Embedding's post-processor: byte-level offsets, then `<|endoftext|>` after
    each text."""
    from tokenizers import processors

    return processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"$A {END_OF_TEXT}",
                pair=f"$A {END_OF_TEXT} $B {END_OF_TEXT}",
                special_tokens=[(END_OF_TEXT, tok.token_to_id(END_OF_TEXT))],
            ),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m workers.sim.tiny_model",
        description="Write a tiny random llama chat model (for demos and tests).",
    )
    parser.add_argument("dir", type=Path, help="directory to write the model into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if complete")
    parser.add_argument(
        "--embedding", action="store_true", help="a tiny qwen3 embedding model instead"
    )
    args = parser.parse_args(argv)
    build = build_tiny_embedding_model if args.embedding else build_tiny_model
    out = build(args.dir, seed=args.seed, force=args.force)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
