"""What the registry does, as plain functions over a SQLAlchemy session.

Routes in ``app.py`` and the ledger consumer in ``ledger.py`` are thin shells
around these.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    Select,
    Table,
    bindparam,
    delete,
    func,
    insert,
    literal_column,
    null,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import CursorResult, Dialect
from sqlalchemy.orm import Session

from gc_core.errors import Forbidden, NotFound
from gc_core.protocol import ErrorInfo, GroupManifest, Heartbeat, ResultMessage, Timings
from gc_core.registry import policy
from gc_core.registry.db import AgentHeartbeatRow, EarlyResultRow, EndpointRow, FunctionRow, TaskRow, TokenRow
from gc_core.registry.identity import ANONYMOUS, Principal, revoke_token
from gc_core.registry_api.schemas import (
    EndpointIn,
    EndpointOut,
    EndpointPolicy,
    EndpointStatus,
    FunctionIn,
    FunctionOut,
    FunctionSharing,
    TaskEvent,
    TaskOut,
)

__all__ = [
    "OFFLINE_AFTER_PERIODS",
    "ReceivedResult",
    "TaskOwner",
    "allowed_functions",
    "any_early_results",
    "authorize_task",
    "create_endpoint",
    "delete_endpoint",
    "early_result_counts",
    "endpoint_status",
    "expire_early_results",
    "expire_results",
    "get_endpoint",
    "get_function",
    "get_tasks",
    "list_endpoints",
    "list_group_tasks",
    "record_heartbeat",
    "record_manifest",
    "record_results",
    "register_function",
    "set_endpoint_policy",
    "set_aside_results",
    "set_function_sharing",
    "take_early_results",
    "task_counts",
    "task_owners",
]

#: An endpoint whose last heartbeat is older than this many periods is offline.
OFFLINE_AFTER_PERIODS = 3
#: Task ids looked up per query: far below any database's limit on bound variables.
LOOKUP_CHUNK = 500


@dataclass(frozen=True)
class TaskOwner:
    """Whose a recorded task is: its submitter, task group and endpoint."""

    user: str
    task_group_id: str
    endpoint_id: str


@dataclass(frozen=True)
class ReceivedResult:
    """A result (or a dead letter, ``dead``) as it reached the ledger, with the
    broker-checked ``sender``; what it claims is not checked yet."""

    result: ResultMessage
    sender: str
    dead: bool
    #: How large its value was when it was too large to keep (``result`` carries none);
    #: None when ``result`` carries it.
    dropped_size: int | None = None


def register_function(db: Session, body: FunctionIn, *, owner: str | None = None) -> FunctionOut:
    """Store a function once: the same bytes from the same owner give the same id.
    ``owner`` (the authenticated caller) overrides the owner the body claims."""
    owner = owner or body.owner
    payload = base64.b64decode(body.payload_b64, validate=True)
    digest = hashlib.sha256(payload).hexdigest()
    row = db.scalars(select(FunctionRow).where(
        FunctionRow.content_hash == digest, FunctionRow.owner == owner)).first()
    if row is None:
        row = FunctionRow(
            function_id=str(uuid.uuid4()), name=body.name, owner=owner, content_hash=digest,
            content_type=body.content_type, payload=payload, source=body.source,
            python_version=body.python_version, serializer=body.serializer, created=time.time(),
            sharing=body.sharing.sharing, shared_groups=body.sharing.shared_groups)
        db.add(row)
        db.commit()
    return _function_out(row)


def get_function(db: Session, function_id: str, principal: Principal = ANONYMOUS) -> FunctionOut:
    """A registered function by id, if ``principal`` may use it; for an agent, if its
    endpoint may run it for one of its users (``policy.agent_function_refusal``)."""
    if principal.is_agent:
        policy.require_agent_may_read(db, principal, function_id)
    row = db.get(FunctionRow, function_id)
    if row is None or not (principal.is_agent or policy.may_use_function(principal, row)):
        raise NotFound(f"no function {function_id} is registered (or it is not shared with you)")
    return _function_out(row)


def set_function_sharing(db: Session, function_id: str, sharing: FunctionSharing,
                         principal: Principal = ANONYMOUS) -> FunctionOut:
    """Change who may run a function; only its owner (or an admin) may."""
    row = _owned_function(db, function_id, principal, "share")
    row.sharing, row.shared_groups = sharing.sharing, sharing.shared_groups
    db.commit()
    return _function_out(row)


def delete_function(db: Session, function_id: str,
                    principal: Principal = ANONYMOUS) -> FunctionOut:
    """Forget a function; only its owner (or an admin) may. Its tasks stay in the ledger;
    a task naming it that an agent has not loaded yet fails, since no agent can fetch it."""
    row = _owned_function(db, function_id, principal, "delete")
    gone = _function_out(row)
    db.delete(row)
    db.commit()
    return gone


def _owned_function(db: Session, function_id: str, principal: Principal,
                    doing: str) -> FunctionRow:
    """The function, if ``principal`` owns it (or is an admin)."""
    row = db.get(FunctionRow, function_id)
    if row is None or not policy.may_use_function(principal, row):
        raise NotFound(f"no function {function_id} is registered (or it is not shared with you)")
    if not (principal.admin or principal.name == row.owner):
        raise Forbidden(f"only {row.owner}, who owns function {function_id}, may {doing} it")
    return row


def create_endpoint(db: Session, body: EndpointIn, *, owner: str | None = None) -> EndpointOut:
    """Register a new endpoint with a fresh id; ``owner`` overrides the one the body claims."""
    row = EndpointRow(endpoint_id=str(uuid.uuid4()), name=body.name, owner=owner or body.owner,
                      description=body.description, created=time.time())
    _apply_policy(row, body.policy)
    db.add(row)
    db.commit()
    return _endpoint_out(row)


def get_endpoint(db: Session, endpoint_id: str, principal: Principal = ANONYMOUS) -> EndpointOut:
    """A registered endpoint by id, if ``principal`` may see it."""
    return _endpoint_out(policy.endpoint_or_404(db, principal, endpoint_id))


def list_endpoints(db: Session, principal: Principal = ANONYMOUS) -> list[EndpointOut]:
    """Every endpoint ``principal`` may see, oldest first."""
    rows = db.scalars(select(EndpointRow).order_by(EndpointRow.created))
    return [_endpoint_out(r) for r in rows if policy.may_see_endpoint(principal, r)]


def set_endpoint_policy(db: Session, endpoint_id: str, new: EndpointPolicy,
                        principal: Principal = ANONYMOUS) -> EndpointOut:
    """Replace an endpoint's policy; only its owner (or an admin) may."""
    row = policy.endpoint_or_404(db, principal, endpoint_id)
    policy.require_endpoint_owner(principal, row)
    _apply_policy(row, new)
    db.commit()
    return _endpoint_out(row)


