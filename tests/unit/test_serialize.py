"""Serializer lookup, the allow-list, and JSON's error messages."""

from __future__ import annotations

import pytest

from gc_core.errors import SerializationError, SerializerNotAllowed, UnknownSerializer
from gc_core.serialize import (
    CLOUDPICKLE,
    JSON,
    PYTHON_VERSION,
    check_allowed,
    get_serializer,
    python_minor,
)


@pytest.mark.parametrize(("key", "expected"), [
    ("application/json", JSON),
    ("application/vnd.gc.cloudpickle", CLOUDPICKLE),
])
def test_get_serializer_finds_a_serializer_by_content_type(key: str, expected: object) -> None:
    assert get_serializer(key) is expected


@pytest.mark.parametrize(("key", "expected"), [("json", JSON), ("cloudpickle", CLOUDPICKLE)])
def test_get_serializer_finds_a_serializer_by_short_name(key: str, expected: object) -> None:
    assert get_serializer(key) is expected


def test_get_serializer_raises_unknown_serializer_listing_the_known_content_types() -> None:
    with pytest.raises(UnknownSerializer) as info:
        get_serializer("application/x-yaml")

    assert info.value.content_type == "application/x-yaml"
    assert isinstance(info.value, SerializationError)
    message = str(info.value)
    assert "application/x-yaml" in message
    assert "application/json" in message
    assert "application/vnd.gc.cloudpickle" in message


def test_check_allowed_accepts_a_serializer_on_the_allow_list() -> None:
    check_allowed(JSON, frozenset({"json"}))


def test_check_allowed_refuses_a_serializer_not_on_the_allow_list() -> None:
    with pytest.raises(SerializerNotAllowed) as info:
        check_allowed(CLOUDPICKLE, frozenset({"json"}))

    assert info.value.content_type == CLOUDPICKLE.content_type
    assert "not allowed" in str(info.value)
    assert "json" in str(info.value)


def test_json_round_trips_plain_data() -> None:
    value = {"args": [1, 2.5, "x", None, True], "kwargs": {"k": [1]}}

    assert JSON.loads(JSON.dumps(value)) == value


def test_cloudpickle_round_trips_a_closure() -> None:
    offset = 10

    def add(x: int) -> int:
        return x + offset

    assert CLOUDPICKLE.loads(CLOUDPICKLE.dumps(add))(5) == 15


def test_json_dumps_of_a_non_json_value_raises_serialization_error_with_advice() -> None:
    with pytest.raises(SerializationError) as info:
        JSON.dumps({1, 2, 3})

    message = str(info.value)
    assert "set" in message
    assert "cannot be sent as JSON" in message
    assert "cloudpickle" in message
    assert isinstance(info.value.__cause__, TypeError)


def test_json_dumps_of_a_circular_value_raises_serialization_error() -> None:
    loop: list[object] = []
    loop.append(loop)

    with pytest.raises(SerializationError, match="list"):
        JSON.dumps(loop)


@pytest.mark.parametrize("number", [float("nan"), float("inf"), float("-inf")])
def test_json_dumps_refuses_numbers_a_strict_json_parser_would_reject(number: float) -> None:
    with pytest.raises(SerializationError, match="cannot be sent as JSON"):
        JSON.dumps({"x": [number]})


def test_a_serializer_label_is_its_name_and_version() -> None:
    assert JSON.label == "json 1"
    assert CLOUDPICKLE.label.startswith("cloudpickle ")


@pytest.mark.parametrize(("version", "minor"), [
    ("3.11.7", "3.11"), ("3.9.0", "3.9"), ("3.13.0rc1", "3.13"), ("3.12", "3.12"),
])
def test_python_minor_keeps_major_and_minor(version: str, minor: str) -> None:
    assert python_minor(version) == minor


def test_python_version_is_this_interpreter() -> None:
    import platform

    assert platform.python_version() == PYTHON_VERSION
