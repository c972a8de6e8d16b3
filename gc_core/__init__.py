"""What every side of gc-fabric shares: the wire contract, serializers, topology, broker, errors."""

from gc_core.errors import (
    BrokerError,
    BrokerUnreachable,
    ConfigError,
    ConnectionLost,
    GCError,
    NotFound,
    PolicyError,
    ProtocolError,
    PublishNotConfirmed,
    RegistryError,
    SerializationError,
    SerializerNotAllowed,
    TaskCancelled,
    TaskDeadLettered,
    TaskError,
    TaskExecutionFailed,
    TaskPending,
    UnknownSerializer,
    VersionMismatch,
    WorkerLost,
)
from gc_core.protocol import ErrorInfo, ResultMessage, TaskMessage, Timings
from gc_core.settings import FabricSettings, resolve_settings

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
    # wire models
    "ErrorInfo",
    "ResultMessage",
    "TaskMessage",
    "Timings",
    # settings
    "FabricSettings",
    "resolve_settings",
]
