"""The state a job travels with between deliveries, typed: its chain of hops (rules 1-4
applied once, at dispatch), its sampling parameters, the attempts made so far, and when
it was dispatched. Plain data, no I/O: the message carries it as JSON
(workers/runtime/sending.py), the task parses it once as a delivery starts, and
everything below the task reads these types.

    TravellingState.model_validate(message["state"])  # a delivery's start
    state.wire()                                        # into the next message

A hop is `router.policy.Hop`, an attempt `router.results.Attempt`: both are re-exported
here, so the state's parts come from one place.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, ConfigDict, SerializerFunctionWrapHandler, model_serializer

from router.policy import Hop, Route
from router.results import Attempt

__all__ = ["Attempt", "Hop", "TravellingState", "travelling_state"]


class TravellingState(BaseModel):
    """A job's state in its message's `state` kwarg. The JSON keys are the wire format
    (docs/enqueue-from-any-language.md): `sends` is left out until a forward sets it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    chain: tuple[Hop, ...] = ()
    temperature: float | None = None
    max_tokens: int | None = None
    attempts: tuple[Attempt, ...] = ()
    prompt_tokens: int = 0
    dispatched_at: float | None = None  # unix seconds
    sends: int = 0  # the fleet's forwards of the job so far: names its message (deliveries)

    @model_serializer(mode="wrap")
    def _without_unset_sends(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if not self.sends:
            data.pop("sends", None)
        return data

    def wire(self) -> dict[str, Any]:
        """The state as the message carries it (JSON-ready)."""
        return self.model_dump(mode="json")

    def hop_of(self, model: str) -> Hop:
        """The chain's hop of `model`."""
        return next(hop for hop in self.chain if hop.model == model)


def travelling_state(decision: Route, now: float | None = None) -> TravellingState:
    """The state a freshly routed job travels with: its chain, sampling parameters, no
    attempts yet, and when it was dispatched."""
    return TravellingState(
        chain=decision.chain,
        temperature=decision.temperature,
        max_tokens=decision.max_tokens,
        prompt_tokens=decision.prompt_tokens,
        dispatched_at=time.time() if now is None else now,
    )
