"""Thread engine: tasks run in threads of the agent process (cheapest; no isolation)."""

from __future__ import annotations

from gc_agent.engines.base import SlotPool
from gc_agent.execution import FunctionCache, Job, run_job

__all__ = ["ThreadEngine"]


class ThreadEngine(SlotPool):
    """Runs each task in one of ``max_workers`` threads."""

    name = "threads"

    def __init__(self, max_workers: int) -> None:
        super().__init__(max_workers)
        self._functions: FunctionCache = {}

    def _run_batch(self, slot: int, jobs: list[Job], *, sent: bool) -> None:
        for job in jobs:  # one, since a thread takes one job at a time (_batch_limit)
            self._report(job.task_id, run_job(job, self._functions))
