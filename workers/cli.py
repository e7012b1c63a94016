"""The `fleet` command line.

Its flags and `--json` shapes are a contract users' scripts rely on: keep them stable.
Bad input exits with status 2 and one line on stderr naming the problem and the valid
choices, never a traceback. Commands that need the fleet's machinery import it lazily,
so `fleet route` and `fleet catalog` start without Celery.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from router.catalog import QUEUES, SOURCES, TASK_CLASSES, Catalog, load_catalog
from router.errors import FleetError, NoRouteAvailable

EXIT_USAGE = 2
Handler = Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more (got {value})")
    return value


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be 1 or more (got 0)")
    return value


def _float_above(minimum: float, inclusive: bool) -> Callable[[str], float]:
    """An argparse type: a number above `minimum` (or equal to it, if `inclusive`)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if inclusive and not value >= minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum:g} or more (got {text})")
        if not inclusive and not value > minimum:
            raise argparse.ArgumentTypeError(f"must be above {minimum:g} (got {text})")
        return value

    return parse


_positive_float = _float_above(0, inclusive=False)
_non_negative_float = _float_above(0, inclusive=True)


def _port(text: str) -> int:
    value = _non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"not a port: {value} (valid: 0-65535)")
    return value


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")


def _console() -> Any:
    from rich.console import Console

    # Piped output has no terminal width: do not squeeze long model ids into 80 columns.
    return Console(highlight=False, width=None if sys.stdout.isatty() else 160)


# --- fleet route -----------------------------------------------------------------


def cmd_route(args: argparse.Namespace) -> int:
    from router.policy import RouteQuery, route

    catalog = load_catalog()
    query = RouteQuery(
        task_class=args.task_class,
        focus=args.focus,
        profile=args.profile,
        model=args.model,
        has_image=args.image,
        prompt_tokens=args.prompt_tokens,
        source=args.source,
    )
    try:
        decision = route(catalog, query, _live_skips(catalog, query))
    except NoRouteAvailable as exc:
        print(f"fleet: {exc}", file=sys.stderr)
        return 1  # not a usage error: the job is valid, no model can take it
    if args.json:
        _print_json(decision.as_dict())
        return 0
    _print_route_table(catalog, decision)
    return 0


def _state_client() -> Any:
    """A Redis client for the fleet's state, or None when it cannot be reached."""
    import os

    import redis

    from workers.config import fleet_urls
    from workers.state.connections import new_client

    client = new_client(fleet_urls({**os.environ, **_broker_env()})[1])
    try:
        client.ping()
    except redis.RedisError:
        client.close()
        return None
    return client


def _live_skips(catalog: Catalog, query: Any) -> dict[str, str]:
    """Why models of the job's chain would be skipped now (empty without a reachable fleet)."""
    from router.policy import route
    from workers.state.limits import FleetState

    try:
        models = [hop.model for hop in route(catalog, query).chain]
    except NoRouteAvailable:
        return {}
    client = _state_client()
    if client is None:
        return {}
    with client:
        blocks = FleetState(client, catalog).blocks(query.task_class, models, query.prompt_tokens)
    return {model: block.reason for model, block in blocks.items()}


def _print_route_table(catalog: Catalog, decision: Any) -> None:
    from rich.table import Table

    table = Table(title=f"route for a {decision.task_class} job", title_justify="left")
    for col in ("#", "model", "queue", "tier", "context"):
        table.add_column(col)
    for i, hop in enumerate(decision.chain, 1):
        window = catalog.model(hop.model).context_window
        table.add_row(str(i), hop.model, hop.queue, hop.tier, f"{window:,}")
    console = _console()
    console.print(table)
    params = f"temperature={decision.temperature}  max_tokens={decision.max_tokens}"
    console.print(f"queue: {decision.queue}   {params}")
    for model_id, reason in decision.dropped:
        console.print(f"skipped {model_id}: {reason}")
    import os

    for hop in decision.chain:
        provider = catalog.providers[catalog.model(hop.model).provider]
        if provider.api_key_env and not os.environ.get(provider.api_key_env):
            console.print(
                f"note: {hop.model} needs {provider.api_key_env}, unset here"
                " (a worker without it skips the model)"
            )


# --- fleet catalog / check-config ---------------------------------------------------


