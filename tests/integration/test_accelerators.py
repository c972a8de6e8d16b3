"""available_accelerators: each worker sees one device only, and no more workers than devices.

There is no GPU here, and none is needed: pinning is the variables each GPU runtime reads
(CUDA_VISIBLE_DEVICES, ROCR_VISIBLE_DEVICES, ZE_AFFINITY_MASK, ...), so fake device ids show
it. Tasks meet at a rendezvous (a directory each one writes to, waiting for the others), so
the tasks of one round run at once, on as many distinct workers.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from gc_agent.accelerators import DEVICE_VARIABLES
from gc_client import Client, Executor
from tests.fabric import Endpoint, Fabric, eventually

#: Repository root: htex worker pools import this module's functions from it.
REPO_ROOT = Path(__file__).resolve().parents[2]
#: Seconds a test waits for results (an htex block takes a few to come up).
RESULT_TIMEOUT = 120
#: Fake device ids of the process engine's endpoint: three, for four configured workers.
PROCESS_DEVICES = ["gpu-a", "gpu-b", "gpu-c"]
#: Fake device ids of the htex endpoint's node: two, for four configured workers.
HTEX_DEVICES = ["xe-0", "xe-1"]


def devices_at_rendezvous(directory: str, expected: int) -> dict[str, str]:
    """Note this worker in ``directory``, wait until ``expected`` workers have (60 s at most),
    and return what its task sees of each device variable, and how many had arrived."""
    import os
    import time
    from pathlib import Path

    from gc_agent.accelerators import DEVICE_VARIABLES

    Path(directory, str(os.getpid())).touch()
    deadline = time.monotonic() + 60
    while len(os.listdir(directory)) < expected and time.monotonic() < deadline:
        time.sleep(0.05)
    seen = {name: os.environ.get(name, "") for name in DEVICE_VARIABLES}
    return {**seen, "arrived": str(len(os.listdir(directory))), "pid": str(os.getpid())}


def _gc_config(endpoint: Endpoint, engine: dict[str, object]) -> None:
    """Rewrite the endpoint's config.yaml with an engine section in Globus Compute's
    vocabulary, left as it is: the agent maps it when it loads it."""
    path = endpoint.directory / "config.yaml"
    config = yaml.safe_load(path.read_text())
    config["engine"] = engine
    config["heartbeat_period"] = 1
    path.write_text(yaml.safe_dump(config))


@pytest.fixture(scope="module")
def pinned_processes(fabric: Fabric) -> Iterator[Endpoint]:
    """A process pool of four workers on three fake devices, from a Globus Compute config."""
    endpoint = fabric.configure_endpoint(f"pinned-{uuid.uuid4().hex[:8]}")
    _gc_config(endpoint, {"type": "ProcessPoolEngine", "max_workers": 4,
                          "available_accelerators": PROCESS_DEVICES})
    endpoint.start()
    yield endpoint
    endpoint.stop_all()


@pytest.fixture(scope="module")
def pinned_htex(fabric: Fabric) -> Iterator[Endpoint]:
    """An htex engine on one local block: four workers per node, two fake devices."""
    pytest.importorskip("parsl", reason="the htex engine needs Parsl")
    endpoint = fabric.configure_endpoint(f"pinned-htex-{uuid.uuid4().hex[:8]}")
    _gc_config(endpoint, {
        "type": "GlobusComputeEngine", "max_workers_per_node": 4,
        "available_accelerators": HTEX_DEVICES, "heartbeat_period": 1,
        "provider": {"type": "LocalProvider", "init_blocks": 1, "min_blocks": 1,
                     "max_blocks": 1, "worker_init": f"export PYTHONPATH={REPO_ROOT}"}})
    endpoint.start()
    yield endpoint
    endpoint.stop_all()


def _one_round(client: Client, endpoint: Endpoint, tmp_path: Path,
               workers: int) -> list[dict[str, str]]:
    """``workers`` tasks that run at once, one per worker; what each saw."""
    with Executor(endpoint_id=endpoint.endpoint_id, client=client) as ex:
        futures = [ex.submit(devices_at_rendezvous, str(tmp_path), workers)
                   for _ in range(workers)]
        return [future.result(timeout=RESULT_TIMEOUT) for future in futures]


def test_each_process_worker_sees_its_own_device_in_every_gpu_variable(
        client: Client, pinned_processes: Endpoint, tmp_path: Path) -> None:
    seen = _one_round(client, pinned_processes, tmp_path, len(PROCESS_DEVICES))

    assert {task["arrived"] for task in seen} == {"3"}  # all ran at once, on three workers
    assert sorted(task["CUDA_VISIBLE_DEVICES"] for task in seen) == PROCESS_DEVICES
    for task in seen:
        assert {task[name] for name in DEVICE_VARIABLES} == {task["CUDA_VISIBLE_DEVICES"]}


def test_the_process_pool_runs_no_more_workers_than_devices(
        client: Client, pinned_processes: Endpoint) -> None:
    status = eventually(lambda: (s := client.get_endpoint_status(pinned_processes.endpoint_id))
                        .details.get("workers") is not None and s, what="a heartbeat")

    assert status.details["workers"] == len(PROCESS_DEVICES)  # 4 configured, 3 devices


def test_a_replaced_worker_keeps_the_device_of_its_slot(
        client: Client, pinned_processes: Endpoint, tmp_path: Path) -> None:
    before_dir, after_dir = tmp_path / "before", tmp_path / "after"
    before_dir.mkdir()
    after_dir.mkdir()
    before = _one_round(client, pinned_processes, before_dir, len(PROCESS_DEVICES))
    with Executor(endpoint_id=pinned_processes.endpoint_id, client=client) as ex:
        # Each delivery of this task ends its worker process, and its slot starts a new one.
        ex.submit(_exit_worker).exception(timeout=RESULT_TIMEOUT)

    after = _one_round(client, pinned_processes, after_dir, len(PROCESS_DEVICES))

    assert {task["pid"] for task in after} != {task["pid"] for task in before}
    assert sorted(task["CUDA_VISIBLE_DEVICES"] for task in after) == PROCESS_DEVICES


def _exit_worker() -> None:
    import os

    os._exit(3)


def test_each_htex_worker_sees_its_own_device_and_the_node_runs_one_per_device(
        client: Client, pinned_htex: Endpoint, tmp_path: Path) -> None:
    seen = _one_round(client, pinned_htex, tmp_path, len(HTEX_DEVICES))

    assert {task["arrived"] for task in seen} == {"2"}
    assert sorted(task["CUDA_VISIBLE_DEVICES"] for task in seen) == HTEX_DEVICES
    for task in seen:  # Parsl's worker pool pins CUDA, ROCm and Level Zero
        device = task["CUDA_VISIBLE_DEVICES"]
        assert (task["ROCR_VISIBLE_DEVICES"], task["ZE_AFFINITY_MASK"]) == (device, device)
    status = eventually(lambda: (s := client.get_endpoint_status(pinned_htex.endpoint_id))
                        .details.get("engine_status", {}).get("workers") and s,
                        what="the worker pool in a heartbeat")
    assert status.details["engine_status"]["workers"] == len(HTEX_DEVICES)
