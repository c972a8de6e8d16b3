"""Jobs and outcomes as JSON-ready data, for a worker that runs as another account.

Whatever a user's process sends back is read by root: it must never be unpickled (a
pickle can run code), so outcomes cross as JSON and are validated field by field.
"""

from __future__ import annotations

import base64
from dataclasses import asdict
from typing import Any

from pydantic import TypeAdapter

from gc_agent.execution import Job, Outcome

__all__ = ["job_from_wire", "job_to_wire", "outcome_from_wire", "outcome_to_wire"]

#: Job fields that are bytes (base64 on the wire).
_BYTES_FIELDS = ("function_payload", "payload")


#: Checks an outcome from the user's process field by field (pydantic validates dataclasses).
_OUTCOME: TypeAdapter[Outcome] = TypeAdapter(Outcome)


def job_to_wire(job: Job) -> dict[str, Any]:
    """A job as JSON-ready data."""
    data = asdict(job)
    for name in _BYTES_FIELDS:
        data[name] = base64.b64encode(data[name]).decode()
    return data


def job_from_wire(data: dict[str, Any]) -> Job:
    """The job ``job_to_wire`` made (in the user's process, from root: trusted)."""
    return Job(**{**data, **{name: base64.b64decode(data[name]) for name in _BYTES_FIELDS}})


def outcome_to_wire(outcome: Outcome) -> dict[str, Any]:
    """An outcome as JSON-ready data."""
    data = asdict(outcome)
    data["payload"] = base64.b64encode(outcome.payload).decode()
    data["error"] = outcome.error.model_dump() if outcome.error else None
    return data


def outcome_from_wire(data: Any) -> Outcome:
    """An outcome from the user's process.

    Raises:
        ValueError: not a well-formed outcome.
    """
    if not isinstance(data, dict) or not isinstance(data.get("payload"), str):
        raise ValueError("an outcome must be an object with a base64 payload")
    return _OUTCOME.validate_python({**data, "payload": base64.b64decode(data["payload"],
                                                                         validate=True)})
