"""The AsyncExecutor does what the Executor does: cancels at the endpoint, reattaches to a
task group, submits on behalf of a gateway's end user, and bounds ``map``'s tasks in flight.

Real broker, registry and agents throughout; each test drives one ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gc_client import AsyncExecutor, Client
from gc_core.errors import PolicyError
from gc_core.registry_api.schemas import TaskOut
from tests.fabric import Endpoint, eventually, pid_alive
from tests.integration.test_cancel_and_output import mark_and_sleep
from tests.integration.test_identities import TokenFabric, alices_endpoint, tokens  # noqa: F401

#: Seconds a test waits for a result or a ledger record before it fails instead of hanging.
RESULT_TIMEOUT = 60.0


def square(x: int) -> int:
    return x * x


def sleep_then_square(x: int, seconds: float) -> int:
    import time

    time.sleep(seconds)
    return x * x


async def until(check: Callable[[], Any], timeout: float = RESULT_TIMEOUT,
                what: str = "a condition") -> Any:
    """Like ``tests.fabric.eventually``, but lets the event loop run between polls (the
    executor publishes and receives on it); ``check`` runs in a worker thread."""
    deadline = time.monotonic() + timeout
    while not (value := await asyncio.to_thread(check)):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.05)
    return value


def _status(client: Client, task_id: str) -> str:
    return client.get_task(task_id).status


def _finished(client: Client, task_id: str) -> TaskOut | None:
    """The ledger's record of the task once it is no longer waiting, else None."""
    task = client.get_task(task_id)
    return None if task.status in ("waiting", "unknown") else task


# -- cancel reaches the endpoint -----------------------------------------------------------


def test_cancelling_a_queued_task_means_it_never_runs(client: Client, make_endpoint: Any,
                                                      tmp_path: Path) -> None:
    # Given a task confirmed into the queue of an endpoint whose agent is not running
    ep: Endpoint = make_endpoint()
    marker = tmp_path / "ran"

    async def main() -> tuple[str, bool, int]:
        async with AsyncExecutor(endpoint_id=ep.endpoint_id, client=client) as ex:
            future = await ex.submit(mark_and_sleep, str(marker), 0)
            await until(lambda: _status(client, future.task_id) == "waiting", what="the ledger")
            # When it is cancelled, and the agent starts afterwards
            cancelled = future.cancel()
            await asyncio.to_thread(ep.start)
            # and serves a task sent after it
            after = await ex.submit(mark_and_sleep, str(tmp_path / "after"), 0)
            return future.task_id, cancelled and future.cancelled(), \
                await asyncio.wait_for(after, RESULT_TIMEOUT)

    task_id, cancelled, later_pid = asyncio.run(main())

    # Then the ledger records it cancelled, and it never ran
    assert cancelled and later_pid > 0
    assert eventually(lambda: _finished(client, task_id), RESULT_TIMEOUT,
                      "the ledger").status == "cancelled"
    assert not marker.exists()


def test_cancelling_a_running_task_stops_its_worker(client: Client, make_endpoint: Any,
                                                    tmp_path: Path) -> None:
    # Given a task running on the only worker of an endpoint
    ep: Endpoint = make_endpoint(workers=1)
    ep.start()
    marker = tmp_path / "started"

    async def main() -> str:
        async with AsyncExecutor(endpoint_id=ep.endpoint_id, client=client) as ex:
            future = await ex.submit(mark_and_sleep, str(marker), 120)
            await until(marker.exists, what="the task to start")
            worker_pid = int(marker.read_text())
            # When its future is cancelled
            assert future.cancel()
            # Then its worker is stopped, and a new worker takes the slot
            await until(lambda: not pid_alive(worker_pid), 30, "the worker to be stopped")
            assert await asyncio.wait_for(await ex.submit(square, 3), RESULT_TIMEOUT) == 9
            return future.task_id

    task_id = asyncio.run(main())

    # and the ledger records it cancelled, saying why
    task = eventually(lambda: _finished(client, task_id), RESULT_TIMEOUT, "the ledger")
    assert task.status == "cancelled"
    assert task.error is not None and task.error.type == "TaskCancelled"
    assert "worker was stopped" in task.error.message


# -- task_group_id and reload_tasks --------------------------------------------------------


