"""The htex engine on a real Slurm, through the whole fabric.

client ─▶ RabbitMQ ─▶ agent ─▶ interchange ─▶ Slurm jobs (blocks) ─▶ worker pools ─▶ workers,
and back. One endpoint serves the module: up to two blocks of two workers, none at first,
released after a few idle seconds. Heartbeats and thresholds are short so that lost blocks
and workers are noticed in seconds, not minutes. The tests run in file order: the last one
checks that the blocks the others used are released.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("parsl", reason="the htex engine needs Parsl (pip install parsl)")

from gc_agent.config import HtexEngineConfig, load_config, save_config
from gc_agent.providers import SlurmProviderConfig
from gc_client import Client, Executor, TaskExecutionFailed
from tests.fabric import Endpoint, Fabric, eventually
from tests.scheduler.conftest import Slurm

#: Repository root: the worker pools import this module's functions (pickled by reference).
REPO_ROOT = Path(__file__).resolve().parents[2]
#: Seconds a test waits for a result (a block must be submitted, start and connect first).
RESULT_TIMEOUT = 120
#: Seconds a block may stay idle before it is released.
IDLE_TIMEOUT = 4.0
#: Blocks the endpoint may hold at once.
MAX_BLOCKS = 2


def slurm_job() -> str:
    import os

    return os.environ.get("SLURM_JOB_ID", "")


def nap_in_job(seconds: float) -> str:
    import os
    import time

    time.sleep(seconds)
    return os.environ.get("SLURM_JOB_ID", "")


def lose_once_in_job(marker: str, seconds: float) -> str:
    """First run: note this worker's pid and sleep (to be killed); a rerun: return the job id."""
    import os
    import time
    from pathlib import Path

    path = Path(marker)
    if path.exists():
        return os.environ.get("SLURM_JOB_ID", "")
    path.write_text(str(os.getpid()))
    time.sleep(seconds)
    return "not killed"


def seen_resource_spec() -> dict[str, object]:
    from gc_core.task_context import current_resource_spec

    return current_resource_spec()


@pytest.fixture(scope="module")
def label() -> str:
    """The engine's label: Parsl names our Slurm jobs ``parsl.<label>.block-<n>``."""
    return f"gc{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def slurm_endpoint(fabric: Fabric, slurm: Slurm, label: str) -> Iterator[Endpoint]:
    """An endpoint whose htex engine gets up to MAX_BLOCKS blocks from Slurm."""
    ep = _configure(fabric, slurm, label, max_workers_per_node=2, idle_timeout=IDLE_TIMEOUT,
                    max_blocks=MAX_BLOCKS)
    ep.start()
    yield ep
    _clean_up(ep, slurm, label)


def _configure(fabric: Fabric, slurm: Slurm, label: str, *, walltime: str = "00:10:00",
               init_blocks: int = 0, max_blocks: int = 1, **engine: Any) -> Endpoint:
    """An endpoint whose htex engine's blocks are Slurm jobs named ``parsl.<label>.…``, with
    short heartbeats, thresholds and polls so that changes are seen in seconds."""
    ep = fabric.configure_endpoint(f"slurm-{label}", heartbeat_period=1.0)
    config = HtexEngineConfig(
        type="htex", label=label, max_retries_on_system_failure=2, heartbeat_period=1,
        heartbeat_threshold=5, strategy_period=1, **engine, provider=SlurmProviderConfig(
            type="slurm", partition=slurm.partition, walltime=walltime, init_blocks=init_blocks,
            min_blocks=init_blocks, max_blocks=max_blocks, exclusive=False, status_poll_period=1,
            worker_init=f"export PYTHONPATH={REPO_ROOT}"))
    path = ep.directory / "config.yaml"
    save_config(load_config(path).model_copy(update={"engine": config}), path)
    return ep


def _clean_up(ep: Endpoint, slurm: Slurm, label: str) -> None:
    ep.stop_all()
    for job_id in slurm.jobs(f"parsl.{label}."):  # whatever a failed test left behind
        slurm.cancel(job_id)


