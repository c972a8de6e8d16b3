"""The action provider's pure core: durations, and status documents from ledger rows."""

from __future__ import annotations

import pytest

from gc_core.protocol import ErrorInfo
from gc_core.registry.actions import action_status, duration_seconds
from gc_core.registry.db import ActionRow, TaskRow


@pytest.mark.parametrize(("text", "seconds"), [
    ("P30D", 30 * 86400), ("PT1H30M", 5400), ("P1W", 7 * 86400), ("PT0.5S", 0.5),
    ("P1Y2M", (365 + 60) * 86400), ("P1DT1S", 86401),
])
def test_iso_durations_become_seconds(text: str, seconds: float) -> None:
    assert duration_seconds(text) == seconds


@pytest.mark.parametrize("text", ["", "P", "PT", "30D", "P1H", "P1DT", "p1d", "P-1D", "P30D\n"])
def test_what_is_not_an_iso_duration_is_refused_saying_so(text: str) -> None:
    with pytest.raises(ValueError, match="ISO 8601 duration"):
        duration_seconds(text)


def _action(**overrides: object) -> ActionRow:
    fields: dict[str, object] = {
        "action_id": "a-1", "request_id": "r", "request_hash": "h", "creator": "alice",
        "endpoint_id": "ep", "label": None, "monitor_by": [], "manage_by": [],
        "release_after": "P30D", "created": 1000.0, "cancel_requested": None, "released": None}
    return ActionRow(**{**fields, **overrides})


def _task(status: str, **overrides: object) -> TaskRow:
    fields: dict[str, object] = {
        "task_id": "a-1", "task_group_id": "a-1", "status": status,
        "content_type": "application/json", "result": None, "error_json": None,
        "result_note": "", "stdout": "", "stderr": "", "submitted": 1000.0, "finished": None,
        "recorded": None}
    return TaskRow(**{**fields, **overrides})


def test_an_action_the_ledger_has_not_finished_is_active() -> None:
    for task in (None, _task("waiting")):
        status = action_status(_action(), task)
        assert (status.status, status.display_status, status.completion_time) == (
            "ACTIVE", "Submitted", None)
    assert action_status(_action(cancel_requested=1001.0), None).display_status == "Cancelling"


def test_a_successful_task_gives_its_json_value_and_completion_time() -> None:
    status = action_status(_action(), _task("success", result=b'{"x": [1, 2]}', finished=1005.0,
                                            stdout="hello\n"))
    assert (status.status, status.display_status) == ("SUCCEEDED", "Succeeded")
    assert status.details["result"] == {"x": [1, 2]}
    assert status.details["stdout"] == "hello\n"
    assert status.completion_time == "1970-01-01T00:16:45+00:00"
    assert status.start_time == "1970-01-01T00:16:40+00:00"


def test_a_value_the_ledger_did_not_keep_is_explained_not_invented() -> None:
    status = action_status(_action(), _task("success", result_note="the result expired"))
    assert status.status == "SUCCEEDED"
    assert "result" not in status.details
    assert status.details["note"] == "the result expired"


@pytest.mark.parametrize(("state", "error_type", "display"), [
    ("failed", "ZeroDivisionError", "Failed"),
    ("cancelled", "TaskCancelled", "Cancelled"),
    ("failed", "TaskDeadLettered", "Dead-lettered"),
])
def test_a_task_that_did_not_succeed_fails_the_action_with_its_error(
        state: str, error_type: str, display: str) -> None:
    error = ErrorInfo(type=error_type, message="why", traceback="tb")
    status = action_status(_action(), _task(state, error_json=error.model_dump_json(),
                                            recorded=1002.0))
    assert (status.status, status.display_status) == ("FAILED", display)
    assert status.details["error"] == {"type": error_type, "message": "why", "traceback": "tb"}
    assert status.completion_time is not None
