"""The Executor against a real broker, registry and agent."""

from __future__ import annotations

import concurrent.futures
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from gc_client import Client, Executor, TaskExecutionFailed
from gc_core.broker import BrokerSession
from gc_core.broker_consumers import Delivery
from gc_core.errors import PublishNotConfirmed
from tests.fabric import Endpoint, Fabric, eventually


def hello_world() -> str:
    return "Hello World!"


def divide(a: float, b: float) -> float:
    return a / b


def square(x: int) -> int:
    return x * x


def test_hello_world_round_trip(client: Client, endpoint: Endpoint) -> None:
    with Executor(endpoint_id=endpoint.endpoint_id, client=client) as ex:
        future = ex.submit(hello_world)
        assert future.result(timeout=60) == "Hello World!"
        assert future.task_id


def test_remote_exception_carries_type_message_and_traceback(client: Client,
                                                             endpoint: Endpoint) -> None:
    with Executor(endpoint_id=endpoint.endpoint_id, client=client) as ex:
        future = ex.submit(divide, 1, 0)
        with pytest.raises(TaskExecutionFailed) as caught:
            future.result(timeout=60)
    error = caught.value
    assert error.task_id == future.task_id
    assert error.remote_type == "ZeroDivisionError"
    assert "division by zero" in error.remote_message
    assert "in divide" in error.remote_traceback
    assert "ZeroDivisionError" in str(error) and "Remote traceback" in str(error)


def test_map_as_completed_and_wait_work_on_its_futures(client: Client, endpoint: Endpoint) -> None:
    with Executor(endpoint_id=endpoint.endpoint_id, client=client) as ex:
        assert list(ex.map(square, range(20), timeout=60)) == [x * x for x in range(20)]
        futures = [ex.submit(square, x) for x in range(50)]
        done = {f.result() for f in concurrent.futures.as_completed(futures, timeout=60)}
        assert done == {x * x for x in range(50)}
        finished, pending = concurrent.futures.wait(futures, timeout=60)
        assert len(finished) == 50 and not pending


def test_a_function_is_registered_once_per_process(client: Client, endpoint: Endpoint) -> None:
    calls = []
    register = client.registry.register_function

    def counting_register(*args: object, **kwargs: object) -> str:
        calls.append(1)
        return register(*args, **kwargs)  # type: ignore[arg-type]

    client.registry.register_function = counting_register  # type: ignore[method-assign]
    with Executor(endpoint_id=endpoint.endpoint_id, client=client) as ex:
        assert sum(f.result(timeout=60) for f in [ex.submit(square, 3) for _ in range(30)]) == 270
    assert len(calls) == 1


def test_the_json_serializer_runs_language_neutral_tasks(client: Client, endpoint: Endpoint) -> None:
    with Executor(endpoint_id=endpoint.endpoint_id, client=client, serializer="json") as ex:
        assert ex.submit(divide, 9, 3).result(timeout=60) == 3.0


def test_a_task_for_an_unknown_endpoint_fails_with_a_clear_error(client: Client) -> None:
    with Executor(endpoint_id="no-such-endpoint", client=client) as ex:
        future = ex.submit(hello_world)
        with pytest.raises(PublishNotConfirmed, match="configured"):
            future.result(timeout=60)


def test_shutdown_with_cancel_futures_cancels_pending_futures(client: Client,
                                                              make_endpoint: object) -> None:
    idle = make_endpoint()  # type: ignore[operator]  # never started: tasks wait in its queue
    ex = Executor(endpoint_id=idle.endpoint_id, client=client)
    futures = [ex.submit(square, x) for x in range(5)]
    ex.shutdown(wait=False, cancel_futures=True)
    assert all(f.cancelled() for f in futures)


