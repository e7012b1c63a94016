"""The beat schedule: heartbeat and cron jobs stay on the free and local tiers, every entry is
checked when the schedule is built, and a real `celery beat` feeds the test fleet."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from celery.schedules import crontab

from beat_schedule import SCHEDULE, Entry, beat_schedule
from router.catalog import Catalog, load_catalog
from router.errors import ConfigError, NoRouteAvailable
from router.jobs import parse_job
from router.policy import route_job
from workers.runtime.celery_app import create_app
from workers.runtime.sending import TASK_RUN_JOB

ROOT = Path(__file__).resolve().parents[1]
ALLOWED_TIERS = {"free", "local"}
EXPECTED_QUEUE = {"heartbeat": "local", "cron": "free"}


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog()


def test_every_entry_routes_to_free_and_local_only(catalog: Catalog) -> None:
    schedule = beat_schedule(catalog)
    assert set(schedule) == {"heartbeat", "inbox-digest", "nightly-summary"}
    for name, entry in schedule.items():
        assert entry["task"] == TASK_RUN_JOB
        job = parse_job(entry["kwargs"]["job"])
        decision = route_job(catalog, job)
        assert {hop.tier for hop in decision.chain} <= ALLOWED_TIERS, name
        assert entry["options"]["queue"] == decision.queue == EXPECTED_QUEUE[job.source], name
        # Escalation: with every free model in cooldown, only local models remain; with
        # free and local gone, the job is refused rather than sent to a paid model.
        no_free = {m.id: "cooldown" for m in catalog.models if m.tier == "free"}
        assert {h.tier for h in route_job(catalog, job, no_free).chain} == {"local"}, name
        no_cheap = {m.id: "cooldown" for m in catalog.models if m.tier in ALLOWED_TIERS}
        with pytest.raises(NoRouteAvailable):
            route_job(catalog, job, no_cheap)


def test_a_subscription_model_asked_for_by_a_cron_job_is_dropped(catalog: Catalog) -> None:
    greedy = Entry("greedy", 60, {**SCHEDULE[1].job, "model": "zai/glm-4.7"})
    entry = beat_schedule(catalog, entries=[greedy])["greedy"]
    decision = route_job(catalog, parse_job(entry["kwargs"]["job"]))
    why = "tier subscription not allowed for a cron/cost_free job (allowed: free, local)"
    assert ("zai/glm-4.7", why) in decision.dropped
    assert entry["options"]["queue"] == "free"


def test_jobs_carry_no_id_and_their_reprs_no_prompt(catalog: Catalog) -> None:
    for name, entry in beat_schedule(catalog).items():
        job = entry["kwargs"]["job"]
        assert "id" not in job, "every firing must get its own id (the Celery task id)"
        assert job["metadata"]["beat_entry"] == name
        assert job["source"] in ("cron", "heartbeat")
        shown = entry["options"]["argsrepr"] + entry["options"]["kwargsrepr"]
        assert name in shown
        for message in job["messages"]:
            assert message["content"][:20] not in shown
        json.dumps(entry["kwargs"])  # the task serializer is JSON


def test_the_schedule(catalog: Catalog) -> None:
    schedule = beat_schedule(catalog)
    assert schedule["heartbeat"]["schedule"] == 300.0
    hourly, nightly = schedule["inbox-digest"]["schedule"], schedule["nightly-summary"]["schedule"]
    assert isinstance(hourly, crontab) and isinstance(nightly, crontab)
    assert (hourly.minute, hourly.hour) == ({0}, set(range(24)))
    assert (nightly.minute, nightly.hour) == ({0}, {2})
    assert nightly.day_of_week == set(range(7))
    heartbeat = schedule["heartbeat"]["kwargs"]["job"]
    assert heartbeat["task_class"] == "heartbeat" and heartbeat["max_tokens"] <= 16
    for name in ("inbox-digest", "nightly-summary"):
        job = schedule[name]["kwargs"]["job"]
        assert (job["task_class"], job["source"]) == ("cost_free", "cron")
    fast = beat_schedule(catalog, every_s=1.5)
    assert {e["schedule"] for e in fast.values()} == {1.5}


HEARTBEAT = SCHEDULE[0].job


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (Entry("pinned", 60, {**HEARTBEAT, "id": "hb-1"}), "must not set 'id'"),
        (Entry("from-app", 60, {**HEARTBEAT, "source": "app"}), "source must be 'cron'"),
        (
            Entry("no-source", 60, {"task_class": "heartbeat", "messages": HEARTBEAT["messages"]}),
            "source must be 'cron'",
        ),
        (Entry("bad-class", 60, {**HEARTBEAT, "task_class": "chitchat"}), "'task_class'"),
        (Entry("no-messages", 60, {**HEARTBEAT, "messages": []}), "'messages'"),
        (Entry("bad-cron", "0 2 * *", HEARTBEAT), "needs 5 fields"),
        (Entry("bad-hour", "0 25 * * *", HEARTBEAT), "25"),
        (Entry("never", 0, HEARTBEAT), "above 0"),
        (Entry("huge", 60, {**HEARTBEAT, "max_tokens": 50_000_000}), "no usable model"),
    ],
    ids=lambda v: v.name if isinstance(v, Entry) else None,
)
def test_a_broken_entry_fails_loudly_with_its_name(
    catalog: Catalog, entry: Entry, expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        beat_schedule(catalog, entries=[*SCHEDULE, entry])
    assert str(caught.value).startswith(f"beat entry {entry.name!r}: ")
    assert expected in str(caught.value)


def test_duplicate_names_are_refused(catalog: Catalog) -> None:
    with pytest.raises(ConfigError, match="duplicate entry names"):
        beat_schedule(catalog, entries=[SCHEDULE[0], SCHEDULE[0]])


def test_the_app_builds_the_schedule_only_when_beat_reads_it() -> None:
    code = (
        "import sys\n"
        "from workers.runtime.celery_app import create_app\n"
        "app = create_app({'FLEET_BEAT_EVERY_S': '2'})\n"
        "assert 'beat_schedule' not in sys.modules, 'built at import'\n"
        "schedule = dict(app.conf.beat_schedule)\n"
        "assert 'beat_schedule' in sys.modules\n"
        "print(sorted(schedule), sorted({e['schedule'] for e in schedule.values()}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert out.stdout.strip() == "['heartbeat', 'inbox-digest', 'nightly-summary'] [2.0]"


def test_a_bad_every_s_knob_is_refused() -> None:
    with pytest.raises(ConfigError, match="FLEET_BEAT_EVERY_S"):
        create_app({"FLEET_BEAT_EVERY_S": "soon"})
    assert isinstance(create_app({}).conf.beat_schedule["nightly-summary"]["schedule"], crontab)


# --- a real beat process against the test fleet ----------------------------------------------

BEAT_EVERY_S = 2
WAIT_S = 60  # a limit, not a target: the test goes on as soon as the jobs have answered


def _beat_results(client: redis.Redis, since: datetime) -> dict[str, list[dict[str, Any]]]:
    """Final task metas of beat-sent jobs finished after `since`, by beat entry."""
    found: dict[str, list[dict[str, Any]]] = {}
    keys = list(client.scan_iter("celery-task-meta-*", count=1000))
    for raw in client.mget(keys) if keys else []:
        if raw is None:
            continue
        meta = json.loads(raw)
        result = meta.get("result")
        metadata = (result.get("metadata") if isinstance(result, dict) else None) or {}
        entry = metadata.get("beat_entry")
        done = meta.get("date_done")
        final = meta["status"] in ("SUCCESS", "FAILURE")
        if entry and done and final and datetime.fromisoformat(done).replace(tzinfo=UTC) >= since:
            found.setdefault(entry, []).append(meta)
    return found


def _enough(found: dict[str, list[dict[str, Any]]]) -> bool:
    return (
        len(found.get("heartbeat", [])) >= 2
        and bool(found.get("inbox-digest"))
        and bool(found.get("nightly-summary"))
    )


def test_beat_feeds_the_fleet(
    fleet_env: dict[str, str], fleet_workers: Any, redis_server: Any, tmp_path: Path
) -> None:
    beat_dir = tmp_path / "beat"
    beat_dir.mkdir()
    schedule_file = beat_dir / "celerybeat-schedule"
    env = {**fleet_env, "FLEET_BEAT_EVERY_S": str(BEAT_EVERY_S)}
    argv = [sys.executable, "-m", "celery", "-A", "workers.runtime.celery_app", "beat"]
    argv += ["-s", str(schedule_file), "-l", "INFO"]
    client = redis.Redis.from_url(redis_server.url)
    since = datetime.now(UTC)
    started = time.monotonic()
    with open(tmp_path / "beat.log", "wb") as log:
        beat = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=log, stderr=log)
    try:
        found = _beat_results(client, since)
        while not _enough(found) and time.monotonic() - started < WAIT_S:
            assert beat.poll() is None, (tmp_path / "beat.log").read_text()[-3000:]
            time.sleep(0.2)
            found = _beat_results(client, since)
        elapsed = time.monotonic() - started
    finally:
        beat.send_signal(signal.SIGTERM)
        code = beat.wait(20)
        client.close()
    beat_log = (tmp_path / "beat.log").read_text(errors="replace")
    print(f"beat: heartbeat x2 and both cron jobs answered in {elapsed:.1f} s")

    assert _enough(found), (
        f"after {WAIT_S} s: { {k: len(v) for k, v in found.items()} }\n" + (beat_log[-3000:])
    )
    assert code == 0, beat_log[-3000:]
    assert "Sending due task heartbeat (fleet.run_job)" in beat_log

    for metas in found.values():
        for meta in metas:
            assert meta["status"] == "SUCCESS", meta
            result = meta["result"]
            assert result["ok"] and result["text"], result
            assert result["job_id"] == meta["task_id"]  # the worker took the task id
    heartbeats = [m["result"] for m in found["heartbeat"]]
    assert {r["model"] for r in heartbeats} == {"local/qwen3-mlx"}
    assert all(r["queue_path"] == ["local"] and r["source"] == "heartbeat" for r in heartbeats)
    assert len({r["job_id"] for r in heartbeats}) == len(heartbeats)  # one id per firing

    catalog = load_catalog(fleet_env["FLEET_CATALOG"])
    for name in ("inbox-digest", "nightly-summary"):
        for meta in found[name]:
            result = meta["result"]
            assert catalog.model(result["model"]).tier == "free", result["model"]
            assert result["queue_path"] == ["free"] and result["source"] == "cron"

    # The schedule file went where -s said, and nowhere else.
    assert list(beat_dir.glob("celerybeat-schedule*"))
    assert not list(ROOT.glob("celerybeat-schedule*"))
