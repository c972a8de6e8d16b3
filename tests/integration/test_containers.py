"""Workers in containers, for real: podman runs the processes, threads and htex engines'
workers in an image built here (tests/container_image.py), and each task proves where it
ran by reading a file only the image has."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gc_agent.config import HtexEngineConfig, load_config, save_config
from gc_agent.providers import LocalProviderConfig
from gc_client import Client, Executor
from gc_core.errors import GCError
from tests.container_image import (
    MARKER,
    MARKER_PATH,
    containers_conf,
    ensure_image,
    ensure_podman,
    mount_fabric_options,
)
from tests.fabric import Endpoint, Fabric, eventually

pytest.importorskip("parsl", reason="the htex case needs Parsl (pip install parsl)")


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The cached test image; agents started meanwhile run podman with runc."""
    ensure_podman()
    conf = containers_conf(tmp_path_factory.mktemp("podman"))
    before = os.environ.get("CONTAINERS_CONF")
    os.environ["CONTAINERS_CONF"] = str(conf)  # read by Fabric.env for the agents
    yield ensure_image(dict(os.environ))
    if before is None:
        del os.environ["CONTAINERS_CONF"]
    else:
        os.environ["CONTAINERS_CONF"] = before


@pytest.fixture(scope="module")
def shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory the tasks in containers may write to."""
    return tmp_path_factory.mktemp("shared")


def _with_container(endpoint: Endpoint, **keys: object) -> Endpoint:
    path = endpoint.directory / "config.yaml"
    config = load_config(path)
    save_config(config.model_copy(update={"engine": config.engine.model_copy(update=keys)}),
                path)
    assert load_config(path).engine.container is not None  # the file says what was meant
    return endpoint


@pytest.fixture(scope="module")
def endpoints(fabric: Fabric, image: str, shared_dir: Path) -> Iterator[dict[str, Endpoint]]:
    """One endpoint per engine, each running its workers in the image."""
    options = f"{mount_fabric_options()} -v {shared_dir}:{shared_dir}"
    keys = {"container_type": "podman", "container_uri": image, "container_cmd_options": options}
    made = {engine: _with_container(fabric.configure_endpoint(
        f"ct-{engine}-{uuid.uuid4().hex[:6]}", engine=engine, workers=2, heartbeat_period=1.0),
        **keys) for engine in ("processes", "threads")}
    htex = fabric.configure_endpoint(f"ct-htex-{uuid.uuid4().hex[:6]}", heartbeat_period=1.0)
    path = htex.directory / "config.yaml"
    save_config(load_config(path).model_copy(update={"engine": HtexEngineConfig.model_validate({
        "type": "htex", "max_workers_per_node": 1, "heartbeat_period": 1, **keys,
        "provider": LocalProviderConfig(init_blocks=1, min_blocks=1, max_blocks=1)})}), path)
    made["htex"] = htex
    for endpoint in made.values():
        endpoint.start()
    yield made
    for endpoint in made.values():
        endpoint.stop_all()


def read_marker(path: str) -> str:
    """What the task finds at ``path`` where it runs."""
    with open(path) as marker:
        return marker.read().strip()


@pytest.mark.parametrize("engine", ["processes", "threads", "htex"])
def test_a_task_runs_inside_the_engines_container(client: Client,
                                                  endpoints: dict[str, Endpoint],
                                                  engine: str) -> None:
    assert not Path(MARKER_PATH).exists(), "the host itself must not hold the image's marker"
    with Executor(endpoint_id=endpoints[engine].endpoint_id, client=client) as ex:
        assert ex.submit(read_marker, MARKER_PATH).result(timeout=180) == MARKER


def test_a_task_in_a_container_prints_and_fails_as_on_the_host(
        client: Client, endpoints: dict[str, Endpoint]) -> None:
    def shout_and_fail() -> None:
        print("from inside")
        raise ValueError("refused inside the container")

    with Executor(endpoint_id=endpoints["processes"].endpoint_id, client=client) as ex:
        future = ex.submit(shout_and_fail)
        with pytest.raises(GCError, match="refused inside the container"):
            future.result(timeout=120)
    assert "from inside" in (future.stdout or "")


def _running_containers() -> set[str]:
    listed = subprocess.run(["podman", "ps", "--format", "{{.Names}}"], capture_output=True,
                            text=True, check=True, env=dict(os.environ))
    return set(listed.stdout.split())


def test_cancelling_a_running_task_stops_its_container(
        client: Client, endpoints: dict[str, Endpoint], shared_dir: Path) -> None:
    started = shared_dir / f"started-{uuid.uuid4().hex[:6]}"

    def sleep_long(flag: str) -> None:
        Path(flag).touch()
        time.sleep(600)

    before = _running_containers()
    with Executor(endpoint_id=endpoints["processes"].endpoint_id, client=client) as ex:
        future = ex.submit(sleep_long, str(started))
        eventually(started.exists, timeout=120, what="the task to start in its container")
        assert future.cancel()
    # The worker's container was killed by name (killing podman's client alone would leave
    # it running), and a new worker's container took its place.
    gone = eventually(lambda: before - _running_containers(), timeout=60,
                      what="the cancelled task's container to stop")
    assert len(gone) == 1


def test_an_agent_whose_image_cannot_start_refuses_to_start_saying_why(
        fabric: Fabric, image: str) -> None:
    endpoint = _with_container(
        fabric.configure_endpoint(f"ct-bad-{uuid.uuid4().hex[:6]}", workers=1,
                                  heartbeat_period=1.0),
        container_type="podman", container_uri="localhost/gc-no-such-image:1",
        container_cmd_options="--pull=never")
    try:
        with pytest.raises(RuntimeError) as failure:
            endpoint.start()
    finally:
        endpoint.stop_all()
    log = str(failure.value)
    assert "Error: the worker container exited with code" in log
    assert "localhost/gc-no-such-image:1: image not known" in log
    assert "Traceback" not in log


def test_stopped_agents_leave_no_container_running(endpoints: dict[str, Endpoint],
                                                   image: str) -> None:
    # Last in the module: it stops the module's agents. The htex block's container stops
    # with its block (its init passes on the provider's SIGTERM), the workers' with the agent.
    for endpoint in endpoints.values():
        endpoint.stop_all()
    eventually(lambda: not _containers_of(image), timeout=60,
               what=f"every container of {image} to stop")


def _containers_of(image: str) -> str:
    listed = subprocess.run(["podman", "ps", "--filter", f"ancestor={image}", "--format",
                             "{{.Names}}"], capture_output=True, text=True, check=True,
                            env=dict(os.environ))
    return listed.stdout.strip()
