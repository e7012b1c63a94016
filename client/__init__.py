"""modelfleet's client: send jobs to the fleet and follow them to their results.

It sits above the decision layer (`router`, which routes without I/O) and the fleet's
runtime (`workers`), whose sending and live-state code it uses; the gateway and the
`fleet` command stand on it. Importing it loads no Celery and no Redis client: those load
on the first send. `from router import dispatch` reaches the same functions.
"""

from client.dispatch import JobHandle, dispatch, dispatch_many

__all__ = ["JobHandle", "dispatch", "dispatch_many"]
