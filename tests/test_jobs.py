"""Jobs are validated at the door: one line naming the field, the bad value, the choices."""

from __future__ import annotations

import pytest

from router import InvalidJob, Job, parse_job

TEXT = [{"role": "user", "content": "hello"}]


def job(**fields):
    return {"task_class": "creative", "messages": TEXT, **fields}


def test_a_full_job_parses() -> None:
    parsed = parse_job(
        job(
            messages=[
                {"role": "system", "content": "be brief"},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this?"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
                    ],
                },
            ],
            focus="creative",
            profile="social",
            model="litellm/kimi",
            temperature=0.4,
            max_tokens=100,
            source="sub-agent",
            priority=2,
            idempotency_key="digest-2026-11-23",
            deadline="2026-11-23T10:00:00Z",
            metadata={"app": "inbox", "n": 3},
        )
    )
    assert parsed.has_image
    assert parsed.source == "sub-agent"
    assert len(parsed.id) == 32
    assert parsed.prompt_tokens() > 1000  # an image part is charged as one


def test_defaults() -> None:
    parsed = parse_job(job())
    assert (parsed.source, parsed.priority, parsed.has_image) == ("app", 5, False)
    assert parse_job(parsed) is parsed
    assert isinstance(parsed, Job)


@pytest.mark.parametrize(
    ("fields", "needles"),
    [
        ({"task_class": "poetry"}, ["'task_class'", "'complex_reasoning'", "'poetry'"]),
        ({"source": "web"}, ["'source'", "'app', 'cron', 'heartbeat' or 'sub-agent'", "'web'"]),
        ({"temperature": 3}, ["'temperature'", "less than or equal to 2", "3"]),
        ({"max_tokens": 0}, ["'max_tokens'", "greater than 0"]),
        ({"priority": 11}, ["'priority'", "less than or equal to 9"]),
        ({"messages": []}, ["'messages'", "at least 1"]),
        ({"messages": [{"role": "bot", "content": "x"}]}, ["'messages.0.role'", "'bot'"]),
        (
            {"messages": [{"role": "user", "content": [{"type": "video"}]}]},
            ["'messages.0.content.0'", "'video'", "'text', 'image_url'"],
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            ["'messages.0.content.0.image_url.url' is required"],
        ),
        ({"colour": "red"}, ["'colour' is unknown", "valid: app, deadline, focus, id"]),
        ({"metadata": {"k": [1]}}, ["'metadata.k"]),
        ({"id": "has space"}, ["'id'", "pattern"]),
    ],
)
def test_bad_jobs_are_refused_in_one_line(fields: dict, needles: list[str]) -> None:
    with pytest.raises(InvalidJob) as caught:
        parse_job(job(**fields))
    message = str(caught.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_missing_task_class() -> None:
    with pytest.raises(InvalidJob, match="'task_class' is required"):
        parse_job({"messages": TEXT})
