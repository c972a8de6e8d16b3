"""Every error gc-fabric raises, under one base.

    GCError
    ├── ProtocolError              a message that cannot be decoded (raw bytes attached)
    ├── SerializationError
    │   ├── UnknownSerializer      content type nobody here knows
    │   ├── SerializerNotAllowed   known, but not on this side's allow-list
    │   ├── VersionMismatch        sender and receiver Python / serializer versions differ
    │   └── ResultNotSerializable  the function's return value cannot be serialized
    ├── BrokerError
    │   ├── BrokerUnreachable      no connection could be made (URL attached, no password)
    │   ├── BrokerRefused          refused for good: credentials, vhost, certificate, declaration
    │   ├── ConnectionLost
    │   └── PublishNotConfirmed    the broker nacked or the connection dropped first
    ├── TaskError                  (task_id attached)
    │   ├── TaskExecutionFailed    the function raised remotely: type, message, traceback text
    │   ├── TaskDeadLettered       delivery limit reached or message rejected
    │   ├── TaskCancelled
    │   ├── TaskPending            the task exists but has no result yet
    │   ├── TaskNotFound           the ledger has never heard of this task id
    │   ├── ResultTooLarge         the value is over the endpoint's result_size_limit
    │   ├── WorkerLost             the worker running the task died
    │   ├── WorkerError            a worker answered with a malformed outcome, or no reason
    │   └── EndpointError          the endpoint's agent or engine failed the task itself
    ├── PolicyError                the endpoint refuses the task
    ├── RegistryError              the registry answered with an error or not at all
    │   ├── RegistryUnreachable    not at all, or that it is unavailable (502, 503, 504)
    │   ├── NotFound
    │   ├── NotAuthenticated       no token, or one that is unknown, expired or revoked (401)
    │   └── Forbidden              authenticated, but a policy does not allow it (403)
    └── ConfigError

A failure an endpoint reports travels as text (an ``ErrorInfo``: type name, message,
traceback). :func:`remote_error` raises it again as its own class when the type is one of
:data:`REMOTE_ERRORS`, the fabric's errors that cross the wire; whatever the function itself
raised is a :class:`TaskExecutionFailed`. Either way the error carries ``task_id``,
``remote_type``, ``remote_message`` and ``remote_traceback``.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # protocol.py imports this module: only the type checker needs ErrorInfo
    from typing_extensions import Self

    from gc_core.protocol import ErrorInfo

__all__ = [
    "REMOTE_ERRORS",
    "BrokerError",
    "BrokerRefused",
    "BrokerUnreachable",
    "ConfigError",
    "ConnectionLost",
    "EndpointError",
    "Forbidden",
    "GCError",
    "NotAuthenticated",
    "NotFound",
    "PolicyError",
    "ProtocolError",
    "PublishNotConfirmed",
    "RegistryError",
    "RegistryUnreachable",
    "ResultNotSerializable",
    "ResultTooLarge",
    "SerializationError",
    "SerializerNotAllowed",
    "TaskCancelled",
    "TaskDeadLettered",
    "TaskError",
    "TaskExecutionFailed",
    "TaskNotFound",
    "TaskPending",
    "UnknownSerializer",
    "VersionMismatch",
    "WorkerError",
    "WorkerLost",
    "find_certificate_failure",
    "remote_error",
]


class GCError(Exception):
    """Base of every gc-fabric error.

    An error rebuilt from a task's result (:func:`remote_error`) also names the task and
    what its endpoint said; for an error raised here those are empty.
    """

    #: The task whose result reported this error.
    task_id: str = ""
    #: The error's type name, message and traceback as the endpoint sent them.
    remote_type: str = ""
    remote_message: str = ""
    remote_traceback: str = ""

    @classmethod
    def from_remote(cls, task_id: str, error: ErrorInfo) -> Self:
        """This error as an endpoint reported it for ``task_id``, with its message as sent.

        The constructor is not run: a subclass's builds the message from parts (a content
        type, both versions) that stayed on the endpoint, so those attributes keep their
        class defaults. ``BaseException.__new__`` stores the message as ``args``.
        """
        rebuilt = cls.__new__(cls, error.message)
        rebuilt.task_id = task_id
        rebuilt.remote_type = error.type
        rebuilt.remote_message = error.message
        rebuilt.remote_traceback = error.traceback
        return rebuilt

    def __str__(self) -> str:
        if not self.remote_type:
            return super().__str__()
        text = f"task {self.task_id} failed remotely: {self.remote_type}: {self.remote_message}"
        if self.remote_traceback:
            text += "\n\nRemote traceback:\n" + self.remote_traceback.rstrip()
        return text


class ProtocolError(GCError):
    """A message could not be decoded; ``raw`` holds the bytes that failed."""

    raw: bytes = b""

    def __init__(self, message: str, *, raw: bytes = b"") -> None:
        super().__init__(message)
        self.raw = raw


class SerializationError(GCError):
    """A value could not be serialized or deserialized."""


class UnknownSerializer(SerializationError):
    """No serializer is registered for this content type."""

    content_type: str = ""

    def __init__(self, content_type: str, known: list[str]) -> None:
        super().__init__(
            f"unknown serializer {content_type!r}; known content types: {', '.join(known)}"
        )
        self.content_type = content_type


class SerializerNotAllowed(SerializationError):
    """The serializer exists but this side does not accept it."""

    content_type: str = ""

    def __init__(self, content_type: str, allowed: list[str]) -> None:
        super().__init__(
            f"serializer {content_type!r} is not allowed here; allowed: {', '.join(allowed)}"
        )
        self.content_type = content_type


class VersionMismatch(SerializationError):
    """Sender and receiver run versions that cannot exchange this payload."""

    what: str = ""
    local: str = ""
    remote: str = ""

    def __init__(self, what: str, *, local: str, remote: str, detail: str = "") -> None:
        message = f"{what} version mismatch: sender has {remote}, this side has {local}"
        super().__init__(f"{message}: {detail}" if detail else message)
        self.what = what
        self.local = local
        self.remote = remote


class ResultNotSerializable(SerializationError):
    """The function returned a value its task's serializer cannot write, so it cannot be
    sent back; ``value_type`` names its type and ``serializer`` the serializer."""

    value_type: str = ""
    serializer: str = ""

    def __init__(self, *, task_id: str, value_type: str, serializer: str, reason: str) -> None:
        super().__init__(
            f"the result of task {task_id}, a {value_type}, cannot be serialized with "
            f"{serializer} ({reason}); return plain data (numbers, strings, lists, "
            "dicts), or write the value to storage both sides can reach and return its path")
        self.task_id = task_id
        self.value_type = value_type
        self.serializer = serializer


class BrokerError(GCError):
    """Talking to RabbitMQ failed."""


class BrokerUnreachable(BrokerError):
    """No connection to the broker could be opened."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot reach the broker at {url}: {reason}")
        self.url = url
        self.reason = reason


