"""The catalog (providers, models, prices, limits) and the policy: one YAML file, validated.

`load_catalog()` reads the packaged default or the file named by `FLEET_CATALOG`, and
refuses a broken file with one line: the file, the line, the field, the bad value and
the valid choices. Cross-references (chain -> model, model -> provider) are checked
here, once, so the router can trust every id it is given.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import cached_property
from importlib import resources
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from router.errors import ConfigError, choices

Queue = Literal["local", "free", "subscription", "vision", "long-context"]
Tier = Literal["local", "free", "subscription", "paid"]
# What a model can serve. A job's needs (router/jobs.py, Job.needs()) are a subset of
# these: routing drops a model lacking one. The rest only decide whether a tuning field
# (seed, logprobs, reasoning_effort, parallel_tool_calls) is sent to the model or dropped.
# docs/catalog.md says where each shipped model's list comes from.
Capability = Literal[
    "vision",  # image parts
    "video",  # video parts (a video job routes like an image job, then needs this)
    "reasoning",  # reasoning_effort, reasoning content in the answer
    "code",
    "long_context",
    "tools",  # tools / tool_choice: function calling
    "parallel_tool_calls",  # the parallel_tool_calls switch
    "json_object",  # response_format {"type": "json_object"}
    "json_schema",  # response_format {"type": "json_schema", ...}
    "logprobs",  # logprobs / top_logprobs
    "seed",
    # An embedding model: it serves the embedding class only, and no chat job goes to it.
    "embedding",
]
TaskClass = Literal[
    "complex_reasoning",
    "creative",
    "user_facing",
    "vision",
    "long_context",
    "fast_general",
    "cost_free",
    "reasoning_free",
    "heartbeat",
    "embedding",  # vectors for texts (Job.input), not a chat
]
Source = Literal["app", "cron", "heartbeat", "sub-agent"]

QUEUES: tuple[str, ...] = get_args(Queue)
TIERS: tuple[str, ...] = get_args(Tier)
TASK_CLASSES: tuple[str, ...] = get_args(TaskClass)
SOURCES: tuple[str, ...] = get_args(Source)
CAPABILITIES: tuple[str, ...] = get_args(Capability)
# Classes a catalog may leave without a chain (a copy made before the class existed): a job
# of one is refused at the door, naming the missing chain.
OPTIONAL_CLASSES: frozenset[str] = frozenset({"embedding"})

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Quota(_Strict):
    """A subscription plan's allowance: requests or tokens per rolling window."""

    requests: PositiveInt | None = None
    tokens: PositiveInt | None = None
    window_h: Annotated[float, Field(gt=0)]

    @model_validator(mode="after")
    def _one_measure(self) -> Quota:
        if (self.requests is None) == (self.tokens is None):
            raise ValueError("a quota counts either requests or tokens: give exactly one")
        return self


class Limits(_Strict):
    """Fleet-wide limits, enforced across every worker (see workers' limit module)."""

    requests_per_min: PositiveInt | None = None
    tokens_per_min: PositiveInt | None = None
    requests_per_day: PositiveInt | None = None
    quota: Quota | None = None


class Provider(_Strict):
    kind: Literal["openai", "mlx"]
    base_url: str | None = None
    base_url_env: str | None = None  # a variable that overrides base_url when set
    api_key_env: str | None = None  # the variable holding the key; never the key itself
    timeout_s: Annotated[float, Field(gt=0)] = 120.0
    limits: Limits | None = None

    @model_validator(mode="after")
    def _http_needs_url(self) -> Provider:
        if self.kind == "openai" and not (self.base_url or self.base_url_env):
            raise ValueError("an openai provider needs base_url or base_url_env")
        return self

    def resolved_base_url(self, environ: Mapping[str, str] = os.environ) -> str | None:
        if self.base_url_env and environ.get(self.base_url_env):
            return environ[self.base_url_env]
        return self.base_url


