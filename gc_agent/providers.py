"""Where the high-throughput engine gets its nodes: config models mapped onto Parsl's providers.

An endpoint's ``engine.provider`` section says which batch system hands out the blocks
(``local``, ``slurm``, ``pbspro``, ``torque``, ``lsf``, ``gridengine``, ``condor``, ``kubernetes``)
and how the worker pools are started on a block's nodes (``launcher``: ``single``, ``simple``,
``srun``, ``mpiexec``, ``mpirun``, ``aprun``, ``jsrun``, ``gnu_parallel``). This module validates that
section and builds the matching Parsl objects; Parsl does the scheduler plumbing.

    >>> provider = build_provider(SlurmProviderConfig(partition="debug", walltime="00:30:00"))
    >>> type(provider).__name__
    'SlurmProvider'
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

from gc_core.errors import ConfigError

if TYPE_CHECKING:
    from parsl.launchers.base import Launcher
    from parsl.providers.base import ExecutionProvider

__all__ = [
    "PROVIDER_TYPES",
    "CondorProviderConfig",
    "GridEngineProviderConfig",
    "KubernetesProviderConfig",
    "LSFProviderConfig",
    "LauncherConfig",
    "LocalProviderConfig",
    "PBSProProviderConfig",
    "ProviderConfig",
    "SlurmProviderConfig",
    "TorqueProviderConfig",
    "build_launcher",
    "build_provider",
    "walltime_seconds",
]

#: A batch walltime: HH:MM:SS (hours may exceed 24).
WALLTIME_PATTERN = re.compile(r"^\d{1,4}:[0-5]\d:[0-5]\d$")
#: Largest number of blocks (batch jobs) one endpoint may ask for.
MAX_BLOCKS_LIMIT = 1024


#: Launchers that wrap the worker pool in a command taking extra options (``overrides``).
WRAPPING_LAUNCHERS = ("srun", "mpiexec", "mpirun", "aprun", "jsrun")


class LauncherConfig(BaseModel):
    """How a block starts its worker pools: directly, or under a parallel launcher."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["single", "simple", "srun", "mpiexec", "mpirun", "aprun", "jsrun",
                  "gnu_parallel"] = "single"
    overrides: str = Field(default="", description="Extra options for the wrapping command.")
    bind_cmd: str | None = Field(default=None, description="mpiexec's CPU binding option "
                                                           "(Parsl's default: --bind-to).")

    @model_validator(mode="after")
    def _options_need_their_launcher(self) -> LauncherConfig:
        if self.overrides and self.type not in WRAPPING_LAUNCHERS:
            raise ValueError(f"launcher.overrides {self.overrides!r} is only allowed with "
                             "launcher.type srun or mpiexec (or mpirun, aprun, jsrun)")
        if self.bind_cmd is not None and self.type != "mpiexec":
            raise ValueError(f"launcher.bind_cmd {self.bind_cmd!r} is only allowed with "
                             "launcher.type mpiexec")
        return self


