"""An endpoint's configuration: ``$GC_HOME/endpoints/<name>/config.yaml``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from gc_agent.accelerators import AcceleratorIds, workers_for_devices
from gc_agent.addresses import AddressLookup
from gc_agent.containers import ContainerSettings
from gc_agent.execution import DEFAULT_RESULT_SIZE_LIMIT
from gc_agent.providers import PROVIDER_TYPES, LocalProviderConfig, ProviderConfig, walltime_seconds
from gc_core.broker_login import broker_urls_on_port
from gc_core.errors import ConfigError

__all__ = ["EndpointConfig", "EngineConfig", "HtexEngineConfig", "IdentityRule", "MultiUserConfig",
           "load_config", "parse_config", "read_token", "save_config", "write_token"]


class EngineConfig(ContainerSettings):
    """Where tasks run: a thread pool or a pool of worker processes on this machine."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["threads", "processes"] = "processes"
    max_workers: int = Field(default=2, ge=1, le=1024)
    available_accelerators: AcceleratorIds = Field(
        default=(), description="A device count or the devices' ids: each worker process "
                                "sees one device only, and there are no more workers than "
                                "devices (processes engine).")

    @model_validator(mode="after")
    def _threads_cannot_be_pinned(self) -> EngineConfig:
        if self.available_accelerators and self.type == "threads":
            raise ValueError("available_accelerators needs engine.type 'processes' (or 'htex'): "
                             "threads share one process and so one set of visible devices, "
                             "so no thread can be pinned to its own")
        return self

    @property
    def workers(self) -> int:
        """Workers started: ``max_workers``, at most one per listed device."""
        return workers_for_devices(self.max_workers, self.available_accelerators)


class HtexEngineConfig(ContainerSettings):
    """Parsl's HighThroughputExecutor: an interchange here, worker pools on the provider's blocks."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["htex"]
    label: str = Field(default="htex", pattern=r"^[A-Za-z0-9_.-]+$")
    max_workers_per_node: int = Field(default=2, ge=1, le=1024)
    max_retries_on_system_failure: int = Field(
        default=0, ge=0, le=100,
        description="Times a task whose worker or node was lost runs again before it fails "
                    "with WorkerLost (0, as in Globus Compute: it fails at once).")
    address: str | AddressLookup = Field(
        default="127.0.0.1", description="Address the workers reach the interchange on, or "
                                         "how to find it when the engine starts.")
    available_accelerators: AcceleratorIds = Field(
        default=(), description="A device count or the devices' ids of each node: each worker "
                                "sees one device only, and a node runs no more workers than "
                                "devices.")
    cores_per_worker: float = Field(default=1.0, gt=0, le=4096,
                                    description="CPU cores each worker takes on its node.")
    mem_per_worker: float | None = Field(default=None, gt=0,
                                         description="GB of memory each worker takes.")
    prefetch_capacity: int = Field(default=0, ge=0, le=10_000,
                                   description="Tasks each worker pool fetches beyond its idle "
                                               "workers.")
    worker_debug: bool = Field(default=False, description="Worker pools log at DEBUG level.")
    encrypted: bool = Field(default=True, description="CurveZMQ between interchange and workers.")
    parsl_tasks_per_worker: int = Field(
        default=2, ge=1, le=100,
        description="Parsl tasks (a task, or a bundle: bundle_seconds) handed to Parsl per "
                    "worker: more keeps workers busy between round trips; tasks the agent still "
                    "holds stay cancellable and go back to the queue when it stops.")
    bundle_seconds: float = Field(
        default=0.02, ge=0, le=60,
        description="Seconds of work (as a function's runs so far took) that quick tasks "
                    "waiting together (one batch of tasks, or more than Parsl's room) may share "
                    "in one Parsl task: Parsl's cost is then paid once for them all, and their "
                    "results return together. 0: each task travels alone.")
    heartbeat_period: int = Field(default=30, ge=1, le=3600,
                                  description="Seconds between worker-pool heartbeats; also how "
                                              "often a pool checks for dead workers.")
    heartbeat_threshold: int = Field(default=120, ge=2, le=86_400,
                                     description="Seconds without a heartbeat before a worker "
                                                 "pool (and its tasks) counts as lost.")
    run_dir: str | None = Field(default=None, description="Parsl's logs and scripts; default "
                                                          "$GC_HOME/endpoints/<name>/htex or a "
                                                          "temporary directory.")
    idle_timeout: float = Field(default=120.0, ge=0, le=86_400,
                                description="Seconds with no task before blocks above "
                                            "min_blocks are released.")
    strategy_period: float = Field(default=5.0, gt=0, le=3600,
                                   description="Seconds between scaling decisions.")
    drain_margin: int | None = Field(
        default=60, ge=0, le=86_400,
        description="Seconds before a block's walltime at which its workers stop taking new "
                    "tasks and exit once idle (None: never).")
    shutdown_timeout: float = Field(default=10.0, gt=0, le=600,
                                    description="Seconds a stopping engine waits for its "
                                                "interchange before killing it.")
    provider: ProviderConfig = LocalProviderConfig()

    @model_validator(mode="after")
    def _drain_before_walltime(self) -> HtexEngineConfig:
        walltime = getattr(self.provider, "walltime", None)
        if walltime and self.drain_margin is not None \
                and self.drain_margin >= walltime_seconds(walltime):
            raise ValueError(f"drain_margin {self.drain_margin} is not less than the provider's "
                             f"walltime {walltime!r} ({walltime_seconds(walltime)} s); allowed: a "
                             "margin shorter than the walltime, or null for no draining")
        return self

    @property
    def workers_per_node(self) -> int:
        """Workers on each node: ``max_workers_per_node``, at most one per listed device."""
        return workers_for_devices(self.max_workers_per_node, self.available_accelerators)

    @property
    def drain_period(self) -> int | None:
        """Seconds after a worker pool starts at which it drains: walltime minus the margin."""
        walltime = getattr(self.provider, "walltime", None)
        if not walltime or self.drain_margin is None:
            return None
        return walltime_seconds(walltime) - self.drain_margin


def _engine_tag(data: Any) -> str | None:
    """Which engine model a config's ``engine`` section is: no ``type`` means the local default."""
    kind = data.get("type", "processes") if isinstance(data, dict) else getattr(data, "type", None)
    if kind in ("threads", "processes"):
        return "local"
    return "htex" if kind == "htex" else None


