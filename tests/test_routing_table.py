"""Every row of the chain table (docs/architecture.md, section 4), the focus/profile
precedence and rules 2-4."""

from __future__ import annotations

import pickle

import pytest

from router import NoRouteAvailable, RouteQuery, load_catalog, parse_job, route, route_job
from router.errors import CapabilityUnavailable, InvalidJob

CATALOG = load_catalog()

OR = "openrouter/"
# The default chains (docs/architecture.md, section 4), primary first, as (model, queue).
DESIGN_CHAINS = {
    "complex_reasoning": [
        ("zai/glm-4.7", "subscription"),
        ("minimax/MiniMax-M2.1", "subscription"),
        ("litellm/kimi-k2-thinking", "subscription"),
        (OR + "nousresearch/hermes-3-llama-3.1-405b:free", "free"),
        (OR + "deepseek/deepseek-chat", "free"),
    ],
    "creative": [
        ("zai/glm-4.7", "subscription"),
        ("minimax/MiniMax-M2.1", "subscription"),
        ("litellm/trinity-free", "free"),
        (OR + "meta-llama/llama-3.1-405b-instruct:free", "free"),
    ],
    "user_facing": [
        ("zai/glm-4.7", "subscription"),
        ("minimax/MiniMax-M2.1", "subscription"),
        ("litellm/kimi", "subscription"),
        ("litellm/qwen3-next-free", "free"),
    ],
    "vision": [
        ("minimax/MiniMax-Vision-Video-01", "vision"),
        (OR + "nvidia/nemotron-nano-12b-v2-vl:free", "vision"),
    ],
    "long_context": [
        ("moonshot/kimi-k2-0905-preview", "long-context"),
        ("litellm/qwen3-next-free", "free"),
        ("litellm/nemotron-free", "free"),
    ],
    "fast_general": [
        ("minimax/MiniMax-M2.1", "subscription"),
        (OR + "meta-llama/llama-3.1-405b-instruct:free", "free"),
        ("local/qwen3-mlx", "local"),
    ],
    "cost_free": [
        (OR + "meta-llama/llama-3.1-405b-instruct:free", "free"),
        (OR + "nousresearch/hermes-3-llama-3.1-405b:free", "free"),
        ("litellm/deepseek-free", "free"),
        ("litellm/gpt-oss-free", "free"),
        ("local/qwen3-mlx", "local"),
    ],
    "reasoning_free": [
        (OR + "nousresearch/hermes-3-llama-3.1-405b:free", "free"),
        (OR + "deepseek/deepseek-chat", "free"),
        ("litellm/chimera-free", "free"),
        ("local/qwen3-local", "local"),
    ],
    "heartbeat": [
        ("local/qwen3-mlx", "local"),
        ("local/phi4-mini-local", "local"),
        ("local/qwen-cpu-fallback", "local"),
        ("litellm/gpt-oss-small-free", "free"),
    ],
}
FALLBACKS = [
    "litellm/qwen3-next-free",
    "litellm/deepseek-free",
    "litellm/gpt-oss-free",
    "litellm/trinity-free",
    "litellm/chimera-free",
]


def chain_of(**query: object) -> list[str]:
    return [hop.model for hop in route(CATALOG, RouteQuery(**query)).chain]  # type: ignore[arg-type]


@pytest.mark.parametrize("task_class", sorted(DESIGN_CHAINS))
def test_every_design_row_is_the_default_chain(task_class: str) -> None:
    decision = route(CATALOG, RouteQuery(task_class=task_class))
    assert [(h.model, h.queue) for h in decision.chain] == DESIGN_CHAINS[task_class]
    assert decision.queue == DESIGN_CHAINS[task_class][0][1]
    assert decision.dropped == ()


@pytest.mark.parametrize(
    ("focus", "primary"),
    [
        ("orchestrator", "litellm/kimi"),
        ("devsecops", "litellm/qwen3-coder-free"),
        ("data", "litellm/chimera-free"),
        ("trader", "litellm/deepseek-free"),
        ("creative", "litellm/trinity-free"),
        ("social", "litellm/trinity-free"),
        ("journalist", "litellm/qwen3-next-free"),
    ],
)
def test_focus_primary_is_followed_by_the_cost_fallbacks(focus: str, primary: str) -> None:
    chain = chain_of(task_class="complex_reasoning", focus=focus)
    assert chain == list(dict.fromkeys([primary, *FALLBACKS]))


