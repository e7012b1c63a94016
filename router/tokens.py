"""Prompt size estimation without any tokenizer download.

Routing only needs to know whether a prompt fits a model's context window, so an
estimate that errs on the high side is what we want: it must never undercount plain
English by more than 10% against the BPE tokenizers the providers use. The estimate
follows how those tokenizers pre-split text (words with their leading space, digit
groups of up to three, punctuation runs, whitespace runs) and charges long words and
non-ASCII text more, as BPE does.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

# The same shape as the GPT-4 pre-tokenizer: a letter run with an optional leading
# space, up to three digits, a punctuation run, or whitespace.
_PIECES = re.compile(r" ?[^\W\d_]+| ?\d{1,3}| ?[^\w\s]+|\s+|_+", re.UNICODE)

# What a message costs beyond its text (role markers, separators), as OpenAI documents
# for its chat format, and what an image part is charged at most by common providers.
TOKENS_PER_MESSAGE = 4
TOKENS_PER_IMAGE = 1_000
# A video part: about a minute of video at the ~263 tokens a second Gemini charges.
TOKENS_PER_VIDEO = 16_000
# A tool call's or a tool definition's wrapping (markers, the name's framing).
TOKENS_PER_TOOL = 8


def _piece_tokens(piece: str) -> int:
    word = piece.lstrip(" ")
    if not word:
        return 1
    if word.isspace():
        return 1 + len(word) // 8
    if not word.isascii():
        # Accented, CJK, emoji: BPE spends roughly a token per character or more.
        return max(1, math.ceil(len(word.encode("utf-8")) / 2))
    if word[0].isalpha():
        # Common English words up to ~9 letters are one token; longer ones split.
        return 1 + max(0, len(word) - 6) // 4
    if word[0].isdigit():
        return 1
    return math.ceil(len(word) / 2)  # punctuation: BPE merges common pairs


class _Memo(dict[str, int]):
    """Short pieces repeat (" the", ",", " "): their counts are remembered, which makes
    the estimate several times faster on prose (the sum runs in C over a dict lookup);
    the memo is bounded in entries and piece length."""

    ENTRIES = 50_000
    PIECE_CHARS = 24

    def __missing__(self, piece: str) -> int:
        count = _piece_tokens(piece)
        if len(piece) <= self.PIECE_CHARS and len(self) < self.ENTRIES:
            self[piece] = count
        return count


_MEMO = _Memo()


def estimate_tokens(text: str) -> int:
    """Estimated token count of `text` (never 0 for non-empty text)."""
    if not text:
        return 0
    return sum(map(_MEMO.__getitem__, _PIECES.findall(text)))


def estimate_message_tokens(
    messages: Iterable[Mapping[str, Any]], tools: Iterable[Mapping[str, Any]] = ()
) -> int:
    """Estimated prompt tokens of OpenAI-style chat messages (text, image and video parts,
    assistant tool calls, tool results) and of the tool definitions sent with them."""
    total = 3  # the assistant reply primer
    for message in messages:
        total += TOKENS_PER_MESSAGE
        total += _content_tokens(message.get("content"))
        refusal = message.get("refusal")
        if isinstance(refusal, str):
            total += estimate_tokens(refusal)
        for call in message.get("tool_calls") or ():
            function = call.get("function") or {}
            total += TOKENS_PER_TOOL + estimate_tokens(str(call.get("id") or ""))
            total += estimate_tokens(str(function.get("name") or ""))
            total += estimate_tokens(str(function.get("arguments") or ""))
        if message.get("tool_call_id"):
            total += estimate_tokens(str(message["tool_call_id"]))
    return total + estimate_tool_tokens(tools)


def estimate_tool_tokens(tools: Iterable[Mapping[str, Any]]) -> int:
    """Estimated prompt tokens of tool definitions: providers render each function's name,
    description and JSON schema into the prompt; its JSON text is a high-side stand-in."""
    return sum(
        TOKENS_PER_TOOL + _definition_tokens(json.dumps(tool.get("function", tool)))
        for tool in tools
    )


@functools.lru_cache(maxsize=4096)
def _definition_tokens(definition: str) -> int:
    # An agent sends the same tool belt with every turn (and a request is routed at the
    # gateway and again at dispatch): each definition is estimated once, then looked up.
    return estimate_tokens(definition)


def _content_tokens(content: Any) -> int:
    if isinstance(content, str):
        return estimate_tokens(content)
    total = 0
    for part in content or ():
        kind = part.get("type")
        if kind == "text":
            total += estimate_tokens(part.get("text", ""))
        elif kind == "video_url":
            total += TOKENS_PER_VIDEO
        else:  # an image, or a part the fleet passes on (audio, a file): charged as one
            total += TOKENS_PER_IMAGE
    return total
