"""The container keys of an engine section and the command lines they produce.

podman runs for real in tests/integration/test_containers.py; apptainer and singularity
are not packaged in Debian 12, so their command lines are checked here.
"""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gc_agent.config import EndpointConfig, EngineConfig, HtexEngineConfig
from gc_agent.containers import Container, container_command, containerized_launch_cmd

WORKER = ["python3", "-m", "gc_agent.engines.worker", "/tmp/gc-worker-x/agent.sock"]


@pytest.mark.parametrize("runtime", ["apptainer", "singularity"])
def test_apptainer_and_singularity_exec_the_worker_in_the_image_with_its_socket_bound(
        runtime: str) -> None:
    container = EngineConfig(container_type=runtime, container_uri="/images/py.sif",  # type: ignore[arg-type]
                             container_cmd_options="--cleanenv --bind '/data sets:/data'").container
    assert container is not None
    command = container_command(container, WORKER, mounts=["/tmp/gc-worker-x"],
                                environment={"CUDA_VISIBLE_DEVICES": "1"})
    assert command == [runtime, "exec", "--bind", "/tmp/gc-worker-x",
                       "--env", "CUDA_VISIBLE_DEVICES=1", "--cleanenv",
                       "--bind", "/data sets:/data", "/images/py.sif", *WORKER]


@pytest.mark.parametrize("runtime", ["docker", "podman"])
def test_docker_and_podman_run_a_named_removed_container_on_the_host_network(
        runtime: str) -> None:
    container = Container(runtime, "registry.example/py:3.11", ("-v", "/data:/data"))
    command = container_command(container, WORKER, mounts=["/tmp/gc-worker-x"], name="gc-worker-1",
                                environment={"ZE_AFFINITY_MASK": "0"})
    assert command == [runtime, "run", "--rm", "--init", "--name", "gc-worker-1",
                       "--network", "host",
                       "-v", "/tmp/gc-worker-x:/tmp/gc-worker-x", "--env", "ZE_AFFINITY_MASK=0",
                       "-v", "/data:/data", "registry.example/py:3.11", *WORKER]


@pytest.mark.parametrize("option", ["--network=none", "--net", "--network"])
def test_a_network_named_in_the_options_replaces_the_host_network(option: str) -> None:
    command = container_command(Container("podman", "img", (option, "none")), WORKER)
    assert "host" not in command


def test_the_htex_pool_runs_in_the_container_through_both_of_parsls_formats() -> None:
    from parsl.executors.high_throughput.executor import DEFAULT_LAUNCH_CMD

    container = Container("apptainer", "/images/{py}.sif", ("--cleanenv",))
    template = containerized_launch_cmd(container, DEFAULT_LAUNCH_CMD, "/run/gc/htex")
    # Parsl fills its settings first, then each block's id.
    settings = {name: f"<{name}>" for name in (
        "debug", "max_workers_per_node", "addresses", "prefetch_capacity", "cores_per_worker",
        "mem_per_worker", "poll_period", "worker_port", "cert_dir", "logdir", "logconf",
        "heartbeat_period", "address_probe_timeout_string", "heartbeat_threshold",
        "drain_period", "cpu_affinity", "enable_mpi_mode", "mpi_launcher", "accelerators")}
    command = template.format(**settings).format(block_id=7)
    assert command.startswith("apptainer exec --bind /run/gc/htex --cleanenv '/images/{py}.sif' "
                              "python3 -m parsl.executors.high_throughput.process_worker_pool ")
    assert "--block_id=7" in command and "-a <addresses>" in command


def test_a_launch_command_of_another_shape_is_refused() -> None:
    with pytest.raises(ValueError, match=r"process_worker_pool\.py"):
        containerized_launch_cmd(Container("podman", "img"), "my_pool --x", "/run")


@pytest.mark.parametrize(("keys", "problem"), [
    ({"container_type": "podman"}, "needs container_uri"),
    ({"container_uri": "img"}, "need a container_type"),
    ({"container_type": "none", "container_cmd_options": "-v /a:/a"}, "need a container_type"),
    ({"container_type": "docker", "container_uri": "img", "container_cmd_options": "-v 'x"},
     "not a valid shell-quoted string"),
    ({"container_type": "shifter", "container_uri": "img"}, "container_type"),
])
def test_incomplete_or_unknown_container_keys_are_refused_by_name(
        keys: dict[str, str], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        EngineConfig(**keys)  # type: ignore[arg-type]


def test_globus_computes_container_keys_load_on_every_engine_section() -> None:
    keys = {"container_type": "apptainer", "container_uri": "/images/py.sif",
            "container_cmd_options": "--cleanenv"}
    for engine in ({"type": "processes", **keys}, {"type": "threads", **keys},
                   {"type": "htex", **keys}):
        config = EndpointConfig.model_validate({"name": "n", "endpoint_id": "e", "engine": engine})
        assert config.engine.container == Container("apptainer", "/images/py.sif", ("--cleanenv",))
    assert EngineConfig().container is None
    assert HtexEngineConfig(type="htex", container_type="none").container is None
