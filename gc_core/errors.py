"""Every error gc-fabric raises, under one base.

    GCError
    ├── ProtocolError              a message that cannot be decoded (raw bytes attached)
    ├── SerializationError
    │   ├── UnknownSerializer      content type nobody here knows
    │   ├── SerializerNotAllowed   known, but not on this side's allow-list
    │   └── VersionMismatch        sender and receiver Python / serializer versions differ
    ├── BrokerError
    │   ├── BrokerUnreachable      no connection could be made (URL attached, no password)
    │   ├── ConnectionLost
    │   └── PublishNotConfirmed    the broker nacked or the connection dropped first
    ├── TaskError                  (task_id attached)
    │   ├── TaskExecutionFailed    the function raised remotely: type, message, traceback text
    │   ├── TaskDeadLettered       delivery limit reached or message rejected
    │   ├── TaskCancelled
    │   ├── TaskPending            asked for a result that does not exist yet
    │   └── WorkerLost
    ├── PolicyError                the endpoint refuses the task
    ├── RegistryError              the registry answered with an error or not at all
    │   ├── NotFound
    │   ├── NotAuthenticated       no token, or one that is unknown, expired or revoked (401)
    │   └── Forbidden              authenticated, but a policy does not allow it (403)
    └── ConfigError
"""

from __future__ import annotations

import ssl

__all__ = [
    "BrokerError",
    "BrokerUnreachable",
    "ConfigError",
    "ConnectionLost",
    "Forbidden",
    "GCError",
    "NotAuthenticated",
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
    "find_certificate_failure",
]


class GCError(Exception):
    """Base of every gc-fabric error."""


class ProtocolError(GCError):
    """A message could not be decoded; ``raw`` holds the bytes that failed."""

    def __init__(self, message: str, *, raw: bytes = b"") -> None:
        super().__init__(message)
        self.raw = raw


class SerializationError(GCError):
    """A value could not be serialized or deserialized."""


class UnknownSerializer(SerializationError):
    """No serializer is registered for this content type."""

    def __init__(self, content_type: str, known: list[str]) -> None:
        super().__init__(
            f"unknown serializer {content_type!r}; known content types: {', '.join(known)}"
        )
        self.content_type = content_type


class SerializerNotAllowed(SerializationError):
    """The serializer exists but this side does not accept it."""

    def __init__(self, content_type: str, allowed: list[str]) -> None:
        super().__init__(
            f"serializer {content_type!r} is not allowed here; allowed: {', '.join(allowed)}"
        )
        self.content_type = content_type


class VersionMismatch(SerializationError):
    """Sender and receiver run versions that cannot exchange this payload."""

    def __init__(self, what: str, *, local: str, remote: str, detail: str = "") -> None:
        message = f"{what} version mismatch: sender has {remote}, this side has {local}"
        super().__init__(f"{message}: {detail}" if detail else message)
        self.what = what
        self.local = local
        self.remote = remote


class BrokerError(GCError):
    """Talking to RabbitMQ failed."""


class BrokerUnreachable(BrokerError):
    """No connection to the broker could be opened."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot reach the broker at {url}: {reason}")
        self.url = url


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

    def __str__(self) -> str:
        text = f"task {self.task_id} failed remotely: {self.remote_type}: {self.remote_message}"
        if self.remote_traceback:
            text += "\n\nRemote traceback:\n" + self.remote_traceback.rstrip()
        return text


class TaskDeadLettered(TaskError):
    """The broker gave up on delivering the task."""


class TaskCancelled(TaskError):
    """The task was cancelled before it produced a value."""


class TaskPending(TaskError):
    """The task has no result yet."""

    def __init__(self, task_id: str, status: str) -> None:
        super().__init__(f"task {task_id} is not finished (status: {status})", task_id=task_id)
        self.status = status


class WorkerLost(TaskError):
    """The worker running the task died."""


class PolicyError(GCError):
    """The endpoint's policy refuses this task."""


class RegistryError(GCError):
    """The registry refused a request or could not be reached."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


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
