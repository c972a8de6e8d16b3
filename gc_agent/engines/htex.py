"""High-throughput engine: Parsl's HighThroughputExecutor, as Globus Compute's own engine uses it.

The agent's process runs the executor's client side; Parsl starts an interchange process,
and the provider (``gc_agent.providers``) starts worker pools on its blocks — local process
groups, or the nodes of Slurm, PBS Pro or LSF jobs — which connect back over ZeroMQ. Each
task travels as a ``Job`` and runs on a worker through ``run_job``, so a task behaves the
same here as on the local engines (output capture, serializers, resource specification).

The engine keeps jobs beyond its capacity in a local queue and hands Parsl only as many as
its workers can run: a job still waiting here can be cancelled or taken back when the agent
drains. Parsl cannot withdraw a task once it has it, so cancelling such a task only drops
its result (see ``HtexEngine.cancel``).

When a worker, its pool or its node is lost, Parsl fails the task's future with
``WorkerLost``, ``ManagerLost`` or ``BadStateException``; the engine runs the task again up
to ``max_retries_on_system_failure`` times, then reports it failed with ``WorkerLost``.
"""

from __future__ import annotations

import collections
import logging
import os
import shlex
import sys
import tempfile
import threading
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gc_agent.config import HtexEngineConfig
from gc_agent.engines.base import CancelResult, Engine, OnDone, cancelled_outcome
from gc_agent.execution import FunctionCache, Job, Outcome, run_job
from gc_core.protocol import ErrorInfo

__all__ = ["HtexEngine"]

logger = logging.getLogger(__name__)

#: Seconds the job-status poller waits between scaling decisions (Parsl's DFK uses 5).
STRATEGY_PERIOD = 5.0
#: Seconds a block may sit idle before the scaling strategy releases it (above min_blocks).
MAX_IDLETIME = 120.0
#: Resource-specification keys Parsl's interchange itself understands; the whole
#: specification also travels with the job to the worker (``current_resource_spec``).
PARSL_RESOURCE_KEYS = ("priority",)

#: Functions loaded on this worker, by id (one cache per HTEX worker process).
_WORKER_FUNCTIONS: FunctionCache = {}


def run_on_worker(job: Job) -> Outcome:
    """Run ``job`` on an HTEX worker: what Parsl's pool calls for every task."""
    return run_job(job, _WORKER_FUNCTIONS)


@dataclass
class _Task:
    """A job this engine holds: waiting here, or handed to Parsl (``attempt`` > 0)."""

    job: Job
    on_done: OnDone
    attempt: int = 0
    future: Future[Any] | None = None