def test_the_htex_engine_runs_tasks_in_a_slurm_job(slurm: Slurm, tmp_path: Path) -> None:
    import cloudpickle

    from gc_agent.engines.htex import HtexEngine
    from gc_agent.execution import Job, Outcome
    from gc_client.tasks import make_task
    from gc_core.serialize import CLOUDPICKLE, PYTHON_VERSION

    # Given an engine alone (no agent) whose one block is a Slurm job
    engine = HtexEngine(HtexEngineConfig(type="htex", max_workers_per_node=2, provider=(
        SlurmProviderConfig(type="slurm", partition=slurm.partition, walltime="00:05:00",
                            init_blocks=1, max_blocks=1, exclusive=False,
                            worker_init=f"export PYTHONPATH={REPO_ROOT}"))), tmp_path / "run")
    done: queue.SimpleQueue[Outcome] = queue.SimpleQueue()
    engine.start()
    try:
        # When two tasks run there
        for _ in range(2):
            task = make_task(endpoint_id="ep-1", function_id="f-slurm", user="alice",
                             task_group_id="g", serializer=CLOUDPICKLE, args=(), kwargs={})
            engine.submit(Job(task_id=task.task_id, function_id="f-slurm",
                              function_payload=cloudpickle.dumps(slurm_job),
                              function_python=PYTHON_VERSION, content_type=task.content_type,
                              payload=task.payload, sender_python=task.sender_python,
                              sender_serializer=task.sender_serializer), done.put)
        outcomes = [done.get(timeout=RESULT_TIMEOUT) for _ in range(2)]
    finally:
        engine.shutdown()

    # Then both ran inside the same Slurm job, which their worker info names
    assert all(o.state == "success" for o in outcomes), [o.error for o in outcomes]
    job_ids = {CLOUDPICKLE.loads(o.payload) for o in outcomes}
    assert len(job_ids) == 1 and job_ids != {""}
    job_id = job_ids.pop()
    assert all(o.worker.endswith(f"block 0 slurm job {job_id}") for o in outcomes)


class _BlockWatch:
    """Counts our Slurm jobs every few tenths of a second while a sweep runs."""

    def __init__(self, slurm: Slurm, prefix: str) -> None:
        self._slurm, self._prefix = slurm, prefix
        self.most = 0
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> _BlockWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(0.3):
            jobs = self._slurm.jobs(self._prefix)
            self.most = max(self.most, len(jobs))
            self.seen.update(jobs)


def test_a_200_task_sweep_runs_on_workers_inside_slurm_jobs_never_above_max_blocks(
        client: Client, slurm_endpoint: Endpoint, slurm: Slurm, label: str) -> None:
    # Given no block yet; when a 200-task sweep arrives
    with _BlockWatch(slurm, f"parsl.{label}.") as watch, \
            Executor(endpoint_id=slurm_endpoint.endpoint_id, client=client) as ex:
        futures = [ex.submit(slurm_job) for _ in range(200)]
        job_ids = [f.result(timeout=RESULT_TIMEOUT) for f in futures]

    # Then every task ran inside one of our Slurm jobs, and there were never more than max_blocks
    assert all(job_ids), "every task saw SLURM_JOB_ID"
    assert set(job_ids) <= watch.seen
    assert 1 <= watch.most <= MAX_BLOCKS
    # and each task's worker info in the ledger names the Slurm job it ran in
    task_ids = [f.task_id for f in futures]
    workers = eventually(lambda: _workers_once_all_recorded(client, task_ids), 30,
                         "the ledger to record all 200 results")
    assert all(f"slurm job {job_id}" in worker for worker, job_id in zip(workers, job_ids))


