"""Process engine: each slot owns one worker process, fed over a socket.

A task that crashes its worker (a segfault, ``os._exit``, the OOM killer) costs only
that worker: the slot reports the task lost, so the agent returns it to the broker,
and a fresh worker takes the slot. Workers are started with ``subprocess`` so that a
multi-user endpoint can start them as another account (see ``WorkerLaunch``).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import gc_agent
from gc_agent.engines.base import SlotPool
from gc_agent.execution import Job, Outcome
from gc_agent.wire import outcome_from_wire
from gc_core.errors import PolicyError
from gc_core.protocol import ErrorInfo

__all__ = ["Account", "ProcessEngine", "WorkerLaunch"]

logger = logging.getLogger(__name__)

#: Seconds a worker gets to exit on its own at shutdown before it is killed.
WORKER_EXIT_GRACE = 2.0
#: PATH of a worker started as another account: nothing inherited from the agent.
CLEAN_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass(frozen=True)
class Account:
    """A local account tasks run as."""

    name: str
    uid: int
    gid: int
    home: str
    shell: str = "/bin/sh"


@dataclass(frozen=True)
class WorkerLaunch:
    """How to start a worker: which Python, and as which account (None: as the agent)."""

    python: str = sys.executable
    account: Account | None = None
    import_paths: tuple[str, ...] = field(default_factory=lambda: _agent_import_paths())

    def popen_options(self) -> dict[str, Any]:
        """subprocess.Popen keywords: initgroups + setgid + setuid, a clean environment and
        the account's home, when running as another account."""
        if self.account is None:
            return {}
        account = self.account
        if account.uid == 0:
            raise PolicyError("refusing to run tasks as root")
        return {
            "user": account.uid,
            "group": account.gid,
            "extra_groups": os.getgrouplist(account.name, account.gid),
            "cwd": account.home,
            "env": {"HOME": account.home, "USER": account.name, "LOGNAME": account.name,
                    "SHELL": account.shell, "PATH": CLEAN_PATH, "LANG": "C.UTF-8",
                    # Only where gc-fabric itself is installed, so the worker can import it.
                    "PYTHONPATH": os.pathsep.join(self.import_paths)},
        }


def _agent_import_paths() -> tuple[str, ...]:
    """Where this agent imports gc-fabric and its dependencies from."""
    import site

    package_root = str(Path(gc_agent.__file__).resolve().parents[1])
    return tuple(dict.fromkeys([package_root, *site.getsitepackages()]))


class ProcessEngine(SlotPool):
    """Runs each task in one of ``max_workers`` worker processes."""

    name = "processes"
    _interruptible = True

    def __init__(self, max_workers: int, launch: WorkerLaunch | None = None) -> None:
        super().__init__(max_workers)
        self._launch = launch or WorkerLaunch()
        self._workers: dict[int, tuple[subprocess.Popen[bytes], Connection]] = {}

    def _start_slot(self, slot: int) -> None:
        ours, theirs = socket.socketpair()
        process = subprocess.Popen(
            [self._launch.python, "-m", "gc_agent.engines.worker", str(theirs.fileno())],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, **self._launch.popen_options())
        theirs.close()
        self._workers[slot] = (process, Connection(ours.detach()))

    def _stop_slot(self, slot: int) -> None:
        process, conn = self._workers.pop(slot)
        try:
            conn.send(None)
        except OSError:
            pass
        try:
            process.wait(WORKER_EXIT_GRACE)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        conn.close()

    def _interrupt(self, slot: int) -> bool:
        process, _conn = self._workers[slot]
        process.kill()  # the slot sees the socket close, reports the job, and starts a new worker
        return True

    def _run(self, slot: int, job: Job) -> Outcome:
        process, conn = self._workers[slot]
        try:
            conn.send(job)
            answer = conn.recv_bytes()
        except (EOFError, OSError):
            try:
                process.wait(1.0)
            except subprocess.TimeoutExpired:
                process.kill()
            message = (f"worker process {process.pid} exited with code {process.returncode} "
                       f"while running task {job.task_id}")
            conn.close()
            if not self._closing:
                logger.warning("%s; starting a new worker", message)
                self._start_slot(slot)
            return Outcome(job.task_id, "failed", error=ErrorInfo(type="WorkerLost", message=message),
                           lost=True)
        try:
            outcome = outcome_from_wire(json.loads(answer))
            if outcome.task_id != job.task_id:
                raise ValueError(f"it answered for task {outcome.task_id}")
        except ValueError as exc:
            # The worker runs the user's code, which can write to this socket: a bad answer
            # fails the task and costs the worker, never the agent.
            logger.warning("worker process %d sent a malformed outcome for task %s: %s",
                           process.pid, job.task_id, exc)
            self._interrupt(slot)
            process.wait()
            conn.close()
            if not self._closing:
                self._start_slot(slot)
            return Outcome(job.task_id, "failed", error=ErrorInfo(
                type="WorkerError", message=f"the worker sent a malformed outcome for task "
                                            f"{job.task_id}: {exc}"))
        return outcome