class _BlockConfig(BaseModel):
    """What every provider shares: block counts, node count, set-up commands."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    nodes_per_block: int = Field(default=1, ge=1, le=4096)
    init_blocks: int = Field(default=1, ge=0, le=MAX_BLOCKS_LIMIT)
    min_blocks: int = Field(default=0, ge=0, le=MAX_BLOCKS_LIMIT)
    max_blocks: int = Field(default=1, ge=1, le=MAX_BLOCKS_LIMIT)
    worker_init: str = Field(default="", description="Shell run on each block before its workers.")
    launcher: LauncherConfig = LauncherConfig()
    status_poll_period: float | None = Field(
        default=None, gt=0, le=3600,
        description="Seconds between queries of the blocks' state (squeue, qstat, bjobs); "
                    "default Parsl's for the provider (Slurm, PBS Pro, LSF 60, local 5).")

    @model_validator(mode="after")
    def _blocks_in_order(self) -> _BlockConfig:
        if self.min_blocks > self.max_blocks:
            raise ValueError(f"min_blocks {self.min_blocks} is more than max_blocks "
                             f"{self.max_blocks}; allowed: min_blocks <= max_blocks")
        if not self.min_blocks <= self.init_blocks <= self.max_blocks:
            raise ValueError(f"init_blocks {self.init_blocks} is outside min_blocks..max_blocks "
                             f"({self.min_blocks}..{self.max_blocks}); allowed: "
                             "min_blocks <= init_blocks <= max_blocks")
        return self


class _BatchConfig(_BlockConfig):
    """A provider that submits blocks as batch jobs."""

    walltime: str = Field(default="00:10:00", description="HH:MM:SS per block.")
    scheduler_options: str = Field(default="", description="Extra lines for the job script header.")
    cmd_timeout: int | None = Field(
        default=None, ge=1, le=3600,
        description="Seconds a scheduler command (submit, status, cancel) may take; default "
                    "Parsl's for the provider.")

    @field_validator("walltime")
    @classmethod
    def _walltime_is_hms(cls, value: str) -> str:
        if not WALLTIME_PATTERN.match(value):
            raise ValueError(f"walltime {value!r} is not HH:MM:SS (e.g. '01:30:00')")
        return value


class _SingleLauncherConfig(_BlockConfig):
    """A provider whose blocks start their workers directly: no srun or mpiexec."""

    _provider: ClassVar[str]

    @field_validator("launcher")
    @classmethod
    def _single_node_only(cls, value: LauncherConfig) -> LauncherConfig:
        if value.type not in ("single", "simple"):
            raise ValueError(f"launcher.type {value.type!r} is not allowed with provider "
                             f"{cls._provider}; allowed: 'single', 'simple'")
        return value


class LocalProviderConfig(_SingleLauncherConfig):
    """Blocks are process groups on the agent's own machine."""

    type: Literal["local"] = "local"
    _provider = "local"


class KubernetesProviderConfig(_SingleLauncherConfig):
    """Blocks are pods; the agent reaches the cluster with its kubeconfig (or in-cluster)."""

    type: Literal["kubernetes"]
    _provider = "kubernetes"
    image: str = Field(min_length=1, description="Container image with gc-fabric installed.")
    namespace: str = "default"
    init_cpu: float = Field(default=1, gt=0)
    max_cpu: float = Field(default=2, gt=0)
    init_mem: str = Field(default="250Mi", pattern=r"^\d+(Ki|Mi|Gi|Ti)?$")
    max_mem: str = Field(default="500Mi", pattern=r"^\d+(Ki|Mi|Gi|Ti)?$")
    service_account_name: str | None = None
    secret: str | None = Field(default=None, description="Image pull secret.")


class SlurmProviderConfig(_BatchConfig):
    """Blocks are Slurm jobs."""

    type: Literal["slurm"]
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = Field(default=None, description="sbatch --constraint.")
    cores_per_node: int | None = Field(default=None, ge=1, le=4096,
                                       description="sbatch --cpus-per-task.")
    mem_per_node: int | None = Field(default=None, ge=1, description="sbatch --mem, in GB.")
    exclusive: bool = True


class PBSProProviderConfig(_BatchConfig):
    """Blocks are PBS Pro jobs; ``partition`` is the queue."""

    type: Literal["pbspro"]
    partition: str | None = Field(default=None, description="The PBS queue.")
    account: str | None = None
    cpus_per_node: int = Field(default=1, ge=1)
    select_options: str = Field(default="", description="Appended to the select line, e.g. "
                                                         "'ngpus=4'.")


class TorqueProviderConfig(_BatchConfig):
    """Blocks are Torque (PBS) jobs; ``partition`` is the queue."""

    type: Literal["torque"]
    partition: str | None = Field(default=None, description="The Torque queue.")
    account: str | None = None


class GridEngineProviderConfig(_BatchConfig):
    """Blocks are (Sun/Univa/Son of) Grid Engine jobs; ``partition`` is the queue."""

    type: Literal["gridengine"]
    partition: str | None = Field(default=None, description="The Grid Engine queue.")


class CondorProviderConfig(_BatchConfig):
    """Blocks are HTCondor jobs; ``account`` is the accounting group's project."""

    type: Literal["condor"]
    account: str | None = Field(default=None, description="The HTCondor project.")
    cores_per_slot: int | None = Field(default=None, ge=1, le=4096)
    mem_per_slot: float | None = Field(default=None, gt=0, description="GB per slot.")
    requirements: str = Field(default="", description="The submit file's requirements.")


