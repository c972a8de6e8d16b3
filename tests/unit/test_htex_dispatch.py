"""The htex engine's own bookkeeping between its queue and Parsl, without Parsl running."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("parsl", reason="the htex engine needs Parsl (pip install parsl)")

from gc_agent.config import HtexEngineConfig
from gc_agent.engines.htex import HtexEngine
from gc_agent.execution import Outcome
from gc_agent.providers import LocalProviderConfig
from tests.unit.test_execution import a_job


def noop() -> None:
    """Nothing: the engine never gets as far as running it."""


class CancelledWhileSent(HtexEngine):
    """An engine whose job is cancelled just as it goes to Parsl: taken from the queue, not
    yet submitted (the agent's cancel comes on another thread, at any moment)."""

    def _launch(self, bundle: list[Any]) -> None:
        self.cancel_result = self.cancel(bundle[0].job.task_id)
        super()._launch(bundle)


def test_a_job_cancelled_as_it_goes_to_parsl_is_answered_cancelled_once(tmp_path: Path) -> None:
    # (not started: no interchange; the submit itself fails, and that answer is dropped)
    engine = CancelledWhileSent(HtexEngineConfig(type="htex", provider=LocalProviderConfig(
        init_blocks=0, min_blocks=0, max_blocks=1)), tmp_path)
    answers: list[Outcome] = []

    engine.submit(a_job(noop), answers.append)

    assert engine.cancel_result == "abandoned"
    assert [answer.state for answer in answers] == ["cancelled"]
    assert engine.status()["tasks_at_parsl"] == 0


def test_every_waiting_job_is_answered_when_parsl_refuses_them_all(tmp_path: Path) -> None:
    # (every block failed, say, so that each submit to Parsl fails at once: here there is
    # no interchange at all)
    engine = HtexEngine(HtexEngineConfig(type="htex", provider=LocalProviderConfig(
        init_blocks=0, min_blocks=0, max_blocks=1)), tmp_path)
    answers: list[Outcome] = []

    with engine.together():  # a backlog of 3,000, as a sweep's batches leave
        for _ in range(3000):
            engine.submit(a_job(noop), answers.append)

    assert len(answers) == 3000
    assert {answer.state for answer in answers} == {"failed"}
    assert engine.status()["tasks_at_parsl"] == engine.status()["tasks_waiting"] == 0
