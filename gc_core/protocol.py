"""The wire contract: task and result messages, and their AMQP form.

A message is an :class:`Envelope` (the AMQP properties we use plus the body).
Bytes become a model only in :func:`decode_task` / :func:`decode_result`, and a
model becomes bytes only in :func:`encode_task` / :func:`encode_result`; the
header names below are the ones ``docs/asyncapi.yaml`` documents.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Annotated, Any, Literal, NamedTuple, cast

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from gc_core.errors import ProtocolError
from gc_core.serialize import JSON

__all__ = [
    "MAX_ERROR_MESSAGE",
    "MAX_ERROR_TRACEBACK",
    "MAX_EVENT_BYTES",
    "MAX_HEARTBEAT_BYTES",
    "MAX_ID_LENGTH",
    "MAX_JSON_DEPTH",
    "MAX_JSON_HEADER",
    "MAX_LABEL_LENGTH",
    "MAX_MANIFEST_TASKS",
    "MAX_NAME_LENGTH",
    "MAX_OUTPUT_HEADER",
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
    "new_result",
    "new_task",
]

#: Version of this contract; a receiver refuses messages from a newer major version.
PROTOCOL_VERSION = 1

TaskState = Literal["success", "failed", "cancelled"]

# -- bounds: every field from the wire is checked against these where it is decoded --------
# (docs/asyncapi.yaml states the same numbers; a message outside them is refused, not retried)

#: Longest id (task, task group, endpoint, function, user): ids stand in queue names and
#: routing keys, so they are letters, digits, '_' and '-' only. A UUID is 36 characters.
MAX_ID_LENGTH = 64
#: Longest identity claim or end-user name (``gc-identity``, ``gc-on-behalf-of``).
MAX_NAME_LENGTH = 256
#: Longest short label: content types, Python and serializer versions, worker and host names.
MAX_LABEL_LENGTH = 255
#: Longest JSON header text (``gc-resource-spec``, ``gc-user-endpoint-config``), in characters.
MAX_JSON_HEADER = 8192
#: Deepest nesting of lists and objects in a JSON header.
MAX_JSON_DEPTH = 8
#: Longest ``gc-stdout`` / ``gc-stderr`` header, in UTF-8 bytes: an endpoint's output_limit
#: (at most 48 KiB) plus its truncation note. Both headers fit one 128 KiB AMQP frame.
MAX_OUTPUT_HEADER = 50 * 1024
#: Longest error message and remote traceback in a failed result's body, in characters.
MAX_ERROR_MESSAGE = 16 * 1024
MAX_ERROR_TRACEBACK = 64 * 1024
#: Largest event or command body (heartbeat, manifest, cancel), in bytes.
MAX_EVENT_BYTES = 8 * 2**20
#: Largest heartbeat body, in bytes: an agent's is a few hundred bytes of counts, and the
#: registry keeps the last of each agent of an endpoint and reads them for every status.
MAX_HEARTBEAT_BYTES = 16 * 2**10
#: Most task ids one group manifest or cancel command may name.
MAX_MANIFEST_TASKS = 100_000

_ID_PATTERN = rf"^[A-Za-z0-9_\-]{{1,{MAX_ID_LENGTH}}}$"
#: No control characters (NUL, newlines, escapes) in names and labels: they reach logs and
#: shell-visible places, where they could forge lines.
_PRINTABLE_PATTERN = r"^[^\x00-\x1f\x7f]*$"
#: What a pattern means, for error messages a sender can act on.
_PATTERN_MEANING = {
    _ID_PATTERN: f"1 to {MAX_ID_LENGTH} letters, digits, '_' or '-'",
    _PRINTABLE_PATTERN: "text without control characters (no NUL, newline or escape)",
}

Id = Annotated[str, StringConstraints(pattern=_ID_PATTERN)]
#: An id that may be left empty (a result of a task whose function was never known).
OptionalId = Annotated[str, StringConstraints(pattern=rf"^(|{_ID_PATTERN[1:-1]})$")]
Name = Annotated[str, StringConstraints(max_length=MAX_NAME_LENGTH, pattern=_PRINTABLE_PATTERN)]
Label = Annotated[str, StringConstraints(max_length=MAX_LABEL_LENGTH, pattern=_PRINTABLE_PATTERN)]
_PATTERN_MEANING[rf"^(|{_ID_PATTERN[1:-1]})$"] = f"empty, or {_PATTERN_MEANING[_ID_PATTERN]}"

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


class Envelope(NamedTuple):
    """An AMQP message as gc-fabric sees it: the properties it uses and the body.

    A named tuple: every task and result makes several on its way, and one is built in a
    third of the time of a frozen dataclass, immutable all the same."""

    message_id: str
    correlation_id: str
    content_type: str
    headers: dict[str, Any]
    body: bytes

    def __repr__(self) -> str:  # the body may be megabytes of a user's data: not for logs
        return (f"Envelope(message_id={self.message_id!r}, correlation_id={self.correlation_id!r}, "
                f"content_type={self.content_type!r}, headers={self.headers!r})")


class _Frozen(BaseModel):
    # NaN and infinities are no time and no count: a far-future or NaN field is refused.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class Timings(_Frozen):
    """Epoch seconds at which the agent received, started and finished the task."""

    received: float | None = None
    started: float | None = None
    finished: float | None = None


class ErrorInfo(_Frozen):
    """A remote failure as text: we never pickle exception objects across the wire."""

    type: Label
    message: str = Field(max_length=MAX_ERROR_MESSAGE)
    traceback: str = Field(default="", max_length=MAX_ERROR_TRACEBACK)


class TaskMessage(_Frozen):
    """One function call addressed to one endpoint."""

    task_id: Id
    task_group_id: Id
    endpoint_id: Id
    function_id: Id
    user: Id
    content_type: Label
    payload: bytes = Field(repr=False)
    resource_spec: dict[str, Any] = Field(default_factory=dict)
    identity: Name = ""
    #: The end user a service account (a science gateway) submits this task for.
    on_behalf_of: Name = ""
    user_endpoint_config: dict[str, Any] = Field(default_factory=dict)
    sender_python: Label = ""
    sender_serializer: Label = ""
    protocol: int = PROTOCOL_VERSION


class ResultMessage(_Frozen):
    """The outcome of one task: a serialized value, or an error."""

    task_id: Id
    task_group_id: Id
    endpoint_id: OptionalId = ""
    function_id: OptionalId = ""
    user: Id
    on_behalf_of: Name = ""
    state: TaskState
    content_type: Label
    payload: bytes = Field(default=b"", repr=False)
    error: ErrorInfo | None = None
    timings: Timings = Timings()
    worker: Label = ""
    stdout: str = ""
    stderr: str = ""
    sender_python: Label = ""
    sender_serializer: Label = ""
    protocol: int = PROTOCOL_VERSION


#: A task or a result from a dict of its fields, validated: the models' own validators,
#: called without ``model_validate``'s wrapper (which costs an eighth more), and a dict
#: rather than keyword arguments (a fifth more): every task makes a few of each.
new_task = cast(Callable[[dict[str, Any]], TaskMessage],
                TaskMessage.__pydantic_validator__.validate_python)
new_result = cast(Callable[[dict[str, Any]], ResultMessage],
                  ResultMessage.__pydantic_validator__.validate_python)


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
        ProtocolError: a header is missing, malformed or out of bounds, or the protocol is
            newer than ours. Nothing else: the message is hostile until checked.
    """
    headers = _headers(envelope)
    _check_not_dead_lettered(headers, envelope.body)
    _check_protocol(headers, envelope.body)
    try:
        return new_task({
            **_whose(envelope, headers),
            "content_type": envelope.content_type or "",
            "payload": envelope.body,
            "resource_spec": _json_header(headers, H_RESOURCE_SPEC),
            "identity": headers.get(H_IDENTITY, ""),
            "user_endpoint_config": _json_header(headers, H_USER_ENDPOINT_CONFIG),
            "sender_python": headers.get(H_PYTHON, ""),
            "sender_serializer": headers.get(H_SERIALIZER, ""),
        })
    except Exception as exc:  # whatever a forged message makes fail is the message's fault
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
    if result.stdout:
        headers[H_STDOUT] = _clip(result.stdout, MAX_OUTPUT_HEADER)
    if result.stderr:
        headers[H_STDERR] = _clip(result.stderr, MAX_OUTPUT_HEADER)
    if result.on_behalf_of:
        headers[H_ON_BEHALF_OF] = result.on_behalf_of
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
    headers = _headers(envelope)
    try:
        if H_STATE not in headers and "x-death" in headers:
            return _dead_letter_result(envelope, headers)
        _check_protocol(headers, envelope.body)
        state = _text(headers.get(H_STATE, ""))
        error = None
        if state != "success":
            error = ErrorInfo.model_validate_json(envelope.body)
        return new_result({
            **_whose(envelope, headers),
            "state": state,
            "content_type": envelope.content_type or "",
            "payload": envelope.body if error is None else b"",
            "error": error,
            "timings": {"received": _seconds(headers.get(H_RECEIVED)),
                        "started": _seconds(headers.get(H_STARTED)),
                        "finished": _seconds(headers.get(H_FINISHED))},
            "worker": headers.get(H_WORKER, ""),
            "stdout": _output(headers, H_STDOUT),
            "stderr": _output(headers, H_STDERR),
            "sender_python": headers.get(H_PYTHON, ""),
            "sender_serializer": headers.get(H_SERIALIZER, ""),
        })
    except ProtocolError:
        raise
    except Exception as exc:  # whatever a forged message makes fail is the message's fault
        raise ProtocolError(f"malformed result message: {_first_error(exc)}", raw=envelope.body) from exc


