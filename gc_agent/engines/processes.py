"""Process engine: each slot owns one worker process, fed over a pipe.

A task that crashes its worker (a segfault, ``os._exit``, the OOM killer) costs only
that worker: the slot reports the task lost, so the agent returns it to the broker,
and a fresh worker takes the slot.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from gc_agent.engines.base import SlotPool
from gc_agent.execution import FunctionCache, Job, Outcome, run_job
from gc_core.protocol import ErrorInfo

__all__ = ["ProcessEngine"]

logger = logging.getLogger(__name__)

#: Seconds a worker gets to exit on its own at shutdown before it is killed.
WORKER_EXIT_GRACE = 2.0

# Spawned workers start from a clean interpreter: no inherited broker threads or sockets.
_CONTEXT = multiprocessing.get_context("spawn")


def _worker_main(conn: Connection) -> None:
    """A worker process: run jobs from the pipe until told to stop or the agent goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the agent's to handle
    functions: FunctionCache = {}
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return  # the agent died: nothing left to serve
        if job is None:
            return
        conn.send(run_job(job, functions))


class ProcessEngine(SlotPool):
    """Runs each task in one of ``max_workers`` worker processes."""

    name = "processes"
    _interruptible = True

    def __init__(self, max_workers: int) -> None:
        super().__init__(max_workers)
        self._workers: dict[int, tuple[BaseProcess, Connection]] = {}

    def _start_slot(self, slot: int) -> None:
        ours, theirs = _CONTEXT.Pipe(duplex=True)
        process = _CONTEXT.Process(target=_worker_main, args=(theirs,), daemon=True,
                                   name=f"gc-worker-{slot}")
        process.start()
        theirs.close()
        self._workers[slot] = (process, ours)

    def _stop_slot(self, slot: int) -> None:
        process, conn = self._workers.pop(slot)
        try:
            conn.send(None)
        except OSError:
            pass
        process.join(WORKER_EXIT_GRACE)
        if process.is_alive():
            process.kill()
            process.join()
        conn.close()

    def _interrupt(self, slot: int) -> bool:
        process, _conn = self._workers[slot]
        process.kill()  # the slot sees the pipe close, reports the job, and starts a new worker
        return True

    def _run(self, slot: int, job: Job) -> Outcome:
        process, conn = self._workers[slot]
        try:
            conn.send(job)
            outcome: Outcome = conn.recv()
            return outcome
        except (EOFError, OSError):
            process.join(1.0)
            message = (f"worker process {process.pid} exited with code {process.exitcode} "
                       f"while running task {job.task_id}")
            conn.close()
            if not self._closing:
                logger.warning("%s; starting a new worker", message)
                self._start_slot(slot)
            return Outcome(job.task_id, "failed", error=ErrorInfo(type="WorkerLost", message=message),
                           lost=True)
