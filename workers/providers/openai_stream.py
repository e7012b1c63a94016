"""Reading an OpenAI-style chat completion stream: server-sent events to deltas, and the
deltas back into one whole answer. Parsing only: openai_compat.py does the HTTP and maps
failures onto the error tree.

A stream is `data: {chunk}` events ended by `data: [DONE]`, with `: comment` lines
between them (OpenRouter's `: OPENROUTER PROCESSING` keep-alives). Each chunk's
`choices[0].delta` holds a piece of `content`, of `reasoning_content` (or `reasoning`),
of `refusal`, or fragments of `tool_calls`, each naming the call it continues by `index`;
`finish_reason` comes with the last piece; `usage` (with OpenRouter's `cost`) comes in
a chunk of its own, with no choices, when the request asked `stream_options:
{"include_usage": true}`.

No SSE library: the few lines of `sse_data` read what these servers send (multi-line
data, comments, unknown fields skipped), and httpx already splits the lines.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from workers.providers.base import Delta

DONE = "[DONE]"


def sse_data(lines: Iterable[str]) -> Iterator[str]:
    """The data of each event, in order: its `data:` lines joined by newlines. Comments and
    other fields (`event:`, `id:`, `retry:`) are skipped; an event still open when the
    lines end is given too (a last `data: [DONE]` without its blank line)."""
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        name, _, value = line.partition(":")
        if name == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)


@dataclass
class _Call:
    """A tool call being assembled from its fragments."""

    id: str
    name: str = ""
    arguments: list[str] = field(default_factory=list)


@dataclass
class Assembler:
    """Feeds on a stream's chunks: gives the Delta each one adds, and keeps the whole."""

    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    refusal: list[str] = field(default_factory=list)
    calls: dict[int, _Call] = field(default_factory=dict)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    model: str | None = None
    id: str | None = None
    logprobs: list[Any] | None = None  # the choice's logprobs.content, joined
    deltas: int = 0  # how many deltas were given out

    def feed(self, chunk: Any) -> Delta | None:
        """The delta a chunk adds (None when it adds no text: a role, usage, a
        finish_reason alone). Raises TypeError on a chunk not in OpenAI's shape."""
        choice = self._choice(chunk)
        if choice is None:
            return None
        delta = choice.get("delta") or {}
        if not isinstance(delta, dict):
            raise TypeError("`delta` is not an object")
        if isinstance(choice.get("finish_reason"), str) and choice["finish_reason"]:
            self.finish_reason = choice["finish_reason"]
        self._logprobs(choice.get("logprobs"))
        found = Delta(
            text=_content(delta.get("content")),
            reasoning=_string(delta.get("reasoning_content")) or _string(delta.get("reasoning")),
            tool_calls=self._fragments(delta.get("tool_calls")),
        )
        if isinstance(delta.get("refusal"), str):
            self.refusal.append(delta["refusal"])
        if not (found.text or found.reasoning or found.tool_calls):
            return None
        self.text.append(found.text)
        self.reasoning.append(found.reasoning)
        self.deltas += 1
        return found

    def _choice(self, chunk: Any) -> dict[str, Any] | None:
        """The chunk's first choice, if any, once its id, model and usage are kept."""
        if not isinstance(chunk, dict):
            raise TypeError("a chunk is not a JSON object")
        if isinstance(chunk.get("model"), str):
            self.model = chunk["model"]
        if isinstance(chunk.get("id"), str):
            self.id = chunk["id"]
        if isinstance(chunk.get("usage"), dict):  # the last chunk's, or any that has it
            self.usage = chunk["usage"]
        choices = chunk.get("choices") or []
        if not isinstance(choices, list):
            raise TypeError("`choices` is not a list")
        if not choices:
            return None
        choice = choices[0]
        if not isinstance(choice, dict):
            raise TypeError("a choice is not an object")
        return choice

    def _logprobs(self, logprobs: Any) -> None:
        content = logprobs.get("content") if isinstance(logprobs, dict) else None
        if isinstance(content, list):
            self.logprobs = [*(self.logprobs or []), *content]

    def _fragments(self, fragments: Any) -> tuple[dict[str, Any], ...]:
        """The tool-call fragments of a delta, each with its call's `index`; a call's first
        fragment also with its `id` (made up when the provider gave none), `type` and
        `name`, so that a reader of the deltas alone can answer the call."""
        if fragments is None:
            return ()
        if not isinstance(fragments, list):
            raise TypeError("`tool_calls` is not a list")
        return tuple(self._fragment(f) for f in fragments)

    def _fragment(self, fragment: Any) -> dict[str, Any]:
        if not isinstance(fragment, dict):
            raise TypeError("a tool call fragment is not an object")
        function = fragment.get("function") or {}
        if not isinstance(function, dict):
            raise TypeError("a tool call fragment's `function` is not an object")
        index = fragment.get("index")
        if not isinstance(index, int) or isinstance(index, bool):
            # No index (some providers): a fragment naming a call starts one, else it
            # continues the last call.
            starts = fragment.get("id") or function.get("name") or not self.calls
            index = len(self.calls) if starts else max(self.calls)
        arguments = function.get("arguments")
        if arguments is not None and not isinstance(arguments, str):
            arguments = json.dumps(arguments)  # arguments given as an object, at once
        out: dict[str, Any] = {"index": index}
        call = self.calls.get(index)
        if call is None:
            given = fragment.get("id")
            call = _Call(given if isinstance(given, str) and given else f"call_{uuid.uuid4().hex}")
            self.calls[index] = call
            out.update(id=call.id, type="function")
        name = function.get("name")
        named: dict[str, Any] = {}
        if isinstance(name, str) and name and not call.name:
            call.name = named["name"] = name
        if arguments is not None:
            call.arguments.append(arguments)
        out["function"] = {**named, "arguments": arguments or ""}
        return out

    def tool_calls(self) -> list[dict[str, Any]]:
        """The calls in OpenAI's shape, by index. A call streamed without arguments gets
        "{}", as complete() gives for null arguments."""
        return [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": "".join(call.arguments) or "{}"},
            }
            for _, call in sorted(self.calls.items())
        ]

    def nameless_call(self) -> bool:
        return any(not call.name for call in self.calls.values())

    def written(self) -> str:
        return "".join(self.text)


def _content(content: Any) -> str:
    """A delta's text: a string, or text parts joined (some providers)."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    raise TypeError(f"content is a {type(content).__name__}")


def _string(value: Any) -> str:
    return value if isinstance(value, str) else ""
