"""Where the high-throughput engine gets its nodes: config models mapped onto Parsl's providers.

An endpoint's ``engine.provider`` section says which batch system hands out the blocks
(``local``, ``slurm``, ``pbspro``, ``lsf``, ``kubernetes``) and how the worker pools are started on a
block's nodes (``launcher``: ``single``, ``srun``, ``mpiexec``). This module validates that
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
    "KubernetesProviderConfig",
    "LSFProviderConfig",
    "LauncherConfig",
    "LocalProviderConfig",
    "PBSProProviderConfig",
    "ProviderConfig",
    "SlurmProviderConfig",
    "build_launcher",
    "build_provider",
    "walltime_seconds",
]

#: A batch walltime: HH:MM:SS (hours may exceed 24).
WALLTIME_PATTERN = re.compile(r"^\d{1,4}:[0-5]\d:[0-5]\d$")
#: Largest number of blocks (batch jobs) one endpoint may ask for.
MAX_BLOCKS_LIMIT = 1024


class LauncherConfig(BaseModel):
    """How a block starts one worker pool per node: directly, under srun, or under mpiexec."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["single", "srun", "mpiexec"] = "single"
    overrides: str = Field(default="", description="Extra options for srun or mpiexec.")

    @model_validator(mode="after")
    def _overrides_need_a_wrapper(self) -> LauncherConfig:
        if self.overrides and self.type == "single":
            raise ValueError(f"launcher.overrides {self.overrides!r} is only allowed with "
                             "launcher.type srun or mpiexec")
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
        if value.type != "single":
            raise ValueError(f"launcher.type {value.type!r} is not allowed with provider "
                             f"{cls._provider}; allowed: 'single'")
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
    exclusive: bool = True


class PBSProProviderConfig(_BatchConfig):
    """Blocks are PBS Pro jobs; ``partition`` is the queue."""

    type: Literal["pbspro"]
    partition: str | None = Field(default=None, description="The PBS queue.")
    account: str | None = None
    cpus_per_node: int = Field(default=1, ge=1)


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
PROVIDER_TYPES = ("local", "slurm", "pbspro", "lsf", "kubernetes")


def _provider_tag(data: Any) -> str | None:
    """Which provider model a ``provider`` section is; no ``type`` means ``local``."""
    kind = data.get("type", "local") if isinstance(data, dict) else getattr(data, "type", None)
    return kind if kind in PROVIDER_TYPES else None


#: The ``provider`` section of an htex engine, told apart by ``type`` (default ``local``).
ProviderConfig = Annotated[
    Annotated[LocalProviderConfig, Tag("local")]
    | Annotated[SlurmProviderConfig, Tag("slurm")]
    | Annotated[PBSProProviderConfig, Tag("pbspro")]
    | Annotated[LSFProviderConfig, Tag("lsf")]
    | Annotated[KubernetesProviderConfig, Tag("kubernetes")],
    Discriminator(_provider_tag, custom_error_type="provider_type",
                  custom_error_message="type should be 'local', 'slurm', 'pbspro', 'lsf' or "
                                       "'kubernetes'"),
]


def walltime_seconds(walltime: str) -> int:
    """``HH:MM:SS`` as seconds."""
    hours, minutes, seconds = (int(part) for part in walltime.split(":"))
    return hours * 3600 + minutes * 60 + seconds


def build_launcher(config: LauncherConfig) -> Launcher:
    """The Parsl launcher ``config`` asks for."""
    # Parsl is imported here, not at the top: loading an endpoint config must stay quick.
    from parsl.launchers import MpiExecLauncher, SingleNodeLauncher, SrunLauncher

    if config.type == "srun":
        return SrunLauncher(overrides=config.overrides)
    if config.type == "mpiexec":
        return MpiExecLauncher(overrides=config.overrides)
    return SingleNodeLauncher()


def build_provider(config: LocalProviderConfig | SlurmProviderConfig | PBSProProviderConfig
                   | LSFProviderConfig | KubernetesProviderConfig, *,
                   worker_init_prefix: str = "") -> ExecutionProvider:
    """The Parsl provider ``config`` asks for, its blocks set up by ``worker_init_prefix``
    (e.g. putting the agent's Python on PATH) and then by the config's own ``worker_init``."""
    from parsl.providers import LocalProvider, LSFProvider, PBSProProvider, SlurmProvider

    blocks: dict[str, Any] = {
        "nodes_per_block": config.nodes_per_block,
        "init_blocks": config.init_blocks,
        "min_blocks": config.min_blocks,
        "max_blocks": config.max_blocks,
        "worker_init": "\n".join(filter(None, [worker_init_prefix, config.worker_init])),
        "launcher": build_launcher(config.launcher),
    }
    kind: type[ExecutionProvider]
    if isinstance(config, KubernetesProviderConfig):
        return _kubernetes_provider(config, blocks)
    if isinstance(config, LocalProviderConfig):
        kind, options = LocalProvider, blocks
    else:
        options = {**blocks, "walltime": config.walltime,
                   "scheduler_options": config.scheduler_options}
        if isinstance(config, SlurmProviderConfig):
            kind = SlurmProvider
            options.update(partition=config.partition, account=config.account, qos=config.qos,
                           exclusive=config.exclusive)
        elif isinstance(config, PBSProProviderConfig):
            kind = PBSProProvider
            options.update(queue=config.partition, account=config.account,
                           cpus_per_node=config.cpus_per_node)
        else:
            kind = LSFProvider
            # bsub reads the script's #BSUB lines only from standard input.
            options.update(queue=config.partition, project=config.account, bsub_redirection=True)
            if config.cores_per_node is not None:
                options.update(request_by_nodes=False, cores_per_node=config.cores_per_node,
                               cores_per_block=config.cores_per_node * config.nodes_per_block)
    if config.status_poll_period is not None:
        kind = _polled_every(kind, config.status_poll_period)
    return kind(**options)


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
