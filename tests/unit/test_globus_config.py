"""Globus Compute endpoint configs, as published for real clusters, mapped onto ours.

Each config under ``tests/globus_compute_configs/`` becomes a valid agent config, and the
provider it maps to writes its real batch script through Parsl. No scheduler runs here, so
its submit command (``sbatch``, ``qsub``, ``bsub``, ``condor_submit``) is a small program
on ``PATH`` that records how it was called and answers with a job id in that scheduler's
format; Slurm itself runs in ``tests/scheduler/``.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gc_agent.addresses import AddressLookup, resolve_address
from gc_agent.config import (
    EndpointConfig,
    EngineConfig,
    HtexEngineConfig,
    load_config,
    parse_config,
    save_config,
)
from gc_agent.globus_config import is_globus_compute_config, translate
from gc_agent.providers import LocalProviderConfig, build_provider
from gc_core.errors import ConfigError

pytest.importorskip("parsl", reason="the providers are Parsl's")

CONFIGS = Path(__file__).parents[1] / "globus_compute_configs"
#: What each scheduler's submit command prints, in its own format.
SUBMIT_REPLIES = {"sbatch": "Submitted batch job 4711", "qsub": "4213.pbs01",
                  "bsub": "Job <5150> is submitted to queue <batch>.",
                  "condor_submit": "Submitting job(s).\\n1 job(s) submitted to cluster 812."}
#: What the engine asks a block to run (the launcher wraps it).
WORKER_COMMAND = "process_worker_pool.py --max_workers_per_node=4 --block_id=0"


def _config(name: str) -> EndpointConfig:
    """A published config, as an agent config of endpoint ``name``."""
    path = CONFIGS / f"{name}.yaml"
    return parse_config({**yaml.safe_load(path.read_text()), "name": name,
                         "endpoint_id": "0f3c2a5e-5b1d-4c8e-9d7a-1e2f3a4b5c6d"}, str(path))


@pytest.fixture(scope="module")
def submit_log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Submit commands on PATH that record their arguments here and print a job id."""
    bin_dir = tmp_path_factory.mktemp("scheduler-bin")
    log = bin_dir / "calls.log"
    for command, reply in SUBMIT_REPLIES.items():
        program = bin_dir / command
        program.write_text(f'#!/bin/sh\necho "{command} $*" >> {log}\nprintf "{reply}\\n"\n')
        program.chmod(program.stat().st_mode | stat.S_IXUSR)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
        yield log


def _render(name: str, directory: Path, log: Path) -> tuple[str, str, str]:
    """Submit one block of ``name``'s provider: its job id, batch script and submit command."""
    engine = _config(name).engine
    assert isinstance(engine, HtexEngineConfig)
    assert not isinstance(engine.provider, LocalProviderConfig)
    provider = build_provider(engine.provider, worker_init_prefix="export PATH=/opt/gc/bin:$PATH")
    provider.script_dir = str(directory)
    job_id = provider.submit(WORKER_COMMAND, 1, "parsl.htex.block-0")
    scripts = [p for p in directory.iterdir() if not p.name.endswith((".stdout", ".stderr"))
               and not p.name.startswith("cmd_")]
    text = "\n".join(p.read_text() for p in sorted(scripts))
    return job_id, text, log.read_text().splitlines()[-1]


