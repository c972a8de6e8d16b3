"""Broker names and arguments, from ``broker_config/topology.yaml``.

Every exchange, queue and routing key comes from here, the way dramatiq derives
its queue names from one base. The YAML is the single source; this module only
loads it and fills in the placeholders.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gc_core.errors import ConfigError

__all__ = [
    "Binding",
    "QueueDeclaration",
    "Topology",
    "load_topology",
    "safe_name_part",
]

#: A word of a queue name or routing key: what an id may be (gc_core.protocol.MAX_ID_LENGTH).
_NAME_PART = re.compile(r"[A-Za-z0-9_\-]{1,64}")


class _ExchangeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    type: Literal["topic", "direct", "fanout", "headers"]


class _BindingSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    exchange: str
    routing_key: str = ""
    arguments: dict[str, Any] = {}


class _QueueSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    durable: bool = True
    auto_delete: bool = False
    arguments: dict[str, Any] = {}
    bindings: list[_BindingSpec] = []


class _TopologyFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    exchanges: dict[str, _ExchangeSpec]
    queues: dict[str, _QueueSpec]
    routing_keys: dict[str, str]
    quorum_initial_group_size: int | None = Field(default=None, ge=1)


@dataclass(frozen=True)
class Binding:
    """A queue's binding to an exchange, placeholders filled in."""

    exchange: str
    routing_key: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class QueueDeclaration:
    """A queue to declare, with its arguments and bindings, placeholders filled in."""

    name: str
    arguments: dict[str, Any]
    bindings: tuple[Binding, ...]
    #: Whether it outlives a broker restart, and whether it goes with its last consumer.
    durable: bool = True
    auto_delete: bool = False


def safe_name_part(value: str, what: str) -> str:
    """Check that ``value`` can stand inside a queue name or a topic routing key word."""
    if not _NAME_PART.fullmatch(value):
        raise ConfigError(
            f"{what} {value!r} must be 1 to 64 letters, digits, '_' and '-' "
            "(it becomes part of broker queue names and routing keys)"
        )
    return value


class Topology:
    """The loaded topology: exchange names, queue declarations and routing keys."""

    def __init__(self, spec: _TopologyFile) -> None:
        self._spec = spec

    @property
    def exchanges(self) -> dict[str, tuple[str, str]]:
        """Role -> (exchange name, exchange type)."""
        return {role: (e.name, e.type) for role, e in self._spec.exchanges.items()}

    def exchange(self, role: str) -> str:
        """The exchange name for a role: tasks, results, events, commands, dead."""
        return self._spec.exchanges[role].name

    def routing_key(self, kind: str, **values: str) -> str:
        """A routing key of ``kind`` (task, result, heartbeat, ...) with values filled in."""
        return self._spec.routing_keys[kind].format(**values)

    def routing_key_pattern(self, kind: str, **fixed: str) -> re.Pattern[str]:
        """A regex matching routing keys of ``kind``: ``fixed`` values exactly, every other
        placeholder as one name part (so no wildcard or dot). The broker auth backend uses it."""
        return _pattern(self._spec.routing_keys[kind], fixed)

    def queue_name_pattern(self, kind: str, **fixed: str) -> re.Pattern[str]:
        """A regex matching names of queues of ``kind``, as :meth:`routing_key_pattern`."""
        return _pattern(self._spec.queues[kind].name, fixed)

    def queue(self, kind: str, **values: str) -> QueueDeclaration:
        """The declaration of a queue of ``kind`` (endpoint_tasks, results, ledger, ...)."""
        spec = self._spec.queues[kind]
        return QueueDeclaration(
            name=spec.name.format(**values),
            arguments=self._replicated(_fill(spec.arguments, values)),
            bindings=tuple(
                Binding(self.exchange(b.exchange), b.routing_key.format(**values),
                        _fill(b.arguments, values))
                for b in spec.bindings
            ),
            durable=spec.durable,
            auto_delete=spec.auto_delete,
        )


    def _replicated(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """``arguments`` with the replica count the topology sets for every quorum queue."""
        size = self._spec.quorum_initial_group_size
        if size is None or arguments.get("x-queue-type") != "quorum":
            return arguments
        return {**arguments, "x-quorum-initial-group-size": size}


def _pattern(template: str, fixed: dict[str, str]) -> re.Pattern[str]:
    """``template`` as an anchored regex (``\\Z``: a trailing newline does not match)."""
    any_part = _NAME_PART.pattern
    pieces = re.split(r"\{(\w+)\}", template)  # literal, placeholder, literal, ..., literal
    regex = "".join(
        re.escape(piece) if i % 2 == 0 else re.escape(fixed[piece]) if piece in fixed else any_part
        for i, piece in enumerate(pieces))
    return re.compile(rf"\A{regex}\Z")


def _fill(arguments: dict[str, Any], values: dict[str, str]) -> dict[str, Any]:
    return {k: v.format(**values) if isinstance(v, str) else v for k, v in arguments.items()}


@lru_cache(maxsize=4)
def load_topology(path: Path | None = None) -> Topology:
    """Load and validate the topology file (the packaged copy unless ``path`` is given).

    Raises:
        ConfigError: the file is missing or does not match the expected shape.
    """
    try:
        text = (path.read_text() if path is not None
                else resources.files("gc_core").joinpath("topology.yaml").read_text())
        return Topology(_TopologyFile.model_validate(yaml.safe_load(text)))
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        raise ConfigError(f"cannot load broker topology {path or 'topology.yaml'}: {exc}") from exc