def delete_endpoint(db: Session, endpoint_id: str,
                    principal: Principal = ANONYMOUS) -> EndpointOut:
    """Forget an endpoint and revoke its agent tokens; only its owner (or an admin) may.

    Its tasks stay in the ledger: their submitters may still read their results.
    """
    row = policy.endpoint_or_404(db, principal, endpoint_id)
    if principal.is_agent:
        raise Forbidden(f"an agent token cannot delete endpoint {endpoint_id}; its owner "
                        f"{row.owner} deletes it with a token of their own")
    policy.require_endpoint_owner(principal, row)
    gone = _endpoint_out(row)
    live = select(TokenRow.token_id).where(TokenRow.endpoint_id == endpoint_id,
                                            TokenRow.revoked.is_(None))
    for token_id in db.scalars(live).all():
        revoke_token(db, token_id)
    db.execute(delete(AgentHeartbeatRow).where(AgentHeartbeatRow.endpoint_id == endpoint_id))
    db.delete(row)
    db.commit()
    return gone


def allowed_functions(db: Session, endpoint_id: str,
                      principal: Principal = ANONYMOUS) -> list[FunctionOut]:
    """The functions ``principal`` may run on an endpoint (empty if they may not use it)."""
    endpoint = policy.endpoint_or_404(db, principal, endpoint_id)
    if not policy.may_submit(principal, endpoint):
        return []
    query = select(FunctionRow).order_by(FunctionRow.created)
    if endpoint.allowed_functions is not None:
        query = query.where(FunctionRow.function_id.in_(endpoint.allowed_functions))
    return [_function_out(row) for row in db.scalars(query)
            if policy.function_refusal(principal, row, endpoint) is None]


