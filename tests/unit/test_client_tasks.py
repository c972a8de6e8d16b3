"""The client's pure core: building task messages and turning results into values or errors."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gc_client.tasks import make_manifest, make_task, result_value
from gc_core.errors import TaskCancelled, TaskDeadLettered, TaskExecutionFailed
from gc_core.protocol import ErrorInfo, ResultMessage, decode_result, encode_task
from gc_core.serialize import CLOUDPICKLE, JSON, PYTHON_VERSION

REMOTE_TRACEBACK = ('Traceback (most recent call last):\n'
                    '  File "/home/alice/job.py", line 3, in divide\n'
                    '    return a / b\n'
                    'ZeroDivisionError: division by zero\n')


def a_result(**overrides: Any) -> ResultMessage:
    fields: dict[str, Any] = {"task_id": "task-1", "task_group_id": "group-1", "user": "alice",
                                  "state": "success", "content_type": JSON.content_type,
                                  "payload": b'{"answer":42}'}
    fields.update(overrides)
    return ResultMessage(**fields)


def test_make_task_with_json_sends_an_object_of_args_and_kwargs() -> None:
    task = make_task(endpoint_id="ep-1", function_id="fn-1", user="alice",
                     task_group_id="group-1", serializer=JSON, args=(1, "two"),
                     kwargs={"three": 3.0})

    assert json.loads(task.payload) == {"args": [1, "two"], "kwargs": {"three": 3.0}}
    assert task.content_type == "application/json"
    assert task.sender_serializer == "json 1"
    assert task.sender_python == PYTHON_VERSION


def test_make_task_with_cloudpickle_sends_the_pair_of_args_and_kwargs() -> None:
    task = make_task(endpoint_id="ep-1", function_id="fn-1", user="alice",
                     task_group_id="group-1", serializer=CLOUDPICKLE, args=(1,), kwargs={"k": 2},
                     resource_spec={"cores": 4})

    assert CLOUDPICKLE.loads(task.payload) == ((1,), {"k": 2})
    assert task.content_type == CLOUDPICKLE.content_type
    assert task.resource_spec == {"cores": 4}
    assert task.endpoint_id == "ep-1"
    assert task.function_id == "fn-1"
    assert task.user == "alice"
    assert task.task_group_id == "group-1"


def test_make_task_gives_each_task_a_fresh_id() -> None:
    def make() -> str:
        return make_task(endpoint_id="e", function_id="f", user="u", task_group_id="g",
                         serializer=JSON, args=(), kwargs={}).task_id

    assert make() != make()


def test_make_manifest_lists_the_task_ids_of_a_group() -> None:
    manifest = make_manifest(["t1", "t2"], task_group_id="group-1", endpoint_id="ep-1",
                             user="alice")

    assert manifest.task_ids == ["t1", "t2"]
    assert manifest.task_group_id == "group-1"
    assert manifest.submitted > 0


def test_result_value_decodes_a_successful_result() -> None:
    assert result_value(a_result()) == {"answer": 42}


def test_result_value_of_a_failure_raises_task_execution_failed_with_the_remote_details() -> None:
    error = ErrorInfo(type="ZeroDivisionError", message="division by zero",
                      traceback=REMOTE_TRACEBACK)

    with pytest.raises(TaskExecutionFailed) as info:
        result_value(a_result(state="failed", payload=b"", error=error))

    failure = info.value
    assert failure.task_id == "task-1"
    assert failure.remote_type == "ZeroDivisionError"
    assert failure.remote_message == "division by zero"
    assert failure.remote_traceback == REMOTE_TRACEBACK


def test_the_str_of_task_execution_failed_shows_the_remote_type_message_and_traceback() -> None:
    error = ErrorInfo(type="ZeroDivisionError", message="division by zero",
                      traceback=REMOTE_TRACEBACK)

    with pytest.raises(TaskExecutionFailed) as info:
        result_value(a_result(state="failed", payload=b"", error=error))

    text = str(info.value)
    assert "task-1" in text
    assert "ZeroDivisionError: division by zero" in text
    assert "Remote traceback:" in text
    assert 'File "/home/alice/job.py", line 3, in divide' in text


def test_result_value_of_a_dead_lettered_task_raises_task_dead_lettered() -> None:
    error = ErrorInfo(type="TaskDeadLettered", message="task task-1 was given up: reasons")

    with pytest.raises(TaskDeadLettered, match="given up") as info:
        result_value(a_result(state="failed", payload=b"", error=error))

    assert info.value.task_id == "task-1"
    assert not isinstance(info.value, TaskExecutionFailed)


def test_result_value_of_a_task_the_broker_dead_lettered_raises_task_dead_lettered() -> None:
    # Given a task message the broker gave up on after its delivery limit
    task = make_task(endpoint_id="ep-1", function_id="fn-1", user="alice",
                     task_group_id="group-1", serializer=JSON, args=(), kwargs={})
    envelope = encode_task(task)
    envelope.headers["x-death"] = [{"reason": "delivery_limit", "queue": "gc.ep.ep-1.tasks"}]

    # When it arrives on the result queue, Then the client sees a TaskDeadLettered
    with pytest.raises(TaskDeadLettered, match="delivery limit") as info:
        result_value(decode_result(envelope))

    assert info.value.task_id == task.task_id


def test_result_value_of_a_cancelled_task_raises_task_cancelled() -> None:
    error = ErrorInfo(type="TaskCancelled", message="cancelled by alice")

    with pytest.raises(TaskCancelled):
        result_value(a_result(state="cancelled", payload=b"", error=error))
