"""The routing decision: a job's ordered chain of models, each with its queue.

Rules (docs/architecture.md, "Routing"):
  1. preference: explicit model > profile > focus > task class;
  2. a job with image parts takes the vision chain, whatever its class; so does a job
     with video parts, which then also needs a model that takes video;
  2b. a job's needs (`Job.needs()`: tools, json_schema, json_object, vision, video):
     a model lacking one is dropped ("lacks tools");
  3. a model whose context window is smaller than the prompt is skipped; above
     `long_context_above_tokens` the job takes the long_context chain;
  4. cron/heartbeat jobs and cost-restricted classes only get the allowed tiers
     (free and local), on escalation too: the chain is filtered once, here;
  5./6. live state (quota reserve, cooldowns, limits, budgets) arrives as `skip`, a
     mapping of model id to reason, computed by the caller.
Rules 2-6 are constraints, rule 1 a preference: a preferred model that breaks a
constraint is dropped with its reason. A job left with no model raises
CapabilityUnavailable (an InvalidJob) when no model of the chain passes rules 2-4 and one
of them lacks a need: no wait can help, the request must change. Otherwise (every model
too small, held back by its tier, or skipped by live state) it raises NoRouteAvailable.

Pure: no I/O, no Celery, no HTTP. Decisions take microseconds.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from router.catalog import CAPABILITIES, SOURCES, TASK_CLASSES, Catalog, Model
from router.errors import CapabilityUnavailable, InvalidJob, NoRouteAvailable, choices
from router.jobs import EMBEDDING, Job
from router.tokens import estimate_tokens

# The order in which a model's missing needs are named: the first is its reason.
NEED_ORDER = ("vision", "video", "tools", "json_schema", "json_object")
VISUAL = frozenset({"vision", "video"})  # needs that take the vision chain (rule 2)


@dataclass(frozen=True)
class RouteQuery:
    """What routing needs to know of a job."""

    task_class: str
    focus: str | None = None
    profile: str | None = None
    model: str | None = None
    has_image: bool = False
    prompt_tokens: int = 0
    source: str = "app"
    temperature: float | None = None
    max_tokens: int | None = None
    needs: frozenset[str] = frozenset()  # capabilities a model must have (Job.needs())
    # An embedding job's longest input in tokens: a model's context window holds one
    # input at a time, not the batch.
    longest_input: int | None = None

    @property
    def visual(self) -> bool:
        """The job has an image or a video part: it takes the vision chain (rule 2)."""
        return self.has_image or bool(self.needs & VISUAL)

    @functools.cached_property
    def required(self) -> tuple[str, ...]:
        """Every capability a model must have for this job, in the order reasons name
        them (an image part needs vision, whether or not `needs` says so). Cached: routing
        asks once per candidate model."""
        needs = self.needs | ({"vision"} if self.has_image else set())
        ordered = [c for c in NEED_ORDER if c in needs]
        return (*ordered, *sorted(needs - set(NEED_ORDER)))

    @classmethod
    def from_job(cls, job: Job) -> RouteQuery:
        return cls(
            task_class=job.task_class,
            focus=job.focus,
            profile=job.profile,
            model=job.model,
            has_image=job.has_image,
            prompt_tokens=job.prompt_tokens(),
            source=job.source,
            temperature=job.temperature,
            max_tokens=job.max_tokens,
            needs=job.needs(),
            longest_input=max(map(estimate_tokens, job.texts)) if job.input else None,
        )


@dataclass(frozen=True)
class Hop:
    model: str
    queue: str
    tier: str

    def as_dict(self) -> dict[str, str]:
        return {"model": self.model, "queue": self.queue, "tier": self.tier}


@dataclass(frozen=True)
class Route:
    task_class: str
    chain: tuple[Hop, ...]
    temperature: float | None
    max_tokens: int | None
    prompt_tokens: int = 0
    dropped: tuple[tuple[str, str], ...] = field(default=())  # (model, reason), in chain order
    needs: frozenset[str] = frozenset()  # what every hop can serve: live state checks rests

    @property
    def queue(self) -> str:
        return self.chain[0].queue

    def as_dict(self) -> dict[str, Any]:
        """The `fleet route --json` contract: keep these keys stable."""
        return {
            "task_class": self.task_class,
            "queue": self.queue,
            "chain": [hop.as_dict() for hop in self.chain],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }


def route(catalog: Catalog, query: RouteQuery, skip: Mapping[str, str] | None = None) -> Route:
    """The chain of models for `query`; `skip` maps model ids to why they are unusable now."""
    _check_query(catalog, query)
    policy = catalog.policy
    profile = policy.profiles.get(query.profile) if query.profile else None
    candidates = _preferred_chain(catalog, query)
    temperature = _first_set(query.temperature, _get(profile, "temperature"))
    max_tokens = _first_set(query.max_tokens, _get(profile, "max_tokens"))

    chain: list[Hop] = []
    dropped: list[tuple[str, str]] = []
    lacked: list[str] = []  # capabilities some model of the chain lacks
    servable = False  # some model passes rules 2-4 (live state aside)
    for model_id in candidates:
        model = catalog.model(model_id)
        missing = _lacking(query, model)
        if missing is not None and missing not in lacked:
            lacked.append(missing)
        reason = _constraint_broken(catalog, query, model, max_tokens)
        if reason is None:
            servable = True
            reason = (skip or {}).get(model_id)
        if reason:
            dropped.append((model_id, reason))
        else:
            chain.append(Hop(model.id, model.queue, model.tier))
    if not chain:
        if not servable and lacked:
            raise CapabilityUnavailable(_chain_name(catalog, query), lacked, dropped)
        raise NoRouteAvailable(query.task_class, dropped)
    return Route(
        task_class=query.task_class,
        chain=tuple(chain),
        temperature=temperature,
        max_tokens=max_tokens,
        prompt_tokens=query.prompt_tokens,
        dropped=tuple(dropped),
        needs=frozenset(query.required),
    )


def route_job(catalog: Catalog, job: Job, skip: Mapping[str, str] | None = None) -> Route:
    return route(catalog, RouteQuery.from_job(job), skip)


def is_cost_restricted(catalog: Catalog, source: str, task_class: str) -> bool:
    rule = catalog.policy.cost_restricted
    return source in rule.sources or task_class in rule.task_classes


def _check_query(catalog: Catalog, query: RouteQuery) -> None:
    policy = catalog.policy
    for name, value, valid in (
        ("task class", query.task_class, TASK_CLASSES),
        ("source", query.source, SOURCES),
        ("focus", query.focus, policy.focus),
        ("profile", query.profile, policy.profiles),
        ("model", query.model, catalog.by_id),
    ):
        if value is not None and value not in valid:
            raise InvalidJob(f"unknown {name} {value!r} (valid: {choices(valid)})")
    if query.prompt_tokens < 0:
        raise InvalidJob(f"prompt tokens must be 0 or more (got {query.prompt_tokens})")
    if query.task_class not in policy.chains:
        raise InvalidJob(
            f"the catalog has no chain for task class {query.task_class!r}: add"
            f" policy.chains.{query.task_class} (the shipped router/catalog.yaml has one)"
        )
    unknown = sorted(query.needs - set(CAPABILITIES))
    if unknown:
        raise InvalidJob(f"unknown capability {unknown[0]!r} (valid: {choices(CAPABILITIES)})")


def _preferred_chain(catalog: Catalog, query: RouteQuery) -> list[str]:
    """Rule 1 and the chain-switching halves of rules 2 and 3, duplicates dropped."""
    policy = catalog.policy
    if query.profile:
        primary: str | None = policy.profiles[query.profile].model
        rest = policy.fallbacks
    elif query.focus:
        primary = policy.focus[query.focus]
        rest = policy.fallbacks
    else:
        primary, rest = None, policy.chains[query.task_class]  # type: ignore[index]
    if query.task_class == EMBEDDING:
        pass  # a batch of texts: neither rule switches its chain
    elif query.visual:
        rest = policy.chains["vision"]
    elif query.prompt_tokens > policy.long_context_above_tokens:
        rest = policy.chains["long_context"]
    ordered = [m for m in (query.model, primary) if m] + list(rest)
    return list(dict.fromkeys(ordered))


def _constraint_broken(
    catalog: Catalog, query: RouteQuery, model: Model, max_tokens: int | None
) -> str | None:
    """Why rules 2-4 forbid `model` for this job, or None."""
    missing = _lacking(query, model)
    if missing == "vision":
        return "no vision: the job has an image"
    if missing is not None:
        return f"lacks {missing}"
    if model.supports("embedding") and query.task_class != EMBEDDING:
        return "an embedding model: it does not chat"
    if query.longest_input is not None:
        needed = query.longest_input
    else:
        needed = query.prompt_tokens + (max_tokens or 0)
    if needed > model.context_window:
        return f"context too small: {model.context_window:,} < {needed:,} tokens needed"
    if is_cost_restricted(catalog, query.source, query.task_class):
        allowed = catalog.policy.cost_restricted.allowed_tiers
        if model.tier not in allowed:
            return (
                f"tier {model.tier} not allowed for a {query.source}/{query.task_class} job"
                f" (allowed: {choices(allowed)})"
            )
    return None


def _lacking(query: RouteQuery, model: Model) -> str | None:
    """The first capability the job needs that `model` lacks, or None."""
    return next((c for c in query.required if not model.supports(c)), None)


def _chain_name(catalog: Catalog, query: RouteQuery) -> str:
    """The chain a job's candidates came from, for people: `fast_general`, `vision`,
    `profile code + fallbacks`, `model zai/glm-4.7 + user_facing`."""
    policy = catalog.policy
    if query.visual:
        rest = "vision"
    elif query.prompt_tokens > policy.long_context_above_tokens:
        rest = "long_context"
    elif query.profile or query.focus:
        rest = "fallbacks"
    else:
        rest = query.task_class
    parts = [f"model {query.model}"] if query.model else []
    if query.profile:
        parts.append(f"profile {query.profile}")
    elif query.focus:
        parts.append(f"focus {query.focus}")
    return " + ".join([*parts, rest])


def _first_set(value: Any, default: Any) -> Any:
    return value if value is not None else default


def _get(obj: Any, name: str) -> Any:
    return getattr(obj, name) if obj is not None else None
