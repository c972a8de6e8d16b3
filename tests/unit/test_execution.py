"""run_job: load the function and arguments, call, serialize; every failure is an Outcome."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import cloudpickle
import pytest

from gc_agent.execution import FunctionCache, Job, run_job
from gc_client.tasks import make_task
from gc_core.serialize import CLOUDPICKLE, JSON, PYTHON_VERSION, Serializer
from gc_core.task_context import current_resource_spec

MAJOR, MINOR = (int(part) for part in PYTHON_VERSION.split(".")[:2])
OTHER_PYTHON = f"{MAJOR}.{MINOR + 1}.0"


def a_job(function: Callable[..., Any], *args: Any, serializer: Serializer = CLOUDPICKLE,
          function_id: str = "fn-1", **kwargs: Any) -> Job:
    """A job as the agent builds it from a client's task and the registered function."""
    task = make_task(endpoint_id="ep-1", function_id=function_id, user="alice",
                     task_group_id="group-1", serializer=serializer, args=args, kwargs=kwargs)
    return Job(task_id=task.task_id, function_id=function_id,
               function_payload=cloudpickle.dumps(function), function_python=PYTHON_VERSION,
               content_type=task.content_type, payload=task.payload,
               sender_python=task.sender_python, sender_serializer=task.sender_serializer)


def test_a_cloudpickle_job_succeeds_and_returns_its_value_pickled() -> None:
    def power(base: int, exponent: int = 2) -> dict[str, int]:
        return {"value": base ** exponent}

    job = a_job(power, 3, exponent=4)

    outcome = run_job(job, {})

    assert outcome.state == "success", outcome.error
    assert outcome.task_id == job.task_id
    assert outcome.error is None
    assert outcome.content_type == CLOUDPICKLE.content_type
    assert CLOUDPICKLE.loads(outcome.payload) == {"value": 81}
    assert outcome.started is not None and outcome.finished is not None
    assert outcome.started <= outcome.finished
    assert ":" in outcome.worker
    assert not outcome.lost


def test_a_json_job_succeeds_and_returns_its_value_as_json() -> None:
    def concat(a: str, b: str, sep: str = "-") -> list[str]:
        return [a + sep + b]

    outcome = run_job(a_job(concat, "x", "y", serializer=JSON, sep="+"), {})

    assert outcome.state == "success", outcome.error
    assert outcome.content_type == "application/json"
    assert JSON.loads(outcome.payload) == ["x+y"]


def test_a_function_that_raises_gives_a_failed_outcome_with_its_type_and_message() -> None:
    def divide(a: int, b: int) -> float:
        return a / b

    outcome = run_job(a_job(divide, 1, 0), {})

    assert outcome.state == "failed"
    assert outcome.error is not None
    assert outcome.error.type == "ZeroDivisionError"
    assert outcome.error.message == "division by zero"
    assert outcome.payload == b""
    assert outcome.content_type == "application/json"  # the agent labels results by it


def test_the_traceback_of_a_failure_shows_the_users_frames_but_not_run_jobs() -> None:
    def inner_helper() -> None:
        raise KeyError("missing")

    def user_function() -> None:
        inner_helper()

    outcome = run_job(a_job(user_function), {})

    assert outcome.error is not None
    traceback = outcome.error.traceback
    assert traceback.startswith("Traceback (most recent call last):")
    assert "in user_function" in traceback
    assert "in inner_helper" in traceback
    assert "KeyError: 'missing'" in traceback
    assert "run_job" not in traceback
    assert "execution.py" not in traceback


def test_a_function_that_calls_sys_exit_gives_a_failed_outcome() -> None:
    def leave() -> None:
        raise SystemExit(3)

    outcome = run_job(a_job(leave), {})

    assert outcome.state == "failed"
    assert outcome.error is not None
    assert outcome.error.type == "SystemExit"


def test_an_exception_whose_str_fails_still_gives_a_failed_outcome() -> None:
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no str for you")

    def fail() -> None:
        raise Unprintable()

    outcome = run_job(a_job(fail), {})

    assert outcome.state == "failed"
    assert outcome.error is not None
    assert outcome.error.type == "Unprintable"


@pytest.mark.parametrize("body", [b"[1, 2]", b'{"args": {"a": 1}}', b'{"kwargs": [1]}', b'"text"'])
def test_a_json_body_of_the_wrong_shape_gives_a_serialization_error(body: bytes) -> None:
    job = replace(a_job(lambda: None, serializer=JSON), payload=body)

    outcome = run_job(job, {})

    assert outcome.state == "failed"
    assert outcome.error is not None
    assert outcome.error.type == "SerializationError"
    assert '{"args": [...], "kwargs": {...}}' in outcome.error.message
    assert outcome.error.traceback == ""


def test_a_json_body_that_is_not_json_gives_a_serialization_error() -> None:
    job = replace(a_job(lambda: None, serializer=JSON), payload=b"{nope")

    outcome = run_job(job, {})

    assert outcome.error is not None
    assert outcome.error.type == "SerializationError"
    assert "json" in outcome.error.message


def test_a_cloudpickle_body_that_is_not_a_pair_gives_a_serialization_error() -> None:
    job = replace(a_job(lambda: None), payload=CLOUDPICKLE.dumps([1, 2, 3]))

    outcome = run_job(job, {})

    assert outcome.error is not None
    assert outcome.error.type == "SerializationError"
    assert "(args, kwargs)" in outcome.error.message


