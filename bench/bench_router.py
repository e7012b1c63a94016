"""Router decisions per second (pure policy), and job validation + routing per second.

    .venv/bin/python bench/bench_router.py     (also part of `python -m bench`)

Prints the median of several timed rounds; run it side by side with nothing else heavy.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from router import RouteQuery, load_catalog, parse_job, route, route_job

QUERIES = [
    RouteQuery(task_class="complex_reasoning"),
    RouteQuery(task_class="user_facing", profile="routing"),
    RouteQuery(task_class="creative", source="cron"),
    RouteQuery(task_class="fast_general", has_image=True),
    RouteQuery(task_class="cost_free", prompt_tokens=250_000),
    RouteQuery(task_class="reasoning_free", focus="data", model="litellm/kimi"),
]
JOB = {
    "task_class": "user_facing",
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Summarise today's inbox in three bullet points. " * 20},
    ],
    "source": "app",
}


def rate(fn: Callable[[int], None], n: int, rounds: int = 7) -> tuple[float, float]:
    """Median calls per second and median microseconds per call over `rounds` rounds."""
    per_call = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn(n)
        per_call.append((time.perf_counter() - start) / n)
    med = statistics.median(per_call)
    return 1 / med, med * 1e6


def measure(quick: bool = False) -> dict[str, float]:
    """Decisions per second and validate-and-route microseconds, medians of rounds."""
    catalog = load_catalog()

    def decisions(n: int) -> None:
        for i in range(n):
            route(catalog, QUERIES[i % len(QUERIES)])

    def validate_and_route(n: int) -> None:
        for _ in range(n):
            route_job(catalog, parse_job(JOB))

    scale = 4 if quick else 1
    decide_per_s, decide_us = rate(decisions, 20_000 // scale, 7 if not quick else 3)
    validate_per_s, validate_us = rate(validate_and_route, 5_000 // scale, 7 if not quick else 3)
    return {
        "decisions_per_s": decide_per_s,
        "decision_us": decide_us,
        "validate_route_per_s": validate_per_s,
        "validate_route_us": validate_us,
    }


def main() -> None:
    figures = measure()
    print(f"{'measure':<36}{'per second':>14}{'µs each':>10}")
    print(
        f"{'route() decision (pure policy)':<36}"
        f"{figures['decisions_per_s']:>14,.0f}{figures['decision_us']:>10.1f}"
    )
    print(
        f"{'parse_job + estimate + route':<36}"
        f"{figures['validate_route_per_s']:>14,.0f}{figures['validate_route_us']:>10.1f}"
    )


if __name__ == "__main__":
    main()