class Model(_Strict):
    id: str = Field(pattern=r"^[A-Za-z0-9_.-]+/\S+$")
    upstream: str
    queue: Queue
    tier: Tier
    context_window: PositiveInt
    capabilities: frozenset[Capability] = frozenset()
    usd_per_mtok_in: NonNegativeFloat = 0.0
    usd_per_mtok_out: NonNegativeFloat = 0.0
    limits: Limits | None = None

    @property
    def provider(self) -> str:
        return self.id.split("/", 1)[0]

    def listing(self) -> dict[str, Any]:
        """What `fleet catalog` and the gateway's model list show of this model."""
        return {
            "id": self.id,
            "provider": self.provider,
            "queue": self.queue,
            "tier": self.tier,
            "context_window": self.context_window,
            "capabilities": sorted(self.capabilities),
            "usd_per_mtok_in": self.usd_per_mtok_in,
            "usd_per_mtok_out": self.usd_per_mtok_out,
        }

    def supports(self, capability: str) -> bool:
        """Whether the catalog says this model can serve `capability` (any string: one
        the catalog does not know is not supported)."""
        return capability in self.capabilities

    @model_validator(mode="after")
    def _paid_needs_price(self) -> Model:
        # A paid model without a price would be billed as $0: refuse it at load.
        if self.tier == "paid" and not (self.usd_per_mtok_in and self.usd_per_mtok_out):
            raise ValueError("a paid model needs usd_per_mtok_in and usd_per_mtok_out")
        return self


class Profile(_Strict):
    model: str
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    max_tokens: PositiveInt | None = None


class CostRestriction(_Strict):
    sources: frozenset[Source] = frozenset()
    task_classes: frozenset[TaskClass] = frozenset()
    allowed_tiers: frozenset[Tier] = frozenset({"free", "local"})


class Cooldowns(_Strict):
    """How the fleet rests a failing model (fleet-wide, in Redis)."""

    rate_limited_s: Annotated[float, Field(gt=0)] = 5.0  # a 429 without Retry-After
    circuit_failures: PositiveInt = 5  # this many transient failures...
    circuit_window_s: Annotated[float, Field(gt=0)] = 60.0  # ...within this window...
    circuit_open_s: Annotated[float, Field(gt=0)] = 30.0  # ...open the circuit this long
    # A provider that refuses a capability the catalog claims (tools, a response format)
    # rests the model for jobs needing that capability this long; other jobs still use it.
    capability_rest_s: Annotated[float, Field(gt=0)] = 3600.0


Scope = Literal["model", "provider", "tier"]


