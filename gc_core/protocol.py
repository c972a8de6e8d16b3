"""The wire contract: task and result messages, and their AMQP form.

A message is an :class:`Envelope` (the AMQP properties we use plus the body).
Bytes become a model only in :func:`decode_task` / :func:`decode_result`, and a
model becomes bytes only in :func:`encode_task` / :func:`encode_result`; the
header names below are the ones ``docs/asyncapi.yaml`` documents.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gc_core.errors import ProtocolError
from gc_core.serialize import JSON

__all__ = [
    "PROTOCOL_VERSION",
    "CancelCommand",
    "Envelope",
    "ErrorInfo",
    "GroupManifest",
    "Heartbeat",
    "ResultMessage",
    "TaskMessage",
    "TaskState",
    "Timings",
    "decode_event",
    "decode_result",
    "decode_task",
    "encode_event",
    "encode_result",
    "encode_task",
    "error_result",
]

#: Version of this contract; a receiver refuses messages from a newer major version.
PROTOCOL_VERSION = 1

TaskState = Literal["success", "failed", "cancelled"]

H_PROTOCOL = "gc-protocol"
H_FUNCTION = "gc-function-id"
H_ENDPOINT = "gc-endpoint-id"
H_USER = "gc-user"
H_GROUP = "gc-task-group"
H_RESOURCE_SPEC = "gc-resource-spec"
H_PYTHON = "gc-python"
H_SERIALIZER = "gc-serializer"
H_STATE = "gc-state"
H_WORKER = "gc-worker"
H_RECEIVED = "gc-received"
H_STARTED = "gc-started"
H_FINISHED = "gc-finished"
H_EVENT = "gc-event"
H_IDENTITY = "gc-identity"
H_ON_BEHALF_OF = "gc-on-behalf-of"
H_USER_ENDPOINT_CONFIG = "gc-user-endpoint-config"
H_STDOUT = "gc-stdout"
H_STDERR = "gc-stderr"


@dataclass(frozen=True, slots=True)
class Envelope:
    """An AMQP message as gc-fabric sees it: the properties it uses and the body."""

    message_id: str
    correlation_id: str
    content_type: str
    headers: dict[str, Any]
    body: bytes = field(repr=False)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Timings(_Frozen):
    """Epoch seconds at which the agent received, started and finished the task."""

    received: float | None = None
    started: float | None = None
    finished: float | None = None


class ErrorInfo(_Frozen):
    """A remote failure as text: we never pickle exception objects across the wire."""

    type: str
    message: str
    traceback: str = ""


class TaskMessage(_Frozen):
    """One function call addressed to one endpoint."""

    task_id: str = Field(min_length=1)
    task_group_id: str = Field(min_length=1)
    endpoint_id: str = Field(min_length=1)
    function_id: str = Field(min_length=1)
    user: str = Field(min_length=1)
    content_type: str
    payload: bytes = Field(repr=False)
    resource_spec: dict[str, Any] = Field(default_factory=dict)
    identity: str = ""
    #: The end user a service account (a science gateway) submits this task for.
    on_behalf_of: str = ""
    user_endpoint_config: dict[str, Any] = Field(default_factory=dict)
    sender_python: str = ""
    sender_serializer: str = ""
    protocol: int = PROTOCOL_VERSION


class ResultMessage(_Frozen):
    """The outcome of one task: a serialized value, or an error."""

    task_id: str
    task_group_id: str
    endpoint_id: str = ""
    function_id: str = ""
    user: str
    on_behalf_of: str = ""
    state: TaskState
    content_type: str
    payload: bytes = Field(default=b"", repr=False)
    error: ErrorInfo | None = None
    timings: Timings = Timings()
    worker: str = ""
    stdout: str = ""
    stderr: str = ""
    sender_python: str = ""
    sender_serializer: str = ""
    protocol: int = PROTOCOL_VERSION


def encode_task(task: TaskMessage) -> Envelope:
    """Turn a task into its AMQP form."""
    headers: dict[str, Any] = {
        H_PROTOCOL: task.protocol,
        H_FUNCTION: task.function_id,
        H_ENDPOINT: task.endpoint_id,
        H_USER: task.user,
        H_GROUP: task.task_group_id,
        H_PYTHON: task.sender_python,
        H_SERIALIZER: task.sender_serializer,
    }
    if task.resource_spec:
        headers[H_RESOURCE_SPEC] = json.dumps(task.resource_spec)
    if task.identity:
        headers[H_IDENTITY] = task.identity
    if task.on_behalf_of:
        headers[H_ON_BEHALF_OF] = task.on_behalf_of
    if task.user_endpoint_config:
        headers[H_USER_ENDPOINT_CONFIG] = json.dumps(task.user_endpoint_config)
    return Envelope(task.task_id, task.task_group_id, task.content_type, headers, task.payload)


def decode_task(envelope: Envelope) -> TaskMessage:
    """Turn an AMQP message into a task.

    Raises:
        ProtocolError: a header is missing or malformed, or the protocol is newer than ours.
    """
    headers = envelope.headers or {}
    _check_protocol(headers, envelope.body)
    try:
        spec_text = headers.get(H_RESOURCE_SPEC)
        resource_spec = json.loads(_text(spec_text)) if spec_text else {}
        options_text = headers.get(H_USER_ENDPOINT_CONFIG)
        user_options = json.loads(_text(options_text)) if options_text else {}
        return TaskMessage(
            task_id=envelope.message_id or "",
            task_group_id=envelope.correlation_id or _text(headers.get(H_GROUP, "")),
            endpoint_id=_text(headers.get(H_ENDPOINT, "")),
            function_id=_text(headers.get(H_FUNCTION, "")),
            user=_text(headers.get(H_USER, "")),
            content_type=envelope.content_type or "",
            payload=envelope.body,
            resource_spec=resource_spec,
            identity=_text(headers.get(H_IDENTITY, "")),
            on_behalf_of=_text(headers.get(H_ON_BEHALF_OF, "")),
            user_endpoint_config=user_options,
            sender_python=_text(headers.get(H_PYTHON, "")),
            sender_serializer=_text(headers.get(H_SERIALIZER, "")),
        )
    except (ValidationError, ValueError, TypeError) as exc:
        raise ProtocolError(f"malformed task message: {_first_error(exc)}", raw=envelope.body) from exc


def encode_result(result: ResultMessage) -> Envelope:
    """Turn a result into its AMQP form; an error travels as a JSON body."""
    timings = result.timings
    headers: dict[str, Any] = {
        H_PROTOCOL: result.protocol,
        H_STATE: result.state,
        H_FUNCTION: result.function_id,
        H_ENDPOINT: result.endpoint_id,
        H_USER: result.user,
        H_GROUP: result.task_group_id,
        H_WORKER: result.worker,
        H_PYTHON: result.sender_python,
        H_SERIALIZER: result.sender_serializer,
    }
    for name, value in ((H_RECEIVED, timings.received), (H_STARTED, timings.started),
                        (H_FINISHED, timings.finished)):
        if value is not None:
            headers[name] = round(value * 1_000_000)  # AMQP tables have no portable float
    for name, text in ((H_STDOUT, result.stdout), (H_STDERR, result.stderr),
                       (H_ON_BEHALF_OF, result.on_behalf_of)):
        if text:
            headers[name] = text
    if result.error is not None:
        return Envelope(result.task_id, result.task_group_id, JSON.content_type, headers,
                        JSON.dumps(result.error.model_dump()))
    return Envelope(result.task_id, result.task_group_id, result.content_type, headers,
                    result.payload)


def decode_result(envelope: Envelope) -> ResultMessage:
    """Turn an AMQP message from a result queue (or ``gc.ledger``) into a result.

    A task message the broker dead-lettered reaches ``gc.ledger`` too; it becomes a failed
    result that says why, which the ledger records and republishes to the submitter.

    Raises:
        ProtocolError: the message is neither a well-formed result nor a dead-lettered task.
    """
    headers = envelope.headers or {}
    if H_STATE not in headers and "x-death" in headers:
        return _dead_letter_result(envelope)
    _check_protocol(headers, envelope.body)
    try:
        state = _text(headers.get(H_STATE, ""))
        error = None
        if state != "success":
            error = ErrorInfo.model_validate_json(envelope.body)
        return ResultMessage(
            task_id=envelope.message_id or "",
            task_group_id=envelope.correlation_id or _text(headers.get(H_GROUP, "")),
            endpoint_id=_text(headers.get(H_ENDPOINT, "")),
            function_id=_text(headers.get(H_FUNCTION, "")),
            user=_text(headers.get(H_USER, "")),
            on_behalf_of=_text(headers.get(H_ON_BEHALF_OF, "")),
            state=state,  # type: ignore[arg-type]  # pydantic validates the literal
            content_type=envelope.content_type or "",
            payload=envelope.body if error is None else b"",
            error=error,
            timings=Timings(received=_seconds(headers.get(H_RECEIVED)),
                            started=_seconds(headers.get(H_STARTED)),
                            finished=_seconds(headers.get(H_FINISHED))),
            worker=_text(headers.get(H_WORKER, "")),
            stdout=_text(headers.get(H_STDOUT, "")),
            stderr=_text(headers.get(H_STDERR, "")),
            sender_python=_text(headers.get(H_PYTHON, "")),
            sender_serializer=_text(headers.get(H_SERIALIZER, "")),
        )
    except (ValidationError, ValueError, TypeError) as exc:
        raise ProtocolError(f"malformed result message: {_first_error(exc)}", raw=envelope.body) from exc


def error_result(task: TaskMessage, error: ErrorInfo, *, state: TaskState = "failed",
                 timings: Timings | None = None, worker: str = "") -> ResultMessage:
    """A failed (or cancelled) result for ``task``."""
    return ResultMessage(
        task_id=task.task_id, task_group_id=task.task_group_id, endpoint_id=task.endpoint_id,
        function_id=task.function_id, user=task.user, on_behalf_of=task.on_behalf_of,
        state=state, content_type=JSON.content_type, error=error, timings=timings or Timings(), worker=worker,
    )


def _dead_letter_result(envelope: Envelope) -> ResultMessage:
    headers = envelope.headers
    deaths = headers.get("x-death") or [{}]
    death = deaths[0] if isinstance(deaths[0], dict) else {}
    reason = _text(death.get("reason", "unknown"))
    queue = _text(death.get("queue", "?"))
    if reason == "delivery_limit":
        why = (f"it was delivered to an agent {headers.get('x-delivery-count', 'too many')} "
               "times and no attempt produced a result (the delivery limit of queue "
               f"{queue}); the function probably kills its worker or agent, for example "
               "by crashing the interpreter or running out of memory")
    else:
        why = f"the broker dead-lettered it from queue {queue} (reason: {reason})"
    task_id = envelope.message_id or ""
    return ResultMessage(
        task_id=task_id,
        task_group_id=envelope.correlation_id or _text(headers.get(H_GROUP, "")),
        endpoint_id=_text(headers.get(H_ENDPOINT, "")),
        function_id=_text(headers.get(H_FUNCTION, "")),
        user=_text(headers.get(H_USER, "")),
        on_behalf_of=_text(headers.get(H_ON_BEHALF_OF, "")),
        state="failed",
        content_type=JSON.content_type,
        error=ErrorInfo(type="TaskDeadLettered", message=f"task {task_id} was given up: {why}"),
    )


def _check_protocol(headers: dict[str, Any], body: bytes) -> None:
    version = headers.get(H_PROTOCOL)
    if not isinstance(version, int):
        raise ProtocolError(f"missing or malformed {H_PROTOCOL} header: {version!r}", raw=body)
    if version > PROTOCOL_VERSION:
        raise ProtocolError(
            f"message speaks gc protocol {version}, this side speaks {PROTOCOL_VERSION}; "
            "upgrade gc-fabric here", raw=body)


def _text(value: Any) -> str:
    """pika hands header strings back as ``bytes`` when they were sent as long strings."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if not isinstance(value, str):
        raise TypeError(f"expected a string header, got {type(value).__name__}")
    return value


