"""Hypothesis strategies for malformed jobs: a valid job with exactly one thing wrong
(or something that is not a job at all), paired with the field the refusal must name."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from router.catalog import SOURCES, TASK_CLASSES, load_catalog
from router.jobs import Job

BASE: dict[str, Any] = {
    "task_class": "cost_free",
    "messages": [{"role": "user", "content": "hello"}],
}
# Text that no parser reads as a number, a date or a boolean ("inf", "nan", "true", "no",
# "yes", "on", "off", "1e3" all avoid this alphabet or are filtered out).
WORD = st.text(alphabet="abcdghjkmpqrsuvwxz", min_size=1, max_size=12)
JUNK = st.one_of(
    st.lists(st.integers(), max_size=3),
    st.fixed_dictionaries({"a": st.integers()}),
)
NAME = st.from_regex(r"[a-z_][a-z0-9_]{0,20}", fullmatch=True)
LONG = st.text(alphabet="abcxyz019_", min_size=201, max_size=2_000)
BAD_ID_CHARS = " /?#%&*()[]{}'\"\\!@$^+=<>,;|~`"


def _catalog_names() -> tuple[set[str], set[str], set[str]]:
    catalog = load_catalog()
    return (
        set(catalog.policy.focus),
        set(catalog.policy.profiles),
        {m.id for m in catalog.models},
    )


FOCUS, PROFILES, MODELS = _catalog_names()


def _bad_values() -> dict[str, st.SearchStrategy[Any]]:
    """Per top-level field: values it must refuse."""
    non_integral = st.floats(min_value=0.01, max_value=1e6).filter(lambda f: not f.is_integer())
    return {
        "task_class": st.one_of(
            WORD.filter(lambda s: s not in TASK_CLASSES),
            st.integers(),
            st.none(),
            st.booleans(),
            JUNK,
            LONG,
        ),
        "messages": st.one_of(
            st.just([]),
            WORD,
            st.integers(),
            st.none(),
            st.lists(st.integers(), min_size=1, max_size=3),
            st.just({"role": "user"}),
        ),
        "focus": st.one_of(
            WORD.filter(lambda s: s not in FOCUS), st.integers(), st.booleans(), JUNK
        ),
        "profile": st.one_of(
            WORD.filter(lambda s: s not in PROFILES), st.integers(), st.booleans(), JUNK
        ),
        "model": st.one_of(
            WORD.map(lambda s: f"nope/{s}").filter(lambda s: s not in MODELS),
            st.integers(),
            st.booleans(),
            JUNK,
        ),
        "temperature": st.one_of(
            st.floats(max_value=-1e-6, allow_nan=False),
            st.floats(min_value=2.000001, allow_nan=False),
            st.just(float("nan")),
            WORD,
            st.booleans(),
            JUNK,
        ),
        "max_tokens": st.one_of(
            st.integers(max_value=0),
            non_integral,
            WORD,
            st.booleans(),
            JUNK,
            st.just(1e30),
        ),
        "priority": st.one_of(
            st.integers(max_value=-1),
            st.integers(min_value=10),
            non_integral,
            WORD,
            st.booleans(),
            JUNK,
        ),
        "source": st.one_of(WORD.filter(lambda s: s not in SOURCES), st.integers(), JUNK),
        "id": st.one_of(
            st.just(""),
            LONG,
            st.integers(),
            JUNK,
            st.tuples(WORD, st.text(alphabet=BAD_ID_CHARS, min_size=1, max_size=5)).map("".join),
        ),
        "idempotency_key": st.one_of(st.just(""), LONG, st.integers(), JUNK),
        "deadline": st.one_of(WORD, st.booleans(), JUNK, st.just("2024-13-45T99:00:00")),
        "metadata": st.one_of(
            WORD,
            st.integers(),
            st.lists(st.integers(), max_size=3),
            st.dictionaries(WORD, st.lists(st.integers(), max_size=2), min_size=1, max_size=2),
        ),
    }


def _bad_message() -> st.SearchStrategy[Any]:
    ok = {"role": "user", "content": "hi"}
    return st.one_of(
        WORD,
        st.integers(),
        st.none(),
        WORD.filter(lambda s: s not in ("system", "developer", "user", "assistant", "tool")).map(
            lambda r: {**ok, "role": r}
        ),
        st.sampled_from([[], None, 5, {"text": "hi"}]).map(lambda c: {**ok, "content": c}),
        st.just({"role": "user"}),
        st.just({"content": "hi"}),
        NAME.filter(lambda n: n not in ("role", "content", "name")).map(lambda n: {**ok, n: 1}),
    )


def _bad_part() -> st.SearchStrategy[Any]:
    return st.sampled_from(
        [
            {"type": "image_url"},
            {"type": "image_url", "image_url": {"url": ""}},
            {"type": "image_url", "image_url": "https://example.com/a.png"},
            {"type": "image_url", "image_url": {"url": "x", "detail": "ultra"}},
            {"type": "image_url", "image_url": {"url": "x", "size": 3}},
            {"type": "video_url", "video_url": "https://example.com/a.mp4"},
            {"type": "video_url", "video_url": {"url": ""}},
            {"type": "text"},
            {"type": "text", "text": 5},
            {"type": "text", "text": "hi", "extra": True},
            {"text": "no type"},
            "a bare string",
            7,
        ]
    )


def malformed_jobs() -> st.SearchStrategy[tuple[Any, str]]:
    """(job, the field its refusal must name)."""
    values = _bad_values()
    wrong_value = st.sampled_from(sorted(values)).flatmap(
        lambda field: values[field].map(lambda v: ({**BASE, field: v}, field))
    )
    missing = st.sampled_from(["task_class", "messages"]).map(
        lambda field: ({k: v for k, v in BASE.items() if k != field}, field)
    )
    unknown = st.tuples(NAME.filter(lambda n: n not in Job.model_fields), JUNK | WORD).map(
        lambda pair: ({**BASE, pair[0]: pair[1]}, pair[0])
    )
    bad_message = _bad_message().map(
        lambda m: ({**BASE, "messages": [{"role": "user", "content": "hi"}, m]}, "messages")
    )
    bad_part = _bad_part().map(
        lambda p: (
            {**BASE, "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, p]}]},
            "messages",
        )
    )
    not_a_job = st.one_of(st.none(), st.integers(), WORD, st.lists(st.integers(), max_size=3))
    return st.one_of(
        wrong_value, missing, unknown, bad_message, bad_part, not_a_job.map(lambda j: (j, "job"))
    )
