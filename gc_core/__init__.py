"""What every side of gc-fabric shares: the wire contract, serializers, topology, broker, errors."""

from gc_core.errors import (
    BrokerError,
    BrokerUnreachable,
    ConfigError,
    ConnectionLost,
    EndpointError,
    GCError,
    NotFound,
    PolicyError,
    ProtocolError,
    PublishNotConfirmed,
    RegistryError,
    ResultNotSerializable,
    ResultTooLarge,
    SerializationError,
    SerializerNotAllowed,
    TaskCancelled,
    TaskDeadLettered,
    TaskError,
    TaskExecutionFailed,
    TaskNotFound,
    TaskPending,
    UnknownSerializer,
    VersionMismatch,
    WorkerError,
    WorkerLost,
)
from gc_core.protocol import ErrorInfo, ResultMessage, TaskMessage, Timings
from gc_core.settings import FabricSettings, resolve_settings
from gc_core.version import VERSION as _VERSION

#: The installed gc-fabric's version (its package metadata).
__version__ = _VERSION

__all__ = [
    # errors
    "BrokerError",
    "BrokerUnreachable",
    "ConfigError",
    "ConnectionLost",
    "GCError",
    "NotFound",
    "PolicyError",
    "ProtocolError",
    "PublishNotConfirmed",
    "RegistryError",
    "SerializationError",
    "SerializerNotAllowed",
    "TaskCancelled",
    "TaskDeadLettered",
    "TaskError",
    "TaskExecutionFailed",
    "TaskPending",
    "UnknownSerializer",
    "VersionMismatch",
    "WorkerLost",
    "TaskNotFound",
    "ResultTooLarge",
    "WorkerError",
    "EndpointError",
    "ResultNotSerializable",
    # wire models
    "ErrorInfo",
    "ResultMessage",
    "TaskMessage",
    "Timings",
    # settings
    "FabricSettings",
    "resolve_settings",
]