def catalog_rows(catalog: Catalog) -> list[dict[str, Any]]:
    return [
        {
            "id": m.id,
            "provider": m.provider,
            "queue": m.queue,
            "tier": m.tier,
            "context_window": m.context_window,
            "capabilities": sorted(m.capabilities),
            "usd_per_mtok_in": m.usd_per_mtok_in,
            "usd_per_mtok_out": m.usd_per_mtok_out,
        }
        for m in catalog.models
    ]


def cmd_catalog(args: argparse.Namespace) -> int:
    rows = catalog_rows(load_catalog())
    if args.json:
        _print_json(rows)
        return 0
    from rich.table import Table

    table = Table()
    for col in ("id", "provider", "queue", "tier", "context", "capabilities", "$/Mtok in", "out"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["id"],
            r["provider"],
            r["queue"],
            r["tier"],
            f"{r['context_window']:,}",
            ", ".join(r["capabilities"]),
            f"{r['usd_per_mtok_in']:.2f}",
            f"{r['usd_per_mtok_out']:.2f}",
        )
    _console().print(table)
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    catalog = load_catalog(args.path)
    print(
        f"{args.path}: ok ({len(catalog.providers)} providers, {len(catalog.models)} models,"
        f" {len(catalog.policy.chains)} chains)"
    )
    return 0


# --- fleet worker / up / demo / submit ---------------------------------------------------


def cmd_worker(args: argparse.Namespace) -> int:
    import os

    from workers.config import limit_margin_ms
    from workers.ops.pools import worker_argv

    limit_margin_ms()  # a bad FLEET_LIMIT_MARGIN_MS stops here, in one line, not per job
    argv = worker_argv(
        args.queues, pool=args.pool, concurrency=args.concurrency, loglevel=args.loglevel
    )
    env = dict(os.environ)
    env["FLEET_WORKER_CONCURRENCY"] = argv[argv.index("-c") + 1]
    env.update(_broker_env())
    os.execve(argv[0], argv, env)


def _broker_env() -> dict[str, str]:
    from workers.config import broker_from_up

    return broker_from_up()


def cmd_up(args: argparse.Namespace) -> int:
    from workers.config import limit_margin_ms
    from workers.ops.up import run_up

    limit_margin_ms()  # checked before any child starts
    return run_up(
        beat=not args.no_beat,
        flower_port=None if args.no_flower else args.flower_port,
        gateway_port=None if args.no_gateway else args.gateway_port,
    )


def cmd_ledger_writer(args: argparse.Namespace) -> int:
    import logging
    import os

    from workers.ledger import writer
    from workers.ledger.store import Ledger

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    os.environ.update(_broker_env())
    return writer.run(Ledger(), every_s=args.every)


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from gateway.serve import serve

    os.environ.update(_broker_env())
    return serve(args.host, args.port)


def cmd_keys(args: argparse.Namespace) -> int:
    from gateway.keys import KeyStore
    from workers.ledger.store import Ledger
    from workers.state.apps import AppLimits

    ledger = Ledger(redis_url=None)
    store = KeyStore(ledger)
    try:
        if args.action == "create":
            limits = AppLimits(args.usd_per_day, args.usd_per_month, args.requests_per_min)
            classes = args.classes.split(",") if args.classes else None
            key, row = store.create(args.app, limits, classes)
            if args.json:
                _print_json({**row.as_dict(), "key": key})
            else:
                print(key)
                print(
                    f"fleet: key {row.key_id} for app {row.app!r}: shown once, keep it"
                    " (the ledger holds only its hash)",
                    file=sys.stderr,
                )
            return 0
        if args.action == "revoke":
            row = store.revoke(args.key_id)
            _print_json(row.as_dict()) if args.json else print(f"revoked {row.key_id} ({row.app})")
            return 0
        rows = [k.as_dict() for k in store.list()]
        if args.json:
            _print_json(rows)
        for r in [] if args.json else rows:
            state = "revoked" if r["revoked_at"] else "active"
            shown = (
                " ".join(
                    part
                    for part, value in (
                        (f"day ${r['usd_per_day']}", r["usd_per_day"]),
                        (f"month ${r['usd_per_month']}", r["usd_per_month"]),
                        (f"{r['requests_per_min']}/min", r["requests_per_min"]),
                    )
                    if value is not None
                )
                or "no limits"
            )
            allowed: Any = r["classes"]
            classes = ",".join(allowed) if allowed else "all classes"
            print(f"{r['key_id']}  {r['app']:<20} {state:<8} {shown}; {classes}")
        return 0
    finally:
        ledger.close()