def _seconds(microseconds: Any) -> float | None:
    """Timing headers travel as integer microseconds since the epoch."""
    return None if microseconds is None else int(microseconds) / 1_000_000


def _first_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        where = ".".join(str(part) for part in err["loc"]) or "message"
        return f"{where}: {err['msg']}"
    return str(exc)


class Heartbeat(_Frozen):
    """An agent's periodic status, published to the events exchange."""

    endpoint_id: str
    hostname: str
    pid: int
    sent: float
    period: float
    started: float
    engine: str
    workers: int
    workers_busy: int
    tasks_received: int
    tasks_succeeded: int
    tasks_failed: int
    tasks_cancelled: int = 0
    queue_depth: int | None = None
    #: The engine's own view, e.g. the htex engine's blocks (pending, running), managers and
    #: idle/busy workers; empty for engines whose worker counts say it all.
    engine_status: dict[str, Any] = Field(default_factory=dict)


class GroupManifest(_Frozen):
    """The task ids a client submitted to a task group, so the ledger knows them before results."""

    task_group_id: str
    endpoint_id: str
    user: str
    task_ids: list[str]
    submitted: float


class CancelCommand(_Frozen):
    """Ask an endpoint's agent to cancel tasks of ``user``, queued or running."""

    task_ids: list[str]
    user: str
    sent: float