def test_undecodable_arguments_from_another_cloudpickle_give_a_version_mismatch_naming_both() -> None:
    job = replace(a_job(lambda: None), payload=b"\x80\x05garbage",
                  sender_serializer="cloudpickle 0.9.9", sender_python="3.6.15")

    outcome = run_job(job, {})

    assert outcome.state == "failed"
    assert outcome.error is not None
    assert outcome.error.type == "VersionMismatch"
    assert "cloudpickle 0.9.9 on Python 3.6.15" in outcome.error.message
    assert f"{CLOUDPICKLE.label} on Python {PYTHON_VERSION}" in outcome.error.message


def test_undecodable_arguments_from_the_same_cloudpickle_give_a_serialization_error() -> None:
    job = replace(a_job(lambda: None), payload=b"\x80\x05garbage")

    outcome = run_job(job, {})

    assert outcome.error is not None
    assert outcome.error.type == "SerializationError"
    assert "cannot decode the task's arguments" in outcome.error.message


def test_a_function_that_does_not_load_from_another_python_gives_a_version_mismatch() -> None:
    job = replace(a_job(lambda: None), function_payload=b"not a pickle",
                  function_python=OTHER_PYTHON)

    outcome = run_job(job, {})

    assert outcome.state == "failed"
    assert outcome.error is not None
    assert outcome.error.type == "VersionMismatch"
    assert OTHER_PYTHON in outcome.error.message
    assert PYTHON_VERSION in outcome.error.message
    assert "fn-1" in outcome.error.message


def test_a_function_that_does_not_load_on_the_same_python_gives_a_serialization_error() -> None:
    job = replace(a_job(lambda: None), function_payload=b"not a pickle")

    outcome = run_job(job, {})

    assert outcome.error is not None
    assert outcome.error.type == "SerializationError"
    assert "cannot load function fn-1" in outcome.error.message


def test_a_function_payload_that_is_not_callable_gives_a_serialization_error() -> None:
    job = replace(a_job(lambda: None), function_payload=cloudpickle.dumps(42))
    cache: FunctionCache = {}

    outcome = run_job(job, cache)

    assert outcome.error is not None
    assert outcome.error.type == "SerializationError"
    assert "not a callable" in outcome.error.message
    assert cache == {}


def test_a_return_value_json_cannot_carry_gives_a_failed_outcome() -> None:
    def make_set() -> set[int]:
        return {1, 2}

    outcome = run_job(a_job(make_set, serializer=JSON), {})

    assert outcome.state == "failed"
    assert outcome.error is not None
    assert outcome.error.type == "ResultNotSerializable"
    assert "the result of task" in outcome.error.message and "a set" in outcome.error.message
    assert "json" in outcome.error.message and "not JSON serializable" in outcome.error.message
    assert outcome.payload == b""


def test_a_loaded_function_is_cached_and_not_loaded_again() -> None:
    def triple(x: int) -> int:
        return 3 * x

    cache: FunctionCache = {}
    first = run_job(a_job(triple, 2), cache)
    cached = cache["fn-1"]

    # A second job for the same function id whose payload would not even load.
    second = run_job(replace(a_job(triple, 5), function_payload=b"not a pickle"), cache)

    assert first.state == "success" and second.state == "success", second.error
    assert CLOUDPICKLE.loads(second.payload) == 15
    assert cache["fn-1"] is cached
    assert list(cache) == ["fn-1"]


def test_a_function_already_in_the_cache_is_used_instead_of_the_payload() -> None:
    def from_payload() -> str:
        return "payload"

    def already_loaded() -> str:
        return "cache"

    cache: FunctionCache = {"fn-1": already_loaded}

    outcome = run_job(a_job(from_payload), cache)

    assert CLOUDPICKLE.loads(outcome.payload) == "cache"
    assert cache["fn-1"] is already_loaded


def test_a_value_that_cannot_be_pickled_fails_saying_it_was_the_result_and_what_to_do() -> None:
    def make_lock() -> Any:
        import threading

        print("made a lock")
        return threading.Lock()

    outcome = run_job(a_job(make_lock), {})

    assert outcome.state == "failed" and outcome.error is not None
    assert outcome.error.type == "ResultNotSerializable"
    message = outcome.error.message
    assert f"the result of task {outcome.task_id}" in message and "_thread.lock" in message
    assert "cloudpickle" in message and "cannot pickle '_thread.lock' object" in message
    assert "return plain data" in message and "path" in message
    assert outcome.error.traceback == ""  # a failure of the fabric's, not a raise of the user's
    assert outcome.stdout == "made a lock\n"


def test_a_job_sees_its_resource_specification_while_it_runs_and_not_after() -> None:
    job = replace(a_job(current_resource_spec), resource_spec={"num_ranks": 4})

    outcome = run_job(job, {})

    assert outcome.state == "success", outcome.error
    assert CLOUDPICKLE.loads(outcome.payload) == {"num_ranks": 4}
    assert current_resource_spec() == {}


def test_a_job_and_its_outcome_cross_a_pickle_whole() -> None:
    # Jobs go to worker processes and outcomes come back pickled: every field, set or not.
    job = replace(a_job(divmod, 7, 2), output_limit=99, resource_spec={"num_nodes": 2},
                  identity="alice@example.org", user_options={"queue": "debug"})
    outcome = run_job(job, {})
    failed = run_job(a_job(divmod, 7, 0), {})

    for value in (job, outcome, failed, replace(outcome, lost=True, stdout="o", stderr="e")):
        assert pickle.loads(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)) == value
