"""Globus Compute's endpoint ``config.yaml``, taken as it is and mapped onto ours.

People moving from Globus Compute bring a config written in its vocabulary: engines, Parsl
providers and launchers named by class (``GlobusComputeEngine``, ``SlurmProvider``,
``SrunLauncher``), Parsl's key names (``queue``, ``project``), ``address_by_interface``,
``strategy`` and ``job_status_kwargs``. ``translate`` turns such a config into the agent's
own (``gc_agent.config``), whose models then check every value. Each key is honoured or
refused by name with the reason: nothing is dropped silently.

    >>> translate({"engine": {"type": "ThreadPoolEngine", "max_workers": 3}})
    {'engine': {'type': 'threads', 'max_workers': 3}}
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gc_core.errors import ConfigError

__all__ = ["ENGINE_TYPES", "LAUNCHER_TYPES", "PROVIDER_TYPES", "is_globus_compute_config",
           "translate"]

#: Globus Compute's engines, by class name, and ours. HighThroughputEngine is its old name
#: of the Parsl-based engine.
ENGINE_TYPES = {"GlobusComputeEngine": "htex", "HighThroughputEngine": "htex",
                "ProcessPoolEngine": "processes", "ThreadPoolEngine": "threads"}
#: Parsl's providers, by class name, and ours (``gc_agent.providers``).
PROVIDER_TYPES = {"LocalProvider": "local", "SlurmProvider": "slurm", "PBSProProvider": "pbspro",
                  "TorqueProvider": "torque", "LSFProvider": "lsf",
                  "GridEngineProvider": "gridengine", "CondorProvider": "condor",
                  "KubernetesProvider": "kubernetes"}
#: Parsl's launchers, by class name, and ours.
LAUNCHER_TYPES = {"SingleNodeLauncher": "single", "SimpleLauncher": "simple",
                  "SrunLauncher": "srun", "MpiExecLauncher": "mpiexec", "MpiRunLauncher": "mpirun",
                  "AprunLauncher": "aprun", "JsrunLauncher": "jsrun",
                  "GnuParallelLauncher": "gnu_parallel"}
#: Parsl's provider keys that ours call otherwise, by our provider type.
PROVIDER_RENAMES: dict[str, dict[str, str]] = {
    "pbspro": {"queue": "partition"}, "torque": {"queue": "partition"},
    "gridengine": {"queue": "partition"}, "lsf": {"queue": "partition", "project": "account"},
    "condor": {"project": "account"}}
#: Strategies that scale blocks the way the htex engine does (Parsl's "simple").
SIMPLE_STRATEGIES = ("simple", "SimpleStrategy", "KubeSimpleStrategy")

#: Keys of Globus Compute's vocabulary that cannot be honoured here, and why.
REFUSED: dict[str, str] = {
    # the endpoint
    "multi_user": "a multi-user endpoint is configured with gc-fabric's own multi_user "
                  "section (identity_mapping, user_config_template), see the README",
    "public": "who may see and use an endpoint is the registry's endpoint policy "
              "(visibility: listed), not the agent's config",
    "heartbeat_threshold": "the registry counts an endpoint offline after 3 missed heartbeats "
                           "(heartbeat_period): there is no threshold to set",
    "idle_heartbeats_hard": "the agent never stops while tasks wait or run "
                            "(idle_heartbeats_soft stops it once idle that long)",
    "log_dir": "the agent logs to agent.log in its endpoint directory (gc-agent logs NAME)",
    "debug": "start the agent with --log-level DEBUG instead",
    "detach_endpoint": "run `gc-agent start NAME --detach` instead",
    "endpoint_setup": "the agent runs no set-up command, run it before `gc-agent start` "
                      "(or in the systemd unit)",
    "endpoint_teardown": "the agent runs no tear-down command, run it after `gc-agent stop`",
    "environment": "the agent passes its own environment to its workers, set variables "
                   "where it starts (or in worker_init for htex blocks)",
    "high_assurance": "Globus Auth's setting, the registry's tokens and policies do this here",
    "authentication_policy": "Globus Auth's setting, the registry's policies do this here",
    "subscription_id": "Globus's subscriptions have no counterpart here",
    "admins": "the endpoint's owner is whoever configured it, share it with the registry's "
              "endpoint policy (allowed_users, allowed_groups)",
    # the engine
    "scheduler_mode": "a Kubernetes scheduling mode of old Globus Compute engines, "
                      "gc-fabric's htex engine has none",
    "max_tasks_per_child": "worker processes here live until their task crashes them or is "
                           "cancelled",
    "cpu_affinity": "workers are pinned to accelerators (available_accelerators) only, not to "
                    "CPU cores",
    "enable_mpi_mode": "MPIFunction runs mpiexec from an ordinary worker, no MPI mode is needed",
    "mpi_launcher": "MPIFunction runs mpiexec from an ordinary worker, no MPI mode is needed",
    "worker_port_range": "the interchange chooses its own ports on engine.address",
    "interchange_port_range": "the interchange chooses its own ports on engine.address",
    "worker_ports": "the interchange chooses its own ports on engine.address",
    "worker_logdir_root": "worker pools log under the engine's run_dir",
    "working_dir": "tasks run in the worker's directory, change it inside the function",
    # providers and launchers
    "channel": "blocks are submitted from the agent's own host (Parsl no longer has channels)",
    "gpus_per_node": "ask the scheduler in scheduler_options (e.g. #SBATCH --gpus-per-node=4) "
                     "and pin workers with the engine's available_accelerators",
    "gres": "ask the scheduler in scheduler_options (e.g. #SBATCH --gres=gpu:4)",
    "incluster_config": "the agent loads its Kubernetes configuration from ~/.kube/config or, "
                        "inside a cluster, from the cluster itself",
    "move_files": "the agent and the blocks share a filesystem here, nothing is copied",
}
#: Provider keys accepted only with Parsl's default, which is what gc-fabric always does.
PROVIDER_DEFAULTS: dict[str, tuple[Any, str]] = {
    "parallelism": (1, ("the htex engine asks for a block whenever tasks wait and no worker "
                        "is free (Parsl's parallelism 1)"))}
#: Launcher keys accepted only with Parsl's default.
LAUNCHER_DEFAULTS: dict[str, tuple[Any, str]] = {
    "debug": (True, "launchers always trace their commands in the block's output")}
#: Top-level keys both vocabularies share, with the same meaning.
SHARED_TOP_KEYS = frozenset({"heartbeat_period", "allowed_functions", "amqp_port"})


class _Section(BaseModel):
    """A section of Globus Compute's config: the keys named here are typed; any other is
    looked at by ``_rest`` and passed on, or refused with its reason."""

    model_config = ConfigDict(extra="allow", frozen=True)

    def rest(self) -> dict[str, Any]:
        """The keys this model does not name."""
        return dict(self.model_extra or {})


class GlobusLauncher(_Section):
    """A Parsl launcher by class name."""

    type: str


class GlobusProvider(_Section):
    """A Parsl provider by class name with Parsl's keys."""

    type: str
    launcher: GlobusLauncher | None = None


