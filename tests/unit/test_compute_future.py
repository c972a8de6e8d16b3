"""A ComputeFuture is a whole ``concurrent.futures.Future`` that costs the collector little."""

from __future__ import annotations

import gc
import threading
from concurrent.futures import FIRST_COMPLETED, Future, wait

from gc_client.executor import ComputeFuture

#: Objects the cyclic collector tracks for one ComputeFuture: itself, its condition, the
#: condition's lock and waiter deque, the future's waiter and callback lists. A plain
#: ``threading.Condition`` adds five bound methods of its lock (thirteen in all, with a
#: callback bound anew per future), walked again by every full collection of a sweep.
TRACKED_PER_FUTURE = 6


def test_a_compute_future_has_every_attribute_a_plain_future_has() -> None:
    # it replaces the condition Future.__init__ made: whatever else a Python version's
    # Future keeps, it must keep too
    assert set(vars(Future())) <= set(vars(ComputeFuture("t")))


def test_a_compute_future_costs_the_collector_six_objects() -> None:
    existing = gc.get_objects()  # held, so no id of theirs is reused by a new object
    old = {id(thing) for thing in existing}
    on_cancel = print
    futures = [ComputeFuture(f"t{i}", on_cancel) for i in range(1000)]
    # Counted: the new tracked objects the futures reach, not whatever another thread of
    # this test process made meanwhile
    reached, todo = set(), list(futures)
    while todo:
        thing = todo.pop()
        if id(thing) not in reached and id(thing) not in old and gc.is_tracked(thing):
            reached.add(id(thing))
            todo.extend(gc.get_referents(thing))
    assert len(reached) <= TRACKED_PER_FUTURE * len(futures)


def test_a_result_set_by_another_thread_wakes_every_kind_of_waiter() -> None:
    futures = [ComputeFuture(f"t{i}") for i in range(3)]
    seen: list[object] = []
    waiters = [threading.Thread(target=lambda: seen.append(futures[0].result(timeout=10))),
               threading.Thread(target=lambda: seen.append(
                   len(wait(futures[:2], timeout=10, return_when=FIRST_COMPLETED).done)))]
    for thread in waiters:
        thread.start()
    futures[0].set_result("done")
    for thread in waiters:
        thread.join(10)
    assert sorted(map(str, seen)) == ["1", "done"]
    assert not futures[1].done() and futures[1].cancel() and futures[1].cancelled()
    assert wait(futures[2:], timeout=0.01).not_done == {futures[2]}


def test_the_condition_stays_reentrant_for_callbacks_that_look_at_their_future() -> None:
    future = ComputeFuture("t")
    with future._condition, future._condition:  # the default condition's RLock allows it
        assert future._condition._is_owned()
    seen: list[bool] = []
    future.add_done_callback(lambda done: seen.append(done.done()))
    future.set_result(1)
    assert seen == [True] and not future._condition._is_owned()
