"""Process engine: each slot owns one worker process, fed over a socket.

A backlog of quick jobs goes to a worker several per write (as long as their functions'
recent runs add up to ``BATCH_SECONDS``: a job behind another waits for it, and cannot be
cancelled without stopping that worker), and a job handed to an idle slot is written by
the submitting thread (the agent's IO thread) itself; the worker answers each job as it
ends. A task that crashes its worker (a segfault, ``os._exit``, the OOM killer)
costs only that worker: the slot reports the task lost, so the agent returns it to the
broker, and a fresh worker takes the slot. Its batch-mates still unanswered run again,
each alone, so that the one to blame is found and reported alone. Workers are started
with ``subprocess`` so that a multi-user endpoint can start them as another account (see
``WorkerLaunch``).

A worker runs other people's code, which can write anything to the socket the worker
answers on: whatever the slot cannot read or decode fails that task and costs that
worker, never the slot. A worker never holds the agent's standard output or error (the
agent's log), its terminal session, or the fabric's credentials from its environment.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NamedTuple

import gc_agent
from gc_agent.accelerators import device_environment, workers_for_devices
from gc_agent.engines.answers import AnswerReader
from gc_agent.engines.base import SlotPool
from gc_agent.execution import Job, Outcome
from gc_agent.wire import outcome_from_wire
from gc_core.errors import PolicyError
from gc_core.protocol import ErrorInfo

__all__ = ["Account", "ProcessEngine", "WorkerLaunch"]

logger = logging.getLogger(__name__)

#: Seconds a worker gets to exit on its own at shutdown before it is killed.
WORKER_EXIT_GRACE = 2.0
#: Seconds a worker whose socket failed gets to finish exiting: one that is still running
#: after that broke the protocol (its task wrote to the socket) rather than died.
WORKER_EXIT_WAIT = 1.0
#: Longest answer read from a worker, in bytes. Task code can write to its worker's socket,
#: length prefix included; RabbitMQ refuses messages over 128 MiB by default and base64 makes
#: a result a third larger, so no longer answer could ever become a result.
MAX_ANSWER_BYTES = 256 * 2**20
#: Most bytes of jobs the submitting thread (the agent's IO thread) writes to an idle
#: worker itself; more, and the slot's thread writes them, as a backlog's.
DIRECT_SEND_BYTES = 64 * 2**10
#: Seconds of work (by their functions' recent runs) a worker may be handed at once.
BATCH_SECONDS = 0.02
#: Longest part of a decoding error quoted back to the task's submitter, in characters.
MAX_PROBLEM_TEXT = 500
#: PATH of a worker started as another account: nothing inherited from the agent.
CLEAN_PATH = "/usr/local/bin:/usr/bin:/bin"
#: Prefix of the environment variables a worker running as the agent's own account does not
#: inherit: the fabric's namespace, where ``gc_core.settings`` reads every setting and secret
#: (GC_BROKER_URL with its password, GC_TOKEN, GC_REGISTRY_URL, GC_HOME ...).
FABRIC_VARIABLE_PREFIX = "GC_"


def worker_environment(agent_environment: Mapping[str, str]) -> dict[str, str]:
    """The environment of a worker that runs as the agent's own account.

    A deny-list, deliberately: such a worker is the owner's own process, and tasks rely on
    the environment the owner started the agent in (modules, conda, CUDA, scheduler and
    proxy variables) that no allow-list could name. What the agent adds that tasks must
    never see are the fabric's settings, and those all live under one prefix, so a new
    setting is covered the day it is added. Workers of other accounts get an allow-list
    instead (``WorkerLaunch.popen_options``): nothing of root's.
    """
    return {name: value for name, value in agent_environment.items()
            if not name.startswith(FABRIC_VARIABLE_PREFIX)}


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
    import_paths: tuple[str, ...] = field(
        default_factory=lambda: _agent_import_paths())  # noqa: PLW0108 - defined further down

    def spawn(self, module: str, environment: Mapping[str, str] | None = None,
              ) -> tuple[subprocess.Popen[bytes], socket.socket]:
        """Start ``python -m module FD`` as this launch says, with ``environment`` added to
        its variables, FD being its end of a socket pair; returns the process and our end."""
        options = self.popen_options()
        if environment:
            options["env"] = {**options["env"], **environment}
        ours, theirs = socket.socketpair()
        try:
            process = subprocess.Popen([self.python, "-m", module, str(theirs.fileno())],
                                       pass_fds=[theirs.fileno()], **options)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return process, ours

    def popen_options(self) -> dict[str, Any]:
        """subprocess.Popen keywords for a worker.

        Every worker leads a session of its own (no controlling terminal: it cannot reach the
        agent's terminal or be signalled with the agent's process group) and holds nothing of
        the agent's standard streams, which may be the agent's log. As the agent's account it
        gets the agent's environment without the fabric's settings; as another account,
        initgroups + setgid + setuid, a clean environment and the account's home.
        """
        isolated: dict[str, Any] = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL,
                                    "stderr": subprocess.DEVNULL, "start_new_session": True}
        if self.account is None:
            return {**isolated, "env": worker_environment(os.environ)}
        account = self.account
        if account.uid == 0:
            raise PolicyError("refusing to run tasks as root")
        return {
            **isolated,
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
    """Runs each task in one of ``max_workers`` worker processes; given ``devices``, at most
    one per device, each worker seeing its own device only (it keeps it when replaced)."""

    name = "processes"
    _interruptible = True
    #: A backlog of quick jobs reaches each worker several per write (it answers each as it
    #: ends); a job of a function not known to be quick goes alone.
    _batch_limit = 32

    def __init__(self, max_workers: int, launch: WorkerLaunch | None = None,
                 devices: tuple[str, ...] = (), *,
                 batch_seconds: float | None = BATCH_SECONDS) -> None:
        super().__init__(workers_for_devices(max_workers, devices))
        self._batch_seconds = batch_seconds
        self._launch = launch or WorkerLaunch()
        self._devices = devices
        self._workers: dict[int, _Worker] = {}

    def _start_slot(self, slot: int) -> None:
        pinned = device_environment(self._devices[slot]) if self._devices else None
        process, ours = self._launch.spawn("gc_agent.engines.worker", pinned)
        conn = Connection(ours.detach())
        self._workers[slot] = _Worker(process, conn, AnswerReader(conn.fileno()))

    def _stop_slot(self, slot: int) -> None:
        worker = self._workers.pop(slot, None)
        if worker is None:
            return  # its last restart failed: nothing to stop
        process, conn, _ = worker
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
        worker = self._workers.get(slot)
        if worker is not None:
            worker.process.kill()  # the slot sees the socket close, reports the job, starts a new worker
        return True

    def _send_now(self, slot: int, jobs: list[Job]) -> bool:
        worker = self._workers.get(slot)
        if worker is None or sum(len(job.payload) + len(job.function_payload)
                                 for job in jobs) > DIRECT_SEND_BYTES:
            return False  # a worker to start, or a long write: the slot's thread does it
        try:
            worker.conn.send(jobs)
        except OSError:
            pass  # the worker is gone: the slot's read finds out, as after any send
        return True

    def _run_batch(self, slot: int, jobs: list[Job], *, sent: bool) -> None:
        """Hand ``jobs`` to the slot's worker in one write (unless ``sent``) and report each
        outcome as it comes back; if the worker breaks or dies first, see ``_worker_failed``."""
        try:
            process, conn, answers = self._worker(slot)
        except Exception as exc:  # noqa: BLE001 - whatever stops a worker fails these tasks
            for job in jobs:
                self._report(job.task_id, Outcome(job.task_id, "failed", error=ErrorInfo(
                    type="WorkerStartFailed",
                    message=f"no worker process could be started to run task {job.task_id}: "
                            f"{exc}; the endpoint's owner should check its worker Python, the "
                            "account it runs as and the machine's process and memory limits")))
            return
        unanswered = {job.task_id: job for job in jobs}
        problem: str | None
        try:
            if not sent:
                conn.send(jobs)
            for job in jobs:  # the worker answers them in order
                outcome = _decode_outcome(answers.next(MAX_ANSWER_BYTES), job.task_id)
                del unanswered[job.task_id]
                self._report(job.task_id, outcome)
            return
        except (EOFError, OSError) as exc:
            problem = None if _has_exited(process) else \
                f"its answer could not be read ({str(exc) or 'the socket was closed'})"
        except _Malformed as exc:
            problem = str(exc)
        self._worker_failed(slot, process, list(unanswered.values()), problem)

    def _worker_failed(self, slot: int, process: subprocess.Popen[bytes], unanswered: list[Job],
                       problem: str | None) -> None:
        """The slot's worker died (``problem`` None) or broke the protocol before answering
        ``unanswered``. Stopped for a cancel, it is the cancelled job's doing: the others run
        again. Otherwise one job alone is to blame: reported lost (the agent requeues it) or
        failed; of several, nobody knows which, so each runs again alone."""
        interrupted = self._interrupted(unanswered)
        if (interrupted or len(unanswered) > 1) and not self._closing:
            logger.warning("worker process %d %s with %d tasks of its batch unanswered; they "
                           "run again%s", process.pid, "died" if problem is None else "broke",
                           len(unanswered), "" if interrupted else ", each alone")
            self._run_again(unanswered, alone=not interrupted)
        elif problem is None:
            for job in unanswered:
                self._report(job.task_id, self._lost(job, process))
        else:
            logger.warning("worker process %d sent a malformed outcome for task %s; replacing "
                           "it", process.pid, unanswered[0].task_id)
            for job in unanswered:
                self._report(job.task_id, Outcome(job.task_id, "failed", error=ErrorInfo(
                    type="WorkerError", message=f"the worker sent a malformed outcome for task "
                                                f"{job.task_id}: {problem}")))
        self._replace(slot)

    def _worker(self, slot: int) -> _Worker:
        """The slot's worker, started now if its last restart failed."""
        if slot not in self._workers:
            self._start_slot(slot)
        return self._workers[slot]

    def _lost(self, job: Job, process: subprocess.Popen[bytes]) -> Outcome:
        message = (f"worker process {process.pid} exited with code {process.returncode} "
                   f"while running task {job.task_id}")
        if not self._closing:
            logger.warning("%s; starting a new worker", message)
        return Outcome(job.task_id, "failed", error=ErrorInfo(type="WorkerLost", message=message),
                       lost=True)

    def _replace(self, slot: int) -> None:
        """Kill the slot's worker and start a fresh one; if that fails, the slot's next job
        tries again (and fails with the reason if it cannot)."""
        worker = self._workers.pop(slot, None)
        if worker is not None:
            process, conn, _ = worker
            process.kill()
            process.wait()
            conn.close()
        if self._closing:
            return
        try:
            self._start_slot(slot)
        except Exception as exc:  # noqa: BLE001 - the next job retries and reports it
            logger.error("could not start a new worker process for slot %d: %s", slot, exc)


