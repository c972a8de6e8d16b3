"""The AsyncExecutor against a real broker, registry and agent (plain ``asyncio.run``)."""

from __future__ import annotations

import asyncio

import pytest

from gc_client import AsyncExecutor, Client, TaskExecutionFailed
from gc_core.errors import PublishNotConfirmed
from tests.fabric import Endpoint
from tests.integration.test_executor import (
    another_process_consuming,
    divide,
    hello_world,
    square,
)

#: Seconds a test waits for results before it fails instead of hanging.
RESULT_TIMEOUT = 60.0


def test_hello_world_round_trip(client: Client, endpoint: Endpoint) -> None:
    async def main() -> tuple[str, str]:
        async with AsyncExecutor(endpoint_id=endpoint.endpoint_id, client=client) as ex:
            future = await ex.submit(hello_world)
            return future.task_id, await asyncio.wait_for(future, RESULT_TIMEOUT)

    task_id, value = asyncio.run(main())

    assert value == "Hello World!"
    assert task_id


def test_remote_exception_becomes_task_execution_failed_with_the_remote_type(
        client: Client, endpoint: Endpoint) -> None:
    async def main() -> tuple[str, BaseException | None]:
        async with AsyncExecutor(endpoint_id=endpoint.endpoint_id, client=client) as ex:
            future = await ex.submit(divide, 1, 0)
            await asyncio.wait([future], timeout=RESULT_TIMEOUT)
            return future.task_id, future.exception()

    task_id, error = asyncio.run(main())

    assert isinstance(error, TaskExecutionFailed)
    assert error.task_id == task_id
    assert error.remote_type == "ZeroDivisionError"
    assert "division by zero" in error.remote_message
    assert "in divide" in error.remote_traceback


def test_two_hundred_tasks_all_resolve_through_as_completed(client: Client,
                                                            endpoint: Endpoint) -> None:
    async def main() -> tuple[dict[str, int], dict[str, int], int]:
        async with AsyncExecutor(endpoint_id=endpoint.endpoint_id, client=client) as ex:
            futures = [await ex.submit(square, x) for x in range(200)]
            expected = {f.task_id: x * x for x, f in enumerate(futures)}
            got = {}
            async for future in ex.as_completed(futures, timeout=RESULT_TIMEOUT):
                got[future.task_id] = await future
            return expected, got, ex.duplicates_dropped

    expected, got, duplicates = asyncio.run(main())

    assert got == expected
    assert duplicates == 0


def test_a_task_for_an_unknown_endpoint_fails_with_publish_not_confirmed(client: Client) -> None:
    async def main() -> None:
        async with AsyncExecutor(endpoint_id="no-such-endpoint", client=client) as ex:
            future = await ex.submit(hello_world)
            with pytest.raises(PublishNotConfirmed, match="configured"):
                await asyncio.wait_for(future, RESULT_TIMEOUT)

    asyncio.run(main())


def test_map_returns_values_in_submission_order(client: Client, endpoint: Endpoint) -> None:
    async def main() -> list[int]:
        async with AsyncExecutor(endpoint_id=endpoint.endpoint_id, client=client) as ex:
            return await ex.map(square, range(50), timeout=RESULT_TIMEOUT)

    assert asyncio.run(main()) == [x * x for x in range(50)]


def test_concurrent_first_submissions_register_the_function_once(client: Client,
                                                                 endpoint: Endpoint) -> None:
    calls = []
    register = client.registry.register_function

    def counting_register(*args: object, **kwargs: object) -> str:
        calls.append(1)
        return register(*args, **kwargs)  # type: ignore[arg-type]

    def cube(x: int) -> int:  # a fresh function: not in the Client's cache yet
        return x ** 3

    client.registry.register_function = counting_register  # type: ignore[method-assign]

    async def main() -> list[int]:
        async with AsyncExecutor(endpoint_id=endpoint.endpoint_id, client=client) as ex:
            futures = await asyncio.gather(*(ex.submit(cube, x) for x in range(20)))
            return list(await asyncio.wait_for(asyncio.gather(*futures), RESULT_TIMEOUT))

    assert asyncio.run(main()) == [x ** 3 for x in range(20)]
    assert len(calls) == 1


def test_shutdown_with_cancel_futures_cancels_pending_futures(client: Client,
                                                              make_endpoint: object) -> None:
    idle = make_endpoint()  # type: ignore[operator]  # never started: tasks wait in its queue

    async def main() -> list[bool]:
        ex = AsyncExecutor(endpoint_id=idle.endpoint_id, client=client)
        futures = [await ex.submit(square, x) for x in range(5)]
        await ex.shutdown(wait=False, cancel_futures=True)
        return [f.cancelled() for f in futures]

    assert asyncio.run(main()) == [True] * 5


def test_an_async_and_a_sync_executor_of_one_task_group_each_get_their_own_results(
        client: Client, endpoint: Endpoint) -> None:
    # Either may take a result off the group's queue; one taken by the other executor
    # reaches the async one's futures through its event loop.
    from gc_client import Executor

    with Executor(endpoint_id=endpoint.endpoint_id, client=client) as sync_ex:
        assert sync_ex.submit(square, 1).result(timeout=RESULT_TIMEOUT) == 1  # consuming

        async def main() -> list[int]:
            async with AsyncExecutor(endpoint_id=endpoint.endpoint_id, client=client,
                                     task_group_id=sync_ex.task_group_id) as async_ex:
                futures = [await async_ex.submit(square, x) for x in range(40)]
                return list(await asyncio.wait_for(asyncio.gather(*futures), RESULT_TIMEOUT))

        assert asyncio.run(main()) == [x * x for x in range(40)]
        mine = [sync_ex.submit(square, x) for x in range(40)]
        assert [f.result(timeout=RESULT_TIMEOUT) for f in mine] == [x * x for x in range(40)]


def test_an_async_executor_whose_group_another_process_consumes_still_gets_every_result(
        client: Client, endpoint: Endpoint, caplog: pytest.LogCaptureFixture) -> None:
    # As for the Executor (test_executor.py): results the other process takes come from
    # the ledger once this one has seen it.
    async def main() -> tuple[list[int], list[str]]:
        async with AsyncExecutor(endpoint_id=endpoint.endpoint_id, client=client) as ex:
            assert await asyncio.wait_for(await ex.submit(square, 1), RESULT_TIMEOUT) == 1
            with another_process_consuming(client, ex.task_group_id) as taken:
                futures = []
                for n in range(8):  # one at a time: each result its own message
                    futures.append(await ex.submit(square, n))
                    await asyncio.sleep(0.2)
                values = [await asyncio.wait_for(future, RESULT_TIMEOUT) for future in futures]
        return values, taken

    values, taken = asyncio.run(main())
    assert values == [n * n for n in range(8)]
    assert taken, "the other consumer took no result: this test showed nothing"
    assert "another process uses the task group too" in caplog.text