def test_reload_tasks_reattaches_to_a_group_after_the_client_died(
        fabric: Fabric, client: Client, make_endpoint: object) -> None:
    # Given a client process that submits a group of tasks and dies without waiting
    ep = make_endpoint()  # type: ignore[operator]
    script = textwrap.dedent(f"""
        import os
        from gc_client import Executor
        def cube(x):
            return x ** 3
        ex = Executor(endpoint_id={ep.endpoint_id!r})
        futures = [ex.submit(cube, x) for x in range(10)]
        ex.shutdown(wait=False)        # returns once the broker has every task
        print(ex.task_group_id, flush=True)
        os._exit(0)                    # die without waiting for results
    """)
    done = subprocess.run([sys.executable, "-c", script], env=fabric.env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    group = done.stdout.strip()
    # When the endpoint runs them and a new Executor reattaches to the group
    ep.start()
    with Executor(endpoint_id=ep.endpoint_id, client=client, task_group_id=group) as ex:
        futures = _reload_until(ex, expected=10)
        # Then every task's future resolves with its value
        assert sorted(f.result(timeout=60) for f in futures) == [x ** 3 for x in range(10)]


def test_two_executors_of_one_task_group_each_get_the_results_of_their_own_tasks(
        client: Client, endpoint: Endpoint) -> None:
    # A notebook cell re-run: a new Executor for the group (to pick up where it was) while
    # the one made before is still open. Both consume the group's result queue; a result the
    # other one took must still resolve its own future.
    with Executor(endpoint_id=endpoint.endpoint_id, client=client) as first:
        assert first.submit(square, 1).result(timeout=60) == 1  # consuming
        with Executor(endpoint_id=endpoint.endpoint_id, client=client,
                      task_group_id=first.task_group_id) as second:
            futures = [second.submit(square, x) for x in range(40)]
            assert [f.result(timeout=60) for f in futures] == [x * x for x in range(40)]
            mine = [first.submit(square, x) for x in range(40)]
            assert [f.result(timeout=60) for f in mine] == [x * x for x in range(40)]


def test_an_executor_sends_to_the_endpoint_it_is_pointed_at_now(
        client: Client, make_endpoint: Any) -> None:
    # Globus Compute's own hint: "gce.endpoint_id = <ep_id>  # alternative". Each task is
    # recorded for the endpoint it went to, even one switched to while a batch was forming.
    import uuid

    first, second = make_endpoint(), make_endpoint()
    first.start()
    second.start()
    with Executor(client=client) as ex:
        ex.endpoint_id = uuid.UUID(first.endpoint_id)
        to_first = [ex.submit(square, x) for x in range(20)]
        ex.endpoint_id = second.endpoint_id
        to_second = [ex.submit(square, x) for x in range(20)]
        assert [f.result(timeout=60) for f in to_first + to_second] == [x * x for x in range(20)] * 2
    assert ex.endpoint_id == second.endpoint_id
    for futures, endpoint in ((to_first, first), (to_second, second)):
        eventually(lambda fs=futures, ep=endpoint: all(
            (task := client.get_task(f.task_id)).status == "success"
            and task.endpoint_id == ep.endpoint_id for f in fs), 30, "each task in the ledger")


def _reload_until(ex: Executor, expected: int) -> list:  # type: ignore[type-arg]
    """The ledger records a group's manifest asynchronously; give it a moment."""
    import time

    deadline = time.monotonic() + 30
    while True:
        futures = ex.reload_tasks()
        if len(futures) >= expected or time.monotonic() > deadline:
            return futures
        time.sleep(0.2)


def _in_a_forked_child(work: Callable[[], object], timeout: float = 60) -> str:
    """What ``work`` returns, or raises, run in a forked child of this process (as
    ``multiprocessing`` does with its default start method on Linux); "hung" if the child
    is still at it after ``timeout`` seconds."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, and never return into pytest
        try:
            text = f"returned {work()!r}"
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            text = f"raised {type(exc).__name__}: {exc}"
        os.write(write, text.encode()[:60_000])
        os._exit(0)
    os.close(write)
    try:
        ready, _, _ = select.select([read], [], [], timeout)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            return "hung"
        return os.read(read, 65_536).decode()
    finally:
        os.close(read)
        os.waitpid(pid, 0)


def test_a_forked_child_is_told_to_make_its_own_executor_and_the_parents_goes_on(
        client: Client, endpoint: Endpoint) -> None:
    with Executor(endpoint_id=endpoint.endpoint_id, client=client) as ex:
        assert ex.submit(square, 2).result(timeout=60) == 4  # its connection is open
        told = _in_a_forked_child(lambda: ex.submit(square, 3).result(timeout=30))
        assert told.startswith("raised RuntimeError"), told
        assert "forked" in told and "Executor in the child" in told
        # while an Executor made in the child works there
        assert _in_a_forked_child(lambda: _square_with_a_new_executor(client, endpoint, 5)) \
            == "returned 25"
        # and leaving a with-block in the child waits on none of the parent's tasks
        slow = ex.submit(_sleep_and_square, 5.0, 3)
        assert _in_a_forked_child(ex.shutdown, timeout=3) == "returned None"
        assert ex.submit(square, 4).result(timeout=60) == 16
        assert slow.result(timeout=60) == 9


def test_a_forked_child_waiting_on_its_parents_future_is_told_at_once(
        client: Client, endpoint: Endpoint) -> None:
    with Executor(endpoint_id=endpoint.endpoint_id, client=client) as ex:
        done = ex.submit(square, 2)
        assert done.result(timeout=60) == 4
        pending = ex.submit(_sleep_and_square, 3.0, 3)
        # Its result comes to the parent alone: the child waited for ever (or its timeout)
        for wait in (pending.result, pending.exception):
            told = _in_a_forked_child(wait, timeout=10)
            assert told.startswith("raised RuntimeError"), told
            assert f"process {os.getpid()}" in told and pending.task_id in told
            assert "reload_tasks" in told
        # while a future done before the fork has its value there too
        assert _in_a_forked_child(done.result) == "returned 4"
        assert pending.result(timeout=60) == 9


@contextmanager
def another_process_consuming(client: Client, task_group_id: str) -> Iterator[list[str]]:
    """A consumer of the group's result queue that is not of this executor's process (as a
    second process with the same task group would be): it takes what the broker gives it,
    acks it and keeps it. Yields the ids of the messages it took."""
    queue = client.topology.queue("results", user=client.settings.user,
                                  task_group_id=task_group_id).name
    taken: list[str] = []
    other = BrokerSession(client.settings.broker_url, name="another-process",
                          topology=client.topology)

    def take(delivery: Delivery) -> None:
        taken.append(delivery.envelope.message_id)
        other.ack(delivery)

    other.consume(queue, take)
    other.start()
    try:
        yield taken
    finally:
        other.close()


def test_an_executor_whose_group_another_process_consumes_still_gets_every_result(
        client: Client, endpoint: Endpoint, caplog: pytest.LogCaptureFixture) -> None:
    # Two processes with one task group (a script run twice with a fixed task_group_id):
    # the broker gives each result to one of the group's consumers, and a result the other
    # process took left this one's future waiting for ever.
    with Executor(endpoint_id=endpoint.endpoint_id, client=client) as ex:
        assert ex.submit(square, 1).result(timeout=60) == 1  # its queue is consumed
        with another_process_consuming(client, ex.task_group_id) as taken:
            futures = []
            for n in range(8):  # one at a time: each result its own message
                futures.append(ex.submit(square, n))
                time.sleep(0.2)
            assert [future.result(timeout=60) for future in futures] == [n * n for n in range(8)]
    assert taken, "the other consumer took no result: this test showed nothing"
    assert "another process uses the task group too" in caplog.text
    assert repr(ex.task_group_id) in caplog.text


def _sleep_and_square(seconds: float, x: int) -> int:
    import time

    time.sleep(seconds)
    return x * x


def _square_with_a_new_executor(client: Client, endpoint: Endpoint, x: int) -> int:
    with Executor(endpoint_id=endpoint.endpoint_id, client=client) as ex:
        return int(ex.submit(square, x).result(timeout=30))


def test_a_forked_child_runs_tasks_through_its_parents_client(client: Client,
                                                             endpoint: Endpoint) -> None:
    function_id = client.register_function(square)
    client.run(6, endpoint_id=endpoint.endpoint_id, function_id=function_id)  # opens its session

    def run_and_wait() -> object:
        task_id = client.run(7, endpoint_id=endpoint.endpoint_id, function_id=function_id)
        return eventually(lambda: client.get_batch_result([task_id])[task_id].get("result"),
                          30, "the child's task to finish")

    assert _in_a_forked_child(run_and_wait) == "returned 49"


def test_a_resource_specification_no_engine_honours_fails_its_task_on_every_engine(
        client: Client, endpoint: Endpoint) -> None:
    # as on the htex engine (tests/scheduler): asked of a processes engine, num_gpus was
    # silently ignored, and the task ran without the GPUs it asked for
    with Executor(endpoint_id=endpoint.endpoint_id, client=client,
                  resource_specification={"num_gpus": 2}) as ex:
        with pytest.raises(TaskExecutionFailed) as caught:
            ex.submit(square, 3).result(timeout=60)
    assert caught.value.remote_type == "InvalidResourceSpecification"
    assert "'num_gpus'" in caught.value.remote_message
    assert "num_ranks" in caught.value.remote_message  # and what it may hold
    with Executor(endpoint_id=endpoint.endpoint_id, client=client,
                  resource_specification={"num_ranks": 2}) as ex:  # what MPIFunction reads
        assert ex.submit(square, 3).result(timeout=60) == 9


def test_a_function_sent_by_value_runs_with_the_globals_and_closure_it_has_now(
        client: Client, endpoint: Endpoint) -> None:
    # A notebook re-runs a cell with a new parameter and submits the same function again:
    # the value the function was first pickled with must not run instead.
    notebook: dict[str, Any] = {"__name__": "__main__"}  # a function of __main__ goes by value
    exec("threshold = 1\ndef above(x):\n    return x > threshold\n", notebook)
    above = notebook["above"]
    scale = 2

    def scaled(x: int) -> int:
        return x * scale

    with Executor(endpoint_id=endpoint.endpoint_id, client=client) as ex:
        assert ex.submit(above, 3).result(timeout=60) is True
        assert ex.submit(scaled, 3).result(timeout=60) == 6
        notebook["threshold"] = 5
        scale = 10
        assert ex.submit(above, 3).result(timeout=60) is False
        assert ex.submit(scaled, 3).result(timeout=60) == 30
        # and unchanged, it is registered once (the same id, no new pickle)
        assert client.register_function(above) == client.register_function(above)
