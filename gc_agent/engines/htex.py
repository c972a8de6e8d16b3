"""High-throughput engine: Parsl's HighThroughputExecutor, as Globus Compute's own engine uses it.

The agent's process runs the executor's client side; Parsl starts an interchange process,
and the provider (``gc_agent.providers``) starts worker pools on its blocks — local process
groups, or the nodes of Slurm, PBS Pro or LSF jobs — which connect back over ZeroMQ. Each
task travels as a pickled ``Job`` (Parsl's ``task_executor`` hook, :data:`WORKER_ENTRY`) and
runs on a worker through ``run_job``, so a task behaves the same here as on the local
engines (output capture, serializers, resource specification).

The engine keeps jobs in a local queue and hands Parsl only ``parsl_tasks_per_worker`` of
its tasks per worker (enough to keep them fed between round trips): a job still waiting here
can be cancelled or taken back when the agent drains. Parsl cannot withdraw a task once it
has it, so cancelling such a task only drops its result (see ``HtexEngine.cancel``).

Parsl's own cost is about a millisecond of CPU per task, spread over the agent, the
interchange, the pool's manager and the worker: far more than a quick function's run (and
the interchange, one process, passes them one at a time). So quick jobs that wait together
(that arrived in one batch of tasks, or while Parsl held its limit) travel as one Parsl task,
a *bundle*, as long as their functions' runs so far add up to no more than
``bundle_seconds``; the worker runs them one after another (each as any task: its own output,
state put back after it) and their outcomes return together. A job of a function not seen
yet, or with a resource specification, travels alone, and a bundle holds one user's jobs
(a run slower than its function's so far holds back that user's jobs only). A bundle
whose worker is lost is split: each of its jobs runs again alone, that loss charged to none
of them, so a job that kills its worker is the only one to fail with ``WorkerLost``.

When a worker, its pool or its node is lost, Parsl fails the task's future with
``WorkerLost``, ``ManagerLost`` or ``BadStateException``; the engine runs the task again up
to ``max_retries_on_system_failure`` times, then reports it failed with ``WorkerLost``.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import pickle
import shlex
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gc_agent.config import HtexEngineConfig
from gc_agent.engines.base import CancelResult, Engine, OnDone, cancelled_outcome
from gc_agent.engines.processes import FABRIC_VARIABLE_PREFIX
from gc_agent.engines.run_times import RunTimes
from gc_agent.execution import FunctionCache, Job, Outcome
from gc_agent.starting_state import StartingState
from gc_core.protocol import ErrorInfo

__all__ = ["HtexEngine"]

logger = logging.getLogger(__name__)

#: Parsl's scaling strategy: scale out while tasks wait (up to max_blocks), scale in to
#: min_blocks once no task has been at Parsl for idle_timeout. Not "htex_auto_scale": in
#: Parsl 2026.10 it calls scale_in(0, max_idletime) when a block has spare slots, which then
#: cancels every idle block — a pending one included — so one task alone never gets a block.
STRATEGY = "simple"
#: Resource-specification keys Parsl's interchange itself understands (lower runs first).
PARSL_RESOURCE_KEYS = ("priority",)
#: Environment variables naming the batch job a worker runs in, by scheduler.
BATCH_JOB_VARIABLES = (("slurm", "SLURM_JOB_ID"), ("pbs", "PBS_JOBID"), ("lsf", "LSB_JOBID"))

#: Functions loaded on this worker, by id (one cache per HTEX worker process).
_WORKER_FUNCTIONS: FunctionCache = {}
#: What Parsl's worker pool calls for each of our Parsl tasks (its ``task_executor``): a
#: pickled list of jobs (a bundle, often of one) in, the pickled list of their outcomes out.
#: Parsl's default packing (``pack_apply_message``, dill for values) cost ~0.09 ms more per
#: task in the agent and ~0.07 ms more on the worker here.
WORKER_ENTRY = f"{__name__}.run_pickled_jobs"
#: Longest a worker waits for its last answer to be written before running the next jobs,
#: and how often it looks (see ``_wait_for_queue_writes``).
QUEUE_WRITE_PATIENCE = 2.0
QUEUE_WRITE_POLL = 0.0005
#: Most jobs in one bundle, and most bytes of arguments and functions (a bundle's first job
#: may be larger alone).
MAX_BUNDLE = 32
MAX_BUNDLE_BYTES = 2**20
#: Bytes of results and output past which a worker runs no more of a bundle's jobs: quick
#: functions with large results (10 MiB each at most, by default) would otherwise make one
#: Parsl message of hundreds of MiB through the manager, the interchange and the agent.
MAX_BUNDLE_ANSWER_BYTES = 8 * 2**20


def run_pickled_jobs(buffer: bytes) -> bytes:
    """Run the pickled list of ``Job`` in ``buffer`` on this HTEX worker, one after another;
    return the pickled list of their outcomes. Once these hold ``MAX_BUNDLE_ANSWER_BYTES``,
    the jobs left are not run (the engine sends them again)."""
    _wait_for_queue_writes()
    outcomes: list[Outcome] = []
    size = 0
    for job in pickle.loads(buffer):
        if size >= MAX_BUNDLE_ANSWER_BYTES:
            break
        outcomes.append(outcome := run_on_worker(job))
        size += len(outcome.payload) + len(outcome.stdout) + len(outcome.stderr)
    return pickle.dumps(outcomes, protocol=pickle.HIGHEST_PROTOCOL)


def _wait_for_queue_writes() -> None:
    """Wait until this process's multiprocessing queues have written out all they were given:
    the answer to the worker's last Parsl task among it.

    Parsl's worker puts an answer on a multiprocessing queue, whose own thread writes it to
    the pool's manager later, and takes the next Parsl task meanwhile. A job that kills its
    worker before that write (a crash at its first line) takes the answer with it, and the
    tasks it carried wait for ever; killed in the middle of the write, it leaves the queue's
    lock held, and every other worker's answers stuck behind it. (A SIGKILL right after a
    ``put`` loses the item every time here.) A queue still writing after
    ``QUEUE_WRITE_PATIENCE`` (one a task filled and nobody reads) is not waited for again.
    """
    deadline = time.monotonic() + QUEUE_WRITE_PATIENCE
    for thread in threading.enumerate():
        # The writing thread's arguments: (buffer, not_empty, send_bytes, write_lock, ...)
        arguments: tuple[Any, ...] = getattr(thread, "_args", ()) \
            if thread.name == "QueueFeederThread" and thread.ident not in _STUCK_WRITERS else ()
        if len(arguments) < 4 or not isinstance(arguments[0], collections.deque):
            continue
        pending, write_lock = arguments[0], arguments[3]
        while pending and time.monotonic() < deadline:
            time.sleep(QUEUE_WRITE_POLL)
        if pending or (write_lock is not None and not write_lock.acquire(
                timeout=max(0.0, deadline - time.monotonic()))):
            _STUCK_WRITERS.add(thread.ident)
        elif write_lock is not None:
            write_lock.release()


#: Threads of queues that did not finish writing within ``QUEUE_WRITE_PATIENCE``.
_STUCK_WRITERS: set[int | None] = set()


def run_on_worker(job: Job) -> Outcome:
    """Run ``job`` on an HTEX worker, its outcome naming the worker's place; then put back
    what it changed of the worker (``StartingState``)."""
    outcome = _worker_start().run(job, _WORKER_FUNCTIONS)
    return replace(outcome, worker=_this_worker(outcome.worker))


@functools.cache
def _worker_start() -> StartingState:
    """This worker's state before its first task."""
    return StartingState.of_this_process()