class BrokerRefused(BrokerError):
    """The broker refused the session in a way no reconnect can fix: its credentials or
    virtual host, its certificate, a URL that cannot be used, or a declaration."""


class ConnectionLost(BrokerError):
    """An open connection to the broker was lost."""


class PublishNotConfirmed(BrokerError):
    """The broker did not confirm a publish."""


class TaskError(GCError):
    """A task did not produce a value."""

    def __init__(self, message: str, *, task_id: str = "") -> None:
        super().__init__(message)
        self.task_id = task_id


class TaskExecutionFailed(TaskError):
    """The function raised on the endpoint; carries the remote exception as text."""

    def __init__(
        self, *, task_id: str, remote_type: str, remote_message: str, remote_traceback: str
    ) -> None:
        super().__init__(f"{remote_type}: {remote_message}", task_id=task_id)
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback


class TaskDeadLettered(TaskError):
    """The broker gave up on delivering the task."""


class TaskCancelled(TaskError):
    """The task was cancelled before it produced a value."""


class TaskPending(TaskError):
    """The task exists but has no result yet."""

    def __init__(self, task_id: str, status: str) -> None:
        super().__init__(f"task {task_id} is not finished (status: {status})", task_id=task_id)
        self.status = status


class TaskNotFound(TaskError):
    """The ledger has never heard of this task id (or the task is not the caller's to see)."""

    def __init__(self, task_id: str) -> None:
        super().__init__(f"there is no task {task_id}: the ledger has never heard of this id, "
                         "or the task is not yours to see", task_id=task_id)


