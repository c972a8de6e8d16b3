"""What the registry does, as plain functions over a SQLAlchemy session.

Routes in ``app.py`` and the ledger consumer in ``ledger.py`` are thin shells
around these.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from typing import Any, Iterable, cast

from sqlalchemy import Table, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from gc_core.errors import NotFound
from gc_core.protocol import ErrorInfo, GroupManifest, Heartbeat, ResultMessage, Timings
from gc_core.registry.db import EndpointRow, FunctionRow, TaskRow
from gc_core.registry.schemas import (
    EndpointIn,
    EndpointOut,
    EndpointStatus,
    FunctionIn,
    FunctionOut,
    TaskOut,
)

__all__ = [
    "OFFLINE_AFTER_PERIODS",
    "create_endpoint",
    "endpoint_status",
    "get_endpoint",
    "get_function",
    "get_tasks",
    "list_endpoints",
    "list_group_tasks",
    "record_heartbeat",
    "record_manifest",
    "record_results",
    "register_function",
    "task_counts",
]

#: An endpoint whose last heartbeat is older than this many periods is offline.
OFFLINE_AFTER_PERIODS = 3


def register_function(db: Session, body: FunctionIn) -> FunctionOut:
    """Store a function once: the same bytes from the same owner give the same id."""
    payload = base64.b64decode(body.payload_b64, validate=True)
    digest = hashlib.sha256(payload).hexdigest()
    row = db.scalars(select(FunctionRow).where(
        FunctionRow.content_hash == digest, FunctionRow.owner == body.owner)).first()
    if row is None:
        row = FunctionRow(
            function_id=str(uuid.uuid4()), name=body.name, owner=body.owner, content_hash=digest,
            content_type=body.content_type, payload=payload, source=body.source,
            python_version=body.python_version, serializer=body.serializer, created=time.time())
        db.add(row)
        db.commit()
    return _function_out(row)


def get_function(db: Session, function_id: str) -> FunctionOut:
    """A registered function by id."""
    row = db.get(FunctionRow, function_id)
    if row is None:
        raise NotFound(f"no function {function_id} is registered", status=404)
    return _function_out(row)


def create_endpoint(db: Session, body: EndpointIn) -> EndpointOut:
    """Register a new endpoint with a fresh id."""
    row = EndpointRow(endpoint_id=str(uuid.uuid4()), name=body.name, owner=body.owner,
                      description=body.description, created=time.time())
    db.add(row)
    db.commit()
    return _endpoint_out(row)


def get_endpoint(db: Session, endpoint_id: str) -> EndpointOut:
    """A registered endpoint by id."""
    return _endpoint_out(_endpoint_row(db, endpoint_id))


def list_endpoints(db: Session) -> list[EndpointOut]:
    """Every registered endpoint, oldest first."""
    return [_endpoint_out(r) for r in db.scalars(select(EndpointRow).order_by(EndpointRow.created))]


def endpoint_status(db: Session, endpoint_id: str, now: float | None = None) -> EndpointStatus:
    """Online or offline, from the age of the last heartbeat."""
    row = _endpoint_row(db, endpoint_id)
    if row.last_seen is None or row.heartbeat_json is None:
        return EndpointStatus(endpoint_id=endpoint_id, status="never seen")
    details: dict[str, Any] = json.loads(row.heartbeat_json)
    age = (now or time.time()) - row.last_seen
    online = age <= OFFLINE_AFTER_PERIODS * float(details.get("period", 10.0))
    return EndpointStatus(endpoint_id=endpoint_id, status="online" if online else "offline",
                          last_seen=row.last_seen, details=details)


def record_heartbeat(db: Session, heartbeat: Heartbeat) -> None:
    """Remember an endpoint's latest heartbeat (heartbeats of unknown endpoints are dropped)."""
    row = db.get(EndpointRow, heartbeat.endpoint_id)
    if row is not None and (row.last_seen is None or heartbeat.sent >= row.last_seen):
        row.last_seen = heartbeat.sent
        row.heartbeat_json = heartbeat.model_dump_json()


def record_manifest(db: Session, manifest: GroupManifest) -> None:
    """Record submitted tasks as waiting; a task already finished keeps its state."""
    rows = [dict(task_id=t, task_group_id=manifest.task_group_id,
                 endpoint_id=manifest.endpoint_id, user=manifest.user, status="waiting",
                 submitted=manifest.submitted) for t in dict.fromkeys(manifest.task_ids)]
    if rows:
        statement = _insert(db)
        db.connection().execute(statement.on_conflict_do_update(
            index_elements=["task_id"], set_={"submitted": statement.excluded.submitted}), rows)