def authorize_task(db: Session, endpoint_id: str, user: str, function_id: str,
                   content_type: str, principal: Principal = ANONYMOUS,
                   on_behalf_of: str = "") -> str | None:
    """The agents' re-check: why the endpoint must refuse this task, or None. Only the
    endpoint's own agent (or an admin) may ask."""
    endpoint = _endpoint_row(db, endpoint_id)
    if not (principal.admin or principal.endpoint_id == endpoint_id):
        raise Forbidden(f"only the agent of endpoint {endpoint_id} may ask what it may run")
    return policy.task_refusal(db, endpoint, user, function_id, content_type, on_behalf_of)


def endpoint_status(db: Session, endpoint_id: str, now: float | None = None) -> EndpointStatus:
    """Online or offline, from the age of the last heartbeat. Online, the details are the
    newest heartbeat's with the counts of every agent online summed, and ``agents`` lists
    each one's own heartbeat (an endpoint may be served from several hosts)."""
    row = _endpoint_row(db, endpoint_id)
    if row.last_seen is None or row.heartbeat_json is None:
        return EndpointStatus(endpoint_id=endpoint_id, status="never seen")
    now = time.time() if now is None else now
    agents = [beat for beat in map(json.loads, db.scalars(_agent_heartbeats(endpoint_id)).all())
              if _online(beat, now)]
    latest: dict[str, Any] = json.loads(row.heartbeat_json)
    if not agents:  # all offline, or heartbeats from before agents were kept apart
        return EndpointStatus(endpoint_id=endpoint_id,
                              status="online" if _online(latest, now) else "offline",
                              last_seen=row.last_seen, details=latest)
    summed = {key: sum(int(agent.get(key) or 0) for agent in agents) for key in _SUMMED}
    return EndpointStatus(endpoint_id=endpoint_id, status="online", last_seen=row.last_seen,
                          details={**agents[0], **summed, "agents": agents})


#: Heartbeat counts an endpoint's status adds up over its agents (the queue is theirs in
#: common: its depth is the newest heartbeat's).
_SUMMED = ("workers", "workers_busy", "tasks_received", "tasks_succeeded", "tasks_failed",
           "tasks_cancelled")
#: Agents of one endpoint whose heartbeats are kept, the newest: more hosts than any site
#: runs agents of one endpoint on, and a bound on the rows heartbeats naming made-up hosts
#: or pids could add.
MAX_AGENTS_PER_ENDPOINT = 64
#: Seconds an agent's heartbeat is kept after its last: long past offline, so a status can
#: still be read of an agent restarted (a new pid) without its rows piling up.
AGENT_HEARTBEAT_KEPT = 24 * 3600.0


def _online(heartbeat: Mapping[str, Any], now: float) -> bool:
    return now - float(heartbeat["sent"]) <= OFFLINE_AFTER_PERIODS * float(
        heartbeat.get("period", 10.0))


def record_heartbeat(db: Session, heartbeat: Heartbeat, now: float | None = None) -> None:
    """Remember an endpoint's latest heartbeat and its agent's (heartbeats of unknown
    endpoints are dropped). It counts as sent no later than ``now``: a clock ahead (or a
    forged time) cannot keep an endpoint online, nor hide the heartbeats after it."""
    sent = min(heartbeat.sent, time.time() if now is None else now)
    recorded = heartbeat.model_copy(update={"sent": sent}).model_dump_json()
    # One conditional UPDATE, not a read and then a write: two registries recording two
    # heartbeats of one endpoint at once must not let the older one land last.
    known = cast(CursorResult[Any], db.execute(
        update(EndpointRow)
        .where(EndpointRow.endpoint_id == heartbeat.endpoint_id,
               or_(EndpointRow.last_seen.is_(None), EndpointRow.last_seen <= sent))
        .values(last_seen=sent, heartbeat_json=recorded))).rowcount
    if not known and db.get(EndpointRow, heartbeat.endpoint_id) is None:
        return
    agent = {"endpoint_id": heartbeat.endpoint_id, "agent": f"{heartbeat.hostname}:{heartbeat.pid}",
             "last_seen": sent, "heartbeat_json": recorded}
    _upsert(db, _agent_heartbeat_upsert, [agent])
    newest = _agent_heartbeats(heartbeat.endpoint_id).with_only_columns(AgentHeartbeatRow.agent)
    db.execute(delete(AgentHeartbeatRow).where(
        AgentHeartbeatRow.endpoint_id == heartbeat.endpoint_id,
        or_(AgentHeartbeatRow.last_seen < sent - AGENT_HEARTBEAT_KEPT,
            AgentHeartbeatRow.agent.not_in(newest))))