@functools.cache
def _this_worker(worker: str) -> str:
    """:func:`describe_worker` for this process: its environment is set once it starts."""
    return describe_worker(worker, os.environ)


def describe_worker(worker: str, environ: Mapping[str, str]) -> str:
    """``host:pid``, then the Parsl block and the batch job the worker runs in, if any.

    >>> describe_worker("node7:42", {"PARSL_WORKER_BLOCK_ID": "3", "SLURM_JOB_ID": "1234"})
    'node7:42 block 3 slurm job 1234'
    """
    parts = [worker]
    if environ.get("PARSL_WORKER_BLOCK_ID"):
        parts.append(f"block {environ['PARSL_WORKER_BLOCK_ID']}")
    parts += [f"{scheduler} job {environ[name]}" for scheduler, name in BATCH_JOB_VARIABLES
              if environ.get(name)]
    return " ".join(parts)


@dataclass
class _Task:
    """A job this engine holds: waiting here, or handed to Parsl (``attempt`` > 0); ``alone``
    once a bundle it was in lost its worker."""

    job: Job
    on_done: OnDone
    attempt: int = 0
    alone: bool = False


class HtexEngine(Engine):
    """Runs jobs on Parsl's HighThroughputExecutor, with workers on the provider's blocks."""

    name = "htex"

    def __init__(self, config: HtexEngineConfig, run_dir: Path | None = None) -> None:
        self._config = config
        provider = config.provider
        # Read on every dispatch: worked out once (the config is frozen; its workers_per_node
        # validates the accelerator list each time it is read).
        self._capacity = config.workers_per_node * provider.nodes_per_block * max(1, provider.max_blocks)
        self._run_dir = run_dir
        self._tasks: dict[str, _Task] = {}
        self._waiting: collections.deque[str] = collections.deque()
        #: Jobs at Parsl, and the Parsl tasks (bundles) carrying them.
        self._in_parsl = 0
        self._bundles_in_parsl = 0
        #: Jobs and Parsl tasks submitted to Parsl so far, retries included.
        self._sent = (0, 0)
        #: Open ``together`` blocks: jobs wait for the last to end.
        self._held = 0
        #: Whether this thread is in ``_dispatch`` already.
        self._dispatching = threading.local()
        self._run_times = RunTimes()
        self._lock = threading.Lock()
        # HTEX's submit is not thread-safe (a shared ZeroMQ socket, a task counter), and
        # jobs arrive from the agent's thread while retries and queued jobs go out from
        # Parsl's result thread: one lock around every submit, as Parsl's DFK has.
        self._submit_lock = threading.Lock()
        self._executor: Any = None
        self._poller: Any = None
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None
        self._closing = False
        self._blocks: dict[str, str] = {}
        self._manager_blocks: dict[str, str] = {}
        self._snapshot: dict[str, Any] = {"provider": config.provider.type}

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def _parsl_limit(self) -> int:
        """How many bundles Parsl may hold: enough to keep every worker fed between round trips."""
        return self.capacity * self._config.parsl_tasks_per_worker

    @property
    def busy(self) -> int:
        return min(self._in_parsl, self.capacity)

    @property
    def run_dir(self) -> Path | None:
        """Where Parsl keeps its logs and submit scripts (set once started)."""
        return self._run_dir

    def start(self) -> None:
        if self._run_dir is None:
            self._tempdir = tempfile.TemporaryDirectory(prefix="gc-htex-")
            self._run_dir = Path(self._tempdir.name)
        self._run_dir.mkdir(parents=True, exist_ok=True)
        self._executor = _build_executor(self._config, self._run_dir)
        logging.getLogger("parsl.executors.high_throughput.executor").addFilter(_quiet_scale_in)
        self._executor.start()
        self._poller = _make_poller(self._config, self._on_poll)
        self._poller.add_executors([self._executor])
        # The strategy starts the init_blocks on its first run, a whole period from now
        # (Parsl's DFK waits too): run it once at once, before the poller's thread does.
        self._poller.poll()
        logger.info("htex engine started: %d workers per node, provider %s, interchange on %s "
                    "(%s), run dir %s", self._config.max_workers_per_node,
                    self._config.provider.type, self._executor.address,
                    "CurveZMQ" if self._config.encrypted else "unencrypted", self._run_dir)

    def status(self) -> dict[str, Any]:
        """Blocks by state, managers and workers as of the last poll, and the jobs held here."""
        with self._lock:
            waiting, in_parsl, (sent, parsl_tasks) = len(self._waiting), self._in_parsl, self._sent
        return {**self._snapshot, "tasks_waiting": waiting, "tasks_at_parsl": in_parsl,
                "tasks_sent": sent, "parsl_tasks_sent": parsl_tasks}

    def _on_poll(self, executor: Any) -> None:
        """After each scaling pass: log block state changes, note what status reports."""
        managers = executor.connected_managers()
        self._manager_blocks.update((m["manager"], m["block_id"]) for m in managers)
        managers = [m for m in managers if m["active"]]
        blocks = block_states({block_id: status.state.name.lower()
                               for block_id, status in executor.status_facade.items()},
                              {str(m["block_id"]) for m in managers})
        for block_id, state in blocks.items():
            if self._blocks.get(block_id) != state:
                logger.info("htex block %s (job %s): %s", block_id,
                            executor.blocks_to_job_id.get(block_id, "?"), state)
        self._blocks = blocks
        workers = sum(int(m["worker_count"]) for m in managers)
        busy = sum(min(int(m["tasks"]), int(m["worker_count"])) for m in managers)
        states = collections.Counter(blocks.values())
        # Every state seen (a metric's label), pending and running even at 0 (the heartbeat's).
        self._snapshot = {"provider": self._config.provider.type,
                          **{f"blocks_{state}": count for state, count in states.items()},
                          "blocks_pending": states["pending"], "blocks_running": states["running"],
                          "managers": len(managers), "workers": workers, "workers_busy": busy,
                          "workers_idle": workers - busy}

    def submit(self, job: Job, on_done: OnDone) -> None:
        # (a resource specification with a key no engine honours never gets here: policy.py)
        with self._lock:
            self._tasks[job.task_id] = _Task(job, on_done)
            self._waiting.append(job.task_id)
            if self._held:
                return
        self._dispatch()

    @contextmanager
    def together(self) -> Iterator[None]:
        """Hold the jobs submitted inside, then send them on: quick ones in bundles."""
        with self._lock:
            self._held += 1
        try:
            yield
        finally:
            with self._lock:
                self._held -= 1
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
                self._poller.stop(timeout=self._config.shutdown_timeout)
            if self._executor is not None:
                _cancel_blocks(self._executor)
                self._executor.shutdown(timeout=self._config.shutdown_timeout)
        finally:
            self._poller = self._executor = None
            if self._tempdir is not None:
                self._tempdir.cleanup()
                self._tempdir = None

    def _dispatch(self) -> None:
        """Hand waiting jobs to Parsl while it holds fewer than its limit of our bundles.

        A submit Parsl refuses at once (every block failed) is answered within ``_launch``,
        and answering dispatches again: on this thread, the loop already running here
        goes on instead, or a backlog would nest a call per job until Python's recursion
        limit left the rest unanswered."""
        if getattr(self._dispatching, "active", False):
            return
        self._dispatching.active = True
        try:
            while True:
                with self._lock:
                    if self._closing or not self._waiting \
                            or self._bundles_in_parsl >= self._parsl_limit:
                        return
                    bundle = self._next_bundle()
                    self._in_parsl += len(bundle)
                    self._bundles_in_parsl += 1
                    self._count_attempts(bundle)
                self._launch(bundle)
        finally:
            self._dispatching.active = False

    def _next_bundle(self) -> list[_Task]:
        """Under the lock: the next waiting job and the quick ones after it that fit in one
        bundle with it (``bundle_seconds``)."""
        bundle = [self._tasks[self._waiting.popleft()]]
        seconds, size = self._with(0.0, bundle[0], []), 0
        while seconds is not None and len(bundle) < MAX_BUNDLE and self._waiting:
            task = self._tasks[self._waiting[0]]
            size += len(task.job.payload) + len(task.job.function_payload)
            seconds = self._with(seconds, task, bundle)
            if seconds is None or size > MAX_BUNDLE_BYTES:
                break
            bundle.append(task)
            self._waiting.popleft()
        return bundle

    def _with(self, seconds: float, task: _Task, bundle: list[_Task]) -> float | None:
        """Under the lock: the seconds of ``bundle`` (``seconds`` so far) with ``task`` added,
        or None if ``task`` travels alone or may not join it (``RunTimes.added``)."""
        if task.alone or task.job.resource_spec:
            return None
        return self._run_times.added(seconds, task.job, bundle[0].job if bundle else None,
                                     self._config.bundle_seconds)

    def _count_attempts(self, bundle: list[_Task]) -> None:
        """Under the lock, as the jobs leave the queue: one more attempt each, so that a
        cancel from then on knows them handed to Parsl (it no longer finds them queued)."""
        for task in bundle:
            task.attempt += 1
        self._sent = (self._sent[0] + len(bundle), self._sent[1] + 1)

    def _launch(self, bundle: list[_Task]) -> None:
        """Submit this attempt of ``bundle`` to Parsl; count it as lost if Parsl refuses it."""
        attempt = bundle[0].attempt  # (what a retry of a lone job counts)
        spec = {k: v for k, v in bundle[0].job.resource_spec.items() if k in PARSL_RESOURCE_KEYS}
        context: dict[str, Any] = {"task_executor": {"f": WORKER_ENTRY}}
        if spec:
            context["resource_spec"] = spec
        try:
            buffer = pickle.dumps([task.job for task in bundle], protocol=pickle.HIGHEST_PROTOCOL)
            with self._submit_lock:
                future = self._executor.submit_payload(context, buffer)
        except Exception as exc:  # noqa: BLE001 - BadStateException once every block failed: it
            # becomes these tasks' outcome, never the caller's error
            failed: Future[Any] = Future()
            failed.set_exception(exc)
            future = failed
        future.add_done_callback(lambda done: self._finished(bundle, attempt, done))

    def _finished(self, bundle: list[_Task], attempt: int, future: Future[Any]) -> None:
        exc = future.exception()
        lost = exc is not None and _is_system_failure(exc) and not self._closing
        if lost and len(bundle) > 1:
            self._split(bundle, exc)
            return
        task = bundle[0]
        # (a lost job's failure is made below, once it is not to run again)
        outcomes = None if lost else self._outcomes_of(bundle, future)
        with self._lock:
            current = [self._tasks.get(each.job.task_id) is each for each in bundle]
            retry = lost and current[0] and attempt <= self._config.max_retries_on_system_failure
            if retry:
                self._count_attempts(bundle)
            else:
                self._in_parsl -= len(bundle)
                self._bundles_in_parsl -= 1
                answered = len(bundle) if outcomes is None else len(outcomes)
                for each, is_current in zip(bundle[:answered], current):
                    if is_current:
                        del self._tasks[each.job.task_id]
                self._send_again(bundle[answered:])
                for each, outcome in zip(bundle, outcomes or []):
                    self._run_times.note(each.job.function_id, outcome)
        if retry:
            logger.warning("task %s lost its worker (%s%s); running it again (retry %d of %d)",
                           task.job.task_id, exc, self._job_of(exc), attempt,
                           self._config.max_retries_on_system_failure)
            self._launch(bundle)
            return
        # The next jobs first: Parsl's workers need not wait while the agent answers these.
        self._dispatch()
        if outcomes is None:  # lost, and not to run again
            assert exc is not None
            outcomes = [self._failure_of(task, exc)]
        for each, outcome, is_current in zip(bundle, outcomes, current):
            if not is_current:
                continue  # cancelled: its outcome went out already
            try:
                each.on_done(outcome)
            except Exception:
                logger.exception("handling the outcome of task %s failed", each.job.task_id)

    def _split(self, bundle: list[_Task], exc: BaseException | None) -> None:
        """Put the jobs of a bundle whose worker was lost back first in line, each to travel
        alone: the next loss, if any, names the job that caused it."""
        with self._lock:
            self._in_parsl -= len(bundle)
            self._bundles_in_parsl -= 1
            self._send_again(bundle, alone=True)
        logger.warning("a worker was lost with a bundle of %d tasks (%s%s); each runs again alone",
                       len(bundle), exc, self._job_of(exc))
        self._dispatch()

    def _send_again(self, tasks: list[_Task], *, alone: bool = False) -> None:
        """Under the lock: put ``tasks`` back first in line, in their order, as never sent
        (``alone``: each to travel in a bundle of its own); one cancelled meanwhile is not."""
        for task in reversed(tasks):
            if self._tasks.get(task.job.task_id) is task:
                task.attempt, task.alone = 0, task.alone or alone
                self._waiting.appendleft(task.job.task_id)

    def _job_of(self, exc: BaseException | None) -> str:
        """`` (block B, batch job J)`` for a lost manager whose block is known, else ''."""
        manager = getattr(exc, "manager_id", b"")
        block = self._manager_blocks.get(manager.decode() if isinstance(manager, bytes) else "")
        if block is None or self._executor is None:
            return ""
        job = self._executor.blocks_to_job_id.get(block, "?")
        return f" (block {block}, {self._config.provider.type} job {job})"

    def _outcomes_of(self, bundle: list[_Task], future: Future[Any]) -> list[Outcome]:
        """Each job's outcome: as its worker reported it, or the bundle's failure."""
        exc = future.exception()
        if exc is None:
            try:
                outcomes: list[Outcome] = pickle.loads(future.result())
            except Exception as unreadable:  # noqa: BLE001 - each task fails, saying why
                exc = unreadable
            else:
                # (a worker leaves the rest of a bundle whose answers grew large unrun)
                if outcomes and [o.task_id for o in outcomes] == [
                        task.job.task_id for task in bundle[:len(outcomes)]]:
                    return outcomes
                exc = ValueError(f"its worker's {len(outcomes)} answers do not match the "
                                 f"{len(bundle)} tasks it was sent (are the workers' gc-fabric "
                                 "and the agent's the same?)")
        return [self._failure_of(task, exc) for task in bundle]

    def _failure_of(self, task: _Task, exc: BaseException) -> Outcome:
        task_id = task.job.task_id
        if _is_system_failure(exc):
            message = (f"task {task_id} was lost with its worker {task.attempt} times "
                       f"(max_retries_on_system_failure is "
                       f"{self._config.max_retries_on_system_failure}); last: {exc}"
                       f"{self._job_of(exc)}")
            logger.warning("%s", message)
            return Outcome(task_id, "failed", error=ErrorInfo(type="WorkerLost", message=message),
                           worker=_host_of(exc))
        # Parsl (or pickle) could not ship the task, or its outcome could not be read.
        return Outcome(task_id, "failed", error=ErrorInfo(
            type=type(exc).__name__, message=f"the high-throughput engine refused task {task_id}: "
                                             f"{exc}"))


