"""The htex engine's entry on Parsl's workers: found by name, as Parsl's pool finds it, and
running a pickled list of jobs (a bundle) to the pickled list of their outcomes."""

from __future__ import annotations

import importlib
import multiprocessing
import os
import pickle
import socket
import threading

from gc_agent.engines.htex import WORKER_ENTRY
from gc_agent.execution import Job, Outcome
from gc_core.serialize import CLOUDPICKLE
from tests.unit.test_execution import a_job


def power(base: int, exponent: int = 2) -> int:
    return int(base ** exponent)


def printing_square(x: int) -> tuple[int, str]:
    """Print, then leave the worker in another directory."""
    print(f"square of {x}")
    where = os.getcwd()
    os.chdir("/")
    return x * x, where


def run_as_parsl_does(*jobs: Job) -> list[Outcome]:
    """Resolve the entry as Parsl's pool resolves a task_executor (module, then name), give
    it the jobs as the engine sends them (a bundle), and unpickle what it returns."""
    module, _, name = WORKER_ENTRY.rpartition(".")
    entry = getattr(importlib.import_module(module), name)
    outcomes = pickle.loads(entry(pickle.dumps(list(jobs))))
    assert all(isinstance(outcome, Outcome) for outcome in outcomes)
    return list(outcomes)


def test_the_worker_entry_runs_a_pickled_job_to_its_pickled_outcome() -> None:
    job = a_job(power, 3, exponent=4)

    [outcome] = run_as_parsl_does(job)

    # The outcome is the job's, with its value and the worker that ran it
    assert (outcome.task_id, outcome.state, outcome.error) == (job.task_id, "success", None)
    assert CLOUDPICKLE.loads(outcome.payload) == 81
    assert outcome.worker.startswith(f"{socket.gethostname()}:{os.getpid()}")


def test_a_job_that_raises_comes_back_as_a_failed_outcome_not_a_worker_error() -> None:
    [outcome] = run_as_parsl_does(a_job(power, "three"))

    assert outcome.state == "failed"
    assert outcome.error is not None and outcome.error.type == "TypeError"


def test_a_bundle_of_jobs_gives_each_its_own_outcome_output_and_starting_state() -> None:
    home = os.getcwd()
    jobs = [a_job(printing_square, x, function_id="printing-square") for x in range(3)]

    try:
        outcomes = run_as_parsl_does(*jobs)
    finally:
        os.chdir(home)

    # One outcome per job, in order, each with its own value and only its own output
    assert [outcome.task_id for outcome in outcomes] == [job.task_id for job in jobs]
    values, places = zip(*(CLOUDPICKLE.loads(outcome.payload) for outcome in outcomes))
    assert values == (0, 1, 4)
    assert [outcome.stdout for outcome in outcomes] == [f"square of {x}\n" for x in range(3)]
    # and each started where the worker did, not where the one before it left it
    assert len(set(places)) == 1 and "/" not in places


def queue_writes_are_done() -> bool:
    """Whether every multiprocessing queue of this process has written all it was given."""
    feeders = [thread for thread in threading.enumerate() if thread.name == "QueueFeederThread"]
    done = True
    for feeder in feeders:
        pending, write_lock = feeder._args[0], feeder._args[3]  # type: ignore[attr-defined]
        if write_lock.acquire(block=False):
            write_lock.release()
        else:
            done = False
        done = done and not pending
    return bool(feeders) and done


def test_a_bundle_starts_only_once_the_answer_to_the_last_one_has_left_the_worker() -> None:
    # Parsl's worker puts an answer on a queue whose thread writes it out later, and takes the
    # next Parsl task meanwhile: a job that kills its worker at once must not take that
    # answer with it (or the queue's lock, with every later answer stuck behind it).
    answers = multiprocessing.get_context("spawn").Queue()
    answers.put(b"the last answer" * 20_000)  # ~300 KB: more than a pipe holds
    reader = threading.Timer(0.3, answers.get)
    reader.start()
    try:
        [outcome] = run_as_parsl_does(a_job(queue_writes_are_done, function_id="writes-done"))
    finally:
        reader.join()
        answers.close()

    assert CLOUDPICKLE.loads(outcome.payload) is True


def five_mebibytes(n: int) -> bytes:
    return bytes([n]) * 5 * 2**20


def test_a_bundle_whose_answers_grow_large_stops_and_leaves_the_rest_unrun() -> None:
    # 32 quick jobs of 10 MiB results each would make one 320 MiB Parsl message
    jobs = [a_job(five_mebibytes, n, function_id="five-mebibytes") for n in range(4)]

    outcomes = run_as_parsl_does(*jobs)

    # Past 8 MiB of answers the worker runs no more of them; the engine sends the rest again
    assert [outcome.task_id for outcome in outcomes] == [job.task_id for job in jobs[:2]]
    assert [CLOUDPICKLE.loads(outcome.payload)[:1] for outcome in outcomes] == [b"\x00", b"\x01"]
