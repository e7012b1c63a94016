"""What each worker process can serve from where it runs, and the models no live worker of
their queue can.

Every worker process announces, once a beat (workers/runtime/serving.py), per queue it
consumes, the catalog models of that queue it cannot serve: its key variable unset there
(`no_key`), or a local model neither at its path nor in the hub cache (`model_missing`).
An announcement lives one lapse (FLEET_WORKER_LAPSE_S) past its beat, so a dead worker's
word goes with it (scripts/announce.lua).

A model is unservable when live workers of its queue have announced and none of them can
serve it. Rule 6 then skips it like any blocked model, with a Block that no wait frees
(router/slots.py): a chain with nothing else fails at dispatch, naming each model's fix.
A queue on which no live worker announced (a fleet not started, workers older than this)
blocks nothing: its jobs wait on it as before.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from router.catalog import Catalog
from workers.state import keys
from workers.state.connections import script

NO_KEY = "no_key"
MODEL_MISSING = "model_missing"

# queue -> what each live announcing worker of it cannot serve ({model: why} each)
Announced = Mapping[str, list[dict[str, str]]]


@dataclass(frozen=True)
class Unservable:
    kind: str  # NO_KEY or MODEL_MISSING
    reason: str  # for people: what to do, and on which workers


def announce(
    client: Any, process: str, lapse_ms: int, lacking: Mapping[str, Mapping[str, str]]
) -> None:
    """Say, for one lapse, what `process` cannot serve on each queue it consumes
    (`lacking`: queue -> {model: why}; an empty mapping: it serves all of the queue's
    models). One round trip."""
    if not lacking:
        return
    queues = sorted(lacking)
    words = [json.dumps(dict(sorted(lacking[q].items()))) for q in queues]
    script(client, "announce")(
        keys=[keys.serving(q) for q in queues], args=[process, lapse_ms, *words]
    )


def withdraw(client: Any, process: str, queues: Iterable[str]) -> None:
    """A clean exit: the process's announcements go at once, not at its lapse."""
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        pipe.hdel(keys.serving(queue), process)
    pipe.execute()


def look(pipe: Any, queues: Sequence[str]) -> None:
    """Queue in `pipe` what `announced()` reads: each queue's announcements, then Redis'
    clock (len(queues) + 1 replies)."""
    for queue in queues:
        pipe.hgetall(keys.serving(queue))
    pipe.time()


def announced(queues: Sequence[str], replies: list[Any]) -> dict[str, list[dict[str, str]]]:
    """The live announcements of each of `queues`, from look()'s replies."""
    *hashes, clock = replies
    now_ms = int(clock[0]) * 1000 + int(clock[1]) // 1000
    found: dict[str, list[dict[str, str]]] = {}
    for queue, fields in zip(queues, hashes, strict=True):
        words = found[queue] = []
        for value in fields.values():
            text = value.decode() if isinstance(value, bytes) else str(value)
            until, _, lacking = text.partition("|")
            if until.isdigit() and int(until) >= now_ms:
                try:
                    words.append(dict(json.loads(lacking)))
                except (TypeError, ValueError):  # not an announcement: as if none
                    continue
    return found


def unservable(catalog: Catalog, model_id: str, found: Announced) -> Unservable | None:
    """Why no live worker of `model_id`'s queue can serve it; None when one can, or none
    announced."""
    model = catalog.model(model_id)
    whys = [words.get(model_id) for words in found.get(model.queue, [])]
    if not whys or None in whys:
        return None
    kind = str(whys[0])
    if kind == NO_KEY:
        variable = catalog.providers[model.provider].api_key_env
        return Unservable(kind, f"no key: set {variable} on the {model.queue} workers")
    if kind == MODEL_MISSING:
        fix = f"run `fleet models pull {model.id}` on the {model.queue} workers"
        return Unservable(kind, f"model missing: {fix}")
    return Unservable(kind, f"{kind} on every {model.queue} worker")