@pytest.mark.parametrize(
    ("profile", "model", "temperature", "max_tokens"),
    [
        ("routing", "litellm/kimi", 0.3, 512),
        ("analysis", "litellm/kimi", 0.7, 4096),
        ("creative", "litellm/trinity-free", 0.9, 2048),
        ("code", "litellm/qwen3-coder-free", 0.2, 8192),
        ("social", "litellm/trinity-free", 0.8, 1024),
    ],
)
def test_profile_sets_model_and_sampling(
    profile: str, model: str, temperature: float, max_tokens: int
) -> None:
    decision = route(CATALOG, RouteQuery(task_class="fast_general", profile=profile))
    assert decision.chain[0].model == model
    assert [h.model for h in decision.chain] == list(dict.fromkeys([model, *FALLBACKS]))
    assert (decision.temperature, decision.max_tokens) == (temperature, max_tokens)


def test_precedence_explicit_model_then_profile_then_focus_then_class() -> None:
    # Given a job naming all four, the explicit model leads, then the profile's model.
    both = chain_of(task_class="creative", focus="trader", profile="code", model="zai/glm-4.7")
    assert both[:2] == ["zai/glm-4.7", "litellm/qwen3-coder-free"]
    # Profile beats focus; focus beats the class chain.
    assert chain_of(task_class="creative", focus="trader", profile="code")[0] == (
        "litellm/qwen3-coder-free"
    )
    assert chain_of(task_class="creative", focus="trader")[0] == "litellm/deepseek-free"
    # An explicit model alone is followed by the class chain.
    assert chain_of(task_class="cost_free", model="litellm/glm-free") == [
        "litellm/glm-free",
        *[m for m, _ in DESIGN_CHAINS["cost_free"]],
    ]


def test_job_sampling_overrides_the_profile() -> None:
    decision = route(
        CATALOG, RouteQuery(task_class="creative", profile="code", temperature=1.1, max_tokens=77)
    )
    assert (decision.temperature, decision.max_tokens) == (1.1, 77)


@pytest.mark.parametrize("task_class", sorted(DESIGN_CHAINS))
def test_image_jobs_take_the_vision_chain_whatever_their_class(task_class: str) -> None:
    decision = route(CATALOG, RouteQuery(task_class=task_class, has_image=True))
    assert decision.queue == "vision"
    assert all("vision" in CATALOG.model(h.model).capabilities for h in decision.chain)


def test_image_job_drops_a_preferred_model_without_vision_and_says_why() -> None:
    decision = route(CATALOG, RouteQuery(task_class="creative", profile="creative", has_image=True))
    assert decision.chain[0].model == "minimax/MiniMax-Vision-Video-01"
    assert ("litellm/trinity-free", "no vision: the job has an image") in decision.dropped


@pytest.mark.parametrize("task_class", sorted(DESIGN_CHAINS))
def test_prompts_above_200k_take_the_long_context_chain(task_class: str) -> None:
    decision = route(CATALOG, RouteQuery(task_class=task_class, prompt_tokens=250_000))
    assert decision.queue == "long-context"
    assert all(CATALOG.model(h.model).context_window >= 250_000 for h in decision.chain)


@pytest.mark.parametrize("task_class", sorted(DESIGN_CHAINS))
@pytest.mark.parametrize("extra", [{}, {"profile": "analysis"}, {"model": "zai/glm-4.7"}])
def test_a_300k_prompt_never_lands_on_a_200k_model(task_class: str, extra: dict) -> None:
    with pytest.raises(NoRouteAvailable) as caught:
        route(CATALOG, RouteQuery(task_class=task_class, prompt_tokens=300_000, **extra))
    assert all("context too small" in why for _, why in caught.value.reasons)


def test_context_rule_skips_small_models_below_the_long_context_threshold() -> None:
    # deepseek-chat has 64K: a 100K prompt skips it but keeps the 131K models.
    decision = route(CATALOG, RouteQuery(task_class="reasoning_free", prompt_tokens=100_000))
    models = [h.model for h in decision.chain]
    assert OR + "deepseek/deepseek-chat" not in models
    assert "local/qwen3-local" not in models  # 32K
    assert models == [OR + "nousresearch/hermes-3-llama-3.1-405b:free", "litellm/chimera-free"]


def test_max_tokens_counts_against_the_context_window() -> None:
    decision = route(
        CATALOG, RouteQuery(task_class="reasoning_free", prompt_tokens=60_000, max_tokens=8_000)
    )
    assert OR + "deepseek/deepseek-chat" not in [h.model for h in decision.chain]