def _quiet_scale_in(record: logging.LogRecord) -> bool:
    """Drop Parsl's warning, on every scaling pass while tasks run, that no block was idle
    long enough to release: that is the normal case, not a problem."""
    return not record.getMessage().startswith("Could not find enough blocks to kill")


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
    from parsl.executors.high_throughput.executor import DEFAULT_LAUNCH_CMD

    from gc_agent.addresses import resolve_address
    from gc_agent.containers import containerized_launch_cmd
    from gc_agent.providers import build_provider

    # Parsl starts interchange.py and process_worker_pool.py by name from PATH, which lacks
    # the scripts of an agent run from an unactivated venv. The interchange runs here: start
    # its module with our Python. Worker pools: put our scripts first on the pools' PATH (the
    # config's worker_init can still change it, e.g. to activate another environment on the
    # nodes) — or, for a Python without them beside it (a multi-user endpoint's user engine
    # runs the system Python with gc-fabric on PYTHONPATH), run the pool's module with it.
    bin_dir = Path(sys.executable).parent
    launch_cmd = DEFAULT_LAUNCH_CMD
    if not (bin_dir / "process_worker_pool.py").exists():
        launch_cmd = launch_cmd.replace("process_worker_pool.py", f"{shlex.quote(sys.executable)} "
                                        "-m parsl.executors.high_throughput.process_worker_pool", 1)
    if config.container is not None:
        launch_cmd = containerized_launch_cmd(config.container, DEFAULT_LAUNCH_CMD, str(run_dir))
    provider = build_provider(config.provider, worker_init_prefix="\n".join([
        _SCRUB_FABRIC_VARIABLES, f"export PATH={shlex.quote(str(bin_dir))}:$PATH"]))
    executor = HighThroughputExecutor(
        label=config.label,
        address=resolve_address(config.address),
        provider=provider,
        max_workers_per_node=config.max_workers_per_node,
        available_accelerators=list(config.available_accelerators),
        cores_per_worker=config.cores_per_worker,
        mem_per_worker=config.mem_per_worker,
        prefetch_capacity=config.prefetch_capacity,
        worker_debug=config.worker_debug,
        launch_cmd=launch_cmd,
        interchange_launch_cmd=_interchange_command(),
        heartbeat_period=config.heartbeat_period,
        heartbeat_threshold=config.heartbeat_threshold,
        drain_period=config.drain_period,
        encrypted=config.encrypted,
    )
    executor.run_id = str(uuid.uuid4())
    executor.run_dir = str(run_dir)
    script_dir = run_dir / "submit_scripts"
    script_dir.mkdir(parents=True, exist_ok=True)
    provider.script_dir = str(script_dir)
    return executor