class Budget(_Strict):
    """A USD cap on spend by one model, provider or tier, per UTC day and/or month."""

    scope: Scope
    name: str
    usd_per_day: Annotated[float, Field(gt=0)] | None = None
    usd_per_month: Annotated[float, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _some_cap(self) -> Budget:
        if self.usd_per_day is None and self.usd_per_month is None:
            raise ValueError("a budget needs usd_per_day or usd_per_month")
        return self


class Retention(_Strict):
    """How many dead letters of one task class the fleet keeps, and for how long; past
    either limit the oldest go first (workers/state/deadletter.py). A field left out
    falls back to `dead_letters.default`, then to the built-in figure."""

    max_count: int | None = None
    max_age_days: float | None = None

    # Checked before pydantic's coercion, so that a bad figure gets one message naming
    # what is valid, whatever its type ('lots', 0, 2.5, -1, true).
    @field_validator("max_count", mode="before")
    @classmethod
    def _whole_number(cls, value: Any) -> Any:
        if value is not None and (type(value) is not int or value < 1):
            raise ValueError(f"must be a whole number of 1 or more (got {value!r})")
        return value

    @field_validator("max_age_days", mode="before")
    @classmethod
    def _days(cls, value: Any) -> Any:
        if value is not None and (type(value) not in (int, float) or not value > 0):
            raise ValueError(f"must be a number of days above 0, such as 30 or 0.5 (got {value!r})")
        return value


DEAD_LETTER_MAX_COUNT = 1000  # per task class, when the catalog says nothing
DEAD_LETTER_MAX_AGE_DAYS = 30.0


class DeadLetters(_Strict):
    """Dead-letter retention: `default` for every task class, `classes` overriding it
    field by field for some (a heartbeat's failures, a long_context job's big payload)."""

    default: Retention = Retention()
    classes: dict[TaskClass, Retention] = {}

    def for_class(self, task_class: str) -> tuple[int, float]:
        """(max_count, max_age_days) in force for `task_class` (any string: a class the
        catalog does not know gets the default)."""
        own = self.classes.get(task_class)  # type: ignore[call-overload]
        count = (own and own.max_count) or self.default.max_count or DEAD_LETTER_MAX_COUNT
        days = (own and own.max_age_days) or self.default.max_age_days or DEAD_LETTER_MAX_AGE_DAYS
        return count, days


class EmbeddingCache(_Strict):
    """How long the fleet keeps a text's vector, and how many it keeps at most
    (workers/state/vector_cache.py). A 1,024-float vector takes about 4 KB of Redis."""

    enabled: bool = True
    ttl_s: Annotated[float, Field(gt=0)] = 30 * 86400.0
    max_entries: PositiveInt = 100_000


class Policy(_Strict):
    long_context_above_tokens: PositiveInt = 200_000
    cost_restricted: CostRestriction = CostRestriction()
    chains: dict[TaskClass, list[str]]
    focus: dict[str, str] = {}
    profiles: dict[str, Profile] = {}
    fallbacks: list[str] = []
    # Near a subscription quota, only these classes may use its last `quota_reserve`.
    quota_reserve: Annotated[float, Field(ge=0, lt=1)] = 0.2
    quota_reserve_for: frozenset[TaskClass] = frozenset({"user_facing"})
    cooldowns: Cooldowns = Cooldowns()
    budgets: list[Budget] = []
    # A job whose every model is limited waits for the earliest slot, at most this long
    # (or until its deadline); beyond it the job fails with every model's reason.
    max_wait_s: Annotated[float, Field(ge=0)] = 600.0
    dead_letters: DeadLetters = DeadLetters()
    embedding_cache: EmbeddingCache = EmbeddingCache()

    @model_validator(mode="after")
    def _every_class_has_a_chain(self) -> Policy:
        present = {cls for cls, chain in self.chains.items() if chain}
        missing = [c for c in TASK_CLASSES if c not in present and c not in OPTIONAL_CLASSES]
        if missing:
            raise ValueError(f"chains missing for task classes: {', '.join(missing)}")
        return self


class Catalog(_Strict):
    providers: dict[str, Provider]
    models: list[Model]
    policy: Policy

    @model_validator(mode="after")
    def _cross_references(self) -> Catalog:
        seen: set[str] = set()
        for i, model in enumerate(self.models):
            if model.id in seen:
                raise ValueError(f"models.{i}.id: duplicate model id {model.id!r}")
            seen.add(model.id)
            if model.provider not in self.providers:
                raise ValueError(
                    f"models.{i}.id: {model.id!r} names unknown provider {model.provider!r}"
                    f" (valid: {choices(self.providers)})"
                )
        for i, budget in enumerate(self.policy.budgets):
            valid = self._scope_names(budget.scope)
            if budget.name not in valid:
                raise ValueError(
                    f"policy.budgets.{i}.name: unknown {budget.scope} {budget.name!r}"
                    f" (valid: {choices(valid)})"
                )
        for where, model_id in self._policy_references():
            if model_id not in seen:
                raise ValueError(f"{where}: unknown model {model_id!r} (valid: {choices(seen)})")
            # An embedding model answers the embedding class only; that class only them.
            embeds = self.by_id[model_id].supports("embedding")
            if embeds != where.startswith("policy.chains.embedding."):
                kind = "an embedding model" if embeds else "not an embedding model"
                raise ValueError(
                    f"{where}: {model_id!r} is {kind}: embedding models serve the embedding"
                    " chain, and only they do"
                )
        return self

    def _scope_names(self, scope: str) -> set[str]:
        if scope == "model":
            return {m.id for m in self.models}
        if scope == "provider":
            return set(self.providers)
        return set(TIERS)

    def _policy_references(self) -> list[tuple[str, str]]:
        refs = [
            (f"policy.chains.{cls}.{i}", mid)
            for cls, chain in self.policy.chains.items()
            for i, mid in enumerate(chain)
        ]
        refs += [(f"policy.focus.{f}", mid) for f, mid in self.policy.focus.items()]
        refs += [(f"policy.profiles.{p}.model", pr.model) for p, pr in self.policy.profiles.items()]
        refs += [(f"policy.fallbacks.{i}", mid) for i, mid in enumerate(self.policy.fallbacks)]
        return refs

    @cached_property
    def by_id(self) -> dict[str, Model]:
        return {m.id: m for m in self.models}

    def model(self, model_id: str) -> Model:
        return self.by_id[model_id]


DEFAULT_CATALOG = "catalog.yaml"


def default_catalog_path() -> Path:
    return Path(str(resources.files("router").joinpath(DEFAULT_CATALOG)))


def catalog_path(environ: Mapping[str, str] = os.environ) -> Path:
    """The file in force: FLEET_CATALOG when set, else the packaged default."""
    override = environ.get("FLEET_CATALOG")
    return Path(override) if override else default_catalog_path()


def load_catalog(path: str | Path | None = None) -> Catalog:
    """Load and validate a catalog file; ConfigError with one precise line if it is bad."""
    path = Path(path) if path is not None else catalog_path()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read catalog: {exc.strerror or exc}") from exc
    try:
        # libyaml's loader (when PyYAML has it) parses the catalog several times faster.
        data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}{where}: not valid YAML: {problem}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with providers, models and policy")
    try:
        return Catalog.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(path, text, exc)) from exc


