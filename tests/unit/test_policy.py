"""Whether an endpoint runs a task: pure checks on a decoded task message."""

from __future__ import annotations

from typing import Any

from gc_agent.policy import refusal, resource_spec_problem
from gc_core.protocol import TaskMessage
from gc_core.serialize import CLOUDPICKLE, JSON, PYTHON_VERSION

BOTH = frozenset({"cloudpickle", "json"})
MAJOR, MINOR = (int(part) for part in PYTHON_VERSION.split(".")[:2])
#: A Python whose pickled bytecode this interpreter cannot load.
OTHER_PYTHON = f"{MAJOR}.{MINOR + 1}.0"


def a_task(**overrides: Any) -> TaskMessage:
    fields: dict[str, Any] = {
        "task_id": "task-1", "task_group_id": "group-1", "endpoint_id": "ep-1", "function_id": "fn-1",
        "user": "alice", "content_type": CLOUDPICKLE.content_type, "payload": b"...",
        "sender_python": PYTHON_VERSION, "sender_serializer": CLOUDPICKLE.label}
    fields.update(overrides)
    return TaskMessage(**fields)


def test_a_valid_task_is_not_refused() -> None:
    assert refusal(a_task(), endpoint_id="ep-1", allowed_serializers=BOTH) is None


def test_a_task_addressed_to_another_endpoint_is_refused_with_policy_error() -> None:
    error = refusal(a_task(endpoint_id="ep-2"), endpoint_id="ep-1", allowed_serializers=BOTH)

    assert error is not None
    assert error.type == "PolicyError"
    assert "ep-2" in error.message
    assert "ep-1" in error.message


def test_a_serializer_left_out_of_the_allow_list_is_refused() -> None:
    error = refusal(a_task(), endpoint_id="ep-1", allowed_serializers=frozenset({"json"}))

    assert error is not None
    assert error.type == "SerializerNotAllowed"
    assert CLOUDPICKLE.content_type in error.message


def test_an_unknown_content_type_is_refused_as_unknown_serializer() -> None:
    error = refusal(a_task(content_type="application/x-yaml"), endpoint_id="ep-1",
                    allowed_serializers=BOTH)

    assert error is not None
    assert error.type == "UnknownSerializer"
    assert "application/x-yaml" in error.message


def test_a_cloudpickle_task_from_another_python_minor_is_refused_naming_both_versions() -> None:
    error = refusal(a_task(sender_python=OTHER_PYTHON), endpoint_id="ep-1",
                    allowed_serializers=BOTH)

    assert error is not None
    assert error.type == "VersionMismatch"
    assert OTHER_PYTHON in error.message
    assert PYTHON_VERSION in error.message


def test_a_cloudpickle_task_from_another_patch_release_is_not_refused() -> None:
    task = a_task(sender_python=f"{MAJOR}.{MINOR}.999")

    assert refusal(task, endpoint_id="ep-1", allowed_serializers=BOTH) is None


def test_a_json_task_from_another_python_is_not_refused() -> None:
    task = a_task(content_type=JSON.content_type, sender_python=OTHER_PYTHON,
                  sender_serializer=JSON.label)

    assert refusal(task, endpoint_id="ep-1", allowed_serializers=BOTH) is None


# -- resource specifications, on every engine --------------------------------------------


def test_a_resource_specification_with_the_engines_keys_is_accepted() -> None:
    assert resource_spec_problem({"priority": 2.5, "num_nodes": 2, "ranks_per_node": 4,
                                  "num_ranks": 8, "launcher_options": "--bind-to core"}) is None


def test_an_unknown_resource_specification_key_is_named_with_the_allowed_ones() -> None:
    problem = resource_spec_problem({"num_nodes": 1, "cores": 4})

    assert problem is not None and "'cores'" in problem
    assert "allowed: priority, num_nodes, ranks_per_node, num_ranks, launcher_options" in problem


def test_a_resource_specification_value_of_the_wrong_type_is_named() -> None:
    assert resource_spec_problem({"num_nodes": "2"}) \
        == "resource_specification 'num_nodes' must be int, got '2'"
    assert resource_spec_problem({"priority": True}) is not None