class LSFProviderConfig(_BatchConfig):
    """Blocks are LSF jobs; ``partition`` is the queue, ``account`` the project."""

    type: Literal["lsf"]
    partition: str | None = Field(default=None, description="The LSF queue.")
    account: str | None = Field(default=None, description="The LSF project.")
    cores_per_node: int | None = Field(
        default=None, ge=1, le=4096,
        description="Ask for cores (-n, span[ptile]) instead of whole nodes (-nnodes, which "
                    "only LSF with CSM offers).")


#: Provider types: the tags pydantic also puts in an error's location after ``provider``.
PROVIDER_TYPES = ("local", "slurm", "pbspro", "torque", "lsf", "gridengine", "condor",
                  "kubernetes")


def _provider_tag(data: Any) -> str | None:
    """Which provider model a ``provider`` section is; no ``type`` means ``local``."""
    kind = data.get("type", "local") if isinstance(data, dict) else getattr(data, "type", None)
    return kind if kind in PROVIDER_TYPES else None


#: The ``provider`` section of an htex engine, told apart by ``type`` (default ``local``).
ProviderConfig = Annotated[
    Annotated[LocalProviderConfig, Tag("local")]
    | Annotated[SlurmProviderConfig, Tag("slurm")]
    | Annotated[PBSProProviderConfig, Tag("pbspro")]
    | Annotated[TorqueProviderConfig, Tag("torque")]
    | Annotated[LSFProviderConfig, Tag("lsf")]
    | Annotated[GridEngineProviderConfig, Tag("gridengine")]
    | Annotated[CondorProviderConfig, Tag("condor")]
    | Annotated[KubernetesProviderConfig, Tag("kubernetes")],
    Discriminator(_provider_tag, custom_error_type="provider_type",
                  custom_error_message="type should be one of 'local', 'slurm', 'pbspro', "
                                       "'torque', 'lsf', 'gridengine', 'condor', 'kubernetes'"),
]


def walltime_seconds(walltime: str) -> int:
    """``HH:MM:SS`` as seconds."""
    hours, minutes, seconds = (int(part) for part in walltime.split(":"))
    return hours * 3600 + minutes * 60 + seconds


def build_launcher(config: LauncherConfig) -> Launcher:
    """The Parsl launcher ``config`` asks for."""
    # Parsl is imported here, not at the top: loading an endpoint config must stay quick.
    from parsl import launchers

    kinds: dict[str, type[Launcher]] = {
        "single": launchers.SingleNodeLauncher, "simple": launchers.SimpleLauncher,
        "srun": launchers.SrunLauncher, "mpiexec": launchers.MpiExecLauncher,
        "mpirun": launchers.MpiRunLauncher, "aprun": launchers.AprunLauncher,
        "jsrun": launchers.JsrunLauncher, "gnu_parallel": launchers.GnuParallelLauncher}
    options: dict[str, Any] = {}
    if config.type in WRAPPING_LAUNCHERS:
        options["overrides"] = config.overrides
    if config.bind_cmd is not None:
        options["bind_cmd"] = config.bind_cmd
    return kinds[config.type](**options)


#: Our provider configs whose ``partition`` Parsl calls ``queue``.
_QUEUE_PROVIDERS = ("pbspro", "torque", "lsf", "gridengine")


def build_provider(config: LocalProviderConfig | SlurmProviderConfig | PBSProProviderConfig
                   | TorqueProviderConfig | LSFProviderConfig | GridEngineProviderConfig
                   | CondorProviderConfig | KubernetesProviderConfig, *,
                   worker_init_prefix: str = "") -> ExecutionProvider:
    """The Parsl provider ``config`` asks for, its blocks set up by ``worker_init_prefix``
    (e.g. putting the agent's Python on PATH) and then by the config's own ``worker_init``."""
    from parsl import providers

    blocks: dict[str, Any] = {
        "nodes_per_block": config.nodes_per_block,
        "init_blocks": config.init_blocks,
        "min_blocks": config.min_blocks,
        "max_blocks": config.max_blocks,
        "worker_init": "\n".join(filter(None, [worker_init_prefix, config.worker_init])),
        "launcher": build_launcher(config.launcher),
    }
    if isinstance(config, KubernetesProviderConfig):
        return _kubernetes_provider(config, blocks)
    kind: type[ExecutionProvider]
    if isinstance(config, LocalProviderConfig):
        kind, options = providers.LocalProvider, blocks
    else:
        kind, options = _batch_provider(config)
        options.update(blocks)
    if config.status_poll_period is not None:
        kind = _polled_every(kind, config.status_poll_period)
    return kind(**options)


