"""What the task running now may ask about itself, wherever it runs.

The agent sets it around each call of a task's function (``gc_agent.execution.run_job``);
code a client ships reads it — ``gc_client.MPIFunction`` sizes its launch with the resource
specification — without importing the agent.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

__all__ = ["current_resource_spec", "running_task"]

#: The resource specification of the task running in this context; a worker thread or
#: process runs one task at a time, so each sees its own task's.
_RESOURCE_SPEC: ContextVar[Mapping[str, Any] | None] = ContextVar("gc_resource_spec",
                                                                  default=None)


def current_resource_spec() -> dict[str, Any]:
    """The resource specification of the task running here (empty outside a task)."""
    return dict(_RESOURCE_SPEC.get() or {})


@contextmanager
def running_task(resource_spec: Mapping[str, Any]) -> Iterator[None]:
    """Make ``resource_spec`` the current task's for the duration of the block."""
    token = _RESOURCE_SPEC.set(resource_spec)
    try:
        yield
    finally:
        _RESOURCE_SPEC.reset(token)
