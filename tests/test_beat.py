"""The beat schedule: heartbeat and cron jobs stay on the free and local tiers, every entry is
checked when the schedule is built, a real `celery beat` feeds the test fleet, and an
entry that cannot run is filed once and shown failing, not filed at every firing."""

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
import yaml
from celery.schedules import crontab

from beat_schedule import SCHEDULE, Entry, beat_schedule
from router.catalog import Catalog, load_catalog
from router.errors import ConfigError, NoRouteAvailable
from router.jobs import parse_job
from router.policy import route_job
from tests.fixtures import Workers, reply_text, url_of, wait_until
from workers.runtime.celery_app import create_app
from workers.runtime.sending import TASK_RUN_JOB
from workers.state import beathealth, keys

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
    argv = [sys.executable, "-m", "celery", "-A", "workers", "beat"]
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


# --- a heartbeat that cannot run: reported once, not filed at every firing ---------------------

FAILING = "beat entry 'heartbeat' failing"
RECOVERED = "beat entry 'heartbeat' recovered"


def _no_model_catalog(fleet_env: dict[str, str], tmp_path: Path) -> Path:
    """The test fleet's catalog with no local model on disk, and no waiting for a resting
    model (max_wait_s 0): a firing that finds every model resting fails at once, as the
    first one did, rather than waiting out the 300 s rest of an unusable model."""
    data = yaml.safe_load(Path(fleet_env["FLEET_CATALOG"]).read_text())
    for model in data["models"]:
        if model["id"].startswith("local/"):
            model["upstream"] = str(tmp_path / "no-model-here")
    data["policy"]["max_wait_s"] = 0
    path = tmp_path / "no-model.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _without_keys(env: dict[str, str], catalog: Path) -> dict[str, str]:
    names = {p.api_key_env for p in load_catalog(catalog).providers.values() if p.api_key_env}
    return {k: v for k, v in env.items() if k not in names}


def _heartbeat(client: redis.Redis) -> dict[str, Any]:
    found = {h["entry"]: h for h in beathealth.entries(client)}
    return found.get("heartbeat", {})


def _letters_by_entry(client: redis.Redis) -> dict[str, int]:
    counts: dict[str, int] = {}
    for raw in client.hvals(keys.DEAD_LETTER):
        entry = json.loads(raw)["job"].get("metadata", {}).get("beat_entry")
        counts[entry] = counts.get(entry, 0) + 1
    return counts