class HtexEngine(Engine):
    """Runs jobs on Parsl's HighThroughputExecutor, with workers on the provider's blocks."""

    name = "htex"

    def __init__(self, config: HtexEngineConfig, run_dir: Path | None = None) -> None:
        self._config = config
        self._run_dir = run_dir
        self._tasks: dict[str, _Task] = {}
        self._waiting: collections.deque[str] = collections.deque()
        self._in_parsl = 0
        self._lock = threading.Lock()
        # HTEX's submit is not thread-safe (a shared ZeroMQ socket, a task counter), and
        # jobs arrive from the agent's thread while retries and queued jobs go out from
        # Parsl's result thread: one lock around every submit, as Parsl's DFK has.
        self._submit_lock = threading.Lock()
        self._executor: Any = None
        self._poller: Any = None
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None
        self._closing = False

    @property
    def capacity(self) -> int:
        provider = self._config.provider
        return self._config.max_workers_per_node * provider.nodes_per_block * max(1, provider.max_blocks)

    @property
    def busy(self) -> int:
        return self._in_parsl

    @property
    def run_dir(self) -> Path | None:
        """Where Parsl keeps its logs and submit scripts (set once started)."""
        return self._run_dir

    def start(self) -> None:
        from parsl.jobs.job_status_poller import JobStatusPoller

        if self._run_dir is None:
            self._tempdir = tempfile.TemporaryDirectory(prefix="gc-htex-")
            self._run_dir = Path(self._tempdir.name)
        self._run_dir.mkdir(parents=True, exist_ok=True)
        self._executor = _build_executor(self._config, self._run_dir)
        self._executor.start()
        self._poller = JobStatusPoller(strategy="simple", max_idletime=MAX_IDLETIME,
                                       strategy_period=STRATEGY_PERIOD)
        self._poller.add_executors([self._executor])
        # The strategy starts the init_blocks on its first run, a whole period from now
        # (Parsl's DFK waits too): run it once at once, before the poller's thread does.
        self._poller.poll()
        logger.info("htex engine started: %d workers per node, provider %s, run dir %s",
                    self._config.max_workers_per_node, self._config.provider.type, self._run_dir)

    def submit(self, job: Job, on_done: OnDone) -> None:
        with self._lock:
            self._tasks[job.task_id] = _Task(job, on_done)
            self._waiting.append(job.task_id)
        self._dispatch()

    def cancel(self, task_id: str) -> CancelResult:
        """Cancel a job: one still waiting here is removed and never runs.

        A job already handed to Parsl cannot be stopped: HTEX has no way to withdraw a task
        from its interchange or to interrupt a worker. Its cancelled outcome is reported at
        once, the task runs on (or waits on in the interchange), and its result is dropped.
        """
        with self._lock:
            task = self._tasks.pop(task_id, None)
            if task is not None and task.attempt == 0:
                self._waiting.remove(task_id)
        if task is None:
            return "unknown"
        if task.attempt == 0:
            task.on_done(cancelled_outcome(task_id, "before it started"))
            return "removed"
        task.on_done(cancelled_outcome(task_id, "while at the high-throughput engine; it runs on "
                                                "in its worker, and its result will be dropped"))
        return "abandoned"

    def take_waiting(self) -> list[tuple[Job, OnDone]]:
        with self._lock:
            taken = [self._tasks.pop(task_id) for task_id in self._waiting]
            self._waiting.clear()
        return [(task.job, task.on_done) for task in taken]

    def shutdown(self) -> None:
        self._closing = True
        try:
            if self._poller is not None:
                self._poller.close()
            if self._executor is not None:
                self._executor.shutdown()
        finally:
            self._poller = self._executor = None
            if self._tempdir is not None:
                self._tempdir.cleanup()
                self._tempdir = None

    def _dispatch(self) -> None:
        """Hand waiting jobs to Parsl while it has fewer than ``capacity`` of ours."""
        while True:
            with self._lock:
                if self._closing or not self._waiting or self._in_parsl >= self.capacity:
                    return
                task = self._tasks[self._waiting.popleft()]
                self._in_parsl += 1
            self._launch(task)

    def _launch(self, task: _Task) -> None:
        """Submit one attempt of ``task`` to Parsl; count it as lost if Parsl refuses it."""
        task.attempt += 1
        attempt = task.attempt
        spec = {k: v for k, v in task.job.resource_spec.items() if k in PARSL_RESOURCE_KEYS}
        try:
            with self._submit_lock:
                future = self._executor.submit(run_on_worker, spec, task.job)
        except Exception as exc:  # noqa: BLE001 - BadStateException once every block failed, or a
            # SerializationError: either way it becomes this task's outcome, never the caller's error
            failed: Future[Any] = Future()
            failed.set_exception(exc)
            future = failed
        task.future = future
        future.add_done_callback(lambda done: self._finished(task, attempt, done))

    def _finished(self, task: _Task, attempt: int, future: Future[Any]) -> None:
        task_id = task.job.task_id
        exc = future.exception()
        with self._lock:
            current = self._tasks.get(task_id) is task
            retry = current and exc is not None and _is_system_failure(exc) \
                and attempt <= self._config.max_retries_on_system_failure and not self._closing
            if not retry:
                self._in_parsl -= 1
                if current:
                    del self._tasks[task_id]
        if not current:
            self._dispatch()
            return  # cancelled: its outcome went out already
        if retry:
            logger.warning("task %s lost its worker (%s); running it again (retry %d of %d)",
                           task_id, exc, attempt, self._config.max_retries_on_system_failure)
            self._launch(task)
            return
        try:
            task.on_done(self._outcome_of(task, future))
        except Exception:
            logger.exception("handling the outcome of task %s failed", task_id)
        self._dispatch()

    def _outcome_of(self, task: _Task, future: Future[Any]) -> Outcome:
        task_id = task.job.task_id
        exc = future.exception()
        if exc is None:
            outcome: Outcome = future.result()
            return outcome
        if _is_system_failure(exc):
            message = (f"task {task_id} was lost with its worker {task.attempt} times "
                       f"(max_retries_on_system_failure is "
                       f"{self._config.max_retries_on_system_failure}); last: {exc}")
            logger.warning("%s", message)
            return Outcome(task_id, "failed", error=ErrorInfo(type="WorkerLost", message=message),
                           worker=_host_of(exc))
        # Parsl could not ship the task (serialization, resource specification …).
        return Outcome(task_id, "failed", error=ErrorInfo(
            type=type(exc).__name__, message=f"the high-throughput engine refused task {task_id}: "
                                             f"{exc}"))


def _is_system_failure(exc: BaseException) -> bool:
    """Whether ``exc`` means the task's worker, pool or node went away (not the task's fault)."""
    from parsl.executors.errors import BadStateException
    from parsl.executors.high_throughput.errors import ManagerLost, WorkerLost

    return isinstance(exc, (WorkerLost, ManagerLost, BadStateException))


def _host_of(exc: BaseException) -> str:
    """The host Parsl names in a lost-worker error, if it does."""
    return str(getattr(exc, "hostname", "") or "")


def _build_executor(config: HtexEngineConfig, run_dir: Path) -> Any:
    """A HighThroughputExecutor set up the way Parsl's DataFlowKernel would set it up."""
    from parsl.executors import HighThroughputExecutor

    from gc_agent.providers import build_provider

    # Parsl starts interchange.py and process_worker_pool.py by name from PATH, which lacks
    # the scripts of an agent run from an unactivated venv: name the first in full, and put
    # the agent's scripts first on the worker pools' PATH (the config's worker_init can
    # still change it, e.g. to activate another environment on the nodes).
    bin_dir = Path(sys.executable).parent
    provider = build_provider(config.provider,
                              worker_init_prefix=f"export PATH={shlex.quote(str(bin_dir))}:$PATH")
    executor = HighThroughputExecutor(
        label=config.label,
        address=config.address,
        provider=provider,
        max_workers_per_node=config.max_workers_per_node,
        interchange_launch_cmd=[sys.executable, str(bin_dir / "interchange.py")],
        heartbeat_period=config.heartbeat_period,
        heartbeat_threshold=config.heartbeat_threshold,
        encrypted=config.encrypted,
    )
    executor.run_id = str(uuid.uuid4())
    executor.run_dir = str(run_dir)
    script_dir = run_dir / "submit_scripts"
    script_dir.mkdir(parents=True, exist_ok=True)
    provider.script_dir = str(script_dir)
    return executor


def default_run_dir(endpoint_name: str, config: HtexEngineConfig) -> Path | None:
    """Parsl's run directory for an endpoint: the config's, else under ``$GC_HOME``, else None
    (a temporary directory)."""
    if config.run_dir:
        return Path(config.run_dir)
    home = os.environ.get("GC_HOME")
    return Path(home) / "endpoints" / endpoint_name / "htex" if home else None