class GlobusEngine(_Section):
    """An engine by class name; no ``type`` means GlobusComputeEngine, as in Globus Compute."""

    type: str = "GlobusComputeEngine"
    max_workers: int | None = None
    strategy: str | dict[str, Any] | None = None
    job_status_kwargs: dict[str, Any] | None = None
    provider: GlobusProvider | None = None


class GlobusEndpointConfig(_Section):
    """The top of Globus Compute's config.yaml."""

    display_name: str | None = None
    idle_heartbeats_soft: int | None = Field(default=None, ge=1)
    engine: GlobusEngine | None = None


def is_globus_compute_config(data: object) -> bool:
    """Whether a loaded config.yaml is written in Globus Compute's vocabulary."""
    if not isinstance(data, Mapping):
        return False
    if {"display_name", "idle_heartbeats_soft", "idle_heartbeats_hard"} & set(data):
        return True
    engine = data.get("engine")
    if not isinstance(engine, Mapping):
        return False
    kind = engine.get("type")
    if kind is None:  # ours always names its engine's type, Globus Compute's default needs none
        return bool({"provider", "max_workers_per_node"} & set(engine))
    return str(kind).endswith("Engine")  # its engines are named by class


def translate(data: object, *, agent_keys: Iterable[str] = ()) -> dict[str, Any]:
    """Globus Compute's config ``data`` in the agent's vocabulary.

    ``agent_keys`` are top-level keys of the agent's own config, passed on as they are
    (an agent config may mix them with Globus Compute's sections).

    Raises:
        ConfigError: naming every key that cannot be honoured, with the reason.
    """
    try:
        config = GlobusEndpointConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("Globus Compute config: " + "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'file'}: {e['msg']} (got {e.get('input')!r})"
            for e in exc.errors())) from exc
    problems: list[str] = []
    ours: dict[str, Any] = {}
    if config.display_name is not None:
        ours["description"] = config.display_name
    if config.idle_heartbeats_soft is not None:
        ours["idle_heartbeats"] = config.idle_heartbeats_soft
    ours.update(_passed_on(config.rest(), SHARED_TOP_KEYS | set(agent_keys), "", problems))
    if config.engine is not None:
        ours["engine"] = _engine(config.engine, problems)
    if problems:
        raise ConfigError("Globus Compute config: " + "; ".join(problems))
    return ours