def _agent_heartbeats(endpoint_id: str) -> Select[str]:
    """The heartbeats kept of the endpoint's agents: the newest MAX_AGENTS_PER_ENDPOINT."""
    return (select(AgentHeartbeatRow.heartbeat_json)
            .where(AgentHeartbeatRow.endpoint_id == endpoint_id)
            .order_by(AgentHeartbeatRow.last_seen.desc()).limit(MAX_AGENTS_PER_ENDPOINT))


def _agent_heartbeat_upsert(dialect: Dialect) -> Any:
    """An agent's heartbeat, unless a later one of it is recorded already."""
    table = cast(Table, AgentHeartbeatRow.__table__)
    new = _insert(dialect, table)
    return new.on_conflict_do_update(
        index_elements=["endpoint_id", "agent"],
        set_={"last_seen": new.excluded.last_seen, "heartbeat_json": new.excluded.heartbeat_json},
        where=table.c.last_seen <= new.excluded.last_seen)


def record_manifest(db: Session, manifest: GroupManifest) -> list[str]:
    """Record submitted tasks as waiting; a task already finished keeps its state. A task id
    already recorded for another user or endpoint stays theirs: those ids are returned.

    The upsert itself leaves another's row alone; its owners are looked up only when it
    wrote fewer rows than it was given (or the driver cannot count an executemany's rows),
    which fresh task ids never make it do: that lookup was a tenth of the ledger's time.
    """
    task_ids = sorted(dict.fromkeys(manifest.task_ids))  # in order: see _upsert
    waiting = {"task_group_id": manifest.task_group_id, "endpoint_id": manifest.endpoint_id,
               "user": manifest.user, "submitted": manifest.submitted}
    written = _upsert(db, _manifest_upsert, [{**waiting, "task_id": t} for t in task_ids])
    if written == len(task_ids):
        return []
    claimant = (manifest.user, manifest.endpoint_id)
    return sorted(t for t, owner in task_owners(db, task_ids).items()
                  if (owner.user, owner.endpoint_id) != claimant)


def task_owners(db: Session, task_ids: Iterable[str]) -> dict[str, TaskOwner]:
    """Whose each recorded task is, by task id (ids never recorded are left out)."""
    unique = list(dict.fromkeys(task_ids))
    owners: dict[str, TaskOwner] = {}
    for start in range(0, len(unique), LOOKUP_CHUNK):
        rows = db.connection().execute(_OWNERS,
                                       {"task_ids": unique[start:start + LOOKUP_CHUNK]})
        owners.update({task_id: TaskOwner(user, group, endpoint)
                       for task_id, user, group, endpoint in rows})
    return owners


def record_results(db: Session, results: Iterable[ResultMessage], *,
                   size_limit: int | None = None, now: float | None = None,
                   dropped_sizes: Mapping[str, int] | None = None) -> None:
    """Record finished tasks; the first result for a task wins, as it does for the client.
    A value larger than ``size_limit`` bytes is not kept (the task's state and error are);
    ``dropped_sizes`` gives, by task id, the size of a value not kept before (a
    :class:`ReceivedResult` set aside)."""
    first: dict[str, ResultMessage] = {}
    for result in results:
        first.setdefault(result.task_id, result)
    recorded = now or time.time()
    dropped = dropped_sizes or {}
    _upsert(db, _results_upsert, [_result_row(first[t], size_limit, recorded, dropped.get(t))
                                  for t in sorted(first)])


def expire_results(db: Session, older_than: float, ttl_text: str) -> int:
    """Drop the values (and output) of tasks recorded before ``older_than``; their states
    stay. Returns how many were dropped."""
    expired = db.execute(
        update(TaskRow)
        .where(TaskRow.recorded < older_than, TaskRow.result_note == "",
               TaskRow.status != "waiting")
        .values(result=None, stdout="", stderr="",
                result_note=f"the result expired: this registry keeps results for {ttl_text}"))
    return int(expired.rowcount or 0)  # type: ignore[attr-defined]


def set_aside_results(db: Session, early: Iterable[ReceivedResult], *,
                      size_limit: int | None = None, now: float | None = None) -> None:
    """Keep results no manifest has named the task of yet, unchecked, until one does (see
    :func:`take_early_results`). A value larger than ``size_limit`` bytes is not kept."""
    arrived = time.time() if now is None else now
    rows = []
    for item in early:
        value = item.result.payload
        kept = value if size_limit is None or len(value) <= size_limit else None
        rows.append({"task_id": item.result.task_id, "sender": item.sender, "dead": item.dead,
                     "result_json": item.result.model_dump_json(exclude={"payload"}),
                     "payload": kept, "payload_size": len(value), "arrived": arrived})
    if rows:
        db.execute(insert(EarlyResultRow), rows)


