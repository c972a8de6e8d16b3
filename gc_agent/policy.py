"""Whether this endpoint may run a task: pure checks on the decoded message."""

from __future__ import annotations

from gc_core.errors import GCError, PolicyError, VersionMismatch
from gc_core.protocol import ErrorInfo, TaskMessage
from gc_core.serialize import (
    CLOUDPICKLE,
    PYTHON_VERSION,
    check_allowed,
    get_serializer,
    python_minor,
)
from gc_core.topology import safe_name_part

__all__ = ["refusal"]


def refusal(task: TaskMessage, *, endpoint_id: str, allowed_serializers: frozenset[str]) -> ErrorInfo | None:
    """Why this endpoint refuses ``task``, or None if it may run."""
    try:
        _check(task, endpoint_id=endpoint_id, allowed_serializers=allowed_serializers)
    except GCError as exc:
        return ErrorInfo(type=type(exc).__name__, message=str(exc))
    return None


def _check(task: TaskMessage, *, endpoint_id: str, allowed_serializers: frozenset[str]) -> None:
    if task.endpoint_id != endpoint_id:
        raise PolicyError(f"task {task.task_id} is addressed to endpoint {task.endpoint_id}, "
                          f"not to this one ({endpoint_id})")
    safe_name_part(task.user, "user")
    safe_name_part(task.task_group_id, "task group id")
    serializer = get_serializer(task.content_type)
    check_allowed(serializer, allowed_serializers)
    if serializer is CLOUDPICKLE and task.sender_python:
        # Pickled functions carry bytecode, which changes between Python minor versions.
        if python_minor(task.sender_python) != python_minor(PYTHON_VERSION):
            raise VersionMismatch(
                "Python", local=PYTHON_VERSION, remote=task.sender_python,
                detail="cloudpickle payloads only load on the Python minor version that made "
                       "them; run the client and the endpoint on the same Python, or send "
                       "JSON arguments to a function registered from a matching client")
