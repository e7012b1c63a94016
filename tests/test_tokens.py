"""The prompt-size estimate against real OpenAI BPE tokenizers, offline."""

from __future__ import annotations

import pydoc
from pathlib import Path

import bpe_openai
import pytest

from router.tokens import estimate_message_tokens, estimate_tokens

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def english_samples() -> list[str]:
    samples = [
        "The quick brown fox jumps over the lazy dog. " * 40,
        "Please summarise the attached quarterly report in three bullet points, noting any "
        "unusual expenses, the change in revenue against last year, and the outlook.",
    ]
    for name in ("json", "argparse", "logging", "subprocess", "unittest", "textwrap"):
        samples.append(pydoc.getdoc(__import__(name)))
    samples += [p.read_text() for p in sorted(SHARED.glob("*.md"))]
    return [s for s in samples if len(s) > 100]


@pytest.mark.parametrize("encoding", ["cl100k_base", "o200k_base"])
def test_estimate_never_undercounts_english_by_more_than_10_percent(encoding: str) -> None:
    tokenizer = bpe_openai.get_encoding(encoding)
    for text in english_samples():
        real = len(tokenizer.encode(text))
        estimate = estimate_tokens(text)
        assert estimate >= 0.9 * real, (estimate, real, text[:60])
        assert estimate <= 1.5 * real, (estimate, real, text[:60])  # and not wildly over


def test_estimate_basics() -> None:
    assert estimate_tokens("") == 0
    assert estimate_tokens("hi") == 1
    assert estimate_tokens("日本語のテキスト") >= 8  # non-Latin text costs more per character
    text = "word " * 250_000
    assert estimate_tokens(text) >= 250_000


def test_message_estimate_counts_parts_and_overhead() -> None:
    text_only = [{"role": "user", "content": "hello there"}]
    with_image = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "hello there"},
                {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
            ],
        }
    ]
    assert estimate_message_tokens(text_only) == 3 + 4 + estimate_tokens("hello there")
    assert estimate_message_tokens(with_image) > estimate_message_tokens(text_only) + 500