def take_early_results(db: Session, task_ids: Iterable[str] | None = None) -> list[ReceivedResult]:
    """Take (delete and return) the results set aside whose task is recorded now, those of
    ``task_ids`` only if given, in the order they came. Each goes to one taker: of two
    registries taking at once, the one that deletes a row first has it (PostgreSQL makes
    the other wait for that, then skip it)."""
    recorded = EarlyResultRow.task_id.in_(select(TaskRow.task_id))
    conditions: list[ColumnElement[bool]] = [recorded]
    if task_ids is not None:
        unique = list(dict.fromkeys(task_ids))
        conditions = [recorded & EarlyResultRow.task_id.in_(unique[start:start + LOOKUP_CHUNK])
                      for start in range(0, len(unique), LOOKUP_CHUNK)]
    columns = (EarlyResultRow.early_id, EarlyResultRow.sender, EarlyResultRow.dead,
               EarlyResultRow.result_json, EarlyResultRow.payload, EarlyResultRow.payload_size)
    rows = [row for condition in conditions
            for row in db.execute(delete(EarlyResultRow).where(condition).returning(*columns))]
    taken = []
    for _id, sender, dead, result_json, payload, size in sorted(rows, key=lambda row: row[0]):
        result = ResultMessage.model_validate_json(result_json)
        taken.append(ReceivedResult(result.model_copy(update={"payload": payload or b""}), sender,
                                 dead, None if payload is not None else size))
    return taken


def any_early_results(db: Session) -> bool:
    """Whether any result is set aside (a read: no write lock taken when none is)."""
    return db.scalars(select(EarlyResultRow.early_id).limit(1)).first() is not None


def early_result_counts(db: Session, senders: Iterable[str]) -> dict[str, int]:
    """How many results set aside each of ``senders`` has (those with none are left out)."""
    rows = db.execute(select(EarlyResultRow.sender, func.count())
                      .where(EarlyResultRow.sender.in_(list(set(senders))))
                      .group_by(EarlyResultRow.sender))
    return {sender: int(count) for sender, count in rows}


def expire_early_results(db: Session, older_than: float) -> list[tuple[str, str]]:
    """Drop the results set aside before ``older_than``; return their (task id, sender)."""
    rows = db.execute(delete(EarlyResultRow).where(EarlyResultRow.arrived < older_than)
                      .returning(EarlyResultRow.task_id, EarlyResultRow.sender))
    return [(task_id, sender) for task_id, sender in rows]


def get_tasks(db: Session, task_ids: list[str], principal: Principal = ANONYMOUS) -> list[TaskOut]:
    """Tasks by id, in the order asked; an id the ledger has never seen, or one that is not
    ``principal``'s to see, is ``unknown``."""
    found = {r.task_id: r for r in db.scalars(select(TaskRow).where(TaskRow.task_id.in_(task_ids)))
             if _may_see_task(principal, r)}
    return [_task_out(found[t]) if t in found else _unknown_task(t) for t in task_ids]


def task_counts(db: Session, endpoint_id: str) -> dict[str, int]:
    """How many of an endpoint's tasks the ledger holds in each status."""
    _endpoint_row(db, endpoint_id)
    rows = db.execute(select(TaskRow.status, func.count()).where(
        TaskRow.endpoint_id == endpoint_id).group_by(TaskRow.status))
    counts = dict.fromkeys(("waiting", "success", "failed", "cancelled"), 0)
    counts.update({status: int(n) for status, n in rows})
    return counts


def list_group_tasks(db: Session, task_group_id: str,
                     principal: Principal = ANONYMOUS) -> list[TaskOut]:
    """Every task the ledger knows in a task group (of those ``principal`` may see)."""
    rows = db.scalars(select(TaskRow).where(TaskRow.task_group_id == task_group_id)
                      .order_by(TaskRow.submitted))
    return [_task_out(r) for r in rows if _may_see_task(principal, r)]


def _may_see_task(principal: Principal, row: TaskRow) -> bool:
    """A task is its submitter's (and its endpoint's agent's) to see."""
    return principal.admin or row.user == principal.name or row.endpoint_id == principal.endpoint_id


