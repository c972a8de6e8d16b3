"""The process engine hands a backlog to each worker several jobs per write: every
guarantee still holds per job, on real worker processes.

Jobs submitted before the engine starts are all waiting when its one slot takes its
first job, so they reach the worker as one batch: the engine here batches by count alone
(the agent's batches only jobs of functions it has seen run quickly, see the last tests),
so that what holds inside a batch is tried with jobs that crash, hang or misbehave.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

from gc_agent.engines.processes import ProcessEngine
from gc_agent.execution import Job, Outcome
from gc_core.serialize import CLOUDPICKLE, PYTHON_VERSION
from tests.fabric import eventually
from tests.security.test_worker_isolation import garble_the_workers_socket

#: Seconds to wait for every outcome of a batch.
OUTCOME_TIMEOUT = 60


def echo(word: str) -> str:
    print(f"said {word}")
    return word


def crash_the_worker() -> None:
    os._exit(13)


def wait_for_cancel(marker: str) -> None:
    import pathlib
    import time

    pathlib.Path(marker).write_text("running")
    time.sleep(600)  # until its worker is killed


def forge_the_answer_of(task_id: str) -> str:
    """Write a well-formed outcome for another task to the worker's socket."""
    import struct
    import sys

    from gc_agent.execution import Outcome
    from gc_agent.wire import outcome_to_wire
    from gc_core.serialize import CLOUDPICKLE

    forged = outcome_to_wire(Outcome(
        task_id, "success", CLOUDPICKLE.content_type, CLOUDPICKLE.dumps("forged")))
    os.write(int(sys.argv[1]), struct.pack("!i", len(forged)) + forged)
    return "forged"


def echo_on_descriptors(word: str) -> str:
    print(f"said {word}")
    os.write(1, f"{word} on 1\n".encode())
    os.write(2, f"{word} on 2\n".encode())
    return word


def close_the_descriptors() -> str:
    os.close(1)
    os.close(2)
    return "closed"


def keep_a_file_on_descriptor_1(path: str) -> str:
    """Close standard output and open a file of one's own, which takes descriptor 1."""
    os.close(1)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.write(descriptor, b"precious")
    return str(descriptor)


def point_descriptor_2_at_a_pipe() -> str:
    _, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.write(2, b"into the pipe")
    return "piped"


def silence_the_streams() -> str:
    """Set sys.stdout and sys.stderr to None, a common way to silence a library."""
    import sys

    sys.stdout = None
    sys.stderr = None
    return "silenced"


def fork_and_return_in_both() -> str:
    """Fork, and let the child return from the task too (forgetting its os._exit)."""
    return "parent" if os.fork() else "child"


def move_into_a_directory(path: str, delete: bool) -> str:
    """Leave the worker in another working directory, one that is gone if ``delete``."""
    import shutil

    os.makedirs(path)
    os.chdir(path)
    if delete:
        shutil.rmtree(path)
    return "moved"


def working_directory() -> str:
    return os.getcwd()


def leave_settings_behind() -> str:
    """Change what the next task would inherit: an environment variable, one removed, the
    import path."""
    import sys

    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.pop("HOME", None)
    sys.path.insert(0, "/nonexistent/leftover")
    return "changed"


def settings_seen() -> tuple[str | None, str | None, bool]:
    import sys

    return (os.environ.get("OMP_NUM_THREADS"), os.environ.get("HOME"),
            "/nonexistent/leftover" in sys.path)


def configure_logging_for_itself() -> str:
    """Log the way a script does, for the whole process: a handler on the root logger, at
    DEBUG, and everything below WARNING switched off."""
    import logging

    logging.basicConfig(level=logging.DEBUG, force=True)
    logging.disable(logging.INFO)
    return "changed"


def logging_seen() -> tuple[int, int, int]:
    import logging

    return len(logging.root.handlers), logging.root.level, logging.root.manager.disable


