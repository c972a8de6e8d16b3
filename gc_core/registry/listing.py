"""What a caller pages through, newest first: the tasks they may see, the functions they
may use, and a task group's progress.

Who sees what is the API's policy (``store`` for tasks, ``policy`` for functions), written
here as SQL conditions so the database fills a page rather than Python filtering one.
Pages are cut by keyset: a cursor holds the sort key and id of the last entry shown.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, and_, func, or_, select, true
from sqlalchemy.orm import Session, load_only

from gc_core.errors import Forbidden
from gc_core.protocol import ErrorInfo, Timings
from gc_core.registry import policy
from gc_core.registry.db import FunctionRow, TaskRow
from gc_core.registry.identity import Principal
from gc_core.registry_api.listing import (
    DEFAULT_PAGE_SIZE,
    ID_PATTERN,
    FunctionPage,
    FunctionSummary,
    TaskPage,
    TaskSummary,
)
from gc_core.registry_api.schemas import FunctionSharing

__all__ = ["TaskFilter", "group_progress", "list_functions", "list_tasks", "visible_tasks"]

#: Functions read per query while filling a page of those shared with the caller's groups
#: (group sharing is a JSON list, checked in Python).
FUNCTION_SCAN_BATCH = 200

#: When a task was submitted, or, for one whose result came before its manifest, recorded
#: (every row has one of the two); index ``ix_tasks_user_time`` serves it.
_TASK_TIME = func.coalesce(TaskRow.submitted, TaskRow.recorded)
_SUMMARY_COLUMNS = (TaskRow.task_id, TaskRow.task_group_id, TaskRow.endpoint_id,
                    TaskRow.function_id, TaskRow.user, TaskRow.on_behalf_of, TaskRow.status,
                    TaskRow.submitted, TaskRow.received, TaskRow.started, TaskRow.finished,
                    TaskRow.worker, TaskRow.error_json, _TASK_TIME.label("sort_time"))


@dataclass(frozen=True)
class TaskFilter:
    """Which tasks a listing keeps (None: any)."""

    state: str | None = None
    endpoint_id: str | None = None
    task_group_id: str | None = None

    def conditions(self) -> list[ColumnElement[bool]]:
        chosen = [(TaskRow.status, self.state), (TaskRow.endpoint_id, self.endpoint_id),
                  (TaskRow.task_group_id, self.task_group_id)]
        return [column == value for column, value in chosen if value is not None]


def visible_tasks(principal: Principal) -> ColumnElement[bool]:
    """The tasks ``principal`` may see, as ``store.get_tasks`` decides one by one: its
    submitter's, its endpoint's agent's, and an administrator's."""
    if principal.admin:
        return true()
    mine = TaskRow.user == principal.name
    if principal.endpoint_id is None:
        return mine
    return or_(mine, TaskRow.endpoint_id == principal.endpoint_id)


def list_tasks(db: Session, principal: Principal, filters: TaskFilter = TaskFilter(), *,
               cursor: str | None = None, limit: int = DEFAULT_PAGE_SIZE) -> TaskPage:
    """A page of the tasks ``principal`` may see, newest submission first.

    Raises:
        ValueError: ``cursor`` is not one a page gave.
    """
    query = select(*_SUMMARY_COLUMNS).where(visible_tasks(principal), *filters.conditions())
    if cursor is not None:
        query = query.where(_after(_TASK_TIME, TaskRow.task_id, cursor))
    rows = db.execute(query.order_by(_TASK_TIME.desc(), TaskRow.task_id.desc())
                      .limit(limit + 1)).all()
    page = rows[:limit]
    more = len(rows) > limit
    return TaskPage(tasks=[_task_summary(row) for row in page],
                    next_cursor=_cursor(page[-1].sort_time, page[-1].task_id) if more else None)


def group_progress(db: Session, principal: Principal, task_group_id: str) -> dict[str, int]:
    """How many of a task group's tasks (those ``principal`` may see) are in each state."""
    rows = db.execute(select(TaskRow.status, func.count())
                      .where(visible_tasks(principal), TaskRow.task_group_id == task_group_id)
                      .group_by(TaskRow.status))
    counts = dict.fromkeys(("waiting", "success", "failed", "cancelled"), 0)
    counts.update({status: int(count) for status, count in rows})
    return counts


