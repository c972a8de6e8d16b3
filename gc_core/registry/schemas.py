"""The registry's HTTP request and response bodies, shared by the service and its client."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gc_core.protocol import ErrorInfo, Timings

__all__ = [
    "EndpointIn",
    "EndpointOut",
    "EndpointStatus",
    "FunctionIn",
    "FunctionOut",
    "TaskBatchIn",
    "TaskOut",
    "TaskStatus",
]

TaskStatus = Literal["waiting", "success", "failed", "cancelled", "unknown"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FunctionIn(_Body):
    """A function to register: its serialized form and, where available, its source."""

    name: str = Field(min_length=1, max_length=200)
    content_type: str
    payload_b64: str = Field(min_length=1)
    source: str | None = None
    python_version: str
    serializer: str
    owner: str = "anonymous"


class FunctionOut(_Body):
    """A registered function."""

    function_id: str
    name: str
    content_hash: str
    content_type: str
    payload_b64: str
    source: str | None
    python_version: str
    serializer: str
    owner: str
    created: float


class EndpointIn(_Body):
    """An endpoint to create."""

    name: str = Field(min_length=1, max_length=200)
    owner: str = "anonymous"
    description: str = ""


class EndpointOut(_Body):
    """A registered endpoint."""

    endpoint_id: str
    name: str
    owner: str
    description: str
    created: float


class EndpointStatus(_Body):
    """An endpoint's liveness, from its heartbeats."""

    endpoint_id: str
    status: Literal["online", "offline", "never seen"]
    last_seen: float | None = None
    details: dict[str, Any] = {}


class TaskOut(_Body):
    """A task as the ledger knows it: status, timings and, once finished, its result."""

    task_id: str
    task_group_id: str
    endpoint_id: str
    function_id: str
    user: str
    status: TaskStatus
    submitted: float | None = None
    timings: Timings = Timings()
    worker: str = ""
    content_type: str = ""
    payload_b64: str = ""
    error: ErrorInfo | None = None
    stdout: str = ""
    stderr: str = ""


class TaskBatchIn(_Body):
    """Task ids to look up at once."""

    task_ids: list[str] = Field(max_length=10_000)