def flood_standard_output(megabytes: int) -> int:
    """Have a subprocess write ``megabytes`` MiB to standard output, as a chatty simulation
    code does, then wait a second; return how large the file behind descriptor 1 is."""
    import subprocess
    import time

    subprocess.run(["head", "-c", f"{megabytes}M", "/dev/zero"], check=True)
    time.sleep(1.0)
    return os.fstat(1).st_size


def leave_an_alarm_pending() -> str:
    """Arm a timeout the common way and return without disarming it."""
    import signal

    def too_slow(signum: int, frame: object) -> None:
        raise TimeoutError("the guarded call took too long")

    signal.signal(signal.SIGALRM, too_slow)
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    return "armed"


def leave_an_alarm_pending_and_return_a_value_slow_to_serialize() -> object:
    """Arm a timeout, return without disarming it a value whose pickling outlasts it."""
    import signal
    import time

    class SlowToSerialize:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            time.sleep(1.0)
            return str, ("serialized",)

    signal.setitimer(signal.ITIMER_REAL, 0.3)  # SIGALRM's default action ends the process
    return SlowToSerialize()


def leave_a_profiling_timer_running() -> str:
    """Start a sampling timer whose signal's default action ends the process."""
    import signal

    signal.setitimer(signal.ITIMER_PROF, 0.01, 0.01)
    return "sampling"


def sleep_a_second() -> str:
    import time

    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:  # busy too, so that a CPU-time timer fires as well
        time.sleep(0.01)
    return "slept"


def stop_waiting_for_children() -> str:
    """Ignore SIGCHLD, a way daemons avoid zombies: the kernel then reaps every child."""
    import signal

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    return "ignoring"


def exit_code_of_a_subprocess() -> int:
    import subprocess

    return subprocess.run(["sh", "-c", "exit 3"], check=False).returncode


def open_up_the_file_mode() -> str:
    os.umask(0)
    return "open"


def mode_of_a_new_file(path: str) -> int:
    with open(path, "w"):
        pass
    return os.stat(path).st_mode & 0o777


def list_an_odd_file_name(bad_name: bool) -> str:
    """Print a file name that is no UTF-8 as Python shows it (os.listdir, os.fsdecode: a
    lone surrogate), then fail on it, as code reading such a directory does."""
    name = os.fsdecode(b"data-\xff.csv")
    print(f"found {name}")
    if bad_name:
        raise FileNotFoundError(f"no such file: {name}")
    return name


def change_the_interpreter() -> str:
    """What libraries and scripts set process-wide and forget: a recursion limit, the
    cyclic collector off, a tracer, a default socket timeout, warnings turned into errors."""
    import gc
    import socket
    import sys
    import warnings

    sys.setrecursionlimit(200)
    gc.disable()
    sys.settrace(lambda *_: None)
    sys.setprofile(lambda *_: None)
    socket.setdefaulttimeout(0.001)
    warnings.simplefilter("error")
    return "changed"


def interpreter_settings() -> tuple[object, ...]:
    import gc
    import socket
    import sys
    import warnings

    return (sys.getrecursionlimit(), gc.isenabled(), sys.gettrace() is None,
            sys.getprofile() is None, socket.getdefaulttimeout(), len(warnings.filters),
            warnings.filters[:1])


def import_a_library_that_tunes_the_interpreter() -> str:
    """What some libraries do as they are imported: raise the recursion limit, silence a
    warning of theirs."""
    import sys
    import warnings

    sys.setrecursionlimit(5000)
    warnings.filterwarnings("ignore", message="gc-fabric test library")
    return "imported"


def tuned() -> tuple[int, bool]:
    import sys
    import warnings

    return sys.getrecursionlimit(), any(
        entry[1] is not None and entry[1].pattern == "gc-fabric test library"
        for entry in warnings.filters)


def _job(function: Callable[..., Any], *args: Any, task_id: str = "") -> Job:
    return Job(task_id=task_id or str(uuid.uuid4()), function_id=f"fn-{function.__name__}",
               function_payload=cloudpickle.dumps(function), function_python=PYTHON_VERSION,
               content_type=CLOUDPICKLE.content_type, payload=CLOUDPICKLE.dumps((args, {})),
               sender_python=PYTHON_VERSION, sender_serializer=CLOUDPICKLE.label)