def record_results(db: Session, results: Iterable[ResultMessage]) -> None:
    """Record finished tasks; the first result for a task wins, as it does for the client."""
    first: dict[str, ResultMessage] = {}
    for result in results:
        first.setdefault(result.task_id, result)
    rows = [_result_row(r) for r in first.values()]
    if rows:
        statement = _insert(db)
        update = {c: statement.excluded[c] for c in rows[0] if c not in ("task_id", "submitted")}
        db.connection().execute(statement.on_conflict_do_update(
            index_elements=["task_id"], set_=update,
            where=TaskRow.__table__.c.status == "waiting"), rows)


def get_tasks(db: Session, task_ids: list[str]) -> list[TaskOut]:
    """Tasks by id, in the order asked; an id the ledger has never seen is ``unknown``."""
    found = {r.task_id: r for r in db.scalars(select(TaskRow).where(TaskRow.task_id.in_(task_ids)))}
    return [_task_out(found[t]) if t in found else _unknown_task(t) for t in task_ids]


def task_counts(db: Session, endpoint_id: str) -> dict[str, int]:
    """How many of an endpoint's tasks the ledger holds in each status."""
    _endpoint_row(db, endpoint_id)
    rows = db.execute(select(TaskRow.status, func.count()).where(
        TaskRow.endpoint_id == endpoint_id).group_by(TaskRow.status))
    counts = {status: 0 for status in ("waiting", "success", "failed", "cancelled")}
    counts.update({status: int(n) for status, n in rows})
    return counts


def list_group_tasks(db: Session, task_group_id: str) -> list[TaskOut]:
    """Every task the ledger knows in a task group."""
    rows = db.scalars(select(TaskRow).where(TaskRow.task_group_id == task_group_id)
                      .order_by(TaskRow.submitted))
    return [_task_out(r) for r in rows]


def _insert(db: Session) -> Any:
    """A one-row upsert on the tasks table, run with executemany: compiled once, cached,
    and never near a database's bound-variable limit however many rows come."""
    dialect = db.get_bind().dialect.name
    table = cast(Table, TaskRow.__table__)
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)


def _result_row(result: ResultMessage) -> dict[str, Any]:
    return dict(
        task_id=result.task_id, task_group_id=result.task_group_id,
        endpoint_id=result.endpoint_id, function_id=result.function_id, user=result.user,
        status=result.state, submitted=None, received=result.timings.received,
        started=result.timings.started, finished=result.timings.finished, worker=result.worker,
        content_type=result.content_type, result=result.payload if result.error is None else None,
        error_json=result.error.model_dump_json() if result.error else None,
        stdout=result.stdout, stderr=result.stderr)


def _endpoint_row(db: Session, endpoint_id: str) -> EndpointRow:
    row = db.get(EndpointRow, endpoint_id)
    if row is None:
        raise NotFound(f"no endpoint {endpoint_id} is registered", status=404)
    return row


def _function_out(row: FunctionRow) -> FunctionOut:
    return FunctionOut(
        function_id=row.function_id, name=row.name, content_hash=row.content_hash,
        content_type=row.content_type, payload_b64=base64.b64encode(row.payload).decode(),
        source=row.source, python_version=row.python_version, serializer=row.serializer,
        owner=row.owner, created=row.created)


def _endpoint_out(row: EndpointRow) -> EndpointOut:
    return EndpointOut(endpoint_id=row.endpoint_id, name=row.name, owner=row.owner,
                       description=row.description, created=row.created)


def _task_out(row: TaskRow) -> TaskOut:
    return TaskOut(
        task_id=row.task_id, task_group_id=row.task_group_id, endpoint_id=row.endpoint_id,
        function_id=row.function_id, user=row.user, status=row.status,  # type: ignore[arg-type]
        submitted=row.submitted,
        timings=Timings(received=row.received, started=row.started, finished=row.finished),
        worker=row.worker, content_type=row.content_type,
        payload_b64=base64.b64encode(row.result).decode() if row.result else "",
        error=ErrorInfo.model_validate_json(row.error_json) if row.error_json else None,
        stdout=row.stdout or "", stderr=row.stderr or "")


def _unknown_task(task_id: str) -> TaskOut:
    return TaskOut(task_id=task_id, task_group_id="", endpoint_id="", function_id="", user="",
                   status="unknown")
