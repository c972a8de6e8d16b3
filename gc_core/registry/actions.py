"""A Globus Flows-style action provider: run a registered function as an *action*.

A workflow engine calls ``POST /actions/run`` with an endpoint id, a function id and JSON
arguments; the registry submits one JSON-serialized task for the caller and answers with an
action status document whose ``status`` then follows the task ledger (``ACTIVE`` while the
task waits or runs, ``SUCCEEDED`` with the JSON value in ``details.result``, ``FAILED`` with
the error in ``details.error``). The shape follows the Globus action provider interface:
introspection, run, status, cancel and release. The action id is the task id.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from gc_core.broker import BrokerSession
from gc_core.errors import (
    BrokerError,
    Forbidden,
    NotFound,
    PublishNotConfirmed,
    RegistryError,
    SerializationError,
)
from gc_core.protocol import (
    CancelCommand,
    Envelope,
    ErrorInfo,
    GroupManifest,
    TaskMessage,
    encode_event,
    encode_task,
)
from gc_core.registry import policy, store
from gc_core.registry.db import ActionRow, FunctionRow, TaskRow
from gc_core.registry.deps import Caller, Db
from gc_core.registry.identity import ANONYMOUS, Principal
from gc_core.serialize import JSON, PYTHON_VERSION
from gc_core.topology import Topology, load_topology

__all__ = ["ActionBody", "ActionRequest", "ActionStatus", "ProviderDescription",
           "action_status", "duration_seconds", "router"]

logger = logging.getLogger(__name__)

#: Seconds a run or cancel waits for the broker to connect, and then to confirm.
BROKER_TIMEOUT = 15.0
#: How long a finished action is kept when the request does not say (the spec's advice).
DEFAULT_RELEASE_AFTER = "P30D"

_NUMBER = r"(\d+(?:\.\d+)?)"
#: ISO 8601 durations (P1Y2M3W4DT5H6M7S); years and months count as 365 and 30 days.
_DURATION = re.compile(rf"\AP(?!\Z)(?:{_NUMBER}Y)?(?:{_NUMBER}M)?(?:{_NUMBER}W)?(?:{_NUMBER}D)?"
                       rf"(?:T(?=\d)(?:{_NUMBER}H)?(?:{_NUMBER}M)?(?:{_NUMBER}S)?)?\Z", re.ASCII)
_DURATION_UNITS = (365 * 86400, 30 * 86400, 7 * 86400, 86400, 3600, 60, 1)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ActionBody(_Body):
    """What to run: the ``body`` of a run request (the provider's ``input_schema``)."""

    endpoint_id: str = Field(min_length=1, max_length=64)
    function_id: str = Field(min_length=1, max_length=64)
    args: list[Any] = Field(default_factory=list, description="Positional arguments, as JSON.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments, as JSON.")


class ActionRequest(_Body):
    """``POST /actions/run``: an action request as the Globus action provider interface has it."""

    request_id: str = Field(default_factory=lambda: str(uuid.uuid4()), min_length=1,
                            max_length=200, description="Repeating a request with the same "
                            "id returns the action it started instead of starting another.")
    body: ActionBody
    label: str | None = Field(default=None, min_length=1, max_length=64)
    monitor_by: list[str] = Field(default_factory=list, max_length=100, description=(
        "Principals besides the creator who may read the action's status."))
    manage_by: list[str] = Field(default_factory=list, max_length=100, description=(
        "Principals besides the creator who may cancel and release the action."))
    release_after: str = Field(default=DEFAULT_RELEASE_AFTER, max_length=40,
                               description="ISO 8601 duration (P30D, PT12H) after completion "
                                           "when the action is forgotten.")

    @field_validator("release_after")
    @classmethod
    def _is_duration(cls, value: str) -> str:
        duration_seconds(value)
        return value


class ActionStatus(BaseModel):
    """An action's state, as every action operation answers it."""

    action_id: str
    status: Literal["ACTIVE", "INACTIVE", "SUCCEEDED", "FAILED"]
    display_status: str
    creator_id: str
    label: str | None = None
    monitor_by: list[str] = []
    manage_by: list[str] = []
    start_time: str
    completion_time: str | None = None
    release_after: str
    details: dict[str, Any] = {}


class ProviderDescription(BaseModel):
    """The introspection document a workflow engine reads before it runs anything."""

    types: list[str] = ["Action"]
    api_version: str = "1.0"
    title: str = "gc-fabric function"
    subtitle: str = "Run a registered function on a gc-fabric endpoint"
    description: str = ("Runs one registered function with JSON arguments on an endpoint "
                         "and returns its JSON value in details.result.")
    keywords: list[str] = ["compute", "function", "gc-fabric"]
    #: This registry's own bearer tokens authenticate callers, not Globus Auth.
    globus_auth_scope: str | None = None
    admin_contact: str = "the administrator of this registry"
    visible_to: list[str] = ["public"]
    runnable_by: list[str] = ["all_authenticated_users"]
    administered_by: list[str] = []
    synchronous: bool = False
    log_supported: bool = False
    maximum_deadline: str = DEFAULT_RELEASE_AFTER
    input_schema: dict[str, Any] = Field(default_factory=ActionBody.model_json_schema)


def duration_seconds(text: str) -> float:
    """Seconds in an ISO 8601 duration such as ``P30D`` or ``PT1H30M``.

    Raises:
        ValueError: ``text`` is not such a duration.
    """
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not an ISO 8601 duration such as P30D or PT1H")
    return sum(float(n) * unit for n, unit in zip(match.groups(), _DURATION_UNITS) if n)


def action_status(action: ActionRow, task: TaskRow | None) -> ActionStatus:
    """The status document of ``action``, from what the ledger knows of its task."""
    state = task.status if task is not None else "waiting"
    status: Literal["ACTIVE", "SUCCEEDED", "FAILED"] = (
        "ACTIVE" if state == "waiting" else "SUCCEEDED" if state == "success" else "FAILED")
    details: dict[str, Any] = {"task_id": action.action_id, "endpoint_id": action.endpoint_id}
    if task is not None and status != "ACTIVE":
        details.update(_outcome(task))
    display = {"ACTIVE": "Cancelling" if action.cancel_requested else "Submitted",
               "SUCCEEDED": "Succeeded"}.get(status, _failure_display(details))
    finished = _completed_at(task)
    return ActionStatus(
        action_id=action.action_id, status=status, display_status=display,
        creator_id=action.creator, label=action.label, monitor_by=action.monitor_by or [],
        manage_by=action.manage_by or [], start_time=_iso(action.created),
        completion_time=_iso(finished) if finished is not None else None,
        release_after=action.release_after, details=details)


def _completed_at(task: TaskRow | None) -> float | None:
    """When a task reached its final state (None while it waits)."""
    if task is None or task.status == "waiting":
        return None
    return task.finished or task.recorded or task.submitted


def _outcome(task: TaskRow) -> dict[str, Any]:
    """The result or error of a finished task, as JSON details."""
    found: dict[str, Any] = {"state": task.status}
    if task.status == "success":
        if task.result_note:
            found["note"] = task.result_note
        elif task.content_type == JSON.content_type:
            found["result"] = json.loads(task.result or b"null")
        else:  # not ours to decode: a task we did not send as JSON
            found["note"] = f"the result is {task.content_type}, not JSON"
    elif task.error_json:
        found["error"] = ErrorInfo.model_validate_json(task.error_json).model_dump()
    for stream in ("stdout", "stderr"):
        if getattr(task, stream):
            found[stream] = getattr(task, stream)
    return found


def _failure_display(details: dict[str, Any]) -> str:
    error_type = details.get("error", {}).get("type", "")
    if error_type == "TaskDeadLettered":
        return "Dead-lettered"
    return "Cancelled" if details.get("state") == "cancelled" else "Failed"


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat()


class ActionPublisher:
    """The registry's own broker connection for actions, opened on first use."""

    def __init__(self, broker_url: str, topology: Topology) -> None:
        self.topology = topology
        self._broker_url = broker_url
        self._session: BrokerSession | None = None
        self._lock = threading.Lock()

    def send(self, exchange: str, routing_key: str, envelope: Envelope, *,
             mandatory: bool) -> str | None:
        """Publish and wait for the broker: None once confirmed, else why it was refused.

        Raises:
            BrokerError: the broker cannot be reached or did not answer in time.
        """
        answer: Future[str | None] = Future()
        self._connected().publish(exchange, routing_key, envelope,
                                  on_confirm=answer.set_result, mandatory=mandatory)
        try:
            return answer.result(BROKER_TIMEOUT)
        except FutureTimeout:
            raise PublishNotConfirmed(
                f"the broker did not confirm within {BROKER_TIMEOUT:.0f}s") from None

    def close(self) -> None:
        with self._lock:
            if self._session is not None:
                self._session.close()
                self._session = None

    def _connected(self) -> BrokerSession:
        with self._lock:
            if self._session is None:
                # user_id: agents on a secured broker trust the registry's own account to
                # submit for its callers, and the broker proves the message is ours.
                session = BrokerSession(self._broker_url, name="gc-registry:actions",
                                        topology=self.topology, stamp_user_id=True)
                session.start(timeout=BROKER_TIMEOUT)
                self._session = session
            return self._session


@asynccontextmanager
async def _publisher_lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.action_publisher = ActionPublisher(app.state.settings.broker_url, load_topology())
    yield
    await asyncio.to_thread(app.state.action_publisher.close)


def _publisher(request: Request) -> ActionPublisher:
    publisher: ActionPublisher = request.app.state.action_publisher
    return publisher


Publisher = Annotated[ActionPublisher, Depends(_publisher)]

router = APIRouter(prefix="/actions", tags=["actions"], lifespan=_publisher_lifespan,
                   responses={409: {"description": "The action's state does not allow this."}})


@router.get("", response_model=ProviderDescription)
def introspect() -> ProviderDescription:
    """Describe this action provider (no token needed)."""
    return ProviderDescription()


@router.post("/run", response_model=ActionStatus, status_code=202)
def run(request: ActionRequest, response: Response, session: Db, caller: Caller,
        publisher: Publisher) -> ActionStatus:
    """Submit the function as one JSON task for the caller; a repeated request_id returns
    the action it started (200) instead of starting another."""
    digest = hashlib.sha256(request.model_dump_json().encode()).hexdigest()
    earlier = _earlier_request(session, caller, request.request_id, digest)
    if earlier is not None:
        response.status_code = 200
        return earlier
    _check_may_run(session, caller, request.body)
    action_id = str(uuid.uuid4())
    task = _task_message(action_id, caller, request.body)
    _publish(publisher, publisher.topology.exchange("tasks"),
             publisher.topology.routing_key("task", endpoint_id=request.body.endpoint_id),
             encode_task(task), mandatory=True, what=f"the task of action {action_id}")
    row = _record(session, request, digest, task)
    try:
        session.commit()
    except IntegrityError as exc:  # the same request_id, run twice at once: one action is kept
        session.rollback()
        earlier = _earlier_request(session, caller, request.request_id, digest)
        if earlier is None:
            raise RegistryError(f"could not record action {action_id}: {exc.orig}",
                                status=409) from exc
        response.status_code = 200
        return earlier
    logger.info("action %s: task for %s on endpoint %s", action_id, caller.name, task.endpoint_id)
    return action_status(row, session.get(TaskRow, action_id))


@router.get("/{action_id}/status", response_model=ActionStatus)
def status(action_id: str, session: Db, caller: Caller) -> ActionStatus:
    """The action's status, following its task in the ledger."""
    return _visible(session, caller, action_id)[1]


@router.post("/{action_id}/cancel", response_model=ActionStatus)
def cancel(action_id: str, session: Db, caller: Caller, publisher: Publisher) -> ActionStatus:
    """Ask the endpoint to cancel the action's task, queued or running; a finished action
    keeps its result and is answered as it is."""
    action, current = _visible(session, caller, action_id, manage=True)
    if current.status != "ACTIVE":
        return current
    command = CancelCommand(task_ids=[action_id], user=action.creator, sent=time.time())
    _publish(publisher, publisher.topology.exchange("commands"),
             publisher.topology.routing_key("command", endpoint_id=action.endpoint_id),
             encode_event(command), mandatory=False, what=f"the cancel of action {action_id}")
    action.cancel_requested = command.sent
    session.commit()
    logger.info("action %s: cancel sent to endpoint %s", action_id, action.endpoint_id)
    return action_status(action, session.get(TaskRow, action_id))


@router.post("/{action_id}/release", response_model=ActionStatus)
def release(action_id: str, session: Db, caller: Caller) -> ActionStatus:
    """Forget a finished action; its final status is the answer."""
    action, current = _visible(session, caller, action_id, manage=True)
    if current.status == "ACTIVE":
        raise RegistryError(f"action {action_id} is still active; cancel it, or wait until "
                            "it finishes, before releasing it", status=409)
    action.released = time.time()
    session.commit()
    return current


def _earlier_request(db: Session, caller: Principal, request_id: str,
                     digest: str) -> ActionStatus | None:
    """The action an earlier request with this id started, if any (its content must match)."""
    action = db.scalars(select(ActionRow).where(ActionRow.creator == caller.name,
                                                ActionRow.request_id == request_id)).first()
    if action is None:
        return None
    if action.released is not None:
        raise RegistryError(f"request_id {request_id!r} started action {action.action_id}, "
                            "which has been released; use a new request_id", status=409)
    if action.request_hash != digest:
        raise RegistryError(f"request_id {request_id!r} was used for a different request "
                            f"(action {action.action_id}); use a new request_id", status=409)
    return action_status(action, db.get(TaskRow, action.action_id))


def _record(db: Session, request: ActionRequest, digest: str, task: TaskMessage) -> ActionRow:
    """Add the action and its task (as waiting) to the session."""
    row = ActionRow(action_id=task.task_id, request_id=request.request_id, request_hash=digest,
                    creator=task.user, endpoint_id=task.endpoint_id, label=request.label,
                    monitor_by=request.monitor_by, manage_by=request.manage_by,
                    release_after=request.release_after, created=time.time())
    db.add(row)
    # The ledger learns of the task here rather than from a published manifest: the
    # status is ACTIVE from the first answer on, and a result that wins the race is kept.
    store.record_manifest(db, GroupManifest(
        task_group_id=task.task_group_id, endpoint_id=task.endpoint_id, user=task.user,
        task_ids=[task.task_id], submitted=row.created))
    return row


def _check_may_run(db: Session, caller: Principal, body: ActionBody) -> None:
    """Refuse what the endpoint's and the function's policies do not allow, saying why: the
    same decision the agents' re-check makes (``policy.task_refusal``)."""
    if caller.is_agent:
        raise Forbidden("an endpoint's agent token cannot run actions; use a user's or a "
                        "service account's token")
    endpoint = policy.endpoint_or_404(db, caller, body.endpoint_id)
    if db.get(FunctionRow, body.function_id) is None:
        raise NotFound(f"no function {body.function_id} is registered")
    if caller is ANONYMOUS:  # an open registry: identities are claimed, so no policy holds
        return
    refusal = policy.task_refusal(db, endpoint, caller.name, body.function_id,
                                  JSON.content_type)
    if refusal is not None:
        raise Forbidden(refusal)


def _task_message(action_id: str, caller: Principal, body: ActionBody) -> TaskMessage:
    try:
        payload = JSON.dumps({"args": body.args, "kwargs": body.kwargs})
    except SerializationError as exc:  # NaN or Infinity: Python's parser lets them through
        raise RegistryError(f"body.args and body.kwargs must be plain JSON: {exc}",
                            status=422) from exc
    return TaskMessage(task_id=action_id, task_group_id=action_id, endpoint_id=body.endpoint_id,
                       function_id=body.function_id, user=caller.name,
                       content_type=JSON.content_type, payload=payload,
                       sender_python=PYTHON_VERSION, sender_serializer=JSON.label)


def _publish(publisher: ActionPublisher, exchange: str, routing_key: str, envelope: Envelope,
             *, mandatory: bool, what: str) -> None:
    """Publish for a route, turning broker trouble into an answer that says what happened."""
    try:
        refused = publisher.send(exchange, routing_key, envelope, mandatory=mandatory)
    except BrokerError as exc:
        raise RegistryError(f"the registry could not send {what}: {exc}", status=503) from exc
    if refused is not None:
        raise RegistryError(f"the broker did not take {what} ({refused}): the endpoint has no "
                            "task queue yet; configure and start its agent with `gc-agent "
                            "start`", status=409)


def _visible(db: Session, caller: Principal, action_id: str, *,
             manage: bool = False) -> tuple[ActionRow, ActionStatus]:
    """An action ``caller`` may see (and, with ``manage``, cancel or release) and its status;
    a released one, or one finished longer ago than its release_after, is gone."""
    action = db.get(ActionRow, action_id)
    if action is None or action.released is not None or not (
            caller.admin or caller.name in {action.creator, *action.monitor_by, *action.manage_by}):
        raise _missing(action_id)
    task = db.get(TaskRow, action_id)
    completed = _completed_at(task)
    if completed is not None and completed + duration_seconds(action.release_after) < time.time():
        raise _missing(action_id)
    if manage and not (caller.admin or caller.name in {action.creator, *action.manage_by}):
        raise Forbidden(f"only {action.creator}, who ran action {action_id}, or those in its "
                        "manage_by may cancel or release it")
    return action, action_status(action, task)


def _missing(action_id: str) -> NotFound:
    return NotFound(f"no action {action_id} (it never existed, was released, or is not yours)")
