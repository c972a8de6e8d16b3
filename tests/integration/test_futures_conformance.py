"""The Executor behaves as ``concurrent.futures`` promises, checked the way CPython checks it.

CPython's ``Lib/test/test_concurrent_futures/`` (3.13/3.14: ``executor.py``,
``test_shutdown.py``, ``test_wait.py``, ``test_as_completed.py``, ``test_future.py``) holds
executor-agnostic checks of submit, map (``buffersize`` included), shutdown, wait,
as_completed, futures and references. Each test here names the CPython test it mirrors and
runs against a real endpoint. Where a remote executor must differ, a one-line comment says why.

Two endpoints serve these tests: the session's live one (2 workers) and an idle one whose
agent never starts, so a task sent there stays pending for as long as a test needs, with no
sleeping. A task that must be running while a test acts waits for a release file the test
creates: the task runs in another process, so no ``threading.Event`` can reach it.
"""

from __future__ import annotations

import concurrent.futures
import gc
import itertools
import logging
import operator
import re
import subprocess
import sys
import textwrap
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import (
    ALL_COMPLETED,
    FIRST_COMPLETED,
    FIRST_EXCEPTION,
    CancelledError,
    Future,
    as_completed,
    wait,
)
from pathlib import Path
from typing import Any

import pytest

from gc_client import Client, Executor, TaskExecutionFailed
from gc_client.executor import ComputeFuture
from tests.fabric import Endpoint, Fabric, eventually

#: Seconds any single result may take; only there so that a broken test fails, not hangs.
RESULT_TIMEOUT = 60.0
#: Seconds a held task waits for its release file before it gives up (frees its worker).
HOLD_LIMIT = 30.0
#: Seconds to wait for the ledger to record a cancellation; below HOLD_LIMIT, so a task that
#: was not cancelled is still waiting when the check gives up.
CANCEL_SEEN_TIMEOUT = 20.0
#: Seconds map may take over two quick calls and one held call: it must time out on the third.
MAP_DEADLINE = 3.0
#: Inputs an "infinite" iterable hands out before it fails the test: an eager map stops here.
INFINITE_GUARD = 32
#: The repository root: the agent and a client subprocess import this module from there.
REPO_ROOT = Path(__file__).resolve().parents[2]


# -- what the tasks run (module level: pickled by reference, imported by the worker) -----


def mul(x: int, y: int) -> int:
    return x * y