#: For each published cluster config: the job id read back, what its batch script must hold
#: (in order), and what its submit command line must hold.
BATCH_SCRIPTS: dict[str, tuple[str, list[str], list[str]]] = {
    "polaris": ("4213.pbs01", [
        "#PBS -l walltime=01:00:00", "#PBS -l select=1:ncpus=32:ngpus=4",
        "#PBS -l filesystems=home:grand:eagle", "export PATH=/opt/gc/bin:$PATH",
        "conda activate gce", "mpiexec --cpu-bind none --depth=64 --ppn 1 -n $WORKERCOUNT",
    ], ["qsub", "-q preemptable", "-A PROJ123"]),
    "perlmutter": ("4711", [
        "#SBATCH --nodes=2", "#SBATCH --time=10", "#SBATCH --constraint=gpu",
        "#SBATCH --exclusive", "#SBATCH --partition=GPU", "source activate gce_env",
        "srun --ntasks 2 -l -c 272",
    ], ["sbatch"]),
    "frontera": ("4711", [
        "#SBATCH --nodes=2", "#SBATCH --time=30", "#SBATCH --mail-type=NONE",
        "#SBATCH --partition=development", "#SBATCH --account=EAR22001", "srun --ntasks 2",
    ], ["sbatch"]),
    "expanse": ("4711", [
        "#SBATCH --nodes=1", "#SBATCH --time=5", "#SBATCH --constraint=knl,quad,cache",
        "#SBATCH --partition=compute", "#SBATCH --account=abc123", "srun --ntasks 1",
    ], ["sbatch"]),
    "bridges-2": ("4711", [
        "#SBATCH --nodes=2", "#SBATCH --time=30", "#SBATCH --partition=RM-small",
        "conda activate gce_env", "srun --ntasks 2",
    ], ["sbatch"]),
    "midway": ("4711", [
        "#SBATCH --gres=gpu:1", "#SBATCH --partition=caslake", "#SBATCH --account=pi-someone",
        "source activate compute-env", "srun --ntasks 1",
    ], ["sbatch"]),
    "bluewaters": ("4213.pbs01", [
        "#PBS -l nodes=2:ppn=32:xe", "#PBS -l walltime=00:30:00", "#PBS -l nodes=2:ppn=1",
        "module load bwpy", "aprun -n 2 -N 1 -b -- bwpy-environ -- /bin/bash",
    ], ["qsub", "-q normal"]),
    "summit": ("5150", [
        "#BSUB -W 30", "#BSUB -alloc_flags smt4", "#BSUB -P CSC123", "#BSUB -q batch",
        "#BSUB -nnodes 2", "jsrun -n 2 -r 1 -g 1 /bin/bash",
    ], ["bsub"]),
    "gridengine": ("4213.pbs01", [
        "#$ -l h_rt=12:00:00", "#$ -pe smp 4", "source ~/gce/bin/activate", WORKER_COMMAND,
    ], ["qsub", "-q gpu.q", "-terse"]),
    "condor": ("812.0", [  # the job's script, then its submit description
        "source /cvmfs/env/setup.sh", WORKER_COMMAND,
        'requirements            = (OpSysAndVer == "CentOS7")', "+projectname            = physics",
        "RequestMemory = 8192.0", "RequestCpus = 4",
    ], ["condor_submit"]),
}


@pytest.mark.parametrize("name", sorted(BATCH_SCRIPTS))
def test_a_published_cluster_config_renders_a_valid_agent_config_and_its_batch_script(
        name: str, submit_log: Path, tmp_path: Path) -> None:
    expected_job, script_lines, command_parts = BATCH_SCRIPTS[name]

    job_id, script, command = _render(name, tmp_path, submit_log)

    assert job_id == expected_job
    positions = [script.find(line) for line in script_lines]
    assert -1 not in positions, [line for line in script_lines if line not in script]
    assert positions == sorted(positions), script
    for part in command_parts:
        assert part in command, command


def test_every_published_config_here_is_recognised_and_mapped() -> None:
    for path in sorted(CONFIGS.glob("*.yaml")):
        assert is_globus_compute_config(yaml.safe_load(path.read_text())), path
        assert _config(path.stem).endpoint_id


def test_polaris_maps_its_engine_keys_scaling_and_address_lookup() -> None:
    engine = _config("polaris").engine

    assert isinstance(engine, HtexEngineConfig)
    assert engine.available_accelerators == ("0", "1", "2", "3")
    assert engine.workers_per_node == 4
    assert engine.idle_timeout == 300
    assert engine.address == AddressLookup(type="address_by_interface", ifname="lo")
    assert resolve_address(engine.address) == "127.0.0.1"
    launcher = engine.provider.launcher
    assert (launcher.type, launcher.bind_cmd, launcher.overrides) == (
        "mpiexec", "--cpu-bind", "--depth=64 --ppn 1")


