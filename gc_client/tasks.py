"""The pure core the client's senders share (Client, Executor, AsyncExecutor): build task
messages and the broker messages that carry them, unpack results."""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass
from typing import Any

from gc_client.pickling import arguments_error, size_text
from gc_core.broker_limits import Refusal
from gc_core.errors import (
    GCError,
    PublishNotConfirmed,
    SerializationError,
    TaskError,
    remote_error,
)
from gc_core.ids import random_id
from gc_core.protocol import (
    CancelCommand,
    Envelope,
    ErrorInfo,
    GroupManifest,
    ResultMessage,
    TaskMessage,
    encode_event,
    encode_task,
    new_task,
)
from gc_core.registry_api.schemas import TaskOut
from gc_core.serialize import JSON, PYTHON_VERSION, Serializer
from gc_core.settings import AGENT_PREFIX
from gc_core.topology import Topology

__all__ = ["Outgoing", "cancel_message", "error_to_exception", "make_manifest",
           "make_task", "manifest_message", "new_id", "not_accepted", "oversize",
           "result_value", "task_message", "task_out_value", "task_routing_key",
           "tasks_message", "untrusted_sender"]


@dataclass(frozen=True)
class Outgoing:
    """A message for the broker: where it goes, what it is, whether it must be routed."""

    exchange: str
    routing_key: str
    envelope: Envelope
    mandatory: bool = False


def new_id() -> str:
    """A fresh task or task group id."""
    return random_id()


def make_task(*, endpoint_id: str, function_id: str, user: str, task_group_id: str,
              serializer: Serializer, args: tuple[Any, ...], kwargs: dict[str, Any],
              resource_spec: dict[str, Any] | None = None, identity: str = "",
              on_behalf_of: str = "",
              user_endpoint_config: dict[str, Any] | None = None) -> TaskMessage:
    """A task message calling ``function_id`` with ``args`` and ``kwargs``.

    Raises:
        SerializationError: an argument cannot be serialized; the message names it.
    """
    call: Any = {"args": list(args), "kwargs": kwargs} if serializer is JSON else (args, kwargs)
    try:
        payload = serializer.dumps(call)
    except Exception as exc:
        raise arguments_error(serializer, args, kwargs, exc) from exc
    return new_task({
        "task_id": new_id(), "task_group_id": task_group_id, "endpoint_id": endpoint_id,
        "function_id": function_id, "user": user, "content_type": serializer.content_type,
        "payload": payload, "resource_spec": resource_spec or {}, "identity": identity,
        "on_behalf_of": on_behalf_of, "user_endpoint_config": user_endpoint_config or {},
        "sender_python": PYTHON_VERSION, "sender_serializer": serializer.label})


def make_manifest(task_ids: list[str], *, task_group_id: str, endpoint_id: str,
                  user: str) -> GroupManifest:
    """Tell the ledger which tasks a group holds before their results exist."""
    return GroupManifest(task_group_id=task_group_id, endpoint_id=endpoint_id, user=user,
                         task_ids=task_ids, submitted=time.time())


def task_message(topology: Topology, task: TaskMessage) -> Outgoing:
    """``task`` for the broker, alone."""
    return tasks_message(topology, task_routing_key(topology, task), encode_task(task))


def task_routing_key(topology: Topology, task: TaskMessage) -> str:
    """Where ``task`` goes: its endpoint's queue."""
    return topology.routing_key("task", endpoint_id=task.endpoint_id)


def tasks_message(topology: Topology, routing_key: str, envelope: Envelope) -> Outgoing:
    """A task, or a batch of tasks, for the endpoint ``routing_key`` names: mandatory, so
    that a task for an endpoint without a queue fails instead of vanishing."""
    return Outgoing(topology.exchange("tasks"), routing_key, envelope, mandatory=True)


def manifest_message(topology: Topology, task_ids: list[str], *, task_group_id: str,
                     endpoint_id: str, user: str) -> Outgoing:
    """The manifest of these tasks of a group, for the ledger."""
    manifest = make_manifest(task_ids, task_group_id=task_group_id, endpoint_id=endpoint_id,
                             user=user)
    return Outgoing(topology.exchange("events"),
                    topology.routing_key("group_submitted", task_group_id=task_group_id),
                    encode_event(manifest))


def cancel_message(topology: Topology, task_ids: list[str], *, endpoint_id: str,
                   user: str) -> Outgoing:
    """Ask ``endpoint_id`` to cancel these tasks of ``user``'s."""
    command = CancelCommand(task_ids=task_ids, user=user, sent=time.time())
    return Outgoing(topology.exchange("commands"),
                    topology.routing_key("command", endpoint_id=endpoint_id),
                    encode_event(command))