def cmd_demo(args: argparse.Namespace) -> int:
    from workers.sim.demo import run_demo

    return run_demo(as_json=args.json)


def cmd_submit(args: argparse.Namespace) -> int:
    import os

    from client import dispatch

    os.environ.update(_broker_env())
    content: Any = args.prompt
    if args.image:
        content = [{"type": "text", "text": args.prompt}, _image_part(args.image)]
    job = {
        "task_class": args.task_class,
        "messages": [{"role": "user", "content": content}],
        "source": args.source,
        **{k: v for k, v in _optional_fields(args).items() if v is not None},
    }
    handle = dispatch(job)
    if not args.wait:
        out = {"job_id": handle.id, **handle.route.as_dict()}
        _print_json(out) if args.json else print(f"{handle.id} queued on {handle.route.queue}")
        return 0
    result = handle.get(timeout=args.timeout, propagate=False)
    if args.json:
        _print_json(result.summary())
    else:
        print(result.text if result.ok else f"fleet: job failed: {result.error}")
    return 0 if result.ok else 1


def _optional_fields(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "focus": args.focus,
        "profile": args.profile,
        "model": args.model,
        "temperature": args.temperature,
        "max_tokens": args.max_tokens,
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


# --- fleet usage -------------------------------------------------------------------------


def cmd_usage(args: argparse.Namespace) -> int:
    import os

    from sqlalchemy.exc import SQLAlchemyError

    from workers.ledger.store import Ledger, redacted
    from workers.ledger.usage import print_report, usage_report

    # The rows of jobs that finished in the last second may still wait on the spool of the
    # fleet's Redis: write them first, when this command knows which Redis that is.
    environ = {**os.environ, **_broker_env()}
    known = environ.get("FLEET_BROKER_URL") or environ.get("FLEET_STATE_URL")
    ledger = Ledger(redis_url="" if known else None, environ=environ)
    try:
        if known:
            ledger.drain()
        report = usage_report(ledger, args.since, args.by, load_catalog())
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        print(f"fleet: cannot read the ledger at {redacted(ledger.url)}: {reason}", file=sys.stderr)
        return 1
    finally:
        ledger.close()
    _print_json(report.rows) if args.json else print_report(report)
    return 0


def _add_usage(sub: Any) -> None:
    from workers.ledger.usage import GROUPS, REFERENCE_MODEL, SINCE_HELP, parse_since

    def since(text: str) -> Any:
        try:
            return parse_since(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    p = sub.add_parser(
        "usage",
        help="tokens, cost and saving per model (or other group), from the ledger",
        description=f"Reads the ledger (FLEET_LEDGER_URL, or ledger.db in the data dir). The"
        f" saving is what the same tokens would cost on {REFERENCE_MODEL} minus what they cost.",
    )
    p.add_argument("--since", type=since, default="24h", help=f"{SINCE_HELP} (default 24h)")
    p.add_argument("--by", choices=GROUPS, default="model", help="group by (default model)")
    p.add_argument(
        "--json",
        action="store_true",
        help="a JSON list, one object per group with keys <by>, attempts, jobs, prompt_tokens,"
        " completion_tokens, cost_usd, saving_usd, orphaned (calls in flight when their worker"
        " died, counted in the others), orphaned_cost_usd (their estimated cost); no total row"
        " (sum the groups; a job met in several groups counts in each)",
    )
    p.set_defaults(handler=cmd_usage)


# --- fleet dead-letter -------------------------------------------------------------------


def cmd_dead_letter(args: argparse.Namespace) -> int:
    from router.errors import ConfigError
    from workers.state import deadletter

    client = _state_client()
    if client is None:
        raise ConfigError("the fleet's Redis is not reachable: start it with `fleet up`")
    with client:
        if args.action == "list":
            policy = load_catalog().policy.dead_letters
            deadletter.trim(client, policy)  # none past its class's age is shown
            found = deadletter.entries(client)
            if args.json:
                _print_json([_dead_row(e) for e in found])
            for e in [] if args.json else found:
                row = _dead_row(e)
                print(f"{row['job_id']}  {row['task_class']:<18} {row['error']}")
            if not args.json:
                _print_trimmed(deadletter.summary(client, policy))
            return 0
        entry = deadletter.take(client, args.job_id)
        if entry is None:
            from router.errors import InvalidJob

            raise InvalidJob(f"no dead letter {args.job_id!r} (see `fleet dead-letter list`)")
    import os

    from client import dispatch

    os.environ.update(_broker_env())
    handle = dispatch(deadletter.replay_job(entry))
    print(json.dumps({"replayed": args.job_id, "job_id": handle.id}) if args.json else handle.id)
    return 0


def _print_trimmed(classes: list[dict[str, Any]]) -> None:
    """The line under `fleet dead-letter list`: what retention took out, per class."""
    lost = [c for c in classes if c["trimmed"]]
    if lost:
        told = ", ".join(f"{c['task_class']} {c['trimmed']}" for c in lost)
        print(f"trimmed by retention (oldest first; `fleet status` has each limit): {told}")


def _dead_row(entry: dict[str, Any]) -> dict[str, Any]:
    result = entry["result"]
    return {
        "job_id": entry["job"]["id"],
        "task_class": entry["job"].get("task_class"),
        "source": entry["job"].get("source", "app"),
        "error": result.get("error"),
        "attempts": len(result.get("attempts", [])),
        "failed_at": entry["failed_at"],
    }


# --- fleet status ------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    import os

    from router.errors import ConfigError
    from workers.ops.status import fleet_status
    from workers.runtime.celery_app import get_app
    from workers.state.limits import FleetState

    catalog = load_catalog()
    client = _state_client()
    if client is None:
        raise ConfigError(
            "the fleet's Redis is not reachable: start it with `fleet up`, or set"
            " FLEET_BROKER_URL (and FLEET_STATE_URL)"
        )
    with client:
        app = get_app({**os.environ, **_broker_env()})
        status = fleet_status(app, FleetState(client, catalog), catalog)
    if args.json:
        _print_json(status)
        return 0
    _print_status(status)
    return 0


def _print_status(status: dict[str, Any]) -> None:
    from rich.table import Table

    console = _console()
    queues = Table(title="queues", title_justify="left")
    for col in ("queue", "waiting", "workers"):
        queues.add_column(col)
    for q in status["queues"]:
        queues.add_row(q["queue"], str(q["waiting"]), ", ".join(q["workers"]) or "none")
    console.print(queues)
    models = Table(title="models (limits, cooldowns, spend today)", title_justify="left")
    for col in ("model", "state", "windows", "spend today"):
        models.add_column(col)
    for m in status["models"]:
        state = m["cooldown"] or ("circuit open" if m["circuit_open"] else "ok")
        windows = ", ".join(f"{k} {v['used']}/{v['limit']}" for k, v in m["windows"].items())
        models.add_row(m["model"], state, windows or "-", f"${m['spend_usd']['day']:.4f}")
    console.print(models)
    _print_beat(console, status["beat"])
    _print_dead_letters(console, status["dead_letters"])


def _print_beat(console: Any, entries: list[dict[str, Any]]) -> None:
    from rich.table import Table
    from rich.text import Text

    from workers.state.beathealth import describe

    if not entries:
        return
    beat = Table(title="beat entries", title_justify="left")
    for col in ("entry", "health"):
        beat.add_column(col)
    for health in entries:
        # as Text: a reason is not markup ('[...]'), nor ':free:' an emoji
        beat.add_row(health["entry"], Text(describe(health)))
    console.print(beat)


def _print_dead_letters(console: Any, classes: list[dict[str, Any]]) -> None:
    from rich.table import Table

    if not classes:
        return
    dead = Table(title="dead letters (`fleet dead-letter list`)", title_justify="left")
    for col in ("class", "held", "trimmed by retention", "keeps"):
        dead.add_column(col)
    for c in classes:
        keeps = f"{c['max_count']} for {c['max_age_days']:g} days"
        dead.add_row(c["task_class"], str(c["held"]), str(c["trimmed"]), keeps)
    console.print(dead)


# --- the parser ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fleet", description="modelfleet: route and run LLM jobs as a fleet")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("route", help="show the queue and model chain a job would take")
    p.add_argument("--class", dest="task_class", required=True, choices=TASK_CLASSES)
    p.add_argument("--focus")
    p.add_argument("--profile")
    p.add_argument("--model", help="an explicit model id (preferred over all else)")
    p.add_argument("--image", action="store_true", help="the job has an image part")
    p.add_argument("--prompt-tokens", type=_non_negative_int, default=0, metavar="N")
    p.add_argument("--source", choices=SOURCES, default="app")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_route)

    p = sub.add_parser("catalog", help="list every model with its queue, tier and prices")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_catalog)

    p = sub.add_parser("demo", help="run the whole fleet end to end on simulated providers")
    p.add_argument("--json", action="store_true", help="one JSON object per job, per line")
    p.set_defaults(handler=cmd_demo)

    p = sub.add_parser(
        "up", help="start the fleet: redis, a worker per queue, beat, Flower, the gateway"
    )
    p.add_argument("--no-beat", action="store_true")
    p.add_argument("--no-flower", action="store_true")
    p.add_argument("--flower-port", type=_port, default=5555)
    p.add_argument("--no-gateway", action="store_true")
    p.add_argument("--gateway-port", type=_port, default=8080)
    p.set_defaults(handler=cmd_up)

    p = sub.add_parser(
        "ledger-writer",
        help="drain the spool of finished jobs' rows into the ledger database (one per fleet)",
    )
    p.add_argument("--every", type=_positive_float, default=1.0, metavar="SECONDS")
    p.set_defaults(handler=cmd_ledger_writer)

    p = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP gateway")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    p.add_argument("--port", type=_port, default=8080)
    p.set_defaults(handler=cmd_serve)

    p = sub.add_parser("keys", help="the gateway's keys per app: create, list, revoke")
    keys = p.add_subparsers(dest="action", required=True, parser_class=_Parser)
    q = keys.add_parser("create", help="a new key for APP (printed once)")
    q.add_argument("app")
    q.add_argument("--usd-per-day", type=_non_negative_float, metavar="X")
    q.add_argument("--usd-per-month", type=_non_negative_float, metavar="Y")
    q.add_argument("--requests-per-min", type=_positive_int, metavar="N")
    q.add_argument("--classes", metavar="C,...", help="task classes the key may use (all)")
    q.add_argument("--json", action="store_true")
    q = keys.add_parser("list", help="every key, its app and limits (never the key)")
    q.add_argument("--json", action="store_true")
    q = keys.add_parser("revoke", help="revoke a key for good")
    q.add_argument("key_id")
    q.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_keys)

    p = sub.add_parser("dead-letter", help="jobs that ended without an answer: list, replay")
    dead = p.add_subparsers(dest="action", required=True, parser_class=_Parser)
    q = dead.add_parser("list", help="every dead letter with its reason")
    q.add_argument("--json", action="store_true")
    q = dead.add_parser("replay", help="dispatch a dead letter's job again, under a new id")
    q.add_argument("job_id")
    q.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_dead_letter)

    p = sub.add_parser("status", help="queues, workers, cooldowns, limits and spend, now")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser("worker", help="run a worker for one or more queues")
    p.add_argument("queues", nargs="+", choices=QUEUES, metavar="QUEUE")
    p.add_argument("--pool", choices=("threads", "solo", "prefork", "gevent"))
    p.add_argument("--concurrency", "-c", type=_positive_int)
    p.add_argument("--loglevel", "-l", default="INFO")
    p.set_defaults(handler=cmd_worker)

    p = sub.add_parser("submit", help="enqueue a job (and wait for its result)")
    p.add_argument("prompt")
    p.add_argument("--class", dest="task_class", required=True, choices=TASK_CLASSES)
    p.add_argument("--focus")
    p.add_argument("--profile")
    p.add_argument("--model")
    p.add_argument("--image", metavar="PATH")
    p.add_argument("--source", choices=SOURCES, default="app")
    p.add_argument("--temperature", type=float)
    p.add_argument("--max-tokens", type=_positive_int)
    p.add_argument("--wait", action="store_true")
    p.add_argument("--timeout", type=float, default=300, help="seconds --wait waits")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_submit)

    p = sub.add_parser("check-config", help="validate a catalog/policy YAML file")
    p.add_argument("path")
    p.set_defaults(handler=cmd_check_config)

    _add_usage(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except FleetError as exc:
        print(f"fleet: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