def capture(*args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return args, kwargs


def tag(token: str, i: int) -> tuple[str, int]:
    return token, i


def raise_value_error(message: str) -> None:
    raise ValueError(message)


def raise_timeout_error_on_one(x: int) -> int:
    if x == 1:
        raise TimeoutError("the call itself timed out")
    return x


def raise_instance_of(exc_type: type[Exception], message: str) -> None:
    raise exc_type(message)


def write_marker(path: str) -> str:
    Path(path).write_text("ran")
    return path


def held(value: Any, release: str = "", started: str = "", fail: bool = False) -> Any:
    """Return ``value`` (or raise it) once ``release`` exists; touch ``started`` first."""
    if started:
        Path(started).touch()
    if release:
        deadline = time.monotonic() + HOLD_LIMIT
        while not Path(release).exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{release} never appeared")
            time.sleep(0.02)
    if fail:
        raise ValueError(value)
    return value


class Token:
    """A result object the caller can hold a weak reference to."""

    def __init__(self, i: int) -> None:
        self.i = i


def make_token(i: int) -> Token:
    return Token(i)


class Holder:
    """An object whose method or self is sent with a task."""

    def touch(self) -> str:
        return "touched"


def identity(value: Any) -> Any:
    return value


class FalseyByBool(Exception):
    def __bool__(self) -> bool:
        return False


class FalseyByLen(Exception):
    def __len__(self) -> int:
        return 0


# -- fixtures and helpers ----------------------------------------------------------------


@pytest.fixture(scope="module")
def idle_endpoint(fabric: Fabric) -> Endpoint:
    """An endpoint whose agent never starts: its tasks stay queued, their futures pending."""
    return fabric.configure_endpoint(f"idle-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def ex(client: Client, endpoint: Endpoint) -> Iterator[Executor]:
    """An Executor on the live endpoint; whatever a failed test left pending is cancelled."""
    executor = Executor(endpoint_id=endpoint.endpoint_id, client=client)
    yield executor
    executor.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
def idle(client: Client, idle_endpoint: Endpoint) -> Iterator[Executor]:
    """An Executor on the idle endpoint (shut down without waiting: nothing there finishes)."""
    executor = Executor(endpoint_id=idle_endpoint.endpoint_id, client=client)
    yield executor
    executor.shutdown(wait=False, cancel_futures=True)


@pytest.fixture
def release(tmp_path: Path) -> Iterator[Path]:
    """A file held tasks wait for; created at teardown so no worker stays held."""
    path = tmp_path / "release"
    yield path
    path.touch()


def _local_future(state: str) -> Future[Any]:
    """A plain Future already in ``state``, set through the public API only."""
    future: Future[Any] = Future()
    if state == "running":
        future.set_running_or_notify_cancel()
    elif state == "cancelled":
        future.cancel()  # cancelled, waiters not yet notified: wait() still counts it pending
    elif state == "cancelled_and_notified":
        future.cancel()
        future.set_running_or_notify_cancel()
    elif state == "raised":
        future.set_exception(OSError("local failure"))
    elif state == "returned":
        future.set_result(42)
    return future


def _collected(*refs: weakref.ref[Any]) -> bool:
    gc.collect()
    return all(ref() is None for ref in refs)


def _finishes(call: Callable[[], object], timeout: float = RESULT_TIMEOUT) -> bool:
    """Run ``call`` in a thread; False if it is still running after ``timeout`` (a hang)."""
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout)
    return not thread.is_alive()


def _ledger_statuses(client: Client, executor: Executor) -> list[str]:
    return sorted(t.status for t in client.registry.list_group_tasks(executor.task_group_id))


def _done_futures_holding(values: set[Any]) -> list[Future[Any]]:
    """Every live, successfully finished future whose result is one of ``values``."""
    gc.collect()
    found = []
    for obj in gc.get_objects():
        if (isinstance(obj, Future) and obj.done() and not obj.cancelled()
                and obj.exception() is None and isinstance(obj.result(), tuple)
                and obj.result() in values):
            found.append(obj)
    return found


def _counted(inputs: Iterable[int], pulled: list[int]) -> Iterator[int]:
    """``inputs``, recording each one map takes."""
    for i in inputs:
        pulled.append(i)
        yield i


def _endless(limit: int = INFINITE_GUARD) -> Iterator[int]:
    """0, 1, 2, ... without end, except that taking ``limit`` of them fails the test: an
    eager map would otherwise read forever."""
    for i in itertools.count():
        if i >= limit:
            raise AssertionError(f"map read {limit} inputs: it does not read lazily")
        yield i


# -- submit and map (executor.py: ExecutorTest) ----------------------------------------


def test_submit_runs_the_call_on_the_endpoint_and_returns_its_value(ex: Executor) -> None:
    # mirrors test_submit
    assert ex.submit(pow, 2, 8).result(timeout=RESULT_TIMEOUT) == 256


def test_submit_passes_keyword_arguments_even_ones_named_self_or_fn(ex: Executor) -> None:
    # mirrors test_submit_keyword
    assert ex.submit(mul, 2, y=8).result(timeout=RESULT_TIMEOUT) == 16
    future = ex.submit(capture, 1, self=2, fn=3)
    assert future.result(timeout=RESULT_TIMEOUT) == ((1,), {"self": 2, "fn": 3})


def test_submit_takes_the_callable_only_positionally(ex: Executor) -> None:
    # mirrors test_submit_keyword (the TypeError half)
    with pytest.raises(TypeError):
        ex.submit(fn=capture, arg=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        ex.submit(arg=1)  # type: ignore[call-arg]


@pytest.mark.parametrize("chunksize", [1, 3])
def test_map_yields_values_in_input_order_whatever_the_chunksize(ex: Executor,
                                                                 chunksize: int) -> None:
    # mirrors test_map
    values = ex.map(pow, range(10), range(10), timeout=RESULT_TIMEOUT, chunksize=chunksize)
    assert list(values) == list(map(pow, range(10), range(10)))


def test_map_raises_a_failed_call_in_its_place_then_stops(ex: Executor) -> None:
    # mirrors test_map_exception (3.14: the iterator ends at the failure)
    values = ex.map(divmod, [1, 1, 1, 1], [2, 3, 0, 5], timeout=RESULT_TIMEOUT)
    assert next(values) == (0, 1)
    assert next(values) == (0, 1)
    # A remote exception arrives as TaskExecutionFailed naming its type: we never unpickle
    # exception objects from the wire.
    with pytest.raises(TaskExecutionFailed) as caught:
        next(values)
    assert caught.value.remote_type == "ZeroDivisionError"
    with pytest.raises(StopIteration):
        next(values)


def test_a_timeout_error_raised_by_the_call_is_not_map_timing_out(ex: Executor) -> None:
    # mirrors test_map_timeout_from_callable
    values = ex.map(raise_timeout_error_on_one, [0, 1, 2], timeout=RESULT_TIMEOUT)
    assert next(values) == 0
    with pytest.raises(TaskExecutionFailed) as caught:
        next(values)
    assert caught.value.remote_type == "TimeoutError"
    assert not isinstance(caught.value, concurrent.futures.TimeoutError)


def test_map_raises_timeout_error_at_its_deadline_and_cancels_the_calls_left(
        client: Client, ex: Executor, release: Path) -> None:
    # mirrors test_map_timeout (3.14: the calls left are cancelled, the iterator is exhausted)
    values = ex.map(held, [0, 0, 2], ["", "", str(release)], timeout=MAP_DEADLINE)
    results = []
    with pytest.raises(concurrent.futures.TimeoutError):
        for value in values:
            results.append(value)
    assert results in ([0, 0], [0], [])  # a loaded machine may be late even for the first two
    with pytest.raises(StopIteration):
        next(values)
    # Cancelling a remote call tells the endpoint, which stops the held task's worker.
    eventually(lambda: (s := _ledger_statuses(client, ex)) and len(s) == 3
               and "cancelled" in s and set(s) <= {"success", "cancelled"},
               CANCEL_SEEN_TIMEOUT, "the ledger to record the held task cancelled")


def test_closing_map_early_cancels_the_calls_it_did_not_yield(client: Client, ex: Executor,
                                                              release: Path) -> None:
    # mirrors test_map_close
    values = ex.map(held, [0, 1, 2], ["", str(release), str(release)], timeout=RESULT_TIMEOUT)
    assert next(values) == 0
    values.close()  # type: ignore[attr-defined]
    with pytest.raises(StopIteration):
        next(values)
    eventually(lambda: _ledger_statuses(client, ex) == ["cancelled", "cancelled", "success"],
               CANCEL_SEEN_TIMEOUT, "the ledger to record both held tasks cancelled")


def test_map_submits_every_call_before_it_is_iterated(ex: Executor, tmp_path: Path) -> None:
    # mirrors test_map_submits_without_iteration and test_shutdown_race_issue12456
    markers = [tmp_path / f"marker-{i}" for i in range(3)]
    ex.map(write_marker, [str(m) for m in markers])  # never iterated
    assert _finishes(ex.shutdown), "shutdown hung after an un-iterated map"
    assert all(m.exists() for m in markers)


# -- map(buffersize=...) (executor.py, 3.14) ---------------------------------------------


@pytest.mark.parametrize("buffersize", ["2", 2.0])
def test_map_refuses_a_buffersize_that_is_not_an_integer(ex: Executor, buffersize: Any) -> None:
    # mirrors test_map_buffersize_type_validation (CPython raises TypeError here)
    with pytest.raises(TypeError, match="buffersize"):
        ex.map(str, range(4), buffersize=buffersize)


@pytest.mark.parametrize("buffersize", [0, -1])
def test_map_refuses_a_buffersize_below_one(ex: Executor, buffersize: int) -> None:
    # mirrors test_map_buffersize_value_validation
    with pytest.raises(ValueError, match="buffersize"):
        ex.map(str, range(4), buffersize=buffersize)


@pytest.mark.parametrize("buffersize", [1, 2, 4, 8])
def test_map_with_a_buffersize_yields_every_value_in_order(ex: Executor, buffersize: int) -> None:
    # mirrors test_map_buffersize and test_map_buffersize_on_multiple_iterables
    one = ex.map(str, range(4), buffersize=buffersize)
    assert list(one) == ["0", "1", "2", "3"]
    two = ex.map(operator.add, range(4), range(4), buffersize=buffersize)
    assert list(two) == [0, 2, 4, 6]


def test_map_with_a_buffersize_reads_an_infinite_iterable_lazily(ex: Executor) -> None:
    # mirrors test_map_buffersize_on_infinite_iterable and ..._on_multiple_infinite_iterables
    one = ex.map(str, _endless(), buffersize=2)
    assert [next(one), next(one), next(one)] == ["0", "1", "2"]
    one.close()  # type: ignore[attr-defined]
    two = ex.map(operator.add, _endless(), _endless(),
                 buffersize=2)
    assert [next(two), next(two), next(two)] == [0, 2, 4]
    two.close()  # type: ignore[attr-defined]


def test_map_with_a_buffersize_over_no_input_yields_nothing(ex: Executor) -> None:
    # mirrors test_map_buffersize_on_empty_iterable and test_map_buffersize_without_iterable
    assert next(ex.map(str, [], buffersize=2), None) is None
    assert next(ex.map(str, buffersize=2), None) is None


def test_map_with_a_buffersize_takes_only_that_many_inputs_until_iterated(ex: Executor) -> None:
    # mirrors test_map_buffersize_when_buffer_is_full
    inputs = iter(range(4))
    ex.map(str, inputs, buffersize=2)
    assert _finishes(ex.shutdown), "shutdown hung"
    assert next(inputs) == 2


def test_map_with_a_buffersize_stays_at_most_that_many_calls_ahead_of_the_caller(
        ex: Executor) -> None:
    # mirrors the buffersize contract (bounded in flight, lazy over the iterable)
    pulled: list[int] = []
    values = ex.map(str, _counted(range(8), pulled), buffersize=3)
    assert len(pulled) == 3
    yielded = []
    for _ in range(8):
        yielded.append(next(values))
        assert len(pulled) <= len(yielded) + 3
    assert yielded == [str(i) for i in range(8)]


# -- references (executor.py: test_free_reference, test_no_stale_references) -------------


def test_map_does_not_keep_the_values_it_yielded(ex: Executor) -> None:
    # mirrors test_free_reference
    for value in ex.map(make_token, range(6), timeout=RESULT_TIMEOUT):
        ref = weakref.ref(value)
        del value
        assert _collected(ref), "a value map yielded is still referenced"


def test_map_does_not_keep_the_futures_of_values_it_yielded(ex: Executor) -> None:
    # mirrors test_free_reference, for the futures behind map's iterator
    token = uuid.uuid4().hex
    values = ex.map(tag, [token] * 6, range(6), timeout=RESULT_TIMEOUT)
    yielded = {next(values) for _ in range(3)}
    assert _done_futures_holding(yielded) == []
    assert sorted(values) == [(token, i) for i in range(3, 6)]


def test_the_executor_does_not_keep_finished_futures_the_caller_dropped(ex: Executor) -> None:
    # mirrors test_no_stale_references, for futures and their results
    futures = [ex.submit(make_token, i) for i in range(6)]
    assert [f.result(timeout=RESULT_TIMEOUT).i for f in futures] == list(range(6))
    refs = [weakref.ref(f) for f in futures] + [weakref.ref(f.result()) for f in futures]
    del futures
    assert _collected(*refs), "the executor still holds futures (or results) nobody else does"
    assert ex.submit(mul, 6, 7).result(timeout=RESULT_TIMEOUT) == 42  # and it is still alive


@pytest.mark.parametrize("how", ["as_bound_method", "as_argument"])
def test_the_executor_does_not_keep_what_a_call_was_sent_with(ex: Executor, how: str) -> None:
    # mirrors test_no_stale_references
    holder = Holder()
    ref = weakref.ref(holder)
    if how == "as_bound_method":
        ex.submit(holder.touch)  # the future is dropped on purpose
    else:
        ex.submit(identity, holder)
    del holder
    eventually(lambda: _collected(ref), 10, "the sent object to be collected")


def test_as_completed_and_the_executor_do_not_keep_futures_already_yielded(ex: Executor) -> None:
    # mirrors test_free_reference_yielded_future
    futures = [ex.submit(mul, i, 2) for i in range(6)]
    for future in as_completed(futures, timeout=RESULT_TIMEOUT):
        futures.remove(future)
        ref = weakref.ref(future)
        del future
        assert _collected(ref), "a yielded future is still referenced"


# -- other executor checks (executor.py) -------------------------------------------------


def test_there_is_no_max_workers_the_endpoint_sets_concurrency(client: Client,
                                                               endpoint: Endpoint) -> None:
    # mirrors test_max_workers_negative: the endpoint's configured workers bound concurrency
    with pytest.raises(TypeError):
        Executor(endpoint_id=endpoint.endpoint_id, client=client, max_workers=2)  # type: ignore[call-arg]


@pytest.mark.parametrize("exc_type", [FalseyByBool, FalseyByLen])
def test_an_exception_that_is_falsey_still_fails_the_future(ex: Executor,
                                                            exc_type: type[Exception]) -> None:
    # mirrors test_swallows_falsey_exceptions
    future = ex.submit(raise_instance_of, exc_type, "falsey")
    with pytest.raises(TaskExecutionFailed) as caught:
        future.result(timeout=RESULT_TIMEOUT)
    assert caught.value.remote_type == exc_type.__name__
    assert "falsey" in caught.value.remote_message


# -- shutdown (test_shutdown.py) ---------------------------------------------------------


def test_submit_and_map_after_shutdown_raise_runtime_error(ex: Executor) -> None:
    # mirrors test_run_after_shutdown
    ex.shutdown()
    with pytest.raises(RuntimeError):
        ex.submit(pow, 2, 5)
    with pytest.raises(RuntimeError):
        ex.map(str, [1])


def test_shutdown_waits_until_every_submitted_call_finished(ex: Executor) -> None:
    # mirrors test_hang_issue12364
    futures = [ex.submit(mul, i, 3) for i in range(12)]
    assert _finishes(ex.shutdown), "shutdown hung"
    assert all(f.done() for f in futures)
    assert [f.result(timeout=0) for f in futures] == [i * 3 for i in range(12)]


def test_shutdown_with_cancel_futures_cancels_queued_and_running_calls(
        client: Client, ex: Executor, release: Path, caplog: pytest.LogCaptureFixture) -> None:
    # mirrors test_cancel_futures
    caplog.set_level(logging.ERROR, logger="gc_core.broker")
    futures = [ex.submit(held, i, str(release)) for i in range(6)]  # 2 run, 4 wait
    assert _finishes(lambda: ex.shutdown(wait=True, cancel_futures=True)), "shutdown hung"
    # All are cancelled, running ones too: the endpoint is asked to stop them, where
    # CPython lets a running call finish.
    assert all(f.cancelled() for f in futures)
    eventually(lambda: _ledger_statuses(client, ex) == ["cancelled"] * 6,
               CANCEL_SEEN_TIMEOUT, "the ledger to record every task cancelled")
    # The endpoint's answers for the cancelled tasks may reach the closing Executor: it
    # must drop them quietly, not fail on its IO thread.
    assert not [r for r in caplog.records if r.name == "gc_core.broker"]


def test_shutdown_does_not_wait_for_a_future_cancelled_just_before(idle: Executor) -> None:
    # mirrors test_hang_gh94440
    idle.submit(int).cancel()
    assert _finishes(lambda: idle.shutdown(wait=True)), "shutdown waited for a cancelled future"


def test_the_executor_is_a_context_manager_that_shuts_down_on_exit(client: Client,
                                                                   endpoint: Endpoint) -> None:
    # mirrors test_context_manager_shutdown
    executor = Executor(endpoint_id=endpoint.endpoint_id, client=client)
    with executor as entered:
        assert entered is executor
        assert list(entered.map(abs, range(-3, 3), timeout=RESULT_TIMEOUT)) == [3, 2, 1, 0, 1, 2]
    with pytest.raises(RuntimeError):
        executor.submit(abs, -1)


def test_shutdown_may_be_called_again(ex: Executor) -> None:
    # mirrors the documented "safe to call several times" (Executor.shutdown)
    assert ex.submit(mul, 2, 2).result(timeout=RESULT_TIMEOUT) == 4
    ex.shutdown()
    ex.shutdown()
    ex.shutdown(wait=False, cancel_futures=True)


def test_shutdown_without_waiting_returns_at_once_and_the_futures_still_resolve(
        client: Client, endpoint: Endpoint, release: Path) -> None:
    # mirrors test_shutdown_no_wait
    first = Executor(endpoint_id=endpoint.endpoint_id, client=client)
    futures = [first.submit(held, i * 2, str(release)) for i in range(4)]
    assert _finishes(lambda: first.shutdown(wait=False)), "shutdown(wait=False) hung"
    assert not any(f.done() for f in futures)
    release.touch()
    assert [f.result(timeout=RESULT_TIMEOUT) for f in futures] == [0, 2, 4, 6]


@pytest.mark.parametrize("ending", ["exit", "shutdown_without_waiting"])
def test_a_call_submitted_just_before_the_program_exits_still_runs(
        fabric: Fabric, endpoint: Endpoint, tmp_path: Path, ending: str) -> None:
    # mirrors test_interpreter_shutdown and test_hang_gh83386: the program exits (no hang)
    # and the call is not lost; here it runs on the endpoint even after its submitter is gone.
    marker = tmp_path / "ran"
    script = textwrap.dedent(f"""
        from gc_client import Executor
        from tests.integration.test_futures_conformance import write_marker
        ex = Executor(endpoint_id={endpoint.endpoint_id!r})
        ex.submit(write_marker, {str(marker)!r})
        if {ending!r} == "shutdown_without_waiting":
            ex.shutdown(wait=False)
    """)
    done = subprocess.run([sys.executable, "-c", script], env=fabric.env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    eventually(marker.exists, RESULT_TIMEOUT, "the call submitted before exit to run")


# -- wait (test_wait.py) -----------------------------------------------------------------


def test_wait_for_first_completed_returns_once_one_future_finished(ex: Executor,
                                                                   idle: Executor) -> None:
    # mirrors test_first_completed
    cancelled = _local_future("cancelled")
    finishes, never = ex.submit(mul, 21, 2), idle.submit(mul, 1, 1)
    done, not_done = wait([cancelled, finishes, never], timeout=RESULT_TIMEOUT,
                          return_when=FIRST_COMPLETED)
    assert done == {finishes}
    assert not_done == {cancelled, never}


def test_wait_for_first_completed_returns_at_once_when_some_already_are(idle: Executor) -> None:
    # mirrors test_first_completed_some_already_completed
    notified, returned = _local_future("cancelled_and_notified"), _local_future("returned")
    never = idle.submit(mul, 1, 1)
    done, not_done = wait([notified, returned, never], timeout=RESULT_TIMEOUT,
                          return_when=FIRST_COMPLETED)
    assert done == {notified, returned}
    assert not_done == {never}


def test_wait_for_first_exception_returns_when_a_call_fails(ex: Executor, idle: Executor) -> None:
    # mirrors test_first_exception (the first call is awaited instead of raced by sleeps)
    succeeded = ex.submit(mul, 2, 21)
    succeeded.result(timeout=RESULT_TIMEOUT)
    failed, never = ex.submit(raise_value_error, "boom"), idle.submit(mul, 1, 1)
    done, not_done = wait([succeeded, failed, never], timeout=RESULT_TIMEOUT,
                          return_when=FIRST_EXCEPTION)
    assert done == {succeeded, failed}
    assert not_done == {never}


def test_wait_for_first_exception_counts_futures_that_already_finished(ex: Executor,
                                                                       idle: Executor) -> None:
    # mirrors test_first_exception_some_already_complete
    returned, cancelled = _local_future("returned"), _local_future("cancelled")
    notified = _local_future("cancelled_and_notified")
    failed, never = ex.submit(divmod, 21, 0), idle.submit(mul, 1, 1)
    done, not_done = wait([returned, cancelled, notified, failed, never],
                          timeout=RESULT_TIMEOUT, return_when=FIRST_EXCEPTION)
    assert done == {returned, notified, failed}
    assert not_done == {cancelled, never}


def test_wait_for_first_exception_returns_at_once_for_a_future_that_already_failed(
        idle: Executor) -> None:
    # mirrors test_first_exception_one_already_failed
    raised, never = _local_future("raised"), idle.submit(mul, 1, 1)
    done, not_done = wait([raised, never], timeout=RESULT_TIMEOUT, return_when=FIRST_EXCEPTION)
    assert done == {raised}
    assert not_done == {never}


def test_wait_for_all_completed_waits_for_every_future(ex: Executor) -> None:
    # mirrors test_all_completed
    local = [_local_future(s) for s in ("returned", "cancelled_and_notified", "raised")]
    remote = [ex.submit(divmod, 2, 0), ex.submit(mul, 2, 21)]
    done, not_done = wait(local + remote, timeout=RESULT_TIMEOUT, return_when=ALL_COMPLETED)
    assert done == set(local + remote)
    assert not_done == set()


def test_wait_returns_the_unfinished_futures_when_it_times_out(idle: Executor) -> None:
    # mirrors test_timeout
    local = [_local_future(s) for s in ("cancelled_and_notified", "raised", "returned")]
    never = idle.submit(mul, 1, 1)
    done, not_done = wait([*local, never], timeout=0.05, return_when=ALL_COMPLETED)
    assert done == set(local)
    assert not_done == {never}


def test_wait_counts_a_future_given_twice_once(ex: Executor) -> None:
    # mirrors test_20369
    future = ex.submit(mul, 2, 3)
    done, not_done = wait([future, future], timeout=RESULT_TIMEOUT, return_when=ALL_COMPLETED)
    assert done == {future}
    assert not_done == set()


# -- as_completed (test_as_completed.py) -------------------------------------------------


def test_as_completed_yields_every_future_once_finished(ex: Executor) -> None:
    # mirrors test_no_timeout
    local = [_local_future(s) for s in ("cancelled_and_notified", "raised", "returned")]
    remote = [ex.submit(mul, 2, 21), ex.submit(mul, 7, 6)]
    assert set(as_completed(local + remote, timeout=RESULT_TIMEOUT)) == set(local + remote)


@pytest.mark.parametrize("timeout", [0, 0.1])
def test_as_completed_times_out_without_yielding_unfinished_futures(idle: Executor,
                                                                    timeout: float) -> None:
    # mirrors test_future_times_out and test_correct_timeout_exception_msg
    finished = {_local_future(s) for s in ("cancelled_and_notified", "raised", "returned")}
    never = idle.submit(mul, 1, 1)
    yielded = set()
    with pytest.raises(concurrent.futures.TimeoutError, match=r"^1 \(of 4\) futures unfinished$"):
        for future in as_completed(finished | {never}, timeout=timeout):
            yielded.add(future)
    assert yielded == finished


def test_as_completed_yields_a_future_given_several_times_once(ex: Executor) -> None:
    # mirrors test_duplicate_futures
    future = ex.submit(mul, 2, 21)
    assert list(as_completed(itertools.repeat(future, 3), timeout=RESULT_TIMEOUT)) == [future]


# -- futures (test_future.py) ------------------------------------------------------------


def test_a_done_callback_sees_the_remote_value(ex: Executor, release: Path) -> None:
    # mirrors test_done_callback_with_result (the callback runs on the executor's IO thread)
    seen: list[Any] = []
    called = threading.Event()
    future = ex.submit(held, 5, str(release))
    future.add_done_callback(lambda f: (seen.append(f.result()), called.set()))
    release.touch()
    assert called.wait(RESULT_TIMEOUT)
    assert seen == [5]


def test_a_done_callback_sees_the_remote_exception(ex: Executor, release: Path) -> None:
    # mirrors test_done_callback_with_exception
    seen: list[BaseException | None] = []
    called = threading.Event()
    future = ex.submit(held, "it failed", str(release), fail=True)
    future.add_done_callback(lambda f: (seen.append(f.exception()), called.set()))
    release.touch()
    assert called.wait(RESULT_TIMEOUT)
    assert isinstance(seen[0], TaskExecutionFailed) and seen[0].remote_type == "ValueError"


def test_a_done_callback_sees_the_cancellation(idle: Executor) -> None:
    # mirrors test_done_callback_with_cancel
    seen: list[bool] = []
    future = idle.submit(mul, 1, 1)
    future.add_done_callback(lambda f: seen.append(f.cancelled()))
    assert future.cancel()
    assert seen == [True]


def test_a_done_callback_added_after_the_future_finished_runs_at_once(ex: Executor,
                                                                      idle: Executor) -> None:
    # mirrors test_done_callback_already_successful, _already_failed, _already_cancelled
    succeeded, failed = ex.submit(mul, 5, 1), ex.submit(raise_value_error, "test")
    cancelled = idle.submit(mul, 1, 1)
    cancelled.cancel()
    wait([succeeded, failed], timeout=RESULT_TIMEOUT)
    seen: list[Any] = []
    succeeded.add_done_callback(lambda f: seen.append(f.result()))
    failed.add_done_callback(lambda f: seen.append(type(f.exception()).__name__))
    cancelled.add_done_callback(lambda f: seen.append(f.cancelled()))
    assert seen == [5, "TaskExecutionFailed", True]


def test_a_raising_callback_is_logged_and_stops_neither_other_callbacks_nor_results(
        ex: Executor, release: Path, caplog: pytest.LogCaptureFixture) -> None:
    # mirrors test_done_callback_raises
    caplog.set_level(logging.ERROR, logger="concurrent.futures")
    later_ran = threading.Event()

    def raising(_future: Future[Any]) -> None:
        raise RuntimeError("doh!")

    future = ex.submit(held, 5, str(release))
    future.add_done_callback(raising)
    future.add_done_callback(lambda _f: later_ran.set())
    release.touch()
    assert later_ran.wait(RESULT_TIMEOUT)
    assert any("exception calling callback for" in r.getMessage() and r.exc_info
               and "doh!" in str(r.exc_info[1]) for r in caplog.records)
    assert ex.submit(mul, 6, 7).result(timeout=RESULT_TIMEOUT) == 42  # the IO thread lives on


def test_a_raising_callback_added_after_the_future_finished_is_logged_not_raised(
        ex: Executor, caplog: pytest.LogCaptureFixture) -> None:
    # mirrors test_done_callback_raises_already_succeeded
    caplog.set_level(logging.ERROR, logger="concurrent.futures")
    future = ex.submit(mul, 5, 1)
    future.result(timeout=RESULT_TIMEOUT)

    def raising(_future: Future[Any]) -> None:
        raise RuntimeError("doh!")

    future.add_done_callback(raising)
    assert any("exception calling callback for" in r.getMessage() for r in caplog.records)


def test_cancel_succeeds_only_while_the_future_is_unfinished(ex: Executor, idle: Executor) -> None:
    # mirrors test_cancel, test_cancelled, test_done and test_running
    pending = idle.submit(mul, 1, 1)
    assert not pending.done() and not pending.cancelled() and not pending.running()
    assert pending.cancel()
    assert pending.cancelled() and pending.done() and not pending.running()
    assert pending.cancel()  # cancelling again still reports it cancelled
    succeeded, failed = ex.submit(mul, 6, 7), ex.submit(raise_value_error, "no")
    wait([succeeded, failed], timeout=RESULT_TIMEOUT)
    for finished in (succeeded, failed):
        assert not finished.cancel()
        assert finished.done() and not finished.cancelled() and not finished.running()
    assert succeeded.result(timeout=0) == 42


def test_cancelling_a_call_running_at_the_endpoint_stops_it(client: Client, ex: Executor,
                                                            release: Path,
                                                            tmp_path: Path) -> None:
    # mirrors test_cancel (RUNNING): CPython refuses to cancel a running call; the client does
    # not learn that a remote call started, so cancel() succeeds and the endpoint stops it.
    started = tmp_path / "started"
    future = ex.submit(held, 1, str(release), str(started))
    eventually(started.exists, RESULT_TIMEOUT, "the call to start")
    assert future.cancel() and future.cancelled()
    eventually(lambda: client.get_task(future.task_id).status == "cancelled",
               CANCEL_SEEN_TIMEOUT, "the ledger to record the running call cancelled")


def test_result_and_exception_honour_timeouts_and_cancellation(ex: Executor,
                                                               idle: Executor) -> None:
    # mirrors test_result_with_timeout and test_exception_with_timeout
    pending = idle.submit(mul, 1, 1)
    with pytest.raises(concurrent.futures.TimeoutError):
        pending.result(timeout=0)
    with pytest.raises(concurrent.futures.TimeoutError):
        pending.exception(timeout=0)
    succeeded, failed = ex.submit(mul, 6, 7), ex.submit(raise_value_error, "bad")
    wait([succeeded, failed], timeout=RESULT_TIMEOUT)
    assert succeeded.result(timeout=0) == 42 and succeeded.exception(timeout=0) is None
    assert isinstance(failed.exception(timeout=0), TaskExecutionFailed)
    with pytest.raises(TaskExecutionFailed):
        failed.result(timeout=0)
    pending.cancel()
    with pytest.raises(CancelledError):
        pending.result(timeout=0)
    with pytest.raises(CancelledError):
        pending.exception(timeout=0)


def test_a_caller_waiting_on_result_wakes_when_another_thread_cancels(idle: Executor) -> None:
    # mirrors test_result_with_cancel
    pending = idle.submit(mul, 1, 1)
    threading.Thread(target=pending.cancel).start()
    with pytest.raises(CancelledError):
        pending.result(timeout=RESULT_TIMEOUT)


def test_repr_shows_the_state_and_the_outcome_type(ex: Executor, idle: Executor) -> None:
    # mirrors test_repr
    pending = idle.submit(mul, 1, 1)
    assert isinstance(pending, ComputeFuture)
    assert re.fullmatch(r"<ComputeFuture at 0x[0-9a-f]+ state=pending>", repr(pending))
    pending.cancel()
    assert re.fullmatch(r"<ComputeFuture at 0x[0-9a-f]+ state=cancelled>", repr(pending))
    succeeded, failed = ex.submit(mul, 6, 7), ex.submit(raise_value_error, "bad")
    wait([succeeded, failed], timeout=RESULT_TIMEOUT)
    assert re.fullmatch(r"<ComputeFuture at 0x[0-9a-f]+ state=finished returned int>",
                        repr(succeeded))
    assert re.fullmatch(r"<ComputeFuture at 0x[0-9a-f]+ state=finished raised "
                        r"TaskExecutionFailed>", repr(failed))
