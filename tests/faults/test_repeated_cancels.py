"""A cancel can reach an engine more than once (an endpoint's commands come through the
agent's own queue and, maybe, the shared one; a user may press cancel twice): the job is
still answered once, and the second cancel touches nothing else."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gc_agent.engines.base import SlotPool
from gc_agent.engines.processes import ProcessEngine
from gc_agent.engines.threads import ThreadEngine
from tests.fabric import eventually
from tests.faults.test_worker_batches import OUTCOME_TIMEOUT, _job, _Outcomes, _value, echo


def run_until_released(started: str, release: str) -> str:
    """Mark that it runs, then wait for ``release`` to exist (a thread cannot be killed)."""
    import pathlib
    import time

    pathlib.Path(started).write_text("running")
    while not pathlib.Path(release).exists():
        time.sleep(0.01)
    return "released"


@pytest.fixture(params=["threads", "processes"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SlotPool]:
    engine: SlotPool = ThreadEngine(1) if request.param == "threads" else ProcessEngine(1)
    engine.start()
    yield engine
    (tmp_path / "release").touch()
    engine.shutdown()


def test_a_running_job_cancelled_twice_is_answered_once(engine: SlotPool,
                                                        tmp_path: Path) -> None:
    started, release = tmp_path / "started", tmp_path / "release"
    outcomes = _Outcomes()
    job = _job(run_until_released, str(started), str(release))
    engine.submit(job, outcomes.on_done)
    eventually(started.exists, OUTCOME_TIMEOUT, "the job to start")
    first = engine.cancel(job.task_id)
    assert engine.cancel(job.task_id) in ("already", "unknown")
    assert first in ("interrupted", "abandoned")
    release.touch()
    assert outcomes.each_once([job])[job.task_id].state == "cancelled"
    # and the slot goes on with the next job, which no late cancel stops
    after = _job(echo, "after")
    engine.submit(after, outcomes.on_done)
    assert _value(outcomes.each_once([after])[after.task_id]) == "after"
