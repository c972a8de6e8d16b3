"""What cannot be serialized at submit time is named: the argument, the function, the value
JSON cannot carry, with the serializer, the underlying error and what to do instead."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gc_client import Client
from gc_client.tasks import make_task
from gc_core.errors import RegistryError, SerializationError
from gc_core.serialize import CLOUDPICKLE, JSON, Serializer

#: Nothing listens here: registering must fail before it would talk to a registry.
NOWHERE = "127.0.0.1:9"


def submit(serializer: Serializer, *args: Any, **kwargs: Any) -> str:
    """The message of the error make_task raises for this call."""
    with pytest.raises(SerializationError) as caught:
        make_task(endpoint_id="ep-1", function_id="fn-1", user="alice", task_group_id="g-1",
                  serializer=serializer, args=args, kwargs=kwargs)
    assert caught.value.__cause__ is not None  # the underlying error stays chained
    return str(caught.value)


@pytest.fixture
def offline_client(tmp_path: Path) -> Iterator[Client]:
    with Client(broker_url=f"amqp://guest:guest@{NOWHERE}/", registry_url=f"http://{NOWHERE}",
                home=str(tmp_path), user="alice") as client:
        yield client


def test_an_argument_that_cannot_be_pickled_is_named_by_position_and_type() -> None:
    message = submit(CLOUDPICKLE, 1, threading.Lock(), "three")

    assert "argument 1" in message and "_thread.lock" in message
    assert "cloudpickle" in message and "cannot pickle" in message
    assert "path or URL" in message


def test_a_keyword_argument_that_cannot_be_pickled_is_named_by_keyword() -> None:
    with socket.socket() as sock:
        message = submit(CLOUDPICKLE, 1, conn=sock, size=3)

    assert "keyword argument 'conn'" in message and "socket" in message
    assert "argument 0" not in message


def test_the_part_of_a_nested_argument_that_cannot_be_pickled_is_named() -> None:
    message = submit(CLOUDPICKLE, [1, {"ok": 2, "lock": threading.Lock()}])

    assert "argument 0" in message and "[1]['lock']" in message and "_thread.lock" in message


def test_a_json_task_names_the_value_json_cannot_carry() -> None:
    message = submit(JSON, 1, {"tags": {"a", "b"}})

    assert "argument 1" in message and "['tags']" in message and "set" in message
    assert "JSON" in message and "not JSON serializable" in message
    assert "cloudpickle" in message  # the other way to send it


def test_a_json_task_names_a_keyword_holding_nan() -> None:
    message = submit(JSON, threshold=float("nan"))

    assert "keyword argument 'threshold'" in message and "float" in message
    assert "Out of range float" in message


def test_a_function_that_captures_a_lock_is_named_with_what_it_captures(
        offline_client: Client) -> None:
    lock = threading.Lock()

    def guarded_sum(values: list[int]) -> int:
        with lock:
            return sum(values)

    with pytest.raises(SerializationError) as caught:
        offline_client.register_function(guarded_sum)
    message = str(caught.value)
    assert "guarded_sum" in message and "'lock'" in message and "_thread.lock" in message
    assert "cloudpickle" in message and "cannot pickle" in message
    assert "does not capture" in message
    assert isinstance(caught.value.__cause__, TypeError)


def test_a_function_that_captures_an_open_socket_is_named(offline_client: Client) -> None:
    with socket.socket() as sock:
        def send_all(data: bytes) -> None:
            sock.sendall(data)

        with pytest.raises(SerializationError) as caught:
            offline_client.register_function(send_all)
    assert "send_all" in str(caught.value) and "'sock'" in str(caught.value)
    assert "socket" in str(caught.value)


def test_a_function_that_captures_too_much_data_is_named_with_what_it_captures(
        offline_client: Client) -> None:
    # 20 MiB of captured data: past what the registry keeps for a function (16 MiB)
    table = bytes(20 * 2**20)

    def lookup(i: int) -> int:
        return table[i]

    with pytest.raises(SerializationError) as caught:
        offline_client.register_function(lookup)
    message = str(caught.value)
    assert "lookup" in message and "'table'" in message and "bytes" in message
    assert "20.0 MiB" in message and "16.0 MiB" in message
    assert "as an argument" in message and "path or URL" in message


def test_a_function_with_a_source_past_what_the_registry_keeps_registers_without_it(
        offline_client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Generated code can be long: the source is shown, not run, so it is left out
    module = tmp_path / "generated_table.py"
    rows = "\n".join(f"        {i}: {i * i}," for i in range(60_000))
    module.write_text(f"def square(i):\n    return {{\n{rows}\n    }}[i]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from generated_table import square  # type: ignore[import-not-found]

    with pytest.raises(RegistryError):  # it got as far as asking the registry (there is none)
        offline_client.register_function(square)


def test_endpoint_and_task_group_ids_may_be_given_as_uuids(offline_client: Client) -> None:
    # Globus Compute users write Executor(endpoint_id=uuid.UUID(...)); it failed with
    # "TypeError: expected string or bytes-like object, got 'UUID'".
    import uuid

    from gc_client import AsyncExecutor, Executor

    endpoint_id, task_group_id = uuid.uuid4(), uuid.uuid4()
    for front in (Executor, AsyncExecutor):
        ex = front(endpoint_id=endpoint_id, task_group_id=task_group_id,  # type: ignore[operator]
                   client=offline_client)
        assert (ex.endpoint_id, ex.task_group_id) == (str(endpoint_id), str(task_group_id))


def test_an_endpoint_id_that_cannot_be_one_is_refused_when_the_executor_is_made(
        offline_client: Client) -> None:
    from gc_client import Executor
    from gc_core.errors import ConfigError

    with pytest.raises(ConfigError, match="endpoint_id 'my laptop' must be 1 to 64 letters"):
        Executor(endpoint_id="my laptop", client=offline_client)


def test_executors_made_and_closed_one_after_another_leave_nothing_behind(
        offline_client: Client) -> None:
    # Each consuming task group joins the process's live groups; a closed one must leave
    # no entry, or a process running group after group grows with each.
    from gc_client import taskgroup
    from gc_client.taskgroup import TaskGroup, TaskGroupOptions

    before = len(taskgroup._LIVE)
    for _ in range(50):
        group: TaskGroup[Any] = TaskGroup(offline_client, TaskGroupOptions.of(
            task_group_id=None, endpoint_id="ep-1", serializer="json",
            resource_specification=None, user_endpoint_config=None, on_behalf_of=None),
            lambda task_id, endpoint_id: None)  # type: ignore[arg-type,return-value]
        group.join()
        assert not group.leave()
    assert len(taskgroup._LIVE) == before