#: JSON control messages (events and commands) by the kind named in their gc-event header.
ControlMessage = Heartbeat | GroupManifest | CancelCommand
_CONTROL_KINDS: dict[str, type[ControlMessage]] = {
    "heartbeat": Heartbeat, "group-manifest": GroupManifest, "cancel": CancelCommand}


def encode_event(event: ControlMessage) -> Envelope:
    """Turn an event or command into its AMQP form: a JSON body, its kind in a header."""
    kind = next(k for k, model in _CONTROL_KINDS.items() if isinstance(event, model))
    return Envelope("", "", JSON.content_type, {H_PROTOCOL: PROTOCOL_VERSION, H_EVENT: kind},
                    event.model_dump_json().encode())


def decode_event(envelope: Envelope) -> ControlMessage:
    """Turn an AMQP message from the events or commands exchange into its model.

    Raises:
        ProtocolError: unknown kind or malformed body.
    """
    kind = envelope.headers.get(H_EVENT)
    kind = kind.decode() if isinstance(kind, bytes) else kind
    model = _CONTROL_KINDS.get(str(kind))
    if model is None:
        raise ProtocolError(f"unknown event kind {kind!r}", raw=envelope.body)
    try:
        return model.model_validate_json(envelope.body)
    except ValidationError as exc:
        raise ProtocolError(f"malformed {kind} event: {_first_error(exc)}",
                            raw=envelope.body) from exc