class _Outcomes:
    """Every outcome reported, with how many times each task was reported."""

    def __init__(self) -> None:
        self.by_task: dict[str, list[Outcome]] = {}
        self._lock = threading.Lock()

    def on_done(self, outcome: Outcome) -> None:
        with self._lock:
            self.by_task.setdefault(outcome.task_id, []).append(outcome)

    def each_once(self, jobs: list[Job]) -> dict[str, Outcome]:
        eventually(lambda: all(job.task_id in self.by_task for job in jobs), OUTCOME_TIMEOUT,
                   "an outcome for every job")
        assert all(len(self.by_task[job.task_id]) == 1 for job in jobs), self.by_task
        return {job.task_id: self.by_task[job.task_id][0] for job in jobs}


@pytest.fixture
def engine() -> Iterator[ProcessEngine]:
    engine = ProcessEngine(1, batch_seconds=None)
    yield engine
    engine.shutdown()


@pytest.fixture
def agents_engine() -> Iterator[ProcessEngine]:
    """One worker, batching as the agent's engine does."""
    engine = ProcessEngine(1)
    yield engine
    engine.shutdown()


def _start_with(engine: ProcessEngine, jobs: list[Job]) -> _Outcomes:
    outcomes = _Outcomes()
    for job in jobs:
        engine.submit(job, outcomes.on_done)
    engine.start()
    return outcomes


def _value(outcome: Outcome) -> Any:
    assert outcome.state == "success", outcome
    return CLOUDPICKLE.loads(outcome.payload)


def _values_on_one_worker(engine: ProcessEngine, jobs: list[Job]) -> list[Any]:
    """Run ``jobs`` as one batch: what each returned, all of them having succeeded on the
    one worker (never replaced)."""
    got = _start_with(engine, jobs).each_once(jobs)
    assert len({got[job.task_id].worker for job in jobs}) == 1
    return [_value(got[job.task_id]) for job in jobs]


def test_a_batch_runs_in_one_worker_each_job_with_its_own_output(engine: ProcessEngine) -> None:
    jobs = [_job(echo, word) for word in ("one", "two", "three")]
    got = _start_with(engine, jobs).each_once(jobs)
    assert [_value(got[job.task_id]) for job in jobs] == ["one", "two", "three"]
    assert [got[job.task_id].stdout for job in jobs] == ["said one\n", "said two\n",
                                                         "said three\n"]
    assert len({got[job.task_id].worker for job in jobs}) == 1
    assert engine.busy == 0


@pytest.mark.parametrize("where", [0, 1, 3])
def test_a_job_that_kills_its_worker_is_lost_alone_and_its_batch_mates_succeed(
        engine: ProcessEngine, where: int) -> None:
    jobs = [_job(echo, str(n)) for n in range(4)]
    jobs.insert(where, _job(crash_the_worker))
    got = _start_with(engine, jobs).each_once(jobs)
    poison = jobs[where]
    assert got[poison.task_id].lost and got[poison.task_id].error is not None
    assert got[poison.task_id].error.type == "WorkerLost"
    others = [job for job in jobs if job is not poison]
    assert [_value(got[job.task_id]) for job in others] == [str(n) for n in range(4)]
    assert not any(got[job.task_id].lost for job in others)
    assert engine.busy == 0


def test_garbage_from_one_job_of_a_batch_fails_that_job_alone(engine: ProcessEngine) -> None:
    jobs = [_job(echo, "before"), _job(garble_the_workers_socket, "raw"), _job(echo, "after")]
    got = _start_with(engine, jobs).each_once(jobs)
    garbled = got[jobs[1].task_id]
    assert garbled.state == "failed" and garbled.error is not None
    assert garbled.error.type == "WorkerError" and "malformed outcome" in garbled.error.message
    assert _value(got[jobs[0].task_id]) == "before"
    assert _value(got[jobs[2].task_id]) == "after"