def _our_type(types: Mapping[str, str], given: str, where: str,
              problems: list[str]) -> str | None:
    """Our name of the class ``given`` names, or None (noted in ``problems``)."""
    kind = types.get(given)
    if kind is None:
        problems.append(f"{where}type: {given!r} is not one gc-fabric runs "
                        f"(allowed: {', '.join(types)})")
    return kind


def _engine(engine: GlobusEngine, problems: list[str]) -> dict[str, Any]:
    kind = _our_type(ENGINE_TYPES, engine.type, "engine.", problems)
    if kind is None:
        return {}
    if kind != "htex":
        return {"type": kind, **_local_engine(engine, problems)}
    ours: dict[str, Any] = {"type": kind}
    if engine.max_workers is not None:  # the Parsl engine's older name of it
        if "max_workers_per_node" in engine.rest():
            problems.append("engine.max_workers: the older name of max_workers_per_node, "
                            "which is set too; keep one of them")
        ours["max_workers_per_node"] = engine.max_workers
    ours.update(_scaling(engine, problems))
    if engine.provider is not None:
        ours["provider"] = _provider(engine.provider, problems)
    ours.update(_passed_on(engine.rest(), _htex_keys(), "engine.", problems))
    return ours


def _local_engine(engine: GlobusEngine, problems: list[str]) -> dict[str, Any]:
    """The keys of a thread or process pool engine, which runs its workers on this host."""
    ours: dict[str, Any] = {}
    if engine.max_workers is not None:
        ours["max_workers"] = engine.max_workers
    rest = engine.rest()
    if rest.pop("heartbeat_period", None) is not None:
        problems.append("engine.heartbeat_period: a local engine reports with the agent's "
                        "heartbeat, set heartbeat_period at the top of the config")
    for key in ("strategy", "job_status_kwargs", "provider"):
        if getattr(engine, key) is not None:
            problems.append(f"engine.{key}: only GlobusComputeEngine has it: {engine.type} "
                            "runs its workers on this host")
    ours.update(_passed_on(rest, _local_engine_keys(), "engine.", problems))
    return ours


def _scaling(engine: GlobusEngine, problems: list[str]) -> dict[str, Any]:
    """``strategy`` and ``job_status_kwargs`` as the htex engine's idle_timeout and
    strategy_period."""
    ours: dict[str, Any] = {}
    strategy = engine.strategy
    options = dict(strategy) if isinstance(strategy, dict) else {}
    name = options.pop("type", "SimpleStrategy") if isinstance(strategy, dict) else strategy
    if name is not None and name not in SIMPLE_STRATEGIES:
        problems.append(f"engine.strategy: {name!r} cannot be honoured: the htex engine scales "
                        "with Parsl's simple strategy (between min_blocks and max_blocks, for a "
                        "fixed pool set them equal), allowed: simple, SimpleStrategy")
    options.update(engine.job_status_kwargs or {})
    for key, value in options.items():
        ours_key = {"max_idletime": "idle_timeout", "strategy_period": "strategy_period"}.get(key)
        if ours_key is None:
            problems.append(f"engine.job_status_kwargs.{key}: not honoured: the scaling "
                            "options are max_idletime and strategy_period")
        else:
            ours[ours_key] = value
    return ours