@pytest.mark.parametrize("task_class", sorted(DESIGN_CHAINS))
@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"has_image": True},
        {"prompt_tokens": 250_000},
        {"profile": "analysis"},
        {"focus": "orchestrator"},
        {"model": "zai/glm-4.7"},
    ],
)
@pytest.mark.parametrize("source", ["cron", "heartbeat", "app", "sub-agent"])
def test_cron_heartbeat_and_cost_free_never_get_subscription_or_paid(
    task_class: str, extra: dict, source: str
) -> None:
    restricted = source in ("cron", "heartbeat") or task_class in ("cost_free", "heartbeat")
    decision = route(CATALOG, RouteQuery(task_class=task_class, source=source, **extra))
    chain = [h.model for h in decision.chain]
    tiers = {h.tier for h in decision.chain}
    preferred = unrestricted_chain(task_class, extra)
    if restricted:
        # The same preference order, less every subscription and paid model
        assert tiers <= {"free", "local"}
        assert decision.queue in ("free", "local", "vision", "long-context")
        assert chain == [m for m in preferred if CATALOG.model(m).tier in ("free", "local")]
    else:
        # Nothing is held back: the chain rules 1-3 give, whatever the tiers
        assert chain == preferred
        assert not [m for m, why in decision.dropped if "not allowed" in why]
    for model, why in decision.dropped:
        if CATALOG.model(model).tier in ("subscription", "paid") and restricted:
            assert "not allowed" in why or "vision" in why or "context" in why


def unrestricted_chain(task_class: str, extra: dict) -> list[str]:
    """The chain of an app job of `task_class` with one of the `extra` fields above, before
    any tier is held back: rule 1's preference, rule 2's vision chain, rule 3's
    long-context chain (all of whose models hold 250K tokens)."""
    if extra.get("has_image"):
        return [m for m, _ in DESIGN_CHAINS["vision"]]
    if extra.get("prompt_tokens"):
        return [m for m, _ in DESIGN_CHAINS["long_context"]]
    if extra.get("profile") == "analysis" or extra.get("focus") == "orchestrator":
        return ["litellm/kimi", *FALLBACKS]  # both lead with kimi, then the fallbacks
    own = [m for m, _ in DESIGN_CHAINS[task_class]]
    if "model" in extra:
        return list(dict.fromkeys([extra["model"], *own]))
    assert not extra, extra
    return own


def test_explicit_subscription_model_on_a_cron_job_is_dropped_with_its_reason() -> None:
    decision = route(
        CATALOG, RouteQuery(task_class="cost_free", source="cron", model="zai/glm-4.7")
    )
    assert decision.chain[0].model == OR + "meta-llama/llama-3.1-405b-instruct:free"
    assert decision.dropped[0][0] == "zai/glm-4.7"
    assert "tier subscription not allowed" in decision.dropped[0][1]


def test_skip_set_drops_models_with_the_given_reason() -> None:
    skip = {"zai/glm-4.7": "cooldown until 12:00", "minimax/MiniMax-M2.1": "quota reserve"}
    decision = route(CATALOG, RouteQuery(task_class="user_facing"), skip)
    assert decision.chain[0].model == "litellm/kimi"
    assert decision.dropped == tuple(skip.items())


def test_nothing_usable_raises_with_every_models_reason() -> None:
    models = [m for m, _ in DESIGN_CHAINS["vision"]]
    with pytest.raises(NoRouteAvailable) as caught:
        route(CATALOG, RouteQuery(task_class="vision"), {m: "circuit open" for m in models})
    assert [m for m, _ in caught.value.reasons] == models
    assert "circuit open" in str(caught.value)


@pytest.mark.parametrize(
    ("query", "needle"),
    [
        ({"task_class": "nope"}, "unknown task class 'nope' (valid: complex_reasoning"),
        ({"task_class": "creative", "focus": "x"}, "unknown focus 'x' (valid: creative, data"),
        ({"task_class": "creative", "profile": "x"}, "unknown profile 'x' (valid: analysis"),
        ({"task_class": "creative", "model": "x/y"}, "unknown model 'x/y' (valid: "),
        ({"task_class": "creative", "source": "web"}, "unknown source 'web' (valid: app, cron"),
        ({"task_class": "creative", "prompt_tokens": -1}, "prompt tokens must be 0 or more"),
    ],
)
def test_bad_queries_are_refused_with_the_valid_choices(query: dict, needle: str) -> None:
    with pytest.raises(InvalidJob) as caught:
        route(CATALOG, RouteQuery(**query))
    assert needle in str(caught.value)
    assert "\n" not in str(caught.value)


# --- what a job needs ---------------------------------------------------------------------

