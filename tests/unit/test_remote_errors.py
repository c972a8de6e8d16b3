"""Errors an endpoint reports come back as their own class: the table of names and the one
function that rebuilds them, tested with plain ErrorInfo values."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gc_client.tasks import error_to_exception
from gc_core import errors
from gc_core.errors import (
    REMOTE_ERRORS,
    EndpointError,
    GCError,
    PolicyError,
    ResultNotSerializable,
    ResultTooLarge,
    SerializationError,
    SerializerNotAllowed,
    TaskError,
    TaskExecutionFailed,
    TaskNotFound,
    VersionMismatch,
    WorkerError,
    WorkerLost,
    remote_error,
)
from gc_core.protocol import ErrorInfo

REPO = Path(__file__).resolve().parents[2]

#: Error types the fabric sends that are not ours to name: Parsl's, kept as text.
FOREIGN = {"InvalidResourceSpecification"}

REMOTE_TRACEBACK = ('Traceback (most recent call last):\n'
                    '  File "/home/alice/job.py", line 3, in divide\n'
                    '    return a / b\n'
                    'ZeroDivisionError: division by zero\n')


@pytest.mark.parametrize("name", sorted(REMOTE_ERRORS))
def test_every_error_in_the_table_comes_back_as_its_class_with_the_remote_fields(name: str) -> None:
    error = ErrorInfo(type=name, message=f"it broke ({name})")

    rebuilt = remote_error("task-1", error)

    assert type(rebuilt) is REMOTE_ERRORS[name]
    assert isinstance(rebuilt, GCError)
    assert rebuilt.task_id == "task-1"
    assert (rebuilt.remote_type, rebuilt.remote_message, rebuilt.remote_traceback) == \
        (name, f"it broke ({name})", "")
    assert str(rebuilt) == f"task task-1 failed remotely: {name}: it broke ({name})"


def test_each_class_in_the_table_is_named_by_its_own_name() -> None:
    for cls in set(REMOTE_ERRORS.values()):
        assert REMOTE_ERRORS[cls.__name__] is cls


def test_classes_with_constructors_of_their_own_are_rebuilt_from_the_message_as_sent() -> None:
    message = "Python version mismatch: sender has 3.8.0, this side has 3.12.3: run the same"

    rebuilt = remote_error("task-1", ErrorInfo(type="VersionMismatch", message=message))

    assert isinstance(rebuilt, VersionMismatch) and isinstance(rebuilt, SerializationError)
    assert rebuilt.args == (message,)
    assert rebuilt.remote_message == message
    assert (rebuilt.what, rebuilt.local, rebuilt.remote) == ("", "", "")  # stayed remote
    refused = remote_error("t", ErrorInfo(type="SerializerNotAllowed", message="no pickles"))
    assert isinstance(refused, SerializerNotAllowed) and refused.content_type == ""


@pytest.mark.parametrize("name, cls", [
    ("WorkerLost", WorkerLost), ("PolicyError", PolicyError), ("ResultTooLarge", ResultTooLarge),
    ("WorkerError", WorkerError), ("ResultNotSerializable", ResultNotSerializable),
    ("AgentError", EndpointError), ("EngineError", EndpointError),
    ("EngineStartFailed", EndpointError), ("WorkerStartFailed", EndpointError),
    ("ResultRefused", EndpointError), ("TaskDeadLettered", errors.TaskDeadLettered),
    ("TaskCancelled", errors.TaskCancelled), ("SerializationError", SerializationError),
])
def test_the_fabrics_own_failures_are_caught_by_class(name: str, cls: type[GCError]) -> None:
    with pytest.raises(cls) as caught:
        raise remote_error("task-7", ErrorInfo(type=name, message="why"))

    assert caught.value.remote_type == name
    assert not isinstance(caught.value, TaskExecutionFailed)


@pytest.mark.parametrize("name", ["ZeroDivisionError", "MyOwnError", "InvalidResourceSpecification"])
def test_an_unknown_type_stays_task_execution_failed_with_its_remote_type(name: str) -> None:
    rebuilt = remote_error("task-1", ErrorInfo(type=name, message="bad", traceback=REMOTE_TRACEBACK))

    assert type(rebuilt) is TaskExecutionFailed
    assert (rebuilt.task_id, rebuilt.remote_type, rebuilt.remote_message) == ("task-1", name, "bad")
    assert rebuilt.remote_traceback == REMOTE_TRACEBACK
    assert str(rebuilt).startswith(f"task task-1 failed remotely: {name}: bad\n\nRemote traceback:\n")
    assert 'File "/home/alice/job.py", line 3, in divide' in str(rebuilt)


def test_an_error_the_function_raised_stays_task_execution_failed_even_if_named_like_ours() -> None:
    # urllib3 has a ProtocolError too: raised by the user's code, it comes with a traceback
    error = ErrorInfo(type="ProtocolError", message="Connection aborted.",
                      traceback=REMOTE_TRACEBACK)

    rebuilt = remote_error("task-1", error)

    assert type(rebuilt) is TaskExecutionFailed
    assert rebuilt.remote_type == "ProtocolError"


def test_the_client_turns_result_errors_into_the_same_classes() -> None:
    lost = error_to_exception("task-1", ErrorInfo(type="WorkerLost", message="it died"))
    failed = error_to_exception("task-1", ErrorInfo(type="KeyError", message="'x'",
                                                    traceback=REMOTE_TRACEBACK))

    assert type(lost) is WorkerLost and lost.remote_message == "it died"
    assert type(failed) is TaskExecutionFailed


def test_task_not_found_is_a_task_error_naming_the_id() -> None:
    error = TaskNotFound("0b6e")

    assert isinstance(error, TaskError) and error.task_id == "0b6e"
    assert "0b6e" in str(error) and "\n" not in str(error)


def test_every_error_type_the_fabric_names_in_its_source_is_in_the_table() -> None:
    # Given every literal error type the agent and the ledger put in an ErrorInfo
    pattern = re.compile(r'(?:ErrorInfo\(\s*type=|error_info\(\s*|_refused\(outcome,\s*)"(\w+)"')
    sources = [*(REPO / "gc_agent").rglob("*.py"), REPO / "gc_core" / "protocol.py"]
    named = {name for path in sources for name in pattern.findall(path.read_text())}
    assert {"WorkerLost", "ResultTooLarge", "TaskDeadLettered"} <= named  # the scan works

    # Then each comes back as a class of ours
    assert sorted(named - set(REMOTE_ERRORS) - FOREIGN) == []


def test_every_gc_error_the_agent_reports_by_its_class_name_is_in_the_table() -> None:
    # policy.refusal, the worker's loading and the multi-user pools report type(exc).__name__
    # of these; the agent's registry fetch, of any RegistryError
    reported = [PolicyError, VersionMismatch, SerializerNotAllowed, errors.UnknownSerializer,
                SerializationError, errors.ConfigError, errors.RegistryError, errors.NotFound,
                errors.NotAuthenticated, errors.Forbidden, errors.ProtocolError]

    assert [cls.__name__ for cls in reported if REMOTE_ERRORS.get(cls.__name__) is not cls] == []