def _fleet(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    fleet_cli = str(Path(sys.executable).with_name("fleet"))
    return subprocess.run([fleet_cli, *args], env=env, capture_output=True, text=True, timeout=60)


def test_a_heartbeat_that_cannot_run_is_filed_once_and_shown_until_it_recovers(
    fleet_env: dict[str, str], fresh_redis: redis.Redis, tmp_path: Path
) -> None:
    # Given a fleet with no API key set and no local model on disk (a fresh `fleet up`),
    # on a Redis database of its own, and a real beat firing every entry every second
    catalog = _no_model_catalog(fleet_env, tmp_path)
    env = {**fleet_env, "FLEET_BROKER_URL": url_of(fresh_redis), "FLEET_CATALOG": str(catalog)}
    broken = Workers(_without_keys(env, catalog), tmp_path / "broken")
    mended = Workers(env, tmp_path / "mended")  # the same, once the keys are set
    broken.start("local", name="hb-local")
    broken.start("free", name="hb-free", concurrency=4)
    beat_env = {**env, "FLEET_BEAT_EVERY_S": "1"}
    argv = [sys.executable, "-m", "celery", "-A", "workers", "beat"]
    argv += ["-s", str(tmp_path / "celerybeat-schedule"), "-l", "INFO"]

    def logs() -> str:  # every worker's log: a change of health is logged by one of them
        keyed = mended.log("hb-free-keyed") if mended.by_label else ""
        return broken.log("hb-local") + broken.log("hb-free") + keyed

    try:
        broken.wait_ready()
        with open(tmp_path / "beat.log", "wb") as log:
            beat = subprocess.Popen(argv, env=beat_env, cwd=tmp_path, stdout=log, stderr=log)
        # When the heartbeat has failed at least 4 times
        failing = wait_until(
            lambda: (h := _heartbeat(fresh_redis)).get("repeats", 0) >= 3 and h,
            60,
            "four failed heartbeats",
        )
        # Then one dead letter was filed for it, and the failure logged once
        assert failing["failing"] is True
        assert _letters_by_entry(fresh_redis)["heartbeat"] == 1
        assert failing["dead_letter"] in {
            reply_text(k) for k in fresh_redis.hkeys(keys.DEAD_LETTER)
        }
        assert logs().count(FAILING) == 1, logs()[-3000:]
        # (its local models skipped as missing, its free model blocked for want of a key)
        assert "model_missing" in failing["reason"] and "no key: set" in failing["reason"]
        # And `fleet status` shows it failing, since when, why and how often
        status = json.loads(_fleet(env, "status", "--json").stdout)
        shown = {b["entry"]: b for b in status["beat"]}["heartbeat"]
        assert shown["failing"] is True and shown["repeats"] >= 3
        assert shown["since"] == failing["since"] and shown["reason"]
        human = _fleet(env, "status").stdout
        assert "failing since" in human and "repeats" in human, human
        assert ":free:" in human  # a cron entry's reason names OpenRouter's models as they are

        # When the keys are set and the free queue's worker restarted with them
        broken.supervisor.stop_child(broken.by_label["hb-free"])
        mended.start("free", name="hb-free-keyed", concurrency=4)
        mended.wait_ready()
        # Then the next heartbeat answers, and the entry is seen recovered
        recovered = wait_until(
            lambda: (h := _heartbeat(fresh_redis)).get("recovered_at") and h,
            60,
            "the heartbeat recovered",
        )
        time.sleep(2)  # two more firings: they change nothing but `last_ok_at`
    finally:
        if "beat" in locals():
            beat.send_signal(signal.SIGTERM)
            beat.wait(20)
        mended.stop()
        broken.stop()
    assert recovered["failing"] is False and recovered["repeats"] >= 3
    assert logs().count(RECOVERED) == 1 and logs().count(FAILING) == 1
    assert _letters_by_entry(fresh_redis)["heartbeat"] == 1  # still the one
    status = json.loads(_fleet(env, "status", "--json").stdout)
    shown = {b["entry"]: b for b in status["beat"]}["heartbeat"]
    assert shown["failing"] is False and shown["recovered_at"] == recovered["recovered_at"]
    assert "recovered at" in _fleet(env, "status").stdout
    # The cron entries, which could not run either, were filed once each as well
    letters = _letters_by_entry(fresh_redis)
    assert letters.get("inbox-digest", 0) <= 1 and letters.get("nightly-summary", 0) <= 1
    beat_log = (tmp_path / "beat.log").read_text(errors="replace")
    assert beat_log.count("Sending due task heartbeat") >= 5


def _end(backend: Any, job_id: str, run: beathealth.BeatRun) -> None:
    """A beat job's final state, written as its worker writes it (store_result.lua)."""
    from celery import states

    from router.errors import JobFailed
    from workers.runtime.resultstore import Bookkeeping, attach
    from workers.state import deadletter

    job = {"id": job_id, "task_class": "heartbeat", "source": "heartbeat"}
    letter = "" if run.ok else deadletter.entry(job, {"error": run.reason})
    attach(job_id, Bookkeeping(dead_letter=letter, beat=run))
    if run.ok:
        backend.store_result(job_id, {"ok": True}, states.SUCCESS)
    else:
        backend.store_result(job_id, JobFailed(run.reason, {"ok": False}), states.FAILURE)


def test_an_entry_files_each_new_cause_once_and_counts_the_repeats(
    fresh_redis: redis.Redis,
) -> None:
    backend = create_app({"FLEET_BROKER_URL": url_of(fresh_redis)}).backend
    no_key = beathealth.BeatRun("heartbeat", False, "m: no_key", "every model failed: no key")
    no_model = beathealth.BeatRun("heartbeat", False, "m: not_found", "every model failed: gone")
    answered = beathealth.BeatRun("heartbeat", True)

    def filed() -> list[str]:
        return sorted(reply_text(k) for k in fresh_redis.hkeys(keys.DEAD_LETTER))

    _end(backend, "j1", no_key)  # starts failing: filed
    _end(backend, "j2", no_key)  # the same cause: counted
    _end(backend, "j2", no_key)  # the same final state written twice: nothing more
    _end(backend, "j3", no_model)  # a new cause: filed
    _end(backend, "j4", no_key)  # a cause seen in this spell: counted
    health = _heartbeat(fresh_redis)
    assert filed() == ["j1", "j3"]
    assert (health["failing"], health["repeats"], health["dead_letter"]) == (True, 2, "j3")
    assert health["reason"] == no_key.reason  # the latest failure's
    since = health["since"]
    _end(backend, "j5", answered)
    health = _heartbeat(fresh_redis)
    assert (health["failing"], health["since"], health["repeats"]) == (False, since, 2)
    assert health["recovered_at"] >= since
    # A new failing spell starts afresh: its first failure is filed, whatever its cause
    _end(backend, "j6", no_key)
    health = _heartbeat(fresh_redis)
    assert filed() == ["j1", "j3", "j6"]
    assert (health["failing"], health["repeats"]) == (True, 0) and "recovered_at" not in health
    assert health["since"] > since


def test_a_cause_is_the_same_whether_a_model_failed_again_or_is_still_resting() -> None:
    from router.results import Attempt, Outcome, Result

    def attempt(model: str, kind: str, outcome: Outcome = "error") -> Attempt:
        return Attempt(
            number=1,
            model=model,
            queue="local",
            tier="local",
            outcome=outcome,
            error_kind=kind,
            error="...",
            action="next",
            started_at=0.0,
        )

    def failed(error: str, *attempts: Attempt) -> Result:
        return Result(
            job_id="j",
            task_class="heartbeat",
            source="heartbeat",
            ok=False,
            error=error,
            attempts=list(attempts),
        )

    free = "openrouter/meta-llama/llama-3.1-405b-instruct:free"
    first = failed(
        f"every model failed: local/qwen3-mlx: not_found (no MLX model at /m); {free}: no_key"
        " (OPENROUTER_API_KEY is not set)",
        attempt("local/qwen3-mlx", "not_found"),
        attempt(free, "no_key", "skipped"),
    )
    later = failed(
        "no usable model (local/qwen3-mlx: cooldown until 10:05:01 UTC (not_found)); tried:"
        f" every model failed: {free}: no_key (OPENROUTER_API_KEY is not set)",
        attempt(free, "no_key", "skipped"),
    )
    assert beathealth.cause(first) == beathealth.cause(later)
    assert beathealth.cause(first) == f"local/qwen3-mlx: not_found; {free}: no_key"
    limited = failed(
        f"no usable model ({free}: provider limit requests/day (50) full until 00:00:00 UTC)"
    )
    assert beathealth.cause(limited) == f"{free}: provider_limit_requests/day_(#)_full"
    assert beathealth.cause(failed("delivered 4 times without finishing")) == (
        "delivered # times without finishing"
    )
