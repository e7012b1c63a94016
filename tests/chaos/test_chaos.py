"""The chaos scenarios as tests: each must end with every job answered or dead-lettered
exactly once, billed once, and nothing else broken (see harness.py for the audit)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .scenarios import SCENARIOS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario(name: str, tmp_path: Path) -> None:
    tally = SCENARIOS[name](tmp_path)
    summary = (
        f"{tally.scenario}: {tally.jobs} jobs, {tally.answered} answered,"
        f" {tally.dead_lettered} dead-lettered, {tally.lost} lost, {tally.duplicated}"
        f" duplicated, {tally.double_billed} double-billed, {tally.wrong} wrong"
    )
    assert tally.jobs > 0, summary
    assert not tally.problems, "\n".join([summary, *tally.problems[:30]])
    assert (tally.lost, tally.duplicated, tally.double_billed, tally.wrong) == (0, 0, 0, 0)
    if name != "input":  # (its jobs are all refused at the door)
        assert tally.answered + tally.dead_lettered == tally.jobs, summary
