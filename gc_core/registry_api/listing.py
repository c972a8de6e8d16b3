"""Pages of the registry's listings, ``GET /tasks`` and ``GET /functions``: the contract.

A listing is newest first and cut into pages by keyset pagination: each page ends with
an opaque ``next_cursor`` (None on the last page) that the next request passes back, so a
page is as cheap deep into a million tasks as at the start, and tasks recorded meanwhile
neither repeat nor shift an entry out of sight.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from gc_core.registry_api.schemas import FunctionSharing, TaskBasics

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "ID_PATTERN",
    "MAX_PAGE_SIZE",
    "FunctionPage",
    "FunctionSummary",
    "TaskPage",
    "TaskSummary",
]

#: Entries in a page when the request does not say.
DEFAULT_PAGE_SIZE = 50
#: Most entries one page may hold: a larger ``limit`` is a 422.
MAX_PAGE_SIZE = 500
#: What the ids a listing filters by, or a cursor names, are made of.
ID_PATTERN = r"^[A-Za-z0-9_\-]{1,64}$"


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaskSummary(TaskBasics):
    """A task in a listing: where it went, its state and timings; no value nor output
    (``GET /tasks/{id}`` has them)."""

    #: The class name of the failure, for a failed task.
    error_type: str = ""


class TaskPage(_Out):
    """One page of ``GET /tasks``."""

    tasks: list[TaskSummary]
    next_cursor: str | None = None


class FunctionSummary(_Out):
    """A function in a listing, without its serialized bytes or source."""

    function_id: str
    name: str
    owner: str
    created: float
    serializer: str
    python_version: str
    sharing: FunctionSharing = FunctionSharing()


class FunctionPage(_Out):
    """One page of ``GET /functions``."""

    functions: list[FunctionSummary]
    next_cursor: str | None = None