def list_functions(db: Session, principal: Principal, *, cursor: str | None = None,
                   limit: int = DEFAULT_PAGE_SIZE) -> FunctionPage:
    """A page of the functions ``principal`` may use (``policy.may_use_function``): their
    own, those shared with one of their groups, public ones; newest first.

    Raises:
        Forbidden: an agent's token asks (an agent reads only what its endpoint runs).
        ValueError: ``cursor`` is not one a page gave.
    """
    if principal.is_agent:
        raise Forbidden("an endpoint's agent token cannot list functions; use a user's token")
    query = select(FunctionRow).options(load_only(
        FunctionRow.function_id, FunctionRow.name, FunctionRow.owner, FunctionRow.created,
        FunctionRow.serializer, FunctionRow.python_version, FunctionRow.sharing,
        FunctionRow.shared_groups))
    if not principal.admin:
        reachable = [FunctionRow.owner == principal.name, FunctionRow.sharing == "public"]
        if principal.groups:
            reachable.append(FunctionRow.sharing == "groups")
        query = query.where(or_(*reachable))
    query = query.order_by(FunctionRow.created.desc(), FunctionRow.function_id.desc())
    found: list[FunctionRow] = []
    after = cursor
    while len(found) <= limit:
        scanned = query if after is None else query.where(
            _after(FunctionRow.created, FunctionRow.function_id, after))
        batch = list(db.scalars(scanned.limit(FUNCTION_SCAN_BATCH)))
        found.extend(row for row in batch if policy.may_use_function(principal, row))
        if len(batch) < FUNCTION_SCAN_BATCH:
            break
        after = _cursor(batch[-1].created, batch[-1].function_id)
    page = found[:limit]
    more = len(found) > limit
    return FunctionPage(functions=[_function_summary(row) for row in page],
                        next_cursor=_cursor(page[-1].created, page[-1].function_id)
                        if more else None)


def _cursor(sort_key: float, entry_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([sort_key, entry_id]).encode()).decode()


def _after(sort_column: Any, id_column: Any, cursor: str) -> ColumnElement[bool]:
    """Entries after the cursor's in newest-first order (ids break ties)."""
    sort_key, entry_id = _read_cursor(cursor)
    # The first term alone bounds the sort key, so the database seeks the index to the
    # cursor (SQLite does not with a row-value comparison nor with the OR alone); the
    # second settles ties on the key.
    return and_(sort_column <= sort_key, or_(sort_column < sort_key, id_column < entry_id))


def _read_cursor(cursor: str) -> tuple[float, str]:
    try:
        sort_key, entry_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        if isinstance(sort_key, (int, float)) and math.isfinite(sort_key) \
                and isinstance(entry_id, str) and re.fullmatch(ID_PATTERN, entry_id):
            return float(sort_key), entry_id
    except (binascii.Error, UnicodeError, ValueError, TypeError, OverflowError):
        pass
    raise ValueError(f"cursor {cursor[:40]!r} is not one this registry gave: pass the "
                     "next_cursor of the page before, or leave it out for the first page")


def _task_summary(row: Any) -> TaskSummary:
    error = ErrorInfo.model_validate_json(row.error_json) if row.error_json else None
    return TaskSummary(
        task_id=row.task_id, task_group_id=row.task_group_id, endpoint_id=row.endpoint_id,
        function_id=row.function_id, user=row.user, on_behalf_of=row.on_behalf_of or "",
        status=row.status, submitted=row.submitted,
        timings=Timings(received=row.received, started=row.started, finished=row.finished),
        worker=row.worker or "", error_type=error.type if error else "")


def _function_summary(row: FunctionRow) -> FunctionSummary:
    return FunctionSummary(
        function_id=row.function_id, name=row.name, owner=row.owner, created=row.created,
        serializer=row.serializer, python_version=row.python_version,
        sharing=FunctionSharing(sharing=row.sharing,  # type: ignore[arg-type]
                                shared_groups=row.shared_groups or []))
