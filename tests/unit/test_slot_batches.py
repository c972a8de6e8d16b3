"""Which waiting jobs a slot takes at once: several only of functions known to be quick.

A slot pool whose slots record each batch they are handed and answer each job at once,
with the run time its function is given here, so that the batches a backlog forms can be
read exactly.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest

from gc_agent.engines.base import OnDone, SlotPool
from gc_agent.execution import Job, Outcome
from tests.fabric import eventually

#: Seconds each function's runs take, as the recording slots report them.
RUN_SECONDS = {"quick": 0.001, "slow": 0.5}


class RecordingPool(SlotPool):
    """One slot, batching as the process engine does, that runs nothing: it notes each batch
    and answers each job with a run of its function's time."""

    name = "recording"
    _batch_limit = 8
    _batch_seconds = 0.02

    def __init__(self) -> None:
        super().__init__(1)
        self.batches: list[list[str]] = []

    def _run_batch(self, slot: int, jobs: list[Job], *, sent: bool) -> None:
        self.batches.append([f"{job.identity}:{job.function_id}" if job.identity
                             else job.function_id for job in jobs])
        for job in jobs:
            now = time.time()
            self._report(job.task_id, Outcome(job.task_id, "success", started=now,
                                              finished=now + RUN_SECONDS[job.function_id]))

    def run(self, functions: list[str]) -> list[list[str]]:
        """Submit a job of each function (``user:function`` for another user's) while the
        slot is busy; the batches they formed."""
        self.batches.clear()
        answers: list[Outcome] = []
        with self._lock:  # the slot cannot claim until all wait
            for function in functions:
                identity, _, function_id = function.rpartition(":")
                self._waiting_job(identity, function_id, answers.append)
        self._wake_idle()
        eventually(lambda: len(answers) == len(functions), 10, "every answer")
        return list(self.batches)

    def _waiting_job(self, identity: str, function_id: str, on_done: OnDone) -> None:
        job = Job(task_id=str(uuid.uuid4()), function_id=function_id, function_payload=b"",
                  function_python="", content_type="", payload=b"", sender_python="",
                  sender_serializer="", identity=identity)
        self._waiting[job.task_id] = (job, on_done)
        self._backlog.append(job.task_id)


@pytest.fixture
def pool() -> Iterator[RecordingPool]:
    pool = RecordingPool()
    pool.start()
    yield pool
    pool.shutdown()


def test_a_job_of_a_function_not_seen_run_goes_alone_and_the_next_ones_together(
        pool: RecordingPool) -> None:
    assert pool.run(["quick"] * 3) == [["quick"], ["quick", "quick"]]


def test_a_backlog_of_a_function_known_to_be_quick_goes_several_at_a_time(
        pool: RecordingPool) -> None:
    pool.run(["quick"])

    assert pool.run(["quick"] * 12) == [["quick"] * 8, ["quick"] * 4]


def test_jobs_of_a_function_known_to_be_slow_go_one_at_a_time_and_end_a_quick_batch(
        pool: RecordingPool) -> None:
    pool.run(["quick", "slow"])

    assert pool.run(["quick", "quick", "slow", "slow", "quick"]) == [
        ["quick", "quick"], ["slow"], ["slow"], ["quick"]]


def test_jobs_of_different_users_never_share_a_batch(pool: RecordingPool) -> None:
    # (a function quick so far may be slow this time: it holds back its own user's jobs only)
    pool.run(["quick"])

    assert pool.run(["alice:quick", "alice:quick", "bob:quick", "alice:quick"]) == [
        ["alice:quick", "alice:quick"], ["bob:quick"], ["alice:quick"]]