def test_midway_maps_label_retries_and_job_status_kwargs() -> None:
    engine = _config("midway").engine

    assert isinstance(engine, HtexEngineConfig)
    assert (engine.label, engine.max_retries_on_system_failure) == ("Midway-RCC", 2)
    assert (engine.idle_timeout, engine.strategy_period) == (60.0, 30.0)


def test_display_name_is_the_description_and_the_old_engine_name_is_htex() -> None:
    config = _config("expanse")

    assert config.description == "SDSC Expanse"
    assert config.engine.type == "htex"


def test_an_unquoted_long_walltime_that_yaml_reads_as_seconds_is_read_back_as_hms() -> None:
    engine = _config("gridengine").engine

    assert isinstance(engine, HtexEngineConfig)
    assert getattr(engine.provider, "walltime", None) == "12:00:00"
    assert engine.cores_per_worker == 2


def test_a_workstation_config_maps_its_endpoint_keys_and_process_pool() -> None:
    config = _config("laptop_processes")

    assert config.description == "my workstation"
    assert (config.heartbeat_period, config.idle_heartbeats) == (15, 20)
    assert config.allowed_functions == frozenset({"3f1b2a3c-0000-4000-8000-000000000001"})
    assert config.engine == EngineConfig(type="processes", max_workers=3)
    assert _config("laptop_threads").engine == EngineConfig(type="threads", max_workers=3)


def test_the_kubernetes_config_maps_onto_the_kubernetes_provider() -> None:
    engine = _config("kube").engine

    assert isinstance(engine, HtexEngineConfig)
    assert engine.provider.type == "kubernetes"
    assert (engine.idle_timeout, engine.label) == (3600, "Kubernetes-pods")


def test_a_mapped_config_is_saved_in_our_vocabulary_and_loads_back_the_same(
        tmp_path: Path) -> None:
    config = _config("summit")
    path = tmp_path / "config.yaml"

    save_config(config, path)

    saved = yaml.safe_load(path.read_text())
    assert not is_globus_compute_config(saved)
    assert saved["engine"]["provider"]["type"] == "lsf"
    assert load_config(path) == config


def test_a_config_file_in_globus_compute_vocabulary_is_loaded_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("name: pinning\nendpoint_id: e1\n" + (CONFIGS / "worker_pinning.yaml").read_text())

    config = load_config(path)

    assert isinstance(config.engine, HtexEngineConfig)
    assert config.engine.provider == LocalProviderConfig(init_blocks=1, min_blocks=0, max_blocks=1)


# -- what cannot be honoured is refused by name, with the reason ------------------------------