#: Whose each of some tasks is (``task_ids``: a list, expanded into the IN clause).
_OWNERS = (select(TaskRow.task_id, TaskRow.user, TaskRow.task_group_id, TaskRow.endpoint_id)
           .where(TaskRow.task_id.in_(bindparam("task_ids", expanding=True))))

#: The columns of a result's row (_result_row) a later result may not change.
_KEPT_ON_RESULT = ("task_id", "submitted")
_TASKS = cast(Table, TaskRow.__table__)
#: A row of the tasks table with every column at its (scalar) default: the upserts below
#: name every column, so the database is given what SQLAlchemy would otherwise fill in.
_BLANK_ROW: dict[str, Any] = {column.name: getattr(column.default, "arg", None)
                              for column in _TASKS.columns}
#: The columns a manifest gives each of its tasks' rows; _WAITING_ROW has the rest.
_MANIFEST_COLUMNS = frozenset({"task_id", "task_group_id", "endpoint_id", "user", "submitted"})
_WAITING_ROW: dict[str, Any] = {**_BLANK_ROW, "status": "waiting"}


def _constant(value: str | None) -> ColumnElement[Any]:
    """``value`` written into a statement: NULL, or a string literal (our own constants)."""
    if value is None:
        return null()
    return literal_column("'" + value.replace("'", "''") + "'")


def _upsert(db: Session, statement: Callable[[Dialect], Any], rows: list[dict[str, Any]]) -> int:
    """Run ``statement`` (an upsert naming every column) over ``rows`` with the driver's own
    executemany; how many rows it inserted or updated, -1 when the driver cannot count them.

    The ledger's upserts on the tasks table are one-row statements run with executemany:
    compiled once per dialect (functools.cache), never near a database's bound-variable
    limit however many rows come. Handed to the driver as SQL, the rows skip SQLAlchemy's
    per-row work (defaults, bind processing), which took more time than SQLite's own: the
    ledger's writes for batches of 500 tasks (manifest, owners, results, commit) took 65
    µs a task through SQLAlchemy, 33 this way.

    Callers give the rows in task id order: registries sharing a database then lock the
    rows two of them write in one order, and PostgreSQL never has to abort one of them to
    break a deadlock (taking the rows in opposite orders, each would wait for the other).
    """
    if not rows:
        return 0
    connection = db.connection()
    dialect_class: object = type(connection.dialect)
    written = connection.exec_driver_sql(_driver_sql(dialect_class, statement), rows).rowcount
    return written if connection.dialect.supports_sane_multi_rowcount else -1


@functools.cache
def _driver_sql(dialect_class: object, statement: Callable[[Dialect], Any]) -> str:
    """``statement`` compiled for a dialect of ``dialect_class``, its parameters named (the
    rows are dicts)."""
    make = cast(Callable[..., Dialect], dialect_class)
    dialect = make()
    if dialect.positional:  # SQLite's qmark; its driver takes :name as well
        dialect = make(paramstyle="named")
    return str(statement(dialect).compile(dialect=dialect))


def _insert(dialect: Dialect, table: Table = _TASKS) -> Any:
    return (postgresql.insert if dialect.name == "postgresql" else sqlite.insert)(table)


def _manifest_upsert(dialect: Dialect) -> Any:
    """Tasks a manifest names, as waiting; a row another registry recorded for another user
    or endpoint since task_owners looked stays as it is.

    Only what a manifest says is bound; the other columns are written as constants. The
    driver binds each parameter of each row (a manifest of 500 tasks, 19 columns: 9,500),
    and that binding took a third of SQLite's time for the statement: 35 → 23 µs a task.
    """
    new = _insert(dialect).values({
        column.name: bindparam(column.name) if column.name in _MANIFEST_COLUMNS
        else _constant(_WAITING_ROW[column.name]) for column in _TASKS.columns})
    return new.on_conflict_do_update(
        index_elements=["task_id"], set_={"submitted": new.excluded.submitted},
        where=(_TASKS.c.user == new.excluded.user)
        & (_TASKS.c.endpoint_id == new.excluded.endpoint_id))


def _results_upsert(dialect: Dialect) -> Any:
    """Finished tasks: only a waiting row takes one (the first result wins)."""
    new = _insert(dialect)
    return new.on_conflict_do_update(
        index_elements=["task_id"],
        set_={column.name: new.excluded[column.name] for column in _TASKS.columns
              if column.name not in _KEPT_ON_RESULT},
        where=_TASKS.c.status == literal_column("'waiting'"))