TOOLS = frozenset({"tools"})


def test_a_tool_job_starts_at_the_first_model_with_tools_and_says_why_others_were_dropped():
    decision = route(CATALOG, RouteQuery(task_class="cost_free", needs=TOOLS))
    assert [h.model for h in decision.chain] == ["litellm/deepseek-free", "litellm/gpt-oss-free"]
    assert decision.queue == "free"
    assert decision.dropped == (
        (OR + "meta-llama/llama-3.1-405b-instruct:free", "lacks tools"),
        (OR + "nousresearch/hermes-3-llama-3.1-405b:free", "lacks tools"),
        ("local/qwen3-mlx", "lacks tools"),
    )
    assert decision.needs == TOOLS


def test_escalation_never_reaches_a_model_without_tools() -> None:
    # The chain is computed once: the free and local models after MiniMax are not in it.
    decision = route(CATALOG, RouteQuery(task_class="fast_general", needs=TOOLS))
    assert [h.model for h in decision.chain] == ["minimax/MiniMax-M2.1"]
    plain = route(CATALOG, RouteQuery(task_class="fast_general"))
    assert len(plain.chain) == 3


def test_a_json_schema_job_starts_at_the_first_model_that_takes_a_schema() -> None:
    needs = frozenset({"json_schema"})
    decision = route(CATALOG, RouteQuery(task_class="complex_reasoning", needs=needs))
    assert [h.model for h in decision.chain] == [OR + "deepseek/deepseek-chat"]
    assert [why for _, why in decision.dropped] == ["lacks json_schema"] * 4
    json_mode = route(
        CATALOG, RouteQuery(task_class="user_facing", needs=frozenset({"json_object"}))
    )
    assert json_mode.chain[0].model == "zai/glm-4.7"
    assert "minimax/MiniMax-M2.1" in dict(json_mode.dropped)


@pytest.mark.parametrize("need", ["tools", "json_object", "json_schema"])
def test_local_mlx_models_never_get_tools_or_a_response_format(need: str) -> None:
    local = [m.id for m in CATALOG.models if m.tier == "local"]
    assert local and not [m for m in local if CATALOG.model(m).supports(need)]
    query = RouteQuery(task_class="heartbeat", needs=frozenset({need}))
    try:
        decision = route(CATALOG, query)
        chain, dropped = [h.model for h in decision.chain], dict(decision.dropped)
    except CapabilityUnavailable as exc:
        chain, dropped = [], dict(exc.reasons)
    heartbeat_local = [m for m, _ in DESIGN_CHAINS["heartbeat"] if m.startswith("local/")]
    assert not set(chain) & set(local)
    assert [dropped[m] for m in heartbeat_local] == [f"lacks {need}"] * len(heartbeat_local)


def test_a_request_no_model_can_serve_names_the_capability_chain_and_reasons() -> None:
    with pytest.raises(CapabilityUnavailable) as caught:
        route(CATALOG, RouteQuery(task_class="vision", needs=TOOLS))
    exc = caught.value
    assert isinstance(exc, InvalidJob)
    assert (exc.capability, exc.param, exc.chain) == ("tools", "tools", "vision")
    assert str(exc) == (
        "no model of chain vision can serve tools: minimax/MiniMax-Vision-Video-01 (lacks tools),"
        f" {OR}nvidia/nemotron-nano-12b-v2-vl:free (lacks tools)"
    )
    assert pickle.loads(pickle.dumps(exc)).args == exc.args


def test_a_schema_on_user_facing_names_response_format_as_the_param() -> None:
    with pytest.raises(CapabilityUnavailable) as caught:
        route(CATALOG, RouteQuery(task_class="user_facing", needs=frozenset({"json_schema"})))
    assert (caught.value.capability, caught.value.param) == ("json_schema", "response_format")
    assert str(caught.value).startswith("no model of chain user_facing can serve json_schema: ")
    assert len(caught.value.reasons) == 4


def test_the_chain_named_is_the_one_the_job_took() -> None:
    query = RouteQuery(task_class="creative", profile="routing", model="zai/glm-4.7", needs=TOOLS)
    assert route(CATALOG, query).chain[0].model == "zai/glm-4.7"
    with pytest.raises(CapabilityUnavailable) as caught:
        route(
            CATALOG,
            RouteQuery(task_class="heartbeat", source="cron", needs=frozenset({"json_schema"})),
        )
    assert "chain heartbeat can serve json_schema" in str(caught.value)
    with pytest.raises(CapabilityUnavailable) as caught:
        route(
            CATALOG,
            RouteQuery(task_class="creative", focus="data", needs=frozenset({"json_schema"})),
        )
    assert "chain focus data + fallbacks can serve" in str(caught.value)