def test_cancelling_a_running_job_of_a_batch_stops_it_and_its_batch_mates_run(
        engine: ProcessEngine, tmp_path: Path) -> None:
    marker = tmp_path / "running"
    jobs = [_job(echo, "first"), _job(wait_for_cancel, str(marker)), _job(echo, "last")]
    outcomes = _start_with(engine, jobs)
    eventually(marker.exists, OUTCOME_TIMEOUT, "the job to be cancelled to start")
    assert engine.cancel(jobs[1].task_id) == "interrupted"
    got = outcomes.each_once(jobs)
    assert got[jobs[1].task_id].state == "cancelled"
    assert _value(got[jobs[0].task_id]) == "first"
    assert _value(got[jobs[2].task_id]) == "last"
    assert engine.busy == 0


def note_each_start(path: str, seconds: float) -> int:
    """Add a line to ``path`` each time it starts; sleep; return how many starts it saw."""
    import pathlib
    import time

    with pathlib.Path(path).open("a") as notes:
        notes.write("started\n")
    time.sleep(seconds)
    return len(pathlib.Path(path).read_text().splitlines())


def test_cancelling_a_job_waiting_behind_a_long_one_never_restarts_the_long_one(
        agents_engine: ProcessEngine, tmp_path: Path) -> None:
    # Given a long job running, and two more jobs behind it
    long_one = tmp_path / "long"
    jobs = [_job(note_each_start, str(long_one), 2.0), _job(echo, "behind"), _job(echo, "last")]
    outcomes = _start_with(agents_engine, jobs)
    eventually(long_one.exists, OUTCOME_TIMEOUT, "the long job to start")

    # When one of those behind it is cancelled before it started
    assert agents_engine.cancel(jobs[1].task_id) == "removed"

    # Then the long job runs on to its end, started once, and the last job runs after it
    got = outcomes.each_once(jobs)
    assert got[jobs[1].task_id].state == "cancelled"
    assert _value(got[jobs[0].task_id]) == 1
    assert _value(got[jobs[2].task_id]) == "last"


def test_a_job_answering_for_its_batch_mate_fails_alone_and_the_mate_runs_for_real(
        engine: ProcessEngine) -> None:
    mate = str(uuid.uuid4())
    jobs = [_job(echo, "first"), _job(forge_the_answer_of, mate), _job(echo, "mate", task_id=mate)]
    got = _start_with(engine, jobs).each_once(jobs)
    forger = got[jobs[1].task_id]
    assert forger.state == "failed" and forger.error is not None
    assert forger.error.type == "WorkerError" and "malformed outcome" in forger.error.message
    assert _value(got[mate]) == "mate"
    assert _value(got[jobs[0].task_id]) == "first"


@pytest.mark.parametrize(("undo", "value"), [(close_the_descriptors, "closed"),
                                             (point_descriptor_2_at_a_pipe, "piped"),
                                             (silence_the_streams, "silenced")])
def test_a_job_that_undoes_its_output_succeeds_and_the_next_job_prints_as_ever(
        engine: ProcessEngine, undo: Callable[[], str], value: str) -> None:
    jobs = [_job(undo), _job(echo_on_descriptors, "next")]
    got = _start_with(engine, jobs).each_once(jobs)
    assert _value(got[jobs[0].task_id]) == value
    assert _value(got[jobs[1].task_id]) == "next"
    assert got[jobs[1].task_id].stdout == "said next\nnext on 1\n"
    assert got[jobs[1].task_id].stderr == "next on 2\n"
    assert got[jobs[0].task_id].worker == got[jobs[1].task_id].worker  # no worker was lost


def test_a_file_a_job_opens_on_descriptor_1_keeps_what_it_wrote(
        engine: ProcessEngine, tmp_path: Path) -> None:
    # The worker empties its own output files after each job; never a file the job opened.
    kept = tmp_path / "kept.txt"
    jobs = [_job(keep_a_file_on_descriptor_1, str(kept)), _job(echo_on_descriptors, "next")]
    got = _start_with(engine, jobs).each_once(jobs)
    assert _value(got[jobs[0].task_id]) == "1"
    assert kept.read_bytes() == b"precious"
    assert got[jobs[0].task_id].stdout == ""
    assert got[jobs[1].task_id].stdout == "said next\nnext on 1\n"


