"""The short forms of the kill, partition and recovery scenarios (kills.py, partition.py,
recovery.py): the fleet's transport loses nothing, answers each job once, calls it once
while its worker lives, bills each delivered run once, and gives a killed worker's jobs
back within seconds. The long forms, with kombu's stock channel (and RabbitMQ, for
recovery) beside it: `python -m tests.chaos.report --long`."""

from __future__ import annotations

from pathlib import Path

import pytest

from .harness import Tally
from .kills import SHORT_KILLS, random_kills
from .partition import partition
from .recovery import BOUND_S, BROKERS, recovery_short
from .recovery import SHORT_KILLS as RECOVERY_KILLS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def summary(tally: Tally) -> str:
    return "\n".join([f"{tally.scenario}: {'; '.join(tally.notes)}", *tally.problems[:30]])


def zeros(tally: Tally) -> tuple[int, ...]:
    """What no run on the fleet's transport may have: lost, duplicated, called twice,
    billed for calls never made, answered otherwise than documented."""
    return (tally.lost, tally.duplicated, tally.called_twice, tally.double_billed, tally.wrong)


def test_random_kills_lose_no_job(tmp_path: Path) -> None:
    tally = random_kills(tmp_path, transport="fleet", kills=SHORT_KILLS)
    assert tally.jobs > 0 and not tally.problems, summary(tally)
    assert zeros(tally) == (0, 0, 0, 0, 0), summary(tally)
    assert tally.answered == tally.jobs, summary(tally)


def test_a_partitioned_worker_loses_no_job(tmp_path: Path) -> None:
    tally = partition(tmp_path, cut_s=12)
    assert tally.jobs > 0 and not tally.problems, summary(tally)
    assert zeros(tally) == (0, 0, 0, 0, 0), summary(tally)
    assert tally.answered == tally.jobs, summary(tally)


@pytest.mark.parametrize("broker", BROKERS)
def test_a_killed_workers_jobs_come_back(broker: str, tmp_path: Path) -> None:
    # Every broker: the kills struck a worker holding jobs mid-call, each time.
    tally = recovery_short(tmp_path, broker_name=broker)
    found = tally.recovery
    assert found is not None and len(found.kills) == RECOVERY_KILLS, summary(tally)
    assert all(kill.held for kill in found.kills), summary(tally)
    if broker != "fleet":
        return  # kombu's stock channel and RabbitMQ: the baselines, measured, not held to it
    # The fleet's transport: every job a killed worker held answered within BOUND_S, and
    # the run as clean as any other
    worst = max(kill.seconds for kill in found.kills)
    assert worst <= BOUND_S, f"worst recovery {found.seconds(worst)} s\n{summary(tally)}"
    assert not tally.problems, summary(tally)
    assert zeros(tally) == (0, 0, 0, 0, 0), summary(tally)
    assert tally.answered == tally.jobs, summary(tally)