def error_result(task: TaskMessage, error: ErrorInfo, *, state: TaskState = "failed",
                 timings: Timings | None = None, worker: str = "") -> ResultMessage:
    """A failed (or cancelled) result for ``task``."""
    return ResultMessage(
        task_id=task.task_id, task_group_id=task.task_group_id, endpoint_id=task.endpoint_id,
        function_id=task.function_id, user=task.user, on_behalf_of=task.on_behalf_of,
        state=state, content_type=JSON.content_type, error=error, timings=timings or Timings(), worker=worker,
    )


def _dead_letter_result(envelope: Envelope, headers: dict[str, Any]) -> ResultMessage:
    deaths = headers.get("x-death")
    death = deaths[0] if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict) else {}
    reason = _clip(_text(death.get("reason", "unknown")), MAX_LABEL_LENGTH)
    queue = _clip(_text(death.get("queue", "?")), MAX_LABEL_LENGTH)
    if reason == "delivery_limit":
        count = headers.get("x-delivery-count")
        why = (f"it was delivered to an agent {count if isinstance(count, int) else 'too many'} "
               "times and no attempt produced a result (the delivery limit of queue "
               f"{queue}); the function probably kills its worker or agent, for example "
               "by crashing the interpreter or running out of memory")
    else:
        why = f"the broker dead-lettered it from queue {queue} (reason: {reason})"
    whose = _whose(envelope, headers)
    return new_result({
        **whose, "state": "failed", "content_type": JSON.content_type,
        "error": ErrorInfo(type="TaskDeadLettered",
                           message=f"task {whose['task_id']} was given up: {why}")})


