"""The htex engine's provider section: validation messages, and the Parsl objects it maps to."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import TypeAdapter, ValidationError

from gc_agent.config import EndpointConfig, HtexEngineConfig, load_config, save_config
from gc_agent.providers import (
    KubernetesProviderConfig,
    LauncherConfig,
    LocalProviderConfig,
    LSFProviderConfig,
    PBSProProviderConfig,
    ProviderConfig,
    SlurmProviderConfig,
    build_launcher,
    build_provider,
)
from gc_core.errors import ConfigError

parsl = pytest.importorskip("parsl", reason="mapping onto Parsl needs Parsl")

from parsl.launchers import MpiExecLauncher, SingleNodeLauncher, SrunLauncher  # noqa: E402
from parsl.providers import LocalProvider, LSFProvider, PBSProProvider, SlurmProvider  # noqa: E402


def _load(tmp_path: Path, engine: str) -> EndpointConfig:
    path = tmp_path / "config.yaml"
    path.write_text(f"name: lab\nendpoint_id: ep-1\nengine: {engine}\n")
    return load_config(path)


def _problem(tmp_path: Path, engine: str) -> str:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, engine)
    return str(info.value)


# -- validation -------------------------------------------------------------------------


def test_an_htex_engine_with_a_slurm_provider_loads_from_yaml(tmp_path: Path) -> None:
    config = _load(tmp_path, "{type: htex, max_workers_per_node: 4, max_retries_on_system_failure: 2,"
                             " provider: {type: slurm, partition: debug, account: lab, walltime: '01:00:00',"
                             " nodes_per_block: 2, max_blocks: 3, launcher: {type: srun}}}")

    assert isinstance(config.engine, HtexEngineConfig)
    assert config.engine.max_retries_on_system_failure == 2
    assert config.engine.provider == SlurmProviderConfig(
        type="slurm", partition="debug", account="lab", walltime="01:00:00", nodes_per_block=2,
        max_blocks=3, launcher=LauncherConfig(type="srun"))


def test_a_provider_section_without_a_type_is_local(tmp_path: Path) -> None:
    config = _load(tmp_path, "{type: htex, provider: {init_blocks: 1, max_blocks: 2}}")

    assert isinstance(config.engine, HtexEngineConfig)
    assert config.engine.provider == LocalProviderConfig(init_blocks=1, max_blocks=2)


def test_an_unknown_engine_type_names_the_key_the_value_and_all_three_types(tmp_path: Path) -> None:
    problem = _problem(tmp_path, "{type: htx}")

    assert "engine.type" in problem and "'htx'" in problem
    assert "'threads'" in problem and "'processes'" in problem and "'htex'" in problem


def test_an_unknown_provider_type_names_the_key_the_value_and_the_allowed_ones(tmp_path: Path) -> None:
    problem = _problem(tmp_path, "{type: htex, provider: {type: cobalt}}")

    assert "engine.provider.type" in problem and "'cobalt'" in problem
    for allowed in ("'local'", "'slurm'", "'pbspro'", "'lsf'"):
        assert allowed in problem


def test_an_unknown_launcher_type_names_the_key_the_value_and_the_allowed_ones(tmp_path: Path) -> None:
    problem = _problem(tmp_path, "{type: htex, provider: {type: slurm, launcher: {type: wrapped}}}")

    assert "engine.provider.launcher.type" in problem and "'wrapped'" in problem
    assert "'single'" in problem and "'srun'" in problem and "'mpiexec'" in problem


def test_a_bad_walltime_names_the_key_the_value_and_the_format(tmp_path: Path) -> None:
    problem = _problem(tmp_path, "{type: htex, provider: {type: pbspro, walltime: 2h}}")

    assert "engine.provider.walltime" in problem and "'2h'" in problem and "HH:MM:SS" in problem


def test_a_key_the_provider_does_not_have_is_refused(tmp_path: Path) -> None:
    problem = _problem(tmp_path, "{type: htex, provider: {type: local, partition: debug}}")

    assert "engine.provider.partition" in problem and "'debug'" in problem
    assert "Extra inputs are not permitted" in problem


def test_a_key_the_htex_engine_does_not_have_is_refused(tmp_path: Path) -> None:
    problem = _problem(tmp_path, "{type: htex, max_workers: 4}")

    assert "engine.max_workers" in problem and "Extra inputs are not permitted" in problem


def test_a_launcher_that_needs_a_scheduler_is_refused_on_the_local_provider(tmp_path: Path) -> None:
    problem = _problem(tmp_path, "{type: htex, provider: {launcher: {type: srun}}}")

    assert "engine.provider.launcher" in problem and "'srun'" in problem and "'single'" in problem


def test_blocks_out_of_order_name_both_values_and_the_rule(tmp_path: Path) -> None:
    problem = _problem(tmp_path, "{type: htex, provider: {type: lsf, init_blocks: 3, max_blocks: 2}}")

    assert "init_blocks 3" in problem and "(0..2)" in problem
    assert "min_blocks <= init_blocks <= max_blocks" in problem


def test_a_negative_retry_count_names_the_key_and_the_value(tmp_path: Path) -> None:
    problem = _problem(tmp_path, "{type: htex, max_retries_on_system_failure: -1}")

    assert "engine.max_retries_on_system_failure" in problem and "-1" in problem
    assert "greater than or equal to 0" in problem


def test_launcher_overrides_are_refused_without_a_wrapping_launcher() -> None:
    with pytest.raises(ValidationError) as info:
        LauncherConfig(type="single", overrides="--exclusive")

    assert "'--exclusive'" in str(info.value) and "srun or mpiexec" in str(info.value)


def test_an_htex_config_survives_a_save_and_a_load(tmp_path: Path) -> None:
    engine = HtexEngineConfig(type="htex", provider=PBSProProviderConfig(
        type="pbspro", partition="workq", cpus_per_node=8, launcher=LauncherConfig(type="mpiexec")))
    path = tmp_path / "config.yaml"

    save_config(EndpointConfig(name="lab", endpoint_id="ep-1", engine=engine), path)

    assert load_config(path).engine == engine


# -- mapping onto Parsl -----------------------------------------------------------------


def test_a_local_provider_config_becomes_parsls_local_provider() -> None:
    provider = build_provider(LocalProviderConfig(init_blocks=1, min_blocks=1, max_blocks=2,
                                                  worker_init="module load python"),
                              worker_init_prefix="export PATH=/venv/bin:$PATH")

    assert isinstance(provider, LocalProvider)
    assert (provider.init_blocks, provider.min_blocks, provider.max_blocks) == (1, 1, 2)
    assert provider.worker_init == "export PATH=/venv/bin:$PATH\nmodule load python"
    assert isinstance(provider.launcher, SingleNodeLauncher)


def test_a_slurm_provider_config_becomes_parsls_slurm_provider_with_its_launcher() -> None:
    provider = build_provider(SlurmProviderConfig(
        type="slurm", partition="debug", account="lab", qos="low", walltime="00:30:00",
        nodes_per_block=2, init_blocks=0, max_blocks=4, exclusive=False,
        launcher=LauncherConfig(type="srun", overrides="--cpu-bind=none")))

    assert isinstance(provider, SlurmProvider)
    assert (provider.partition, provider.account, provider.qos) == ("debug", "lab", "low")
    assert provider.walltime == "00:30:00" and provider.nodes_per_block == 2
    assert (provider.init_blocks, provider.max_blocks) == (0, 4)
    assert provider.exclusive is False
    assert isinstance(provider.launcher, SrunLauncher)
    assert provider.launcher.overrides == "--cpu-bind=none"


def test_a_pbspro_provider_config_maps_partition_to_the_queue() -> None:
    provider = build_provider(PBSProProviderConfig(
        type="pbspro", partition="workq", account="proj1", cpus_per_node=16,
        launcher=LauncherConfig(type="mpiexec")))

    assert isinstance(provider, PBSProProvider)
    assert (provider.queue, provider.account, provider.cpus_per_node) == ("workq", "proj1", 16)
    assert isinstance(provider.launcher, MpiExecLauncher)


def test_an_lsf_provider_config_maps_partition_to_the_queue_and_account_to_the_project() -> None:
    provider = build_provider(LSFProviderConfig(type="lsf", partition="batch", account="abc123",
                                                walltime="02:00:00"))

    assert isinstance(provider, LSFProvider)
    assert (provider.queue, provider.project, provider.walltime) == ("batch", "abc123", "02:00:00")


@pytest.mark.parametrize(("kind", "parsl_type"), [
    ("single", SingleNodeLauncher), ("srun", SrunLauncher), ("mpiexec", MpiExecLauncher)])
def test_each_launcher_type_maps_to_its_parsl_launcher(kind: str, parsl_type: type) -> None:
    assert isinstance(build_launcher(LauncherConfig(type=kind)), parsl_type)  # type: ignore[arg-type]


def test_a_status_poll_period_replaces_parsls_fixed_interval() -> None:
    default = build_provider(LocalProviderConfig())
    polled = build_provider(LocalProviderConfig(status_poll_period=1.5))

    assert default.status_polling_interval == 5  # Parsl's for LocalProvider
    assert isinstance(polled, LocalProvider) and polled.status_polling_interval == 1.5


# -- what the htex engine reports per task ---------------------------------------------


def test_a_worker_names_its_block_and_batch_job() -> None:
    from gc_agent.engines.htex import describe_worker

    assert describe_worker("n1:7", {"PARSL_WORKER_BLOCK_ID": "0", "PBS_JOBID": "4213.pbs01"}) \
        == "n1:7 block 0 pbs job 4213.pbs01"
    assert describe_worker("laptop:9", {}) == "laptop:9"


def test_a_kubernetes_provider_needs_an_image_and_takes_pod_sizes() -> None:
    with pytest.raises(ValidationError, match="image"):
        TypeAdapter(ProviderConfig).validate_python({"type": "kubernetes"})
    config = TypeAdapter(ProviderConfig).validate_python(
        {"type": "kubernetes", "image": "ghcr.io/lab/gc-worker:1", "max_mem": "2Gi"})
    assert isinstance(config, KubernetesProviderConfig) and config.max_mem == "2Gi"
    with pytest.raises(ValidationError, match=r"launcher\.type 'srun' is not allowed with provider kubernetes"):
        TypeAdapter(ProviderConfig).validate_python(
            {"type": "kubernetes", "image": "x", "launcher": {"type": "srun"}})


def test_a_kubernetes_provider_without_its_client_or_cluster_says_what_to_install() -> None:
    config = KubernetesProviderConfig(type="kubernetes", image="ghcr.io/lab/gc-worker:1")
    with pytest.raises(ConfigError, match=r"pip install kubernetes.*kubeconfig"):
        build_provider(config)