def _interchange_command() -> list[str]:
    """The interchange, run by our Python, stopped by the kernel if the agent dies.

    An interchange that outlives a killed agent keeps heartbeating its blocks' pools, and so
    their batch jobs run on to their walltime. ``setpriv --pdeathsig`` (util-linux) makes
    the kernel send it SIGTERM when the thread that started it ends: the engine is started
    from the agent's main thread (or the user engine's), which lives as long as the agent.
    """
    command = [sys.executable, "-m", "parsl.executors.high_throughput.interchange"]
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", *command] if setpriv else command


def _cancel_blocks(executor: Any) -> None:
    """Cancel every block not known to have ended, through the provider alone.

    Parsl's own scale-in asks the interchange which managers to hold first, and waits for
    ever if it is gone — as it is when a service manager signals the agent's whole process
    group at stop. ``scancel``/``qdel``/``bkill`` (or killing a local block) needs no
    interchange, so a stopping agent never leaves batch jobs behind.
    """
    live = [job_id for block_id, job_id in executor.blocks_to_job_id.items()
            if not (status := executor.status_facade.get(block_id)) or not status.terminal]
    if not live:
        return
    try:
        executor.provider.cancel(live)
        logger.info("cancelled htex blocks (jobs %s)", ", ".join(live))
    except Exception:
        logger.warning("cancelling the htex blocks (jobs %s) failed", ", ".join(live),
                       exc_info=True)


