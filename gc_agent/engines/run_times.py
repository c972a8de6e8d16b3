"""How long each function's runs took lately, so that an engine sends quick jobs on together.

A worker that runs several jobs one after another holds back each one's result (htex: all
come back at the end) or its start (a job behind another cannot be cancelled without
stopping the worker): worth it only for jobs so quick that the cost of sending each alone
is larger. An engine therefore groups jobs only while their functions' recent runs add up
to a small budget, a job of a function it has not seen run goes alone, and a group holds
one user's jobs (a run slower than its function's so far holds back that user's only).
"""

from __future__ import annotations

import collections

from gc_agent.execution import Job, Outcome

__all__ = ["MAX_FUNCTIONS_TIMED", "RUNS_TIMED", "RunTimes"]

#: Functions whose run times are kept (all are forgotten past that: an endpoint serves far
#: fewer, and a function's id comes from whoever submits).
MAX_FUNCTIONS_TIMED = 10_000
#: Runs of each function whose times are kept.
RUNS_TIMED = 7


class RunTimes:
    """The median of each function's last few runs, so that one run far off (the first on a
    worker loads the function and imports what it needs) does not decide, and a function slow
    as often as not counts as slow. Not thread-safe: the engine's lock guards it."""

    def __init__(self) -> None:
        self._recent: dict[str, collections.deque[float]] = {}
        self._median: dict[str, float] = {}

    def note(self, function_id: str, outcome: Outcome) -> None:
        """Count the run ``outcome`` reports (one with no start or end, a lost one, does not)."""
        if outcome.started is None or outcome.finished is None:
            return
        recent = self._recent.get(function_id)
        if recent is None:
            if len(self._recent) >= MAX_FUNCTIONS_TIMED:
                self._recent.clear()
                self._median.clear()
            recent = self._recent[function_id] = collections.deque(maxlen=RUNS_TIMED)
        recent.append(max(0.0, outcome.finished - outcome.started))
        # (of an even count, the longer of the two middle runs)
        self._median[function_id] = sorted(recent)[len(recent) // 2]

    def added(self, seconds: float, job: Job, first: Job | None,
              budget: float | None) -> float | None:
        """The seconds of a group (``seconds`` so far, ``first`` its first job, None while it
        is empty) with ``job`` added, if it stays within ``budget``; None if it would not,
        if ``job`` is another user's than ``first``, or if its function has not run yet (a
        budget of 0 groups nothing; None bounds nothing, and needs no run seen)."""
        if first is not None and job.identity != first.identity:
            return None
        if budget is None:
            return seconds
        expected = self._median.get(job.function_id)
        if expected is None or budget <= 0 or seconds + expected > budget:
            return None
        return seconds + expected
