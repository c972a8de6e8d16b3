"""``GET /tasks`` and ``GET /functions``: thin routes over ``listing``."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query

from gc_core.registry import listing
from gc_core.registry.deps import Caller, Db
from gc_core.registry_api.listing import (
    DEFAULT_PAGE_SIZE,
    ID_PATTERN,
    MAX_PAGE_SIZE,
    FunctionPage,
    TaskPage,
)

__all__ = ["router"]

router = APIRouter(tags=["listings"])

Limit = Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE, description="Entries per page.")]
Cursor = Annotated[str | None, Query(max_length=400, description=(
    "The next_cursor of the page before; leave it out for the first page."))]
Id = Annotated[str | None, Query(pattern=ID_PATTERN)]


@router.get("/tasks", response_model=TaskPage)
def list_tasks(session: Db, caller: Caller,
               state: Literal["waiting", "success", "failed", "cancelled"] | None = None,
               endpoint: Id = None, group: Id = None, cursor: Cursor = None,
               limit: Limit = DEFAULT_PAGE_SIZE) -> TaskPage:
    """The tasks you may see, newest first, a page at a time."""
    filters = listing.TaskFilter(state=state, endpoint_id=endpoint, task_group_id=group)
    return listing.list_tasks(session, caller, filters, cursor=cursor, limit=limit)


@router.get("/functions", response_model=FunctionPage)
def list_functions(session: Db, caller: Caller, cursor: Cursor = None,
                   limit: Limit = DEFAULT_PAGE_SIZE) -> FunctionPage:
    """The functions you may run (yours, your groups', public ones), newest first."""
    return listing.list_functions(session, caller, cursor=cursor, limit=limit)
