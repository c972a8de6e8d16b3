"""``gc-agent diagnose NAME``: one archive an admin can attach to a bug report.

It holds what a maintainer asks for first: the versions, the endpoint's effective config,
the ``GC_*`` settings, whether the broker and the registry answer (and why not), the depth
of the endpoint's task queue, the agent's and its engine's last recorded status, and the
tail of the agent's log. Nothing secret goes in: every member passes through one
:class:`~gc_agent.redaction.Redactor`, which knows the endpoint's token, the token in the
environment and the passwords of every broker URL in play, and masks anything shaped like
a secret besides.
"""

from __future__ import annotations

import io
import json
import os
import platform
import tarfile
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import yaml

from gc_agent.config import EndpointConfig, load_config, read_token
from gc_agent.daemon import EndpointFiles
from gc_agent.redaction import Redactor, is_secret_name, url_passwords
from gc_agent.sessions import agent_session
from gc_core.errors import GCError
from gc_core.registry_api.client import RegistryClient
from gc_core.settings import FabricSettings
from gc_core.topology import load_topology
from gc_core.version import VERSION

__all__ = ["Check", "Diagnosis", "collect", "write_archive"]

#: The distributions whose versions a bug report needs (those not installed are said so).
DISTRIBUTIONS = ("gc-fabric", "pika", "aio-pika", "aiormq", "cloudpickle", "pydantic", "click",
                 "tenacity", "httpx", "parsl", "jinja2")
#: Environment variables worth showing beside the ``GC_*`` ones.
_OTHER_VARIABLES = ("SSL_CERT_FILE", "VIRTUAL_ENV")


@dataclass(frozen=True)
class Check:
    """One thing the diagnosis looked at: whether it was fine, and what it saw."""

    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class Diagnosis:
    """Everything collected for one endpoint, already redacted: archive members by name."""

    name: str
    members: dict[str, bytes]
    checks: list[Check]


def collect(settings: FabricSettings, name: str, *, log_lines: int = 200,
             timeout: float = 10.0) -> Diagnosis:
    """Look at endpoint ``name`` and collect its diagnosis (nothing is written).

    Raises:
        ConfigError: NAME is not configured, or its config is invalid.
    """
    files = EndpointFiles.of(settings, name)
    config = load_config(files.config)
    token, token_check = _agent_token(config, settings)
    broker_url = config.broker_url_or(settings.broker_url)
    registry_url = config.registry_url or settings.registry_url
    redactor = Redactor(_known_secrets(settings, config, token))
    broker, depth = _check_broker(config, broker_url, token, timeout)
    checks = [*token_check, broker, depth, _check_registry(config, registry_url, token),
              _check_agent(files)]
    members: dict[str, Any] = {
        "summary.txt": _summary(name, config, checks),
        "versions.json": _versions(),
        "config.yaml": _effective_config(config, broker_url, registry_url),
        "environment.json": {key: value for key, value in sorted(os.environ.items())
                             if key.startswith("GC_") or key in _OTHER_VARIABLES},
        "checks.json": [asdict(check) for check in checks],
        "status.json": files.read_status() or {},
        "agent.log": _log_tail(files.log, log_lines),
    }
    return Diagnosis(name, {member: _redacted(member, value, redactor)
                            for member, value in members.items()}, checks)


def write_archive(diagnosis: Diagnosis, path: Path) -> None:
    """Write ``diagnosis`` as a gzipped tar readable by its owner only, each member under
    one directory named after the archive."""
    folder = path.name.removesuffix(".tar.gz")
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as file, tarfile.open(fileobj=file, mode="w:gz") as archive:
        for member, content in diagnosis.members.items():
            info = tarfile.TarInfo(f"{folder}/{member}")
            info.size, info.mtime, info.mode = len(content), int(time.time()), 0o600
            archive.addfile(info, io.BytesIO(content))


def _agent_token(config: EndpointConfig,
                 settings: FabricSettings) -> tuple[str | None, list[Check]]:
    """The token the agent logs in with (its endpoint's own, else the environment's), and,
    when it has a token file, whether that can be used."""
    if config.token_file is None:
        return settings.token, []
    try:
        token = read_token(config.token_file)
    except GCError as exc:  # the broker and registry checks go on without it, as the agent would fail
        return None, [Check("agent token", False, str(exc))]
    return token, [Check("agent token", True, f"read from {config.token_file}")]


