"""The messages between root's agent and a user's processes, as typed models and JSON.

Whatever a user's process sends back is read by root: it must never be unpickled (a pickle
can run code), so everything crosses as JSON that pydantic validates field by field; bytes
travel as base64.

Root and a user's htex engine process (``gc_agent.multiuser.remote`` and ``.user_engine``)
talk JSON lines, one message a line, each told apart by its ``op``::

    root -> user's engine (Request)          user's engine -> root (Report)
    start          name, config              outcome        outcome
    submit         job                       cancelled      task_id, result
    cancel         task_id                   taken          task_ids
    take_waiting                             status         status
    shutdown                                 start_failed   reason
                                             refused        problem

A line becomes a model only in :func:`decode_request` or :func:`decode_report`, and a model
a line only in :func:`encode_message`. A worker process (``gc_agent.engines.worker``) sends a
bare outcome: :func:`outcome_to_wire` and :func:`outcome_from_wire`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, RootModel, TypeAdapter, ValidationError
from pydantic_core import ErrorDetails

from gc_agent.config import HtexEngineConfig
from gc_agent.engines.base import CancelResult
from gc_agent.execution import Job, Outcome
from gc_core.errors import ProtocolError

__all__ = ["CancelRequest", "CancelledReport", "OutcomeReport", "RefusedReport", "Report", "Request",
           "ShutdownRequest", "StartFailedReport", "StartRequest", "StatusReport", "SubmitRequest",
           "TakeWaitingRequest", "TakenReport", "decode_report", "decode_request", "encode_message",
           "outcome_from_wire", "outcome_to_wire"]

#: Longest problem a ProtocolError states, in characters (it may quote what the sender sent).
MAX_PROBLEM_TEXT = 300

_T = TypeVar("_T")


class _Message(BaseModel):
    """One message of the channel; a job's or an outcome's bytes are base64 in its JSON."""

    # extra="forbid" reaches into the job and the outcome too: a field nobody expects is refused.
    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_bytes="base64",
                              val_json_bytes="base64")


# -- root -> a user's engine -------------------------------------------------------------


class StartRequest(_Message):
    """Root's first message: run an htex engine with ``config``, its files under ``name``."""

    op: Literal["start"] = "start"
    name: str
    config: HtexEngineConfig


class SubmitRequest(_Message):
    """Run ``job``; its outcome comes back in an ``OutcomeReport``."""

    op: Literal["submit"] = "submit"
    job: Job


class CancelRequest(_Message):
    """Cancel a task; answered with a ``CancelledReport``."""

    op: Literal["cancel"] = "cancel"
    task_id: str


class TakeWaitingRequest(_Message):
    """Hand back the tasks that have not started; answered with a ``TakenReport``."""

    op: Literal["take_waiting"] = "take_waiting"


class ShutdownRequest(_Message):
    """Stop the engine and exit."""

    op: Literal["shutdown"] = "shutdown"


# -- a user's engine -> root -------------------------------------------------------------


class OutcomeReport(_Message):
    """What came of a task root submitted."""

    op: Literal["outcome"] = "outcome"
    outcome: Outcome


class CancelledReport(_Message):
    """What cancelling ``task_id`` did."""

    op: Literal["cancelled"] = "cancelled"
    task_id: str
    result: CancelResult


class TakenReport(_Message):
    """The tasks taken back because they had not started."""

    op: Literal["taken"] = "taken"
    task_ids: list[str]


class StatusReport(_Message):
    """The engine's status for root's heartbeat (blocks, managers, workers), every few seconds."""

    op: Literal["status"] = "status"
    status: dict[str, Any]


class StartFailedReport(_Message):
    """The engine did not start, or root's first message was no good start; the process exits."""

    op: Literal["start_failed"] = "start_failed"
    reason: str


class RefusedReport(_Message):
    """A request the engine could not decode, and why; the engine carries on."""

    op: Literal["refused"] = "refused"
    problem: str


#: What root sends a user's engine process.
Request = Annotated[StartRequest | SubmitRequest | CancelRequest | TakeWaitingRequest
                    | ShutdownRequest, Field(discriminator="op")]
#: What a user's engine process sends root.
Report = Annotated[OutcomeReport | CancelledReport | TakenReport | StatusReport
                   | StartFailedReport | RefusedReport, Field(discriminator="op")]

_REQUEST: TypeAdapter[Request] = TypeAdapter(Request)
_REPORT: TypeAdapter[Report] = TypeAdapter(Report)


def encode_message(message: Request | Report) -> bytes:
    """``message`` as one line of JSON (JSON escapes any newline inside a string)."""
    return message.model_dump_json().encode() + b"\n"


def decode_request(line: bytes) -> Request:
    """The request in a line from root.

    Raises:
        ProtocolError: no request: not JSON, an unknown op, a missing or malformed field.
    """
    return _decode(_REQUEST, line)


def decode_report(line: bytes) -> Report:
    """The report in a line from a user's engine.

    Raises:
        ProtocolError: no report: not JSON, an unknown op, a missing or malformed field.
    """
    return _decode(_REPORT, line)


def _decode(adapter: TypeAdapter[_T], line: bytes) -> _T:
    """One line as one of the models ``adapter`` tells apart by op."""
    try:
        # jiter bounds nesting (deep JSON is an error, never a RecursionError)
        return adapter.validate_json(line)
    except ValidationError as exc:
        raise ProtocolError(_problem(exc), raw=line) from exc


def _problem(exc: ValidationError) -> str:
    """What is wrong with a message, on one line: its first problem and how many more."""
    errors = exc.errors(include_url=False, include_input=False)
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    text = _describe(errors[0]) + more
    return text if len(text) <= MAX_PROBLEM_TEXT else text[:MAX_PROBLEM_TEXT] + "…"


def _describe(error: ErrorDetails) -> str:
    """One pydantic error as ``unknown op ...`` or ``malformed <op> message: <field>: <what>``."""
    context = error.get("ctx") or {}
    if error["type"] == "union_tag_invalid":
        return f"unknown op {str(context['tag'])[:80]!r}; expected one of {context['expected_tags']}"
    if error["type"] == "union_tag_not_found":
        return "no op: every message names its op"
    if not error["loc"]:
        return error["msg"]  # not JSON, or not an object
    op, *where = error["loc"]  # the op names the model that was tried
    field = ".".join(str(part) for part in where)
    return f"malformed {op} message: {field + ': ' if field else ''}{error['msg']}"


# -- a worker's outcome ------------------------------------------------------------------


class _WorkerOutcome(RootModel[Outcome]):
    """An outcome alone, as a worker process answers a job."""

    model_config = ConfigDict(frozen=True, title="Outcome", ser_json_bytes="base64",
                              val_json_bytes="base64")


def outcome_to_wire(outcome: Outcome) -> bytes:
    """An outcome as a JSON document."""
    return _WorkerOutcome(outcome).model_dump_json().encode()


def outcome_from_wire(data: bytes) -> Outcome:
    """An outcome from a worker process, parsed and checked in one pass (pydantic's JSON
    parser: 4.5 µs an outcome, 11 through ``json.loads`` first; it bounds nesting too).

    Raises:
        ValueError: not a well-formed outcome (a pydantic ``ValidationError``).
    """
    return _WorkerOutcome.model_validate_json(data).root
