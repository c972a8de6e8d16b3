"""A worker process: run jobs from the agent's socket until told to stop.

The agent sends a list of jobs at a time (a backlog goes several per write); the worker
runs them in order and answers each one as soon as it ends.

Started by the process engine as ``python -m gc_agent.engines.worker FD``, where FD is
its end of a socket pair (in a container: ``… worker PATH``, the agent's Unix socket to
connect to); in a multi-user endpoint it starts already running as the mapped account.
Its standard output and error are files of its own (``WorkerOutput``), put back and
emptied before each task, and added to the task's captured output after it. Each task
starts with the working directory, environment, import path, file-mode mask and signal
handlers the worker started with, and no timer running, whatever the one before changed.
"""

from __future__ import annotations

import signal
import socket
import sys
from dataclasses import replace
from multiprocessing.connection import Connection

from gc_agent.capture import WorkerOutput
from gc_agent.execution import FunctionCache, Job, Outcome
from gc_agent.starting_state import StartingState
from gc_agent.wire import outcome_to_wire


def serve(conn: Connection) -> None:
    """Run jobs until the agent sends None or goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the agent's to handle
    output = WorkerOutput()
    starting = StartingState.of_this_process()
    functions: FunctionCache = {}
    while True:
        try:
            jobs: list[Job] | None = conn.recv()
        except (EOFError, OSError):
            return  # the agent died: nothing left to serve
        if jobs is None:
            return
        for job in jobs:
            # JSON, not pickle: on a multi-user endpoint root reads this from the user's process.
            conn.send_bytes(outcome_to_wire(_run(job, functions, output, starting)))


def _run(job: Job, functions: FunctionCache, output: WorkerOutput,
         starting: StartingState) -> Outcome:
    """Run ``job``, then put back what it changed of the worker (``StartingState``); its
    output includes what reached this process's descriptors meanwhile. They are emptied
    first: what a thread an earlier job left behind wrote since is not this job's to see
    (the jobs of one batch may be different users')."""
    output.clear(job.output_limit)
    outcome = starting.run(job, functions)
    stdout, stderr = output.following(outcome.stdout, outcome.stderr, job.output_limit)
    if (stdout, stderr) == (outcome.stdout, outcome.stderr):
        return outcome  # nothing reached the descriptors: most tasks
    return replace(outcome, stdout=stdout, stderr=stderr)


def connect(where: str) -> Connection:
    """The connection to the agent: an inherited descriptor's number, or a socket path."""
    if where.isdigit():
        return Connection(int(where))
    agent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    agent.connect(where)
    return Connection(agent.detach())


if __name__ == "__main__":
    serve(connect(sys.argv[1]))
