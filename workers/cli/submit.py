"""`fleet submit`: enqueue one job through the client (and wait for its result, or print
its answer as it is written)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from router.catalog import SOURCES, TASK_CLASSES
from router.jobs import EMBEDDING
from workers.cli.connection import broker_env
from workers.cli.options import Subcommands, add_json_option, positive_int
from workers.cli.output import print_json


def add_submit(commands: Subcommands) -> None:
    p = commands.add_parser("submit", help="enqueue a job (and wait for its result)")
    p.add_argument("prompt")
    p.add_argument("--class", dest="task_class", required=True, choices=TASK_CLASSES)
    p.add_argument("--focus")
    p.add_argument("--profile")
    p.add_argument("--model")
    p.add_argument("--image", metavar="PATH")
    p.add_argument("--source", choices=SOURCES, default="app")
    p.add_argument("--temperature", type=float)
    p.add_argument("--max-tokens", type=positive_int)
    p.add_argument("--dimensions", type=positive_int, help="an embedding job's vector length")
    p.add_argument("--wait", action="store_true")
    p.add_argument(
        "--stream", action="store_true", help="print the answer as it is written (implies --wait)"
    )
    p.add_argument("--timeout", type=float, default=300, help="seconds --wait waits")
    add_json_option(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from client import dispatch

    os.environ.update(broker_env())
    content: Any = args.prompt
    if args.image:
        content = [{"type": "text", "text": args.prompt}, _image_part(args.image)]
    # An embedding job embeds the prompt; any other class answers it
    asked = {"input": [args.prompt]} if args.task_class == EMBEDDING else None
    job = {
        "task_class": args.task_class,
        **(asked or {"messages": [{"role": "user", "content": content}]}),
        "source": args.source,
        **{k: v for k, v in _optional_fields(args).items() if v is not None},
    }
    if args.stream:
        job["stream"] = True
    handle = dispatch(job)
    if args.stream:
        return _print_stream(handle, args)
    if not args.wait:
        out = {"job_id": handle.id, **handle.route.as_dict()}
        print_json(out) if args.json else print(f"{handle.id} queued on {handle.route.queue}")
        return 0
    result = handle.get(timeout=args.timeout, propagate=False)
    if args.json:
        print_json(result.summary())
    elif not result.ok:
        print(f"fleet: job failed: {result.error}")
    elif result.vectors is not None:
        vectors = result.embeddings() or []
        cached = sum(a.cached_items for a in result.attempts)
        print(
            f"{len(vectors)} vector of {len(vectors[0])} floats from {result.model}"
            f" ({cached} from the cache)"
        )
    else:
        print(result.text)
    return 0 if result.ok else 1


def _print_stream(handle: Any, args: argparse.Namespace) -> int:
    """The answer's text as it comes (with --json, its Result at the end, as --wait's);
    a stream that stops after text went out says so, and the job's Result follows once the
    job, gone on unstreamed, ends."""
    import sys

    from router.errors import JobFailed, StreamInterrupted
    from router.results import Result

    try:
        for piece in handle.stream(timeout=args.timeout):
            if isinstance(piece, Result):
                print_json(piece.summary()) if args.json else print()
            elif not args.json:
                sys.stdout.write(piece.text)
                sys.stdout.flush()
        return 0
    except StreamInterrupted as exc:
        print(f"\nfleet: {exc}; waiting for its result", file=sys.stderr)
        result = handle.get(timeout=args.timeout, propagate=False)
        print_json(result.summary()) if args.json else print(result.text or "")
        return 0 if result.ok else 1
    except JobFailed as exc:
        print(f"fleet: job failed: {exc}", file=sys.stderr)
        return 1


def _optional_fields(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "focus": args.focus,
        "profile": args.profile,
        "model": args.model,
        "temperature": args.temperature,
        "max_tokens": args.max_tokens,
        "dimensions": args.dimensions,
    }


def _image_part(path: str) -> dict[str, Any]:
    import base64
    import mimetypes
    from pathlib import Path

    from router.errors import InvalidJob

    kind = mimetypes.guess_type(path)[0]
    if not kind or not kind.startswith("image/"):
        raise InvalidJob(f"--image {path!r} is not an image file (valid: .png, .jpg, .gif, .webp)")
    try:
        data = base64.b64encode(Path(path).read_bytes()).decode()
    except OSError as exc:
        raise InvalidJob(f"--image {path!r}: {exc.strerror}") from None
    return {"type": "image_url", "image_url": {"url": f"data:{kind};base64,{data}"}}