def _result_row(result: ResultMessage, size_limit: int | None, recorded: float,
                dropped_size: int | None = None) -> dict[str, Any]:
    value = result.payload if result.error is None else None
    size = len(value or b"") if dropped_size is None else dropped_size
    note = ""
    if value is not None and (dropped_size is not None
                              or (size_limit is not None and size > size_limit)):
        cap = "what" if size_limit is None else f"the {size_limit:,} bytes"
        note = (f"the result ({size:,} bytes) is larger than {cap} this registry's ledger "
                "keeps; it was delivered to the submitter's result queue only")
        value = None
    return {
        "task_id": result.task_id, "task_group_id": result.task_group_id,
        "endpoint_id": result.endpoint_id, "function_id": result.function_id,
        "user": result.user, "on_behalf_of": result.on_behalf_of, "status": result.state,
        "submitted": None, "received": result.timings.received,
        "started": result.timings.started, "finished": result.timings.finished,
        "worker": result.worker, "content_type": result.content_type, "result": value,
        "error_json": result.error.model_dump_json() if result.error else None,
        "stdout": result.stdout, "stderr": result.stderr, "recorded": recorded,
        "result_note": note}


def _endpoint_row(db: Session, endpoint_id: str) -> EndpointRow:
    row = db.get(EndpointRow, endpoint_id)
    if row is None:
        raise NotFound(f"no endpoint {endpoint_id} is registered")
    return row


def _apply_policy(row: EndpointRow, new: EndpointPolicy) -> None:
    row.visibility, row.allowed_users, row.allowed_groups = (
        new.visibility, new.allowed_users, new.allowed_groups)
    row.allowed_functions, row.allowed_serializers = new.allowed_functions, new.allowed_serializers


def _function_out(row: FunctionRow) -> FunctionOut:
    return FunctionOut(
        function_id=row.function_id, name=row.name, content_hash=row.content_hash,
        content_type=row.content_type, payload_b64=base64.b64encode(row.payload).decode(),
        source=row.source, python_version=row.python_version, serializer=row.serializer,
        owner=row.owner, created=row.created,
        sharing=FunctionSharing(sharing=row.sharing,  # type: ignore[arg-type]
                                shared_groups=row.shared_groups or []))


def _endpoint_out(row: EndpointRow) -> EndpointOut:
    return EndpointOut(endpoint_id=row.endpoint_id, name=row.name, owner=row.owner,
                       description=row.description, created=row.created,
                       policy=EndpointPolicy(
                           visibility=row.visibility,  # type: ignore[arg-type]
                           allowed_users=row.allowed_users or [],
                           allowed_groups=row.allowed_groups or [],
                           allowed_functions=row.allowed_functions,
                           allowed_serializers=row.allowed_serializers))


def _task_out(row: TaskRow) -> TaskOut:
    error = ErrorInfo.model_validate_json(row.error_json) if row.error_json else None
    return TaskOut(
        task_id=row.task_id, task_group_id=row.task_group_id, endpoint_id=row.endpoint_id,
        function_id=row.function_id, user=row.user, on_behalf_of=row.on_behalf_of or "",
        status=row.status,  # type: ignore[arg-type]
        submitted=row.submitted,
        timings=Timings(received=row.received, started=row.started, finished=row.finished),
        worker=row.worker, content_type=row.content_type,
        payload_b64=base64.b64encode(row.result).decode() if row.result else "",
        error=error, stdout=row.stdout or "", stderr=row.stderr or "",
        history=_history(row, error), result_note=row.result_note or "")


def _history(row: TaskRow, error: ErrorInfo | None) -> list[TaskEvent]:
    """The states a task passed through, from the times the ledger holds."""
    final = ("dead-lettered" if error is not None and error.type == "TaskDeadLettered"
             else row.status)
    steps = [("waiting", row.submitted, ""), ("received", row.received, ""),
             ("running", row.started, ""),
             (final, row.finished or row.recorded, error.message if error else "")]
    return [TaskEvent(state=state, at=at, detail=detail)  # type: ignore[arg-type]
            for state, at, detail in steps if at is not None]


def _unknown_task(task_id: str) -> TaskOut:
    return TaskOut(task_id=task_id, task_group_id="", endpoint_id="", function_id="", user="",
                   status="unknown")