def _batch_provider(config: SlurmProviderConfig | PBSProProviderConfig | TorqueProviderConfig
                    | LSFProviderConfig | GridEngineProviderConfig | CondorProviderConfig,
                    ) -> tuple[type[ExecutionProvider], dict[str, Any]]:
    """The Parsl class of a batch provider and its options beyond the blocks."""
    from parsl import providers

    options: dict[str, Any] = {"walltime": config.walltime,
                               "scheduler_options": config.scheduler_options}
    if config.cmd_timeout is not None:
        options["cmd_timeout"] = config.cmd_timeout
    if config.type in _QUEUE_PROVIDERS:
        options["queue"] = getattr(config, "partition")  # noqa: B009 - every one of them has it
    if isinstance(config, SlurmProviderConfig):
        options.update(partition=config.partition, account=config.account, qos=config.qos,
                       constraint=config.constraint, cores_per_node=config.cores_per_node,
                       mem_per_node=config.mem_per_node, exclusive=config.exclusive)
        return providers.SlurmProvider, options
    if isinstance(config, PBSProProviderConfig):
        options.update(account=config.account, cpus_per_node=config.cpus_per_node,
                       select_options=config.select_options)
        return providers.PBSProProvider, options
    if isinstance(config, TorqueProviderConfig):
        options.update(account=config.account)
        return providers.TorqueProvider, options
    if isinstance(config, GridEngineProviderConfig):
        return providers.GridEngineProvider, options
    if isinstance(config, CondorProviderConfig):
        options.update(project=config.account or "", cores_per_slot=config.cores_per_slot,
                       mem_per_slot=config.mem_per_slot, requirements=config.requirements)
        return providers.CondorProvider, options
    # bsub reads the script's #BSUB lines only from standard input.
    options.update(project=config.account, bsub_redirection=True)
    if config.cores_per_node is not None:
        options.update(request_by_nodes=False, cores_per_node=config.cores_per_node,
                       cores_per_block=config.cores_per_node * config.nodes_per_block)
    return providers.LSFProvider, options


def _kubernetes_provider(config: KubernetesProviderConfig,
                         blocks: dict[str, Any]) -> ExecutionProvider:
    """Parsl's KubernetesProvider; it needs the ``kubernetes`` package and a cluster to
    load its configuration from, and says neither clearly: this does."""
    try:
        from parsl.providers import KubernetesProvider

        return KubernetesProvider(
            image=config.image, namespace=config.namespace, init_cpu=config.init_cpu,
            max_cpu=config.max_cpu, init_mem=config.init_mem, max_mem=config.max_mem,
            service_account_name=config.service_account_name, secret=config.secret,
            **{k: v for k, v in blocks.items() if k != "launcher"})
    except Exception as exc:  # OptionalModuleMissing, or kubernetes' ConfigException
        raise ConfigError(
            f"engine.provider kubernetes cannot start: {type(exc).__name__}: {exc}; install "
            "the client (`pip install kubernetes`) and give the agent a kubeconfig "
            "(~/.kube/config or KUBECONFIG) or run it inside the cluster") from exc


def _polled_every(kind: type[ExecutionProvider], seconds: float) -> type[ExecutionProvider]:
    """``kind`` with its status polling interval set to ``seconds``.

    Parsl fixes the interval per provider class (a read-only property: 60 s for Slurm), and
    the scaling strategy sees a cancelled or finished block only once it polls: a shorter
    period replaces lost blocks sooner. The subclass overrides that property alone.
    """
    return type(kind.__name__, (kind,), {"status_polling_interval": property(lambda _: seconds),
                                         "__module__": kind.__module__})