#: The ``engine`` section: a local pool (threads, processes) or the high-throughput engine.
AnyEngineConfig = Annotated[
    Annotated[EngineConfig, Tag("local")] | Annotated[HtexEngineConfig, Tag("htex")],
    Discriminator(_engine_tag, custom_error_type="engine_type",
                  custom_error_message="type should be 'threads', 'processes' or 'htex'"),
]

#: Names pydantic puts in an error's location after these keys to say which variant it tried;
#: they are not keys of the file, so error messages leave them out.
_VARIANT_TAGS = {"engine": ("local", "htex"), "provider": PROVIDER_TYPES}
#: Errors of a section whose ``type`` names no variant.
_BAD_TYPE_ERRORS = ("engine_type", "provider_type")


class IdentityRule(BaseModel):
    """One identity-mapping rule: a regular expression and an account-name template."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    match: str
    output: str


class MultiUserConfig(BaseModel):
    """A multi-user endpoint: map identities to accounts, render each user's engine."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    identity_mapping: list[IdentityRule] = []
    identity_mapping_command: str | None = Field(
        default=None, description="Gets the identity on stdin, prints the account name.")
    user_config_template: Path = Field(description="Jinja2 template of a user's engine config.")
    user_config_schema: Path | None = Field(
        default=None, description="JSON Schema of the options users may set.")
    worker_python: str | None = Field(
        default=None, description="Python that user workers run (readable by every user); "
                                  "default: the agent's.")
    user_idle_timeout: float = Field(default=300.0, gt=0,
                                     description="Seconds before an idle user's workers stop.")
    allowed_privileged_accounts: list[str] = Field(
        default=[],
        description="DANGER: accounts tasks may run as although they are system accounts "
                    "(uid below UID_MIN), in group 0 or in a privileged group (sudo, wheel, "
                    "adm, docker, ...: gc_agent.multiuser.mapping.PRIVILEGED_GROUPS). Each "
                    "one listed lets mapped identities run code with those rights. Root is "
                    "refused even here.")
    insecure_trust_claimed_identities: bool = Field(
        default=False,
        description="INSECURE, for a box where one person sends every task (a demo, a test "
                    "stack): map the identity a task merely claims, on a broker that does not "
                    "verify who sent it. Whoever can send this endpoint a task then runs code "
                    "as any account the mapping reaches. Without it a multi-user agent refuses "
                    "to start unless the broker verifies senders (broker_verifies_user_id).")