def block_states(polled: dict[str, str], with_managers: set[str]) -> dict[str, str]:
    """Each block's state: the provider's, but running once a manager of it has connected.

    Parsl asks the provider for its jobs' states only every few seconds (5 for a local
    block), and a block stays "pending" until then; its workers may be connected, and
    running tasks, well before.
    """
    return {block_id: "running" if state == "pending" and block_id in with_managers else state
            for block_id, state in polled.items()}


def _make_poller(config: HtexEngineConfig, on_poll: Callable[[Any], None]) -> Any:
    """Parsl's job-status poller (the DFK's scaling loop), calling ``on_poll`` after each pass."""
    from parsl.jobs.job_status_poller import JobStatusPoller
    from parsl.utils import Timer

    class Poller(JobStatusPoller):
        def stop(self, timeout: float) -> None:
            """End the scaling loop, waiting at most ``timeout`` for a pass under way."""
            Timer.close(self, timeout)

        def poll(self) -> None:
            super().poll()
            for executor in self._executors:
                try:
                    on_poll(executor)
                except Exception:  # the status report must never stop the scaling loop
                    logger.warning("reading the htex engine's status failed", exc_info=True)

    return Poller(strategy=STRATEGY, max_idletime=config.idle_timeout,
                  strategy_period=config.strategy_period)


#: Block shell that unsets the fabric's variables (the broker URL with its password, the
#: agent's token) which a block inherits from the agent, as a batch job inherits its
#: submitter's environment: task code on the workers must never see them.
_SCRUB_FABRIC_VARIABLES = (
    f"for gc_var in $(env | sed -n 's/^\\({FABRIC_VARIABLE_PREFIX}[A-Za-z0-9_]*\\)=.*/\\1/p'); "
    'do unset "$gc_var"; done; unset gc_var')


def default_run_dir(endpoint_name: str, config: HtexEngineConfig) -> Path | None:
    """Parsl's run directory for an endpoint: the config's, else under ``$GC_HOME``, else None
    (a temporary directory)."""
    if config.run_dir:
        return Path(config.run_dir)
    home = os.environ.get("GC_HOME")
    return Path(home) / "endpoints" / endpoint_name / "htex" if home else None
