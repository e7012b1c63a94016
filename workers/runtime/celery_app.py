"""The Celery app: queues, serialization, acks, events, results. All Celery settings live here.

Settings come from the environment when the app is built (never at import):

    FLEET_BROKER_URL   redis://... or amqp://...     (default redis://127.0.0.1:6379/0)
    FLEET_STATE_URL    redis://... for results and fleet state (default: the broker
                       URL when it is Redis; required with an amqp:// broker)
    FLEET_WORKER_LAPSE_S         on the fleet's transport: how long a worker process may
                       go without beating before the jobs it holds go back to their
                       queues (default 4 s; 0.5 to 600; workers/runtime/liveness.py)
    FLEET_VISIBILITY_TIMEOUT_S   on kombu's stock channel: seconds before Redis redelivers
                       an unacked job (default 600; must exceed twice the longest single
                       attempt: a job waits in a worker at most half of it, then calls).
                       On the fleet's transport a job comes back by its worker's lapse;
                       this only bounds a forward's countdown
    FLEET_RESULT_EXPIRES_S       how long results are kept (default 1 day)
    FLEET_BROKER_TRANSPORT       on a Redis broker: `fleet` (default: workers/runtime/
                       transport.py, which no kill can make lose a job) or `kombu`
                       (kombu's stock channel, kept for comparison)
    FLEET_BEAT_EVERY_S           a test/demo knob: fire every beat entry this many seconds
                       apart instead of on its schedule (unset in production)

`celery -A workers worker -Q free` finds the app through workers/celery.py; this module
answers `app` too (built on first access), for `celery -A workers.runtime.celery_app`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any

from celery import Celery
from kombu.connection import Connection
from kombu.entity import Exchange, Queue

from router.catalog import QUEUES, catalog_path, load_catalog
from router.errors import ConfigError
from workers.config import fleet_urls
from workers.runtime.kombu_fixes import harden_redis_transport
from workers.runtime.liveness import DEFAULT_LAPSE_S

DEFAULT_VISIBILITY_TIMEOUT_S = 600  # > 2 x the longest attempt (provider timeout_s, 120 s)


class LazyBeatSchedule(MutableMapping[str, Any]):
    """Celery's `beat_schedule`, built from `beat_schedule.py` on first use: only beat reads
    it, so workers and dispatchers never load the schedule (or pay for routing it)."""

    def __init__(self, catalog_file: str | None = None, every_s: float | None = None) -> None:
        self.catalog_file = catalog_file
        self.every_s = every_s
        self._entries: dict[str, Any] | None = None

    def _built(self) -> dict[str, Any]:
        if self._entries is None:
            from beat_schedule import beat_schedule

            catalog = load_catalog(self.catalog_file)
            self._entries = beat_schedule(catalog, every_s=self.every_s)
        return self._entries

    def __getitem__(self, key: str) -> Any:
        return self._built()[key]

    def __setitem__(self, key: str, value: Any) -> None:  # app.add_periodic_task
        self._built()[key] = value

    def __delitem__(self, key: str) -> None:
        del self._built()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._built())

    def __len__(self) -> int:
        return len(self._built())

    def __repr__(self) -> str:
        return f"<beat schedule {'(not built)' if self._entries is None else self._entries!r}>"


def _beat_every_s(environ: Mapping[str, str]) -> float | None:
    value = environ.get("FLEET_BEAT_EVERY_S")
    if not value:
        return None
    try:
        every = float(value)
    except ValueError:
        every = 0.0
    if not every > 0:
        raise ConfigError(f"FLEET_BEAT_EVERY_S must be a number of seconds above 0 (got {value!r})")
    return every


FLEET_TRANSPORT = "workers.runtime.transport:Transport"
BROKER_TRANSPORTS = {"fleet": FLEET_TRANSPORT, "kombu": None}


def _seconds(
    environ: Mapping[str, str], name: str, default: float, low: float, high: float
) -> float:
    """A duration setting, checked: a number of seconds from `low` to `high`."""
    value = environ.get(name)
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not low <= seconds <= high:
        raise ConfigError(
            f"{name} must be a number of seconds from {low:g} to {high:g} (got {value!r})"
        )
    return seconds


def _broker_transport(broker: str, environ: Mapping[str, str]) -> str | None:
    """The transport class for a Redis broker (None: the URL's scheme chooses)."""
    name = environ.get("FLEET_BROKER_TRANSPORT") or "fleet"
    if name not in BROKER_TRANSPORTS:
        raise ConfigError(
            f"FLEET_BROKER_TRANSPORT must be one of {', '.join(BROKER_TRANSPORTS)} (got {name!r})"
        )
    return BROKER_TRANSPORTS[name] if broker.startswith(("redis://", "rediss://")) else None


def _queue(name: str) -> Queue:
    """A job queue on a direct exchange of its own (kombu's entities are not annotated)."""
    queue: Callable[..., Queue] = Queue
    exchange: Callable[..., Exchange] = Exchange
    return queue(name, exchange(name, type="direct"), routing_key=name)


def celery_settings(environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    broker, state = fleet_urls(environ)
    visibility = int(
        _seconds(environ, "FLEET_VISIBILITY_TIMEOUT_S", DEFAULT_VISIBILITY_TIMEOUT_S, 1, 86_400)
    )
    lapse = _seconds(environ, "FLEET_WORKER_LAPSE_S", DEFAULT_LAPSE_S, 0.5, 600)
    return {
        "broker_url": broker,
        # A transport given by name wins over the URL's scheme (kombu's Connection).
        "broker_transport": _broker_transport(broker, environ),
        "result_backend": state,
        "broker_connection_retry_on_startup": True,
        # kombu's stock channel redelivers a job nobody acked within the visibility
        # timeout; unacked ETA tasks too. The redelivery is a sweep each worker runs:
        # kombu's default runs it every 100 s (10 s x a throttle of 10), which would leave
        # a killed worker's jobs waiting that long past the timeout; sweep a few times per
        # timeout instead (at most every 10 s: one ZRANGE under a mutex). The fleet's
        # transport brings a job back by its worker's lapse instead (liveness.py).
        "broker_transport_options": {
            "visibility_timeout": visibility,
            "unacked_restore_interval": max(1, min(10, visibility // 4)),
            "unacked_restore_throttle": 1,
            # the queues whose messages the fleet's transport files from publish to ack
            "tracked_queues": list(QUEUES),
            "lapse_s": lapse,
        },
        "result_backend_transport_options": {"retry_policy": {"timeout": 5.0}},
        # Storing a result retries through a Redis restart: a job that finished while
        # Redis was away would otherwise be run again when its unacked message returns.
        "result_backend_always_retry": True,
        "result_backend_max_retries": 12,  # jittered backoff, 20 ms doubling to 10 s
        # Sending a job (dispatch, a worker's forward) rides out a broker restart of a few
        # seconds (5.5 s of retries, Celery's default gives up after 0.6 s); then the
        # error reaches the caller, with nothing queued.
        "task_publish_retry_policy": {
            "max_retries": 8,
            "interval_start": 0,
            "interval_step": 0.25,
            "interval_max": 1.0,
        },
        "result_expires": int(environ.get("FLEET_RESULT_EXPIRES_S", 86_400)),
        # JSON only: a job must be enqueueable from any language, and pickle is unsafe.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        # A job is acked when it is done, and requeued if its worker dies mid-way.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # Events for Flower: workers' and sent tasks', so queued jobs show up too.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_track_started": True,
        # One direct exchange per queue: a bare Queue(name) would bind every queue to the
        # default exchange and routing key, and a job sent to one would reach all five.
        "task_queues": [_queue(name) for name in QUEUES],
        "task_default_queue": "free",
        "task_create_missing_queues": False,
        "worker_hijack_root_logger": False,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # Heartbeat and cron jobs (beat_schedule.py), routed when beat starts.
        "beat_schedule": LazyBeatSchedule(str(catalog_path(environ)), _beat_every_s(environ)),
    }


class FleetConnection(Connection):
    """The app's broker connection: on the fleet's transport its URL reads `redis://`.

    kombu writes a connection's URL with the transport's name as its scheme, and the
    fleet's transport is named by its class path. Flower picks its queue-length reader
    by that scheme (flower/utils/broker.py): only `redis://` gets the reader that sums a
    queue's priority lists, which the fleet's transport fills as kombu's channel does. The
    worker's and beat's banners show the same URL.
    """

    def as_uri(self, include_password: bool = False, mask: str = "**", *args: Any) -> str:
        uri = super().as_uri(include_password, mask, *args)
        if self.transport_cls != FLEET_TRANSPORT:
            return uri
        return f"{'rediss' if self.ssl else 'redis'}://{uri.partition('://')[2]}"


def create_app(environ: Mapping[str, str] = os.environ) -> Celery:
    # No fixups: the only built-in one (Django's) loads celery.worker into every client.
    app = Celery("modelfleet", set_as_current=False, fixups=[])
    app.conf.update(celery_settings(environ))
    app.amqp.Connection = FleetConnection  # every broker connection the app opens
    harden_redis_transport()  # workers/runtime/kombu_fixes.py: survive a Redis restart
    # redis:// results through workers/runtime/resultstore.py: a final state is never
    # replaced by a non-final one, and carries the job's ledger rows and dead letter.
    app.loader.override_backends = {
        "redis": "workers.runtime.resultstore:FleetRedisBackend",
        "rediss": "workers.runtime.resultstore:FleetRedisBackend",
    }
    # The task module registers fleet.run_job on import; workers need it, senders do not.
    app.conf.imports = ["workers.runtime.tasks"]
    return app


_apps: dict[tuple[str, str, str], Celery] = {}


def queue_depths(app: Celery) -> dict[str, int]:
    """Messages ready on each of the fleet's queues, every priority counted (any broker
    kombu speaks: a passive declare's message count); 0 for a queue none has declared."""
    from kombu.exceptions import ChannelError

    depths = {}
    with app.connection_for_read() as conn:
        for queue in QUEUES:
            channel = conn.channel()  # a failed passive declare closes its channel on AMQP
            try:
                depths[queue] = int(channel.queue_declare(queue=queue, passive=True).message_count)
            except ChannelError:
                depths[queue] = 0
            finally:
                channel.close()
    return depths


def get_app(environ: Mapping[str, str] = os.environ) -> Celery:
    """The app for the current FLEET_* settings, built once per broker, state and transport."""
    key = (*fleet_urls(environ), environ.get("FLEET_BROKER_TRANSPORT") or "fleet")
    if key not in _apps:
        _apps[key] = create_app(environ)
    return _apps[key]


def __getattr__(name: str) -> Any:
    # `celery -A workers.runtime.celery_app` looks up `app`: build it from the environment then.
    if name == "app":
        return get_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
