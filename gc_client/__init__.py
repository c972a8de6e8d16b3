"""gc-fabric's client: run Python functions on remote endpoints and get futures back."""

from gc_client.async_executor import AsyncExecutor
from gc_client.client import Batch, Client
from gc_client.executor import ComputeFuture, Executor
from gc_client.functions import MPIFunction, ShellFunction, ShellResult
from gc_client.progress import as_completed
from gc_core.errors import (
    EndpointError,
    GCError,
    PolicyError,
    PublishNotConfirmed,
    ResultNotSerializable,
    ResultTooLarge,
    SerializationError,
    TaskCancelled,
    TaskDeadLettered,
    TaskError,
    TaskExecutionFailed,
    TaskNotFound,
    TaskPending,
    WorkerLost,
)
from gc_core.version import VERSION as _VERSION

#: The installed gc-fabric's version (its package metadata).
__version__ = _VERSION

__all__ = [
    # front ends
    "AsyncExecutor",
    "Client",
    "Executor",
    # functions that run commands
    "MPIFunction",
    "ShellFunction",
    "ShellResult",
    # results
    "Batch",
    "ComputeFuture",
    "as_completed",
    # errors a caller catches
    "EndpointError",
    "GCError",
    "PolicyError",
    "PublishNotConfirmed",
    "ResultNotSerializable",
    "ResultTooLarge",
    "SerializationError",
    "TaskCancelled",
    "TaskDeadLettered",
    "TaskError",
    "TaskExecutionFailed",
    "TaskNotFound",
    "TaskPending",
    "WorkerLost",
]