def test_the_heartbeat_reports_blocks_managers_and_busy_workers(
        client: Client, slurm_endpoint: Endpoint, tmp_path: Path) -> None:
    marker = tmp_path / "running.pid"

    with Executor(endpoint_id=slurm_endpoint.endpoint_id, client=client) as ex:
        # Given a task running in a block
        future = ex.submit(lose_once_in_job, str(marker), 4)
        eventually(marker.exists, RESULT_TIMEOUT, "the task to start")

        # Then the endpoint's status shows a running block, its manager and a busy worker
        def engine_status() -> dict[str, object] | None:
            details = client.get_endpoint_status(slurm_endpoint.endpoint_id).details or {}
            status = details.get("engine_status") or {}
            busy = status.get("blocks_running", 0) >= 1 and status.get("workers_busy", 0) >= 1
            return status if busy else None

        status = eventually(engine_status, 30, "a heartbeat showing a busy worker")
        future.result(timeout=RESULT_TIMEOUT)

    assert status["provider"] == "slurm"
    assert status["managers"] >= 1 and status["workers"] == 2 * status["managers"]
    assert status["workers_idle"] == status["workers"] - status["workers_busy"]


def test_scancel_of_the_running_blocks_mid_sweep_reruns_their_tasks_on_new_blocks(
        client: Client, slurm_endpoint: Endpoint, slurm: Slurm, label: str) -> None:
    with Executor(endpoint_id=slurm_endpoint.endpoint_id, client=client) as ex:
        # Given a sweep under way on our blocks
        futures = [ex.submit(nap_in_job, 1.0) for _ in range(16)]
        first = futures[0].result(timeout=RESULT_TIMEOUT)
        running = [job_id for job_id, state in slurm.jobs(f"parsl.{label}.").items()
                   if state == "RUNNING"]
        assert first in running

        # When every running block is cancelled
        slurm.cancel(*running)

        # Then no task is lost: the ones that ran there run again, on blocks started since
        job_ids = [f.result(timeout=RESULT_TIMEOUT) for f in futures]
    assert all(job_ids)
    assert set(job_ids) - set(running), "some tasks ran on a block started after the scancel"
    assert "lost its worker" in slurm_endpoint.read_logs()


def test_kill_9_of_a_worker_inside_a_slurm_job_reruns_its_task(
        client: Client, slurm_endpoint: Endpoint, tmp_path: Path) -> None:
    marker = tmp_path / "worker.pid"

    with Executor(endpoint_id=slurm_endpoint.endpoint_id, client=client) as ex:
        # Given a task running on a worker in a Slurm job
        future = ex.submit(lose_once_in_job, str(marker), 120)
        pid = int(eventually(lambda: marker.exists() and marker.read_text(), RESULT_TIMEOUT,
                             "the task to start"))
        assert "SLURM_JOB_ID" in _environment(pid)

        # When that worker is killed
        os.kill(pid, signal.SIGKILL)

        # Then the task runs again and succeeds, inside a Slurm job
        assert future.result(timeout=RESULT_TIMEOUT)


def test_an_unknown_resource_specification_key_fails_the_task_naming_it_and_the_allowed_ones(
        client: Client, slurm_endpoint: Endpoint) -> None:
    with Executor(endpoint_id=slurm_endpoint.endpoint_id, client=client,
                  resource_specification={"cores": 4}) as ex:
        with pytest.raises(TaskExecutionFailed) as caught:
            ex.submit(seen_resource_spec).result(timeout=RESULT_TIMEOUT)

    assert caught.value.remote_type == "InvalidResourceSpecification"
    assert "'cores'" in caught.value.remote_message
    assert "priority" in caught.value.remote_message and "num_nodes" in caught.value.remote_message


def test_blocks_are_released_once_idle(slurm_endpoint: Endpoint, slurm: Slurm,
                                       label: str) -> None:
    # Given the sweeps above are done; then our jobs leave squeue once idle_timeout has passed
    # (plus a scaling pass and Slurm's own clean-up)
    eventually(lambda: not slurm.jobs(f"parsl.{label}."), IDLE_TIMEOUT + 30,
               "our Slurm jobs to be released")
    assert "scaled_in" in slurm_endpoint.read_logs()