def test_a_second_async_executor_reattaches_to_the_group_and_gets_every_value(
        client: Client, endpoint: Endpoint) -> None:
    # Given tasks of one group, some finished and some still running, whose executor left
    quick, slow = range(10), range(10, 14)

    async def submit_and_leave() -> tuple[str, list[str]]:
        ex = AsyncExecutor(endpoint_id=endpoint.endpoint_id, client=client)
        futures = [await ex.submit(square, x) for x in quick]
        futures += [await ex.submit(sleep_then_square, x, 2) for x in slow]
        await ex.shutdown(wait=False)
        return ex.task_group_id, [f.task_id for f in futures]

    group, task_ids = asyncio.run(submit_and_leave())
    eventually(lambda: all(_status(client, t) == "success" for t in task_ids[:len(quick)]),
               RESULT_TIMEOUT, "the quick tasks to finish")
    # (the ledger writes manifests in batches: reload_tasks lists what it has recorded)
    eventually(lambda: all(_status(client, t) != "unknown" for t in task_ids),
               RESULT_TIMEOUT, "the ledger to record every task")

    # When a second AsyncExecutor of that group reloads its tasks
    async def reattach() -> dict[str, int]:
        async with AsyncExecutor(endpoint_id=endpoint.endpoint_id, client=client,
                                 task_group_id=group) as ex:
            futures = await ex.reload_tasks()
            values = await asyncio.wait_for(asyncio.gather(*futures), RESULT_TIMEOUT)
            return {f.task_id: v for f, v in zip(futures, values)}

    # Then it gets every task's value: the finished ones from the ledger, the others as
    # their results arrive
    got = asyncio.run(reattach())
    assert got == {t: x * x for t, x in zip(task_ids, [*quick, *slow])}


# -- on_behalf_of --------------------------------------------------------------------------


def test_a_gateway_submits_for_its_end_user_and_the_ledger_records_both(
        tokens: TokenFabric, alices_endpoint: Endpoint) -> None:  # noqa: F811
    async def main(portal: Client) -> tuple[str, int]:
        async with AsyncExecutor(endpoint_id=alices_endpoint.endpoint_id, client=portal,
                                 on_behalf_of="carol@uni.edu") as ex:
            future = await ex.submit(square, 4)
            return future.task_id, await asyncio.wait_for(future, RESULT_TIMEOUT)

    with tokens.client("portal") as portal:
        task_id, value = asyncio.run(main(portal))
        task = eventually(lambda: _finished(portal, task_id), RESULT_TIMEOUT, "the ledger")
    assert value == 16
    assert (task.user, task.on_behalf_of) == ("portal", "carol@uni.edu")


def test_the_async_executor_submits_for_the_clients_end_user_by_default(
        tokens: TokenFabric, alices_endpoint: Endpoint) -> None:  # noqa: F811
    async def main(portal: Client) -> str:
        async with AsyncExecutor(endpoint_id=alices_endpoint.endpoint_id, client=portal) as ex:
            future = await ex.submit(square, 5)
            assert await asyncio.wait_for(future, RESULT_TIMEOUT) == 25
            return future.task_id

    with tokens.client("portal", on_behalf_of="dave@lab.org") as portal:
        task_id = asyncio.run(main(portal))
        task = eventually(lambda: _finished(portal, task_id), RESULT_TIMEOUT, "the ledger")
    assert (task.user, task.on_behalf_of) == ("portal", "dave@lab.org")


def test_only_a_service_account_may_submit_on_someone_elses_behalf(
        tokens: TokenFabric, alices_endpoint: Endpoint) -> None:  # noqa: F811
    async def main(alice: Client) -> None:
        async with AsyncExecutor(endpoint_id=alices_endpoint.endpoint_id, client=alice,
                                 on_behalf_of="mallory") as ex:
            future = await ex.submit(square, 2)
            with pytest.raises(PolicyError, match="alice is not a service account"):
                await asyncio.wait_for(future, RESULT_TIMEOUT)

    with tokens.client("alice") as alice:
        asyncio.run(main(alice))


# -- map with buffersize -------------------------------------------------------------------


def test_map_with_a_buffersize_keeps_that_many_tasks_in_flight_and_returns_values_in_order(
        client: Client, make_endpoint: Any) -> None:
    # Given an endpoint that is not serving yet
    ep: Endpoint = make_endpoint()

    async def main() -> tuple[list[int], int]:
        async with AsyncExecutor(endpoint_id=ep.endpoint_id, client=client) as ex:
            # When a map of 30 calls with a buffersize of 4 starts
            mapping = asyncio.ensure_future(ex.map(square, range(30), timeout=RESULT_TIMEOUT,
                                                   buffersize=4))
            def known() -> int:
                return len(client.registry.list_group_tasks(ex.task_group_id))

            await until(lambda: known() >= 4, what="the first tasks to reach the ledger")
            await asyncio.sleep(1.0)  # room for any task beyond the buffer to be sent
            in_flight = known()
            # and the endpoint starts serving
            await asyncio.to_thread(ep.start)
            return list(await mapping), in_flight

    values, in_flight = asyncio.run(main())

    # Then only 4 tasks were sent while none could finish, and the values come in order
    assert in_flight == 4
    assert values == [x * x for x in range(30)]