def test_a_child_a_job_forks_that_returns_from_it_never_answers_nor_runs_the_batch_mates(
        engine: ProcessEngine) -> None:
    # The child shares the worker's socket to the agent and holds a copy of the batch: were
    # it to go on as the worker, its answers would fail the batch-mates (other users' tasks,
    # maybe) and it would take jobs meant for the worker.
    jobs = [_job(fork_and_return_in_both), _job(echo, "after"), _job(echo, "last")]
    got = _start_with(engine, jobs).each_once(jobs)
    assert _value(got[jobs[0].task_id]) == "parent"
    assert _value(got[jobs[1].task_id]) == "after"
    assert _value(got[jobs[2].task_id]) == "last"
    assert len({got[job.task_id].worker for job in jobs}) == 1  # the worker was never replaced


@pytest.mark.parametrize("delete", [False, True], ids=["kept", "deleted"])
def test_the_next_job_runs_where_its_worker_started(engine: ProcessEngine, tmp_path: Path,
                                                    delete: bool) -> None:
    # A worker runs the jobs of many tasks (of different users on a shared endpoint): one
    # that moves into another directory leaves the next running there, or, if it deleted
    # it, failing with FileNotFoundError at its first relative path
    before, moved, after = _values_on_one_worker(
        engine, [_job(working_directory),
                 _job(move_into_a_directory, str(tmp_path / "elsewhere"), delete),
                 _job(working_directory)])
    assert moved == "moved"
    assert after == before


def test_output_a_subprocess_floods_takes_no_more_disk_than_the_output_limit_needs(
        engine: ProcessEngine) -> None:
    # Descriptor output waits in an unnamed file (it shows in no `du`): a task whose code
    # prints gigabytes must not fill the node's /tmp for everyone while it runs.
    jobs = [_job(flood_standard_output, 200), _job(echo_on_descriptors, "next")]
    got = _start_with(engine, jobs).each_once(jobs)
    assert _value(got[jobs[0].task_id]) <= 2 * 2**20
    marker = got[jobs[0].task_id].stdout.rsplit("[gc-fabric: output truncated, ", 1)[1]
    assert int(marker.split()[0]) >= 198 * 2**20, marker  # what was cut is still counted
    assert got[jobs[1].task_id].stdout == "said next\nnext on 1\n"


@pytest.mark.parametrize(("seen", "change"), [
    # A task that sets OMP_NUM_THREADS (or drops a variable, or prepends to sys.path) must
    # not leave it to the tasks after it, maybe other functions, maybe other users'.
    (settings_seen, leave_settings_behind),
    # One that calls logging.basicConfig(level=DEBUG) turned on every library's debug lines
    # in the tasks after it, and its handler wrote them there.
    (logging_seen, configure_logging_for_itself),
], ids=["environment and import path", "root logger"])
def test_the_next_job_gets_the_settings_its_worker_started_with(
        engine: ProcessEngine, seen: Callable[[], object], change: Callable[[], str]) -> None:
    before, changed, after = _values_on_one_worker(
        engine, [_job(seen), _job(change), _job(seen)])
    assert changed == "changed"
    assert after == before


def test_an_alarm_a_job_left_pending_never_fires_in_the_next_one(engine: ProcessEngine) -> None:
    # A timeout guard armed with signal.alarm/setitimer and not disarmed on the way out
    # fired 0.5 s later in whichever task ran next: a TimeoutError in its middle, or (its
    # handler gone) a worker killed by SIGALRM or SIGPROF, the next task lost.
    jobs = [_job(leave_an_alarm_pending), _job(sleep_a_second),
            _job(leave_a_profiling_timer_running), _job(sleep_a_second)]
    got = _start_with(engine, jobs).each_once(jobs)
    assert [_value(got[job.task_id]) for job in jobs] == ["armed", "slept", "sampling", "slept"]
    assert len({got[job.task_id].worker for job in jobs}) == 1
    # The job that left it is told, in its own error output.
    assert "left a timer running (ITIMER_REAL:" in got[jobs[0].task_id].stderr
    assert "left a timer running (ITIMER_PROF)" in got[jobs[2].task_id].stderr
    assert got[jobs[1].task_id].stderr == ""