def _whose(envelope: Envelope, headers: dict[str, Any]) -> dict[str, Any]:
    """What a task or result says of whose task it is and where it went, unchecked (the
    models check it)."""
    return {"task_id": envelope.message_id or "",
            "task_group_id": envelope.correlation_id or headers.get(H_GROUP, ""),
            "endpoint_id": headers.get(H_ENDPOINT, ""),
            "function_id": headers.get(H_FUNCTION, ""),
            "user": headers.get(H_USER, ""),
            "on_behalf_of": headers.get(H_ON_BEHALF_OF, "")}


def _headers(envelope: Envelope) -> dict[str, Any]:
    """The message's headers, every text one a ``str``: pika hands a long string that is no
    UTF-8 back as ``bytes``, read here as text with replacement characters. The models
    refuse any other type where they want text, naming the field."""
    headers = envelope.headers or {}
    if not isinstance(headers, dict):
        raise ProtocolError("the message's headers are not a table", raw=envelope.body)
    if bytes in set(map(type, headers.values())):
        return {name: _text(value) if type(value) is bytes else value
                for name, value in headers.items()}
    return headers


def _check_not_dead_lettered(headers: dict[str, Any], body: bytes) -> None:
    """Refuse a task, command or event that was dead-lettered into its exchange. None is
    genuine: the fabric dead-letters only into ``gc.dead``. But a queue its declarer points
    at ``gc.tasks``, ``gc.commands`` or ``gc.events`` (which the broker cannot forbid: users
    may publish there) would re-route messages past the broker's topic authorization."""
    if "x-death" in headers:
        raise ProtocolError("a dead-lettered message is not a task, command or event: it was "
                            "re-routed here by a queue's dead-letter arguments", raw=body)


def _check_protocol(headers: dict[str, Any], body: bytes) -> None:
    version = headers.get(H_PROTOCOL)
    if not isinstance(version, int) or isinstance(version, bool):
        raise ProtocolError(f"missing or malformed {H_PROTOCOL} header: {_clip(repr(version), 80)}",
                            raw=body)
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


def _output(headers: dict[str, Any], name: str) -> str:
    """A captured-output header, refused past its bound (in UTF-8 bytes, as it travels)."""
    text = _text(headers.get(name, ""))
    if len(text.encode("utf-8", "replace")) > MAX_OUTPUT_HEADER:
        raise ValueError(f"{name} is longer than {MAX_OUTPUT_HEADER:,} bytes")
    return text