def not_accepted(what: str, endpoint_id: str, reason: object) -> PublishNotConfirmed:
    """The error for tasks the broker did not take: usually a wrong or unconfigured endpoint,
    unless it refused them for good (a :class:`Refusal`, such as a message too large)."""
    hint = "" if isinstance(reason, Refusal) else (
        " Check the endpoint id, and that the endpoint was configured (`gc-agent configure`) "
        "so its task queue exists.")
    return PublishNotConfirmed(f"{what} not accepted for endpoint {endpoint_id}: {reason}.{hint}")


def oversize(task: TaskMessage, limit: int) -> PublishNotConfirmed | None:
    """The error for a task whose message body is over ``limit`` bytes (the broker's
    ``max_message_size``), which the broker would refuse; None when it fits."""
    size = len(task.payload)
    if size <= limit:
        return None
    return PublishNotConfirmed(
        f"task {task.task_id} was not sent: its arguments take {size_text(size)}, over the "
        f"broker's message size limit of {size_text(limit)}. Pass large data by reference (a "
        "path or URL on storage the endpoint can read) instead of as an argument, or, if "
        "the broker's max_message_size is larger, raise the limit: Client(max_message_size=...).")


def untrusted_sender(sender: str, endpoint_id: str, trusted_publishers: frozenset[str]) -> str | None:
    """Why a result that broker user ``sender`` published may not resolve a task sent to
    ``endpoint_id`` (None: it may). Only that endpoint's agent runs the task, and only the
    registry (``trusted_publishers``) speaks for the ledger."""
    agent = AGENT_PREFIX + endpoint_id
    if sender == agent or sender in trusted_publishers:
        return None
    allowed = " or ".join(repr(name) for name in (agent, *sorted(trusted_publishers)))
    return f"only {allowed} may send its result ({agent!r} is the agent of the task's endpoint)"


def error_to_exception(task_id: str, error: ErrorInfo) -> GCError:
    """The local exception for a remote failure: the fabric's own errors by their class
    (:data:`~gc_core.errors.REMOTE_ERRORS`), what the function raised as
    :class:`TaskExecutionFailed`."""
    return remote_error(task_id, error)


def result_value(result: ResultMessage, serializer: Serializer = JSON) -> Any:
    """The value a result carries, decoded only with ``serializer``, the one its task was
    sent with (the default, JSON, never runs code).

    Raises:
        TaskExecutionFailed: the function raised on the endpoint.
        GCError: the fabric failed the task, as the class its endpoint named (a
            :class:`TaskError` such as ``WorkerLost`` or ``TaskCancelled``, a ``PolicyError``,
            a ``SerializationError`` …; see :func:`error_to_exception`).
        SerializationError: the value came in another content type, or cannot be decoded.
    """
    if result.error is not None or result.state != "success":
        raise error_to_exception(result.task_id, result.error or ErrorInfo(
            type="TaskError", message=f"task ended {result.state}"))
    return _decode(result.task_id, result.content_type, result.payload, serializer)


def task_out_value(task: TaskOut, serializer: Serializer = JSON) -> Any:
    """The value of a finished task as the ledger recorded it (see :func:`result_value`)."""
    if task.error is not None or task.status != "success":
        raise error_to_exception(task.task_id, task.error or ErrorInfo(
            type="TaskError", message=f"task ended {task.status}"))
    if task.result_note:
        raise TaskError(f"task {task.task_id} succeeded, but {task.result_note}",
                        task_id=task.task_id)
    return _decode(task.task_id, task.content_type, base64.b64decode(task.payload_b64),
                   serializer)


def _decode(task_id: str, content_type: str, payload: bytes, serializer: Serializer) -> Any:
    if content_type != serializer.content_type:
        # Another deserializer could run whatever code the sender put in: never try it.
        raise SerializationError(
            f"the result of task {task_id} came as {content_type!r}, but the task was sent "
            f"as {serializer.content_type!r}; a result is decoded only with the serializer "
            "its task was sent with, so this one was not decoded. The endpoint did not "
            "follow the wire contract: tell its owner.")
    try:
        return serializer.loads(payload)
    except Exception as exc:
        raise SerializationError(
            f"cannot decode the result of task {task_id} ({content_type}): "
            f"{type(exc).__name__}: {exc}") from exc