def _workers_once_all_recorded(client: Client, task_ids: list[str]) -> list[str] | None:
    tasks = client.registry.get_tasks(task_ids)
    if any(task.status != "success" for task in tasks):
        return None
    return [task.worker for task in tasks]


def _environment(pid: int) -> str:
    """The environment of ``pid``, as text."""
    return Path(f"/proc/{pid}/environ").read_bytes().replace(b"\0", b"\n").decode()



def test_an_agent_stopped_with_its_interchange_already_gone_still_cancels_its_blocks(
        fabric: Fabric, slurm: Slurm) -> None:
    # Given an agent holding one running block (as systemd stops a unit: SIGTERM to every
    # process of it, so the interchange may die before the agent drains)
    label = f"gc{uuid.uuid4().hex[:8]}"
    ep = _configure(fabric, slurm, label, init_blocks=1)
    agent = ep.start()
    try:
        eventually(lambda: "RUNNING" in slurm.jobs(f"parsl.{label}.").values(), RESULT_TIMEOUT,
                   "the block to run")
        interchange = next(pid for pid in _children(agent.pid) if "interchange" in _command(pid))

        # When the interchange is killed, then the agent is asked to stop
        os.kill(interchange, signal.SIGKILL)
        agent.terminate()

        # Then the agent exits by itself and its Slurm job is cancelled
        assert agent.wait(60) == 0
        eventually(lambda: not slurm.jobs(f"parsl.{label}."), 30, "our Slurm job to be cancelled")
    finally:
        _clean_up(ep, slurm, label)


def test_a_block_near_its_walltime_takes_no_new_task_and_a_new_block_runs_it(
        client: Client, fabric: Fabric, slurm: Slurm) -> None:
    # Given blocks of one minute whose workers drain 50 s before it ends
    label = f"gc{uuid.uuid4().hex[:8]}"
    ep = _configure(fabric, slurm, label, walltime="00:01:00", drain_margin=50)
    ep.start()
    try:
        with Executor(endpoint_id=ep.endpoint_id, client=client) as ex:
            first = ex.submit(slurm_job).result(timeout=RESULT_TIMEOUT)
            # When its block drains: its pool exits once idle, so its job ends before walltime
            eventually(lambda: first not in slurm.jobs(f"parsl.{label}."), 50,
                       f"block job {first} to drain and end")
            # Then the next task runs in a new block
            second = ex.submit(slurm_job).result(timeout=RESULT_TIMEOUT)
        assert first and second and second != first
        assert "TIMEOUT" not in _job_state(first)
    finally:
        _clean_up(ep, slurm, label)


def _job_state(job_id: str) -> str:
    done = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True)
    return done.stdout


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid``."""
    done = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                          text=True)
    return [int(word) for word in done.stdout.split()]


def _command(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().lower()


def test_kill_9_of_the_agent_takes_its_interchange_and_then_its_blocks_with_it(
        client: Client, fabric: Fabric, slurm: Slurm) -> None:
    # Given an agent whose block has run a task (so its workers are connected)
    label = f"gc{uuid.uuid4().hex[:8]}"
    ep = _configure(fabric, slurm, label)
    agent = ep.start()
    try:
        with Executor(endpoint_id=ep.endpoint_id, client=client) as ex:
            assert ex.submit(slurm_job).result(timeout=RESULT_TIMEOUT)
        interchange = next(pid for pid in _children(agent.pid) if "interchange" in _command(pid))

        # When the agent is killed outright
        ep.kill(signal.SIGKILL)

        # Then its interchange goes too, and the block's workers, losing it, end their job
        eventually(lambda: not Path(f"/proc/{interchange}").exists(), 30, "the interchange to exit")
        eventually(lambda: not slurm.jobs(f"parsl.{label}."), 60, "our Slurm job to end")
    finally:
        _clean_up(ep, slurm, label)
