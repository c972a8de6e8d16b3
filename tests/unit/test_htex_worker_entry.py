"""The htex engine's entry on Parsl's workers: found by name, as Parsl's pool finds it, and
running a pickled job to its pickled outcome."""

from __future__ import annotations

import importlib
import os
import pickle
import socket

from gc_agent.engines.htex import WORKER_ENTRY
from gc_agent.execution import Job, Outcome
from gc_core.serialize import CLOUDPICKLE
from tests.unit.test_execution import a_job


def power(base: int, exponent: int = 2) -> int:
    return int(base ** exponent)


def run_as_parsl_does(job: Job) -> Outcome:
    """Resolve the entry as Parsl's pool resolves a task_executor (module, then name), give
    it the job as the engine sends it, and unpickle what it returns."""
    module, _, name = WORKER_ENTRY.rpartition(".")
    entry = getattr(importlib.import_module(module), name)
    outcome = pickle.loads(entry(pickle.dumps(job)))
    assert isinstance(outcome, Outcome)
    return outcome


def test_the_worker_entry_runs_a_pickled_job_to_its_pickled_outcome() -> None:
    job = a_job(power, 3, exponent=4)

    outcome = run_as_parsl_does(job)

    # The outcome is the job's, with its value and the worker that ran it
    assert (outcome.task_id, outcome.state, outcome.error) == (job.task_id, "success", None)
    assert CLOUDPICKLE.loads(outcome.payload) == 81
    assert outcome.worker.startswith(f"{socket.gethostname()}:{os.getpid()}")


def test_a_job_that_raises_comes_back_as_a_failed_outcome_not_a_worker_error() -> None:
    outcome = run_as_parsl_does(a_job(power, "three"))

    assert outcome.state == "failed"
    assert outcome.error is not None and outcome.error.type == "TypeError"