class EndpointConfig(BaseModel):
    """Everything one agent needs; defaults run the local demo."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    endpoint_id: str
    description: str = ""
    broker_url: str | None = Field(
        default=None,
        description="The broker, or a cluster's nodes: a list of URLs, or one string of URLs "
                    "separated by commas. The agent connects to the first that answers and "
                    "fails over to the next when its node dies.")
    amqp_port: int | None = Field(
        default=None, ge=1, le=65535,
        description="Reach the broker on this port: it replaces the port of every URL of "
                    "broker_url (or of GC_BROKER_URL), e.g. 443 where only that port is open.")
    registry_url: str | None = None
    token_file: Path | None = Field(
        default=None,
        description="File (mode 0600) holding this endpoint's agent token: the agent logs in "
                    "to the registry, and to a broker URL without credentials, as "
                    "endpoint-<endpoint_id> with it.")
    broker_verifies_user_id: bool = Field(
        default=False,
        description="The broker's users are the registry's, so the user_id it checks on each "
                    "message names the sender: a task must then come from the user it names "
                    "(or a trusted publisher), and a multi-user endpoint maps that user. Implied "
                    "when the agent logs in with its token (token_file and a broker URL without "
                    "credentials); set it when broker_url carries credentials for such a broker.")
    engine: AnyEngineConfig = EngineConfig()
    prefetch: int | None = Field(
        default=None, ge=1,
        description="Unacked tasks the agent holds; default 16 per worker.")
    result_linger: float = Field(
        default=0.02, ge=0, le=1,
        description="Seconds a result of a batch of tasks may wait for its batch-mates' "
                    "results, to travel with them in one message (fewer messages cost the "
                    "broker, the ledger and the client less); 0 sends each at once. A "
                    "batch's last result, and that of a task sent alone, never wait.")
    multi_user: MultiUserConfig | None = None
    allowed_serializers: frozenset[Literal["cloudpickle", "json"]] = frozenset(
        {"cloudpickle", "json"})
    allowed_functions: frozenset[str] | None = Field(
        default=None, description="Function ids this endpoint runs; any other is refused "
                                  "(None: any the registry's policy allows).")
    trusted_publishers: frozenset[str] = Field(
        default=frozenset({"gc-registry"}),
        description="On a secured broker: accounts whose tasks may name another user as their "
                    "submitter — the registry's own broker account, whose action provider "
                    "submits for its callers. Everyone else's tasks must be their own.")
    heartbeat_period: float = Field(default=10.0, gt=0)
    connect_timeout: float = Field(
        default=30.0, gt=0,
        description="Seconds a starting agent keeps trying to reach the broker before it fails.")
    idle_heartbeats: int | None = Field(
        default=None, ge=1,
        description="Stop (exit 0) after this many heartbeat periods in a row with no task "
                    "received or running; None keeps the agent up for ever.")
    output_limit: int = Field(
        default=16_384, ge=0, le=49_152,
        description="Bytes of a task's stdout, and of its stderr, kept on its result; more is "
                    "cut and marked. Both travel in AMQP headers, which must fit one 128 KiB frame.")
    result_size_limit: int = Field(
        default=DEFAULT_RESULT_SIZE_LIMIT, ge=1024, le=128 * 2**20,
        description="Largest serialized result sent back; a larger one fails with a clear error.")
    drain_timeout: float = Field(
        default=30.0, ge=0,
        description="Seconds a stopping agent lets running tasks finish before requeueing them.")
    metrics_port: int | None = Field(
        default=None, ge=1, le=65_535,
        description="Serve Prometheus metrics at http://<metrics_address>:<port>/metrics; None "
                    "(the default) serves none.")
    metrics_address: str = Field(
        default="127.0.0.1",
        description="Where the metrics listener binds: 127.0.0.1 lets only this host scrape it; "
                    "0.0.0.0 any host that reaches this one (the metrics carry no task ids or "
                    "user names, but do show the endpoint's load).")

    @field_validator("broker_url", mode="before")
    @classmethod
    def _nodes_in_one_string(cls, value: object) -> object:
        """A YAML list of a cluster's node URLs, as the one comma-separated string the
        sessions take (gc_core.broker_login.broker_urls)."""
        return ",".join(map(str, value)) if isinstance(value, list) else value

    def broker_url_or(self, default: str) -> str:
        """The broker URLs this agent uses: its own, else ``default``, on ``amqp_port`` if set."""
        urls = self.broker_url or default
        if self.amqp_port is None:
            return urls
        return broker_urls_on_port(urls, self.amqp_port)


def load_config(path: Path) -> EndpointConfig:
    """Read and validate a config file.

    Raises:
        ConfigError: the file is missing, not YAML, or names a bad key or value.
    """
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"no endpoint config at {path}; run `gc-agent configure NAME` first") from exc
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    return parse_config(data, str(path))


def parse_config(data: object, source: str) -> EndpointConfig:
    """Validate a loaded config, in our vocabulary or in Globus Compute's (mapped onto ours
    by ``gc_agent.globus_config``); ``source`` names it in errors.

    Raises:
        ConfigError: a bad key or value, or a Globus Compute key that cannot be honoured.
    """
    from gc_agent import globus_config  # it reads these models' fields: imported late

    try:
        if globus_config.is_globus_compute_config(data):
            data = globus_config.translate(data, agent_keys=EndpointConfig.model_fields)
        return EndpointConfig.model_validate(data)
    except ConfigError as exc:
        raise ConfigError(f"invalid endpoint config {source}: {exc}") from exc
    except ValidationError as exc:
        problems = "; ".join(_describe(error) for error in exc.errors())
        raise ConfigError(f"invalid endpoint config {source}: {problems}") from exc


def _describe(error: Any) -> str:
    """One validation error as ``key.path: message (got value)``."""
    loc: list[Any] = []
    for part in error["loc"]:
        if not (loc and part in _VARIANT_TAGS.get(loc[-1], ())):
            loc.append(part)
    got = error.get("input")
    if error["type"] in _BAD_TYPE_ERRORS and isinstance(got, dict):
        loc, got = [*loc, "type"], got.get("type")
    return f"{'.'.join(str(p) for p in loc) or 'file'}: {error['msg']} (got {got!r})"


def save_config(config: EndpointConfig, path: Path) -> None:
    """Write a config file (readable by its owner only: it may hold a broker password)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = config.model_dump(mode="json", exclude_none=True)
    data["allowed_serializers"] = sorted(data["allowed_serializers"])
    if "allowed_functions" in data:
        data["allowed_functions"] = sorted(data["allowed_functions"])
    _write_private(path, yaml.safe_dump(data, sort_keys=False))


def read_token(path: Path) -> str:
    """The agent token in ``path``, which only its owner may read.

    Raises:
        ConfigError: the file is missing, empty, or readable by group or others.
    """
    try:
        mode = path.stat().st_mode
        token = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the agent token file {path}: {exc}") from exc
    if mode & 0o077:
        raise ConfigError(f"the agent token file {path} is readable by others "
                          f"(mode {mode & 0o777:o}); `chmod 600 {path}`")
    if not token:
        raise ConfigError(f"the agent token file {path} is empty")
    return token


def write_token(token: str, path: Path) -> None:
    """Write an agent token to ``path``, readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_private(path, token + "\n")


def _write_private(path: Path, text: str) -> None:
    # Created 0600 from the first byte: never readable by others, not even for a moment.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(text)
