"""Submit scripts our provider configs produce, and status parsing of recorded scheduler output.

PBS Pro and LSF cannot run here, so Parsl's own providers, built from our configs, write
their real submit scripts while their scheduler commands (``qsub``, ``qstat``, ``bsub``,
``bjobs``) are answered from ``scheduler_outputs/``; Parsl's own parsers then read those
outputs. Slurm runs for real in ``tests/scheduler/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gc_agent.config import HtexEngineConfig
from gc_agent.providers import (
    LauncherConfig,
    LSFProviderConfig,
    PBSProProviderConfig,
    SlurmProviderConfig,
    build_provider,
)

pytest.importorskip("parsl", reason="the providers are Parsl's")

from parsl.jobs.states import JobState
from parsl.providers.cluster_provider import ClusterProvider

#: Recorded scheduler outputs, one file per command.
OUTPUTS = Path(__file__).parent / "scheduler_outputs"
#: What the engine asks a block to run (the real one is longer; the launcher wraps it).
WORKER_COMMAND = "process_worker_pool.py --max_workers_per_node=4 --block_id=0"


@dataclass
class RecordedScheduler:
    """Answers a provider's scheduler commands from recorded outputs and keeps the commands."""

    replies: dict[str, tuple[int, str, str]]
    commands: list[str] = field(default_factory=list)

    def answer(self, cmd: str) -> tuple[int, str, str]:
        self.commands.append(cmd)
        for prefix, reply in self.replies.items():
            if cmd.startswith(prefix):
                return reply
        raise AssertionError(f"no recorded output for {cmd!r}")


def _recorded(name: str) -> tuple[int, str, str]:
    return 0, (OUTPUTS / name).read_text(), ""


@pytest.fixture
def scheduler(monkeypatch: pytest.MonkeyPatch) -> RecordedScheduler:
    recorded = RecordedScheduler({
        "qsub": _recorded("pbspro_qsub.txt"), "qstat": _recorded("pbspro_qstat.json"),
        "bsub": _recorded("lsf_bsub.txt"), "bjobs": _recorded("lsf_bjobs.txt"),
        "sbatch": _recorded("slurm_sbatch.txt"),
        # no accounting here, as on the test machine: Parsl falls back to squeue
        "sacct": (1, "", "Slurm accounting storage is disabled")})
    # Every cluster provider runs its scheduler commands through this one method.
    monkeypatch.setattr(ClusterProvider, "execute_wait",
                        lambda _provider, cmd, timeout=None: recorded.answer(cmd))
    return recorded


def _submit(config: Any, tmp_path: Path, job_name: str = "parsl.htex.block-0") -> tuple[Any, str, str]:
    """Build the provider from ``config``, submit one block; the provider, job id and script."""
    provider = build_provider(config, worker_init_prefix="export PATH=/opt/gc-fabric/bin:$PATH")
    provider.script_dir = str(tmp_path)
    job_id = provider.submit(WORKER_COMMAND, 1, job_name)
    scripts = [p for p in tmp_path.iterdir() if p.name.startswith(job_name)
               and not p.name.endswith((".stdout", ".stderr"))]
    assert len(scripts) == 1, scripts
    return provider, job_id, scripts[0].read_text()


# -- PBS Pro ------------------------------------------------------------------------------


def test_a_pbspro_config_writes_a_qsub_script_with_its_walltime_nodes_cpus_and_set_up(
        scheduler: RecordedScheduler, tmp_path: Path) -> None:
    config = PBSProProviderConfig(
        type="pbspro", partition="workq", account="proj1", walltime="00:30:00",
        nodes_per_block=2, cpus_per_node=8, worker_init="module load python/3.11",
        scheduler_options="#PBS -l filesystems=home", launcher=LauncherConfig(type="mpiexec"))

    _, job_id, script = _submit(config, tmp_path)

    assert job_id == "4213.pbs01"
    assert "#PBS -l walltime=00:30:00" in script
    assert "#PBS -l select=2:ncpus=8" in script
    assert "#PBS -l filesystems=home" in script
    assert script.index("export PATH=/opt/gc-fabric/bin:$PATH") < script.index("module load python/3.11")
    assert "mpiexec" in script and WORKER_COMMAND in script
    # the queue and the account go on the qsub command line
    assert scheduler.commands[-1].startswith("qsub  -q workq -A proj1 ")