def test_an_alarm_a_job_left_pending_never_fires_while_its_value_is_serialized(
        engine: ProcessEngine) -> None:
    # The timers a job leaves were stopped after its value was serialized: an alarm due
    # meanwhile killed the worker (the job reported lost, run again, lost again) or raised
    # in the middle of pickling. They stop as soon as its function returns.
    job = _job(leave_an_alarm_pending_and_return_a_value_slow_to_serialize)
    got = _start_with(engine, [job]).each_once([job])[job.task_id]
    assert (got.state, got.lost, got.error) == ("success", False, None)
    assert _value(got) == "serialized"
    assert "left a timer running (ITIMER_REAL:" in got.stderr


def test_a_signal_handler_a_job_set_does_not_outlive_it(engine: ProcessEngine) -> None:
    # With SIGCHLD ignored, the kernel reaps children at once and subprocess reports every
    # later subprocess's exit code as 0: a failing simulation step would pass, silently.
    assert _values_on_one_worker(engine, [_job(exit_code_of_a_subprocess),
                                          _job(stop_waiting_for_children),
                                          _job(exit_code_of_a_subprocess)]) == [3, "ignoring", 3]


def test_the_file_mode_mask_a_job_set_does_not_outlive_it(engine: ProcessEngine,
                                                          tmp_path: Path) -> None:
    # umask(0) in one task made every later task's files writable by anyone on the machine.
    before, opened, after = _values_on_one_worker(
        engine, [_job(mode_of_a_new_file, str(tmp_path / "before")), _job(open_up_the_file_mode),
                 _job(mode_of_a_new_file, str(tmp_path / "after"))])
    assert opened == "open"
    assert after == before


def test_a_job_printing_and_failing_on_a_file_name_that_is_no_utf8_is_answered(
        engine: ProcessEngine) -> None:
    # A lone surrogate cannot travel as UTF-8 (JSON, AMQP): the worker failed to write its
    # answer and exited, and the task was retried as lost until dead-lettered.
    jobs = [_job(list_an_odd_file_name, True), _job(list_an_odd_file_name, False),
            _job(echo, "next")]
    got = _start_with(engine, jobs).each_once(jobs)
    failed, printed = got[jobs[0].task_id], got[jobs[1].task_id]
    assert failed.state == "failed" and failed.error is not None, failed
    assert failed.error.type == "FileNotFoundError"
    assert "data-\\udcff.csv" in failed.error.message and "found data-\\udcff.csv" in failed.stdout
    assert _value(printed) == os.fsdecode(b"data-\xff.csv")  # the value itself is pickled as is
    assert printed.stdout == "found data-\\udcff.csv\n"
    assert _value(got[jobs[2].task_id]) == "next"
    assert len({got[job.task_id].worker for job in jobs}) == 1


def test_interpreter_settings_a_job_changed_do_not_outlive_it(engine: ProcessEngine) -> None:
    # A recursion limit of 200 failed later jobs' pickling; a tracer left installed made
    # each later job several times slower; warnings as errors failed them on a warning.
    before, changed, after = _values_on_one_worker(
        engine, [_job(interpreter_settings), _job(change_the_interpreter),
                 _job(interpreter_settings)])
    assert changed == "changed"
    assert after == before


def test_what_a_library_tunes_as_it_is_imported_stays_with_it(engine: ProcessEngine) -> None:
    # The library stays imported in the worker: putting its settings back would break it
    # (a recursion limit it raised) or unsilence it, for the tasks after.
    _, seen = _values_on_one_worker(
        engine, [_job(import_a_library_that_tunes_the_interpreter), _job(tuned)])
    assert seen == (5000, True)