class _Worker(NamedTuple):
    """A slot's worker process, the socket it is sent jobs on, and its answers on that socket."""

    process: subprocess.Popen[bytes]
    conn: Connection
    answers: AnswerReader


def _has_exited(process: subprocess.Popen[bytes]) -> bool:
    """Whether ``process`` ends within ``WORKER_EXIT_WAIT`` seconds."""
    try:
        process.wait(WORKER_EXIT_WAIT)
    except subprocess.TimeoutExpired:
        return False
    return True


class _Malformed(Exception):
    """A worker's answer that is no outcome of a job it was given; says what is wrong."""


def _decode_outcome(answer: bytes, task_id: str) -> Outcome:
    """The outcome a worker sent for ``task_id``.

    Raises:
        _Malformed: not a well-formed outcome, or one for another task.
    """
    try:
        # Task code can write anything to this socket: deep JSON, bytes that are no JSON, a
        # stranger's task id. Whatever does not decode is the worker's failure, never the
        # slot's.
        outcome = outcome_from_wire(answer)
    except Exception as exc:  # noqa: BLE001 - see above
        raise _Malformed(f"{type(exc).__name__}: {exc}"[:MAX_PROBLEM_TEXT]) from None
    if outcome.task_id != task_id:
        raise _Malformed(f"it answered for task {outcome.task_id[:80]!r}")
    return outcome