def _refusal(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config({"name": "n", "endpoint_id": "e", **data}, "config.yaml")
    return str(info.value)


def test_every_key_that_cannot_be_honoured_is_named_with_its_reason() -> None:
    problem = _refusal({
        "log_dir": "/tmp/logs", "heartbeat_threshold": 200, "idle_heartbeats_soft": 5,
        "idle_heartbeats_hard": 50, "detach_endpoint": False, "colour": "blue",
        "engine": {
            "type": "GlobusComputeEngine", "scheduler_mode": "hard", "cpu_affinity": "block",
            "strategy": "none", "job_status_kwargs": {"max_idletime": 30, "max_pods": 3},
            "provider": {"type": "SlurmProvider", "partition": "debug", "gres": "gpu:4",
                         "parallelism": 0.5, "queue": "q",
                         "launcher": {"type": "SrunLauncher", "debug": False}}}})

    for key, reason in [
        ("log_dir", "agent.log"), ("heartbeat_threshold", "3 missed heartbeats"),
        ("idle_heartbeats_hard", "idle_heartbeats_soft"), ("detach_endpoint", "--detach"),
        ("colour", "not a key gc-fabric knows"), ("engine.scheduler_mode", "Kubernetes"),
        ("engine.cpu_affinity", "accelerators"), ("engine.strategy", "simple strategy"),
        ("engine.job_status_kwargs.max_pods", "max_idletime and strategy_period"),
        ("engine.provider.gres", "scheduler_options"),
        ("engine.provider.parallelism", "parallelism 1"),
        ("engine.provider.queue", "(known: account"),
        ("engine.provider.launcher.debug", "trace"),
    ]:
        assert f"{key}:" in problem, key
        assert reason in problem.split(f"{key}:", 1)[1].split(";")[0], (key, reason)
    assert "engine.provider.partition" not in problem and "idle_heartbeats_soft:" not in problem


def test_max_workers_beside_its_newer_name_is_refused_not_silently_overridden() -> None:
    problem = _refusal({"engine": {"type": "GlobusComputeEngine", "max_workers": 2,
                                   "max_workers_per_node": 8}})

    assert "engine.max_workers:" in problem and "keep one of them" in problem


def test_unknown_engine_provider_and_launcher_classes_are_refused_naming_the_allowed_ones() -> None:
    problem = _refusal({"engine": {"type": "ParslPoolEngine"}})
    assert "'ParslPoolEngine'" in problem and "GlobusComputeEngine" in problem

    problem = _refusal({"engine": {"provider": {"type": "AWSProvider"}}})
    assert "'AWSProvider'" in problem and "SlurmProvider" in problem and "CondorProvider" in problem

    problem = _refusal({"engine": {"provider": {"type": "LocalProvider",
                                                "launcher": {"type": "WrappedLauncher"}}}})
    assert "'WrappedLauncher'" in problem and "MpiExecLauncher" in problem


def test_a_local_engine_refuses_the_cluster_engines_sections() -> None:
    problem = _refusal({"engine": {"type": "ProcessPoolEngine", "strategy": "simple",
                                   "provider": {"type": "LocalProvider"},
                                   "max_tasks_per_child": 100}})

    assert "engine.strategy: only GlobusComputeEngine" in problem
    assert "engine.provider: only GlobusComputeEngine" in problem
    assert "engine.max_tasks_per_child: cannot be honoured" in problem


def test_accelerators_on_a_thread_pool_are_refused_saying_why() -> None:
    problem = _refusal({"engine": {"type": "ThreadPoolEngine", "available_accelerators": 2}})

    assert "available_accelerators needs engine.type 'processes'" in problem
    assert "threads share one process" in problem


def test_a_bad_address_lookup_is_refused_when_the_engine_resolves_it() -> None:
    problem = _refusal({"engine": {"address": {"type": "address_by_interface"},
                                   "provider": {"type": "LocalProvider"}}})
    assert "ifname is required" in problem

    with pytest.raises(ConfigError, match=r"interface 'nosuch0'.*ip addr"):
        resolve_address(AddressLookup(type="address_by_interface", ifname="nosuch0"))


# -- accelerators and amqp_port ----------------------------------------------------------------


def test_available_accelerators_take_a_count_or_ids_and_cap_the_workers() -> None:
    assert EngineConfig(max_workers=8, available_accelerators=3).workers == 3  # type: ignore[arg-type]
    listed = EngineConfig(max_workers=2, available_accelerators=["a", "b", 7])  # type: ignore[arg-type]
    assert (listed.available_accelerators, listed.workers) == (("a", "b", "7"), 2)
    assert EngineConfig(max_workers=5).workers == 5
    with pytest.raises(ValueError, match="distinct"):
        EngineConfig(available_accelerators=["a", "a"])  # type: ignore[arg-type]


def test_amqp_port_replaces_the_port_of_every_broker_url() -> None:
    config = parse_config({"name": "n", "endpoint_id": "e", "amqp_port": 443,
                           "engine": {"type": "ThreadPoolEngine"}}, "config.yaml")

    assert config.broker_url_or("amqps://u:p@mq1:5671/v?cafile=/ca.pem,amqps://u:p@mq2/v") == \
        "amqps://u:p@mq1:443/v?cafile=/ca.pem,amqps://u:p@mq2:443/v"
    assert parse_config({"name": "n", "endpoint_id": "e"}, "c").broker_url_or("amqp://h:1/") == \
        "amqp://h:1/"


def test_translate_gives_our_vocabulary_only() -> None:
    assert translate({"display_name": "x", "engine": {"type": "ThreadPoolEngine",
                                                      "max_workers": 2}}) == {
        "description": "x", "engine": {"type": "threads", "max_workers": 2}}