def _json_header(headers: dict[str, Any], name: str) -> dict[str, Any]:
    """A header holding a JSON object, refused past its length or nesting bound."""
    raw = headers.get(name)
    if not raw:
        return {}
    text = _text(raw)
    if len(text) > MAX_JSON_HEADER:
        raise ValueError(f"{name} is longer than {MAX_JSON_HEADER:,} characters")
    if _nesting(text) > MAX_JSON_DEPTH:
        raise ValueError(f"{name} nests deeper than {MAX_JSON_DEPTH} levels")
    value = STRICT_JSON.decode(text)
    if not isinstance(value, dict):
        raise TypeError(f"{name} must be a JSON object, not {type(value).__name__}")
    return value


def _nesting(text: str) -> int:
    """How deep brackets nest in a JSON text, counted before parsing it (a deep text would
    exhaust the parser's recursion); brackets inside strings count too, which only errs
    on the safe side."""
    depth = deepest = 0
    for char in text:
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


#: Strict JSON for what comes off the wire: NaN and Infinity are refused. One decoder for
#: every message: ``json.loads`` with an argument builds a new one per call, which cost
#: about as much as the parse of a batch entry's head.
STRICT_JSON = json.JSONDecoder(parse_constant=_no_constant)


def _seconds(microseconds: Any) -> float | None:
    """Timing headers travel as integer microseconds since the epoch."""
    if microseconds is None:
        return None
    if not isinstance(microseconds, int) or isinstance(microseconds, bool):
        raise TypeError(f"expected integer microseconds, got {type(microseconds).__name__}")
    seconds = microseconds / 1_000_000
    if not math.isfinite(seconds):
        raise ValueError("timing out of range")
    return seconds


def _clip(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes, on a character boundary."""
    data = text.encode("utf-8", "replace")
    return text if len(data) <= limit else data[:limit].decode("utf-8", "ignore")


def _first_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        where = ".".join(str(part) for part in err["loc"]) or "message"
        pattern = (err.get("ctx") or {}).get("pattern")
        if pattern in _PATTERN_MEANING:
            return f"{where} must be {_PATTERN_MEANING[pattern]}"
        return f"{where}: {err['msg']}"
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return _clip(f"{exc}" or type(exc).__name__, 300)


class Heartbeat(_Frozen):
    """An agent's periodic status, published to the events exchange."""

    endpoint_id: Id
    hostname: Label
    pid: int
    sent: float
    period: float = Field(gt=0)
    started: float
    engine: Label
    workers: int = Field(ge=0)
    workers_busy: int = Field(ge=0)
    tasks_received: int = Field(ge=0)
    tasks_succeeded: int = Field(ge=0)
    tasks_failed: int = Field(ge=0)
    tasks_cancelled: int = Field(default=0, ge=0)
    queue_depth: int | None = Field(default=None, ge=0)
    #: The engine's own view, e.g. the htex engine's blocks (pending, running), managers and
    #: idle/busy workers; empty for engines whose worker counts say it all.
    engine_status: dict[str, Any] = Field(default_factory=dict)


class GroupManifest(_Frozen):
    """The task ids a client submitted to a task group, so the ledger knows them before results."""

    task_group_id: Id
    endpoint_id: Id
    user: Id
    task_ids: list[Id] = Field(max_length=MAX_MANIFEST_TASKS)
    submitted: float


class CancelCommand(_Frozen):
    """Ask an endpoint's agent to cancel tasks of ``user``, queued or running."""

    task_ids: list[Id] = Field(max_length=MAX_MANIFEST_TASKS)
    user: Id
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
    headers = _headers(envelope)
    _check_not_dead_lettered(headers, envelope.body)
    kind = headers.get(H_EVENT)
    if isinstance(kind, bytes):
        kind = kind.decode("utf-8", "replace")
    model = _CONTROL_KINDS.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise ProtocolError(f"unknown event kind {_clip(repr(kind), 80)}", raw=envelope.body)
    bound = MAX_HEARTBEAT_BYTES if model is Heartbeat else MAX_EVENT_BYTES
    if len(envelope.body) > bound:
        raise ProtocolError(f"{kind} event of {len(envelope.body):,} bytes is over the "
                            f"{bound:,}-byte bound", raw=envelope.body)
    try:
        return model.model_validate_json(envelope.body)
    except Exception as exc:  # whatever a forged message makes fail is the message's fault
        raise ProtocolError(f"malformed {kind} event: {_first_error(exc)}",
                            raw=envelope.body) from exc