def _describe(path: Path, text: str, exc: ValidationError) -> str:
    """One line for the first error: file:line: field: problem (got value)."""
    err = exc.errors(include_url=False)[0]
    loc = [str(part) for part in err["loc"] if part != "[key]"]  # a bad key: its own path
    msg = err["msg"].removeprefix("Value error, ")
    if not loc and ": " in msg and msg.split(": ", 1)[0].count(".") >= 1:
        # Cross-reference errors carry their own dotted location.
        dotted, msg = msg.split(": ", 1)
        loc = dotted.split(".")
    line = _line_of(text, loc)
    where = f"{path}:{line}" if line else str(path)
    field = ".".join(loc) or "(top level)"
    got = "" if err["type"] in ("missing", "value_error") else f" (got {err['input']!r})"
    if err["type"] == "extra_forbidden":
        fields = _fields_at(loc[:-1])
        msg = f"unknown field (valid: {choices(fields)})" if fields else "unknown field"
    return f"{where}: {field}: {msg}{got}"


def _fields_at(loc: list[str]) -> list[str] | None:
    """The fields the schema accepts at `loc` (where an unknown one was met), so that a
    typo's message names the valid ones; None when `loc` is not a set of fields."""
    node: Any = Catalog
    for part in loc:
        node = _bare(node)
        if _is_model(node):
            field = node.model_fields.get(part)
            if field is None:
                return None
            node = field.annotation
        elif get_origin(node) in (dict, list) and get_args(node):
            node = get_args(node)[-1]  # `part` was a key or an index
        else:
            return None
    node = _bare(node)
    return list(node.model_fields) if _is_model(node) else None


def _bare(annotation: Any) -> Any:
    """`X` for `X | None`."""
    if get_origin(annotation) in (Union, UnionType):
        kept = [a for a in get_args(annotation) if a is not type(None)]
        if len(kept) == 1:
            return kept[0]
    return annotation


def _is_model(node: Any) -> bool:
    return isinstance(node, type) and issubclass(node, BaseModel)


def _line_of(text: str, loc: list[str]) -> int | None:
    """The 1-based line of the YAML node at `loc`, or of its nearest existing parent."""
    try:
        node: Any = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if k.value == part]
            if not match:
                break
            key, node = match[0]
            line = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]
            line = node.start_mark.line + 1
        else:
            break
    return line
