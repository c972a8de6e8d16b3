"""The pure core both client front ends share: build task messages, unpack results."""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any

from gc_core.errors import (
    PublishNotConfirmed,
    SerializationError,
    TaskCancelled,
    TaskDeadLettered,
    TaskError,
    TaskExecutionFailed,
)
from gc_core.protocol import ErrorInfo, GroupManifest, ResultMessage, TaskMessage
from gc_core.registry.schemas import TaskOut
from gc_core.serialize import JSON, PYTHON_VERSION, Serializer, get_serializer

__all__ = ["error_to_exception", "make_manifest", "make_task", "new_id", "not_accepted",
           "result_value", "task_out_value"]


def new_id() -> str:
    """A fresh task or task group id."""
    return str(uuid.uuid4())


def make_task(*, endpoint_id: str, function_id: str, user: str, task_group_id: str,
              serializer: Serializer, args: tuple[Any, ...], kwargs: dict[str, Any],
              resource_spec: dict[str, Any] | None = None, identity: str = "",
              on_behalf_of: str = "",
              user_endpoint_config: dict[str, Any] | None = None) -> TaskMessage:
    """A task message calling ``function_id`` with ``args`` and ``kwargs``."""
    call: Any = {"args": list(args), "kwargs": kwargs} if serializer is JSON else (args, kwargs)
    return TaskMessage(
        task_id=new_id(), task_group_id=task_group_id, endpoint_id=endpoint_id,
        function_id=function_id, user=user, content_type=serializer.content_type,
        payload=serializer.dumps(call), resource_spec=resource_spec or {}, identity=identity,
        on_behalf_of=on_behalf_of, user_endpoint_config=user_endpoint_config or {},
        sender_python=PYTHON_VERSION, sender_serializer=serializer.label)


def make_manifest(task_ids: list[str], *, task_group_id: str, endpoint_id: str,
                  user: str) -> GroupManifest:
    """Tell the ledger which tasks a group holds before their results exist."""
    return GroupManifest(task_group_id=task_group_id, endpoint_id=endpoint_id, user=user,
                         task_ids=task_ids, submitted=time.time())


def not_accepted(what: str, endpoint_id: str, reason: object) -> PublishNotConfirmed:
    """The error for tasks the broker did not take: usually a wrong or unconfigured endpoint."""
    return PublishNotConfirmed(
        f"{what} not accepted for endpoint {endpoint_id}: {reason}. Check the endpoint id, "
        "and that the endpoint was configured (`gc-agent configure`) so its task queue exists.")


def error_to_exception(task_id: str, error: ErrorInfo) -> TaskError:
    """The local exception for a remote failure."""
    if error.type == "TaskDeadLettered":
        return TaskDeadLettered(error.message, task_id=task_id)
    if error.type == "TaskCancelled":
        return TaskCancelled(error.message, task_id=task_id)
    return TaskExecutionFailed(task_id=task_id, remote_type=error.type,
                               remote_message=error.message, remote_traceback=error.traceback)


def result_value(result: ResultMessage) -> Any:
    """The value a result carries.

    Raises:
        TaskError: the task failed, was cancelled or dead-lettered.
        SerializationError: the value cannot be decoded here.
    """
    if result.error is not None or result.state != "success":
        raise error_to_exception(result.task_id, result.error or ErrorInfo(
            type="TaskError", message=f"task ended {result.state}"))
    return _decode(result.task_id, result.content_type, result.payload)


def task_out_value(task: TaskOut) -> Any:
    """The value of a finished task as the ledger recorded it (see :func:`result_value`)."""
    if task.error is not None or task.status != "success":
        raise error_to_exception(task.task_id, task.error or ErrorInfo(
            type="TaskError", message=f"task ended {task.status}"))
    if task.result_note:
        raise TaskError(f"task {task.task_id} succeeded, but {task.result_note}",
                        task_id=task.task_id)
    return _decode(task.task_id, task.content_type, base64.b64decode(task.payload_b64))


def _decode(task_id: str, content_type: str, payload: bytes) -> Any:
    try:
        return get_serializer(content_type).loads(payload)
    except SerializationError:
        raise
    except Exception as exc:
        raise SerializationError(
            f"cannot decode the result of task {task_id} ({content_type}): "
            f"{type(exc).__name__}: {exc}") from exc