def _provider(provider: GlobusProvider, problems: list[str]) -> dict[str, Any]:
    kind = _our_type(PROVIDER_TYPES, provider.type, "engine.provider.", problems)
    if kind is None:
        return {}
    ours: dict[str, Any] = {"type": kind}
    if provider.launcher is not None:
        ours["launcher"] = _launcher(provider.launcher, problems)
    renames = PROVIDER_RENAMES.get(kind, {})
    parsl_names = {ours_key: key for key, ours_key in renames.items()}
    known = {parsl_names.get(key, key) for key in _provider_keys(kind)}
    rest = provider.rest()
    if isinstance(rest.get("walltime"), int):
        rest["walltime"] = _sexagesimal_walltime(rest["walltime"])
    passed = _passed_on(rest, known, "engine.provider.", problems, PROVIDER_DEFAULTS)
    ours.update((renames.get(key, key), value) for key, value in passed.items())
    return ours


def _sexagesimal_walltime(seconds: int) -> str:
    """An unquoted walltime such as ``12:00:00``, which YAML 1.1 reads as the number of
    seconds (43200), written back as ``HH:MM:SS``."""
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}"


def _launcher(launcher: GlobusLauncher, problems: list[str]) -> dict[str, Any]:
    kind = _our_type(LAUNCHER_TYPES, launcher.type, "engine.provider.launcher.", problems)
    if kind is None:
        return {}
    return {"type": kind, **_passed_on(launcher.rest(), {"overrides", "bind_cmd"},
                                       "engine.provider.launcher.", problems, LAUNCHER_DEFAULTS)}


def _passed_on(keys: Mapping[str, Any], known: set[str] | frozenset[str], where: str,
               problems: list[str],
               defaults: Mapping[str, tuple[Any, str]] | None = None) -> dict[str, Any]:
    """The keys ``known`` to our model, as they are, and those of ``defaults`` that hold
    the default (dropped: it is what happens anyway); each other one goes to ``problems``
    with the reason it cannot be honoured."""
    passed: dict[str, Any] = {}
    for key, value in keys.items():
        default = (defaults or {}).get(key)
        if key in known:
            passed[key] = value
        elif default is not None and value == default[0]:
            continue  # what gc-fabric does anyway
        elif default is not None:
            problems.append(f"{where}{key}: {value!r} cannot be honoured: {default[1]}")
        elif key in REFUSED:
            problems.append(f"{where}{key}: cannot be honoured: {REFUSED[key]}")
        else:
            problems.append(f"{where}{key}: not a key gc-fabric knows here (known: "
                            f"{', '.join(sorted(known))})")
    return passed


def _local_engine_keys() -> set[str]:
    from gc_agent.config import EngineConfig

    return set(EngineConfig.model_fields) - {"type"}


def _htex_keys() -> set[str]:
    from gc_agent.config import HtexEngineConfig

    return set(HtexEngineConfig.model_fields) - {"type", "provider"}


def _provider_keys(kind: str) -> set[str]:
    from gc_agent import providers

    models: dict[str, type[BaseModel]] = {
        "local": providers.LocalProviderConfig, "slurm": providers.SlurmProviderConfig,
        "pbspro": providers.PBSProProviderConfig, "torque": providers.TorqueProviderConfig,
        "lsf": providers.LSFProviderConfig, "gridengine": providers.GridEngineProviderConfig,
        "condor": providers.CondorProviderConfig,
        "kubernetes": providers.KubernetesProviderConfig}
    return set(models[kind].model_fields) - {"type", "launcher"}