def test_a_video_routes_like_an_image_then_needs_video() -> None:
    decision = route(CATALOG, RouteQuery(task_class="creative", needs=frozenset({"video"})))
    assert [h.model for h in decision.chain] == ["minimax/MiniMax-Vision-Video-01"]
    assert decision.queue == "vision"
    assert decision.dropped == ((OR + "nvidia/nemotron-nano-12b-v2-vl:free", "lacks video"),)
    # A cron job may not use the subscription model, and the free one takes no video
    with pytest.raises(CapabilityUnavailable) as caught:
        route(CATALOG, RouteQuery(task_class="creative", source="cron", needs=frozenset({"video"})))
    assert (caught.value.capability, caught.value.param) == ("video", "messages")


def test_live_state_leaving_nothing_is_still_a_wait_not_a_capability_error() -> None:
    # The models with tools exist, they are only blocked now: NoRouteAvailable, as before.
    skip = {"litellm/deepseek-free": "cooldown", "litellm/gpt-oss-free": "circuit open"}
    with pytest.raises(NoRouteAvailable) as caught:
        route(CATALOG, RouteQuery(task_class="cost_free", needs=TOOLS), skip)
    assert not isinstance(caught.value, CapabilityUnavailable)
    assert ("litellm/deepseek-free", "cooldown") in caught.value.reasons


def test_a_model_with_tools_too_small_and_the_rest_without_tools_is_a_capability_error():
    query = RouteQuery(
        task_class="fast_general", prompt_tokens=199_000, max_tokens=2_000, needs=TOOLS
    )
    with pytest.raises(CapabilityUnavailable) as caught:
        route(CATALOG, query)
    assert "minimax/MiniMax-M2.1 (context too small" in str(caught.value)


def test_an_unknown_need_is_refused_with_the_valid_capabilities() -> None:
    with pytest.raises(InvalidJob) as caught:
        route(CATALOG, RouteQuery(task_class="creative", needs=frozenset({"telepathy"})))
    assert (
        "unknown capability 'telepathy' (valid: code, embedding, json_object, json_schema"
        in str(caught.value)
    )


def test_a_job_without_needs_routes_as_before() -> None:
    job = parse_job({"task_class": "creative", "messages": [{"role": "user", "content": "hi"}]})
    assert RouteQuery.from_job(job).needs == frozenset()
    assert route_job(CATALOG, job).chain == route(CATALOG, RouteQuery("creative")).chain


WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
ASK = [{"role": "user", "content": "weather in Paris?"}]


def test_a_job_with_tools_routes_by_what_it_needs() -> None:
    job = parse_job({"task_class": "cost_free", "messages": ASK, "tools": [WEATHER]})
    assert RouteQuery.from_job(job).needs == TOOLS
    assert route_job(CATALOG, job).chain[0].model == "litellm/deepseek-free"
    # tool_choice "none" sends the tools' definitions but needs no tool calling
    idle = job.model_copy(update={"tool_choice": "none"})
    assert route_job(CATALOG, idle).chain[0].model == OR + "meta-llama/llama-3.1-405b-instruct:free"


def test_a_job_with_a_schema_and_a_video_routes_by_what_it_needs() -> None:
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    job = parse_job({"task_class": "user_facing", "messages": ASK, "response_format": schema})
    with pytest.raises(CapabilityUnavailable) as caught:
        route_job(CATALOG, job)
    assert caught.value.param == "response_format"
    video = {"type": "video_url", "video_url": {"url": "https://example.com/a.mp4"}}
    clip = [{"role": "user", "content": [{"type": "text", "text": "what happens?"}, video]}]
    job = parse_job({"task_class": "fast_general", "messages": clip})
    assert [h.model for h in route_job(CATALOG, job).chain] == ["minimax/MiniMax-Vision-Video-01"]


def test_dispatch_raises_the_capability_error_and_queues_nothing(monkeypatch) -> None:
    from client.dispatch import dispatch

    # Routing refuses the job before any broker is reached (none is configured here).
    monkeypatch.setenv("FLEET_BROKER_URL", "redis://127.0.0.1:1/0")
    job = {"task_class": "vision", "messages": ASK, "tools": [WEATHER]}
    with pytest.raises(InvalidJob) as caught:
        dispatch(job)
    assert isinstance(caught.value, CapabilityUnavailable)
    assert str(caught.value).startswith("no model of chain vision can serve tools: ")