class ResultTooLarge(TaskError):
    """The value is larger than the endpoint sends inline (its ``result_size_limit``)."""


class WorkerLost(TaskError):
    """The worker running the task died: it crashed, was killed or ran out of memory."""


class WorkerError(TaskError):
    """A worker answered with a malformed outcome, or failed the task without saying why."""


class EndpointError(TaskError):
    """The endpoint failed the task itself: its agent or engine broke, no worker could be
    started, or the broker refused the result (``remote_type`` says which)."""


class PolicyError(GCError):
    """The endpoint's policy refuses this task."""


class RegistryError(GCError):
    """The registry refused a request or could not be reached."""

    status: int | None = None

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class RegistryUnreachable(RegistryError):
    """The registry did not answer, or answered that it cannot serve now: asking again
    later may succeed (a registry restarting, a proxy before it without a backend)."""


class NotFound(RegistryError):
    """The registry has no such object."""

    def __init__(self, message: str, *, status: int | None = 404) -> None:
        super().__init__(message, status=status)


class NotAuthenticated(RegistryError):
    """No token, or a token the registry does not accept; the message says which and why."""

    def __init__(self, message: str, *, status: int | None = 401) -> None:
        super().__init__(message, status=status)


class Forbidden(RegistryError):
    """The caller is known, but a policy does not allow what they asked."""

    def __init__(self, message: str, *, status: int | None = 403) -> None:
        super().__init__(message, status=status)


class ConfigError(GCError):
    """A configuration file or setting is invalid."""


#: The errors of ours that cross the wire, by the type name a result's ``ErrorInfo`` gives
#: them: the agent's own failures, its policy's and its registry calls', the worker's, and
#: the ledger's dead letters. A few older names map to the class that covers them.
REMOTE_ERRORS: dict[str, type[GCError]] = {
    **{cls.__name__: cls for cls in (
        ProtocolError, SerializationError, UnknownSerializer, SerializerNotAllowed,
        VersionMismatch, ResultNotSerializable, TaskError, TaskDeadLettered, TaskCancelled,
        ResultTooLarge, WorkerLost, WorkerError, EndpointError, PolicyError, RegistryError,
        NotFound, NotAuthenticated, Forbidden, ConfigError)},
    "AgentError": EndpointError,
    "EngineError": EndpointError,
    "EngineStartFailed": EndpointError,
    "WorkerStartFailed": EndpointError,
    "ResultRefused": EndpointError,
}


def remote_error(task_id: str, error: ErrorInfo) -> GCError:
    """The local exception for a failure ``task_id``'s result reports.

    One of :data:`REMOTE_ERRORS` comes back as its class; anything else, and anything the
    function raised, as :class:`TaskExecutionFailed`. The fabric reports its own failures
    without a traceback; one with a traceback was raised by the task's own code, so a
    ``ProtocolError`` of urllib3's is never mistaken for ours.
    """
    found = REMOTE_ERRORS.get(error.type) if not error.traceback else None
    return (found or TaskExecutionFailed).from_remote(task_id, error)


def find_certificate_failure(error: BaseException) -> ssl.SSLCertVerificationError | None:
    """The failed certificate check behind ``error``, if any: aiormq and httpx chain it as
    the cause; pika wraps it in a workflow error's ``exceptions`` and a connector error's
    ``exception``."""
    pending: list[object] = [error]
    for _ in range(20):  # the chains are short; a cycle must not loop
        if not pending:
            return None
        found = pending.pop()
        if isinstance(found, ssl.SSLCertVerificationError):
            return found
        if isinstance(found, BaseException):
            pending += [found.__cause__, found.__context__, getattr(found, "exception", None),
                        *getattr(found, "exceptions", ())]
    return None
