"""The short forms of the kill and partition scenarios (kills.py, partition.py): the
fleet's transport loses nothing, answers each job once and bills each delivered run once.
The long forms, with kombu's stock channel beside it: `python -m tests.chaos.report --long`."""

from __future__ import annotations

from pathlib import Path

import pytest

from .harness import Tally
from .kills import SHORT_KILLS, random_kills
from .partition import partition

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def summary(tally: Tally) -> str:
    return "\n".join([f"{tally.scenario}: {'; '.join(tally.notes)}", *tally.problems[:30]])


def test_random_kills_lose_no_job(tmp_path: Path) -> None:
    tally = random_kills(tmp_path, transport="fleet", kills=SHORT_KILLS)
    assert tally.jobs > 0 and not tally.problems, summary(tally)
    counts = (tally.lost, tally.duplicated, tally.called_twice, tally.double_billed, tally.wrong)
    assert counts == (0, 0, 0, 0, 0), summary(tally)
    assert tally.answered == tally.jobs, summary(tally)


def test_a_partitioned_worker_loses_no_job(tmp_path: Path) -> None:
    tally = partition(tmp_path, cut_s=12)
    assert tally.jobs > 0 and not tally.problems, summary(tally)
    counts = (tally.lost, tally.duplicated, tally.called_twice, tally.double_billed, tally.wrong)
    assert counts == (0, 0, 0, 0, 0), summary(tally)
    assert tally.answered == tally.jobs, summary(tally)