def _known_secrets(settings: FabricSettings, config: EndpointConfig,
                   token: str | None) -> Iterator[str]:
    """Every secret this machine's settings hold, by value."""
    yield from filter(None, (token, settings.token))
    for urls in (settings.broker_url, config.broker_url or "", settings.registry_url,
                 config.registry_url or ""):
        yield from url_passwords(urls)
    for key, value in os.environ.items():
        if is_secret_name(key) and value:
            yield value
        if "://" in value:
            yield from url_passwords(value)


def _check_broker(config: EndpointConfig, broker_url: str, token: str | None,
                  timeout: float) -> tuple[Check, Check]:
    """Whether the broker takes the agent's login, and how many tasks wait in its queue."""
    queue = load_topology().queue("endpoint_tasks", endpoint_id=config.endpoint_id).name
    session = agent_session(config, broker_url, token, purpose="diagnose")
    try:
        session.start(timeout=timeout)
    except GCError as exc:
        return (Check("broker", False, str(exc)),
                Check("queue depth", False, f"unknown: the broker could not be asked ({queue})"))
    try:
        counts = session.counts(queue, timeout)
    finally:
        session.close(timeout=2)
    reached = Check("broker", True, f"connected to {session.url}")
    if counts is None:
        return reached, Check("queue depth", False, f"no answer for queue {queue} within "
                                                    f"{timeout:g}s: does it exist?")
    return reached, Check("queue depth", True, f"{counts.messages} tasks waiting in {queue}")


def _check_registry(config: EndpointConfig, registry_url: str, token: str | None) -> Check:
    """Whether the registry answers for this endpoint, and what it knows of it."""
    registry = RegistryClient(registry_url, token=token)
    try:
        status = registry.get_endpoint_status(config.endpoint_id)
    except GCError as exc:
        return Check("registry", False, str(exc))
    finally:
        registry.close()
    seen = "never" if status.last_seen is None else f"{time.time() - status.last_seen:.0f}s ago"
    return Check("registry", True, f"{registry_url} knows endpoint {config.endpoint_id}: "
                                   f"{status.status}, last heartbeat {seen}")


def _check_agent(files: EndpointFiles) -> Check:
    """Whether the agent runs, and its engine's state as of its last heartbeat."""
    pid = files.running_pid()
    if pid is None:
        return Check("agent", False, "not running (its pid file names no live process)")
    record = files.read_status()
    if record is None:
        return Check("agent", True, f"running, pid {pid}; no heartbeat recorded yet")
    engine = (f"engine {record['engine']}: {record['workers']} workers, "
              f"{record['workers_busy']} busy {record.get('engine_status') or ''}").rstrip()
    problem = record.get("broker_problem")
    return Check("agent", problem is None,
                 f"running, pid {pid}, last heartbeat {time.time() - record['sent']:.0f}s ago; "
                 f"{engine}" + (f"; broker: {problem}" if problem else ""))


def _summary(name: str, config: EndpointConfig, checks: list[Check]) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    lines = [f"gc-agent diagnose {name} ({config.endpoint_id}), gc-fabric {VERSION}, {when}", ""]
    lines += [f"{'ok  ' if check.ok else 'FAIL'}  {check.name}: {check.detail}"
              for check in checks]
    return "\n".join(lines) + "\n"


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "platform": platform.platform()}
    for distribution in DISTRIBUTIONS:
        try:
            found[distribution] = version(distribution)
        except PackageNotFoundError:
            found[distribution] = "not installed"
    return found


def _effective_config(config: EndpointConfig, broker_url: str,
                      registry_url: str) -> dict[str, Any]:
    """The config with every default filled in, as ``gc-agent render-config`` shows it."""
    effective = config.model_dump(mode="json")
    effective["allowed_serializers"] = sorted(effective["allowed_serializers"])
    effective["broker_url"], effective["registry_url"] = broker_url, registry_url
    return effective


def _log_tail(log: Path, lines: int) -> str:
    try:
        with open(log, errors="replace") as file:
            return "".join(deque(file, maxlen=lines))
    except OSError as exc:
        return f"(no log at {log}: {exc.strerror}; the agent logs there when started with --detach)\n"


def _redacted(member: str, value: Any, redactor: Redactor) -> bytes:
    """A member's bytes: text masked, data masked and written as its name says."""
    if isinstance(value, str):
        return redactor.text(value).encode()
    masked = redactor.data(value)
    if member.endswith(".yaml"):
        return str(yaml.safe_dump(masked, sort_keys=False)).encode()
    return (json.dumps(masked, indent=2) + "\n").encode()