def test_pbspro_states_are_read_from_recorded_qstat_json(scheduler: RecordedScheduler,
                                                         tmp_path: Path) -> None:
    provider, _, _ = _submit(PBSProProviderConfig(type="pbspro", partition="workq"), tmp_path)
    # two older blocks of this provider, as qstat lists them
    for job_id in ("4211.pbs01", "4212.pbs01"):
        provider.resources[job_id] = dict(provider.resources["4213.pbs01"], job_id=job_id)

    states = provider.status(["4211.pbs01", "4212.pbs01", "4213.pbs01"])

    assert [s.state for s in states] == [JobState.COMPLETED, JobState.RUNNING, JobState.PENDING]
    assert scheduler.commands[-1] == "qstat -x -f -F json 4213.pbs01 4211.pbs01 4212.pbs01"


# -- LSF ----------------------------------------------------------------------------------


def test_an_lsf_config_writes_a_bsub_script_with_its_queue_project_walltime_and_cores(
        scheduler: RecordedScheduler, tmp_path: Path) -> None:
    config = LSFProviderConfig(type="lsf", partition="batch", account="abc123",
                               walltime="01:30:00", nodes_per_block=2, cores_per_node=16,
                               worker_init="module load python", launcher=LauncherConfig(type="mpiexec"))

    _, job_id, script = _submit(config, tmp_path)

    assert job_id == "5120"
    assert "#BSUB -W 90" in script  # LSF takes minutes
    assert "#BSUB -q batch" in script and "#BSUB -P abc123" in script
    assert "#BSUB -n 32" in script and '#BSUB -R "span[ptile=16]"' in script
    assert "-nnodes" not in script
    assert "module load python" in script and WORKER_COMMAND in script
    # from standard input, so that bsub reads the #BSUB lines
    assert scheduler.commands[-1].startswith("bsub < ")


def test_an_lsf_config_without_cores_per_node_asks_for_whole_nodes(
        scheduler: RecordedScheduler, tmp_path: Path) -> None:
    _, _, script = _submit(LSFProviderConfig(type="lsf", nodes_per_block=3), tmp_path)

    assert "#BSUB -nnodes 3" in script


def test_lsf_states_are_read_from_recorded_bjobs_output(scheduler: RecordedScheduler,
                                                        tmp_path: Path) -> None:
    provider, _, _ = _submit(LSFProviderConfig(type="lsf", partition="batch"), tmp_path)
    for job_id in ("5118", "5119", "5121", "5122"):
        provider.resources[job_id] = {"job_id": job_id, "status": provider.resources["5120"]["status"]}

    states = provider.status(["5118", "5119", "5120", "5121", "5122"])

    assert [s.state for s in states] == [JobState.COMPLETED, JobState.FAILED, JobState.RUNNING,
                                         JobState.PENDING, JobState.CANCELLED]
    assert scheduler.commands[-1].startswith("bjobs -noheader -o 'jobid stat' ")


# -- Slurm (the script; Slurm itself runs in tests/scheduler) ------------------------------


def test_a_slurm_config_writes_an_sbatch_script_with_partition_account_qos_and_srun(
        scheduler: RecordedScheduler, tmp_path: Path) -> None:
    config = SlurmProviderConfig(type="slurm", partition="debug", account="lab", qos="low",
                                 walltime="00:30:00", nodes_per_block=2, exclusive=True,
                                 worker_init="source ~/venv/bin/activate",
                                 launcher=LauncherConfig(type="srun"))

    _, job_id, script = _submit(config, tmp_path)

    assert job_id == "77"
    for line in ("#SBATCH --partition=debug", "#SBATCH --account=lab", "#SBATCH --qos=low",
                 "#SBATCH --time=30", "#SBATCH --nodes=2", "#SBATCH --exclusive"):
        assert line in script
    assert "source ~/venv/bin/activate" in script and "srun" in script


# -- walltime and draining ----------------------------------------------------------------


def test_workers_drain_the_configured_margin_before_the_walltime() -> None:
    engine = HtexEngineConfig(type="htex", drain_margin=300, provider=SlurmProviderConfig(
        type="slurm", walltime="01:00:00"))

    assert engine.drain_period == 3600 - 300


def test_a_drain_margin_as_long_as_the_walltime_names_both_and_the_rule() -> None:
    with pytest.raises(ValueError) as info:
        HtexEngineConfig(type="htex", drain_margin=600, provider=SlurmProviderConfig(
            type="slurm", walltime="00:10:00"))

    assert "drain_margin 600" in str(info.value) and "'00:10:00'" in str(info.value)
    assert "shorter than the walltime" in str(info.value)


def test_local_blocks_have_no_walltime_so_never_drain() -> None:
    assert HtexEngineConfig(type="htex").drain_period is None
