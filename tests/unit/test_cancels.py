"""The agent's task owners and early cancels: every order a cancel and its task can meet in.

The agent's IO thread handles cancels while a fetch thread may be handing the same task to
the engine; each test below is one interleaving of the two, called in that order.
"""

from __future__ import annotations

import threading

from gc_agent.cancels import Cancels


def test_a_cancel_before_its_task_arrives_answers_the_task_instead_of_running_it() -> None:
    cancels = Cancels(memory=10)

    assert cancels.cancel("t1", "alice") == ("remembered", "")
    assert cancels.begin("t1", "alice") is False
    # the cancel is used up: a redelivery of the task runs
    assert cancels.begin("t1", "alice") is True


def test_a_cancel_from_another_user_neither_stops_nor_is_remembered_for_the_task() -> None:
    cancels = Cancels(memory=10)
    cancels.cancel("t1", "mallory")
    assert cancels.begin("t1", "alice") is True

    assert cancels.cancel("t1", "mallory") == ("refused", "alice")
    assert cancels.submitted("t1") is False


def test_a_cancel_while_the_task_is_handed_to_the_engine_is_carried_out_once_it_is_there() -> None:
    # Given a fetch thread that has begun handing t1 to the engine
    cancels = Cancels(memory=10)
    assert cancels.begin("t1", "alice") is True
    # When the IO thread handles alice's cancel before the engine has the task
    step = cancels.cancel("t1", "alice")
    # Then the cancel waits for the engine, and the fetch thread is told to cancel it there
    assert step == ("deferred", "alice")
    assert cancels.submitted("t1") is True


def test_a_cancel_after_the_engine_has_the_task_goes_to_the_engine() -> None:
    cancels = Cancels(memory=10)
    cancels.begin("t1", "alice")
    assert cancels.submitted("t1") is False

    assert cancels.cancel("t1", "alice") == ("at-engine", "alice")


def test_an_outcome_during_submission_leaves_nothing_to_cancel() -> None:
    cancels = Cancels(memory=10)
    cancels.begin("t1", "alice")
    cancels.end("t1")  # an engine that answers inside submit()

    assert cancels.submitted("t1") is False
    assert cancels.cancel("t1", "alice") == ("remembered", "")


def test_only_the_newest_early_cancels_are_remembered() -> None:
    cancels = Cancels(memory=2)
    for task_id in ("t1", "t2", "t3"):
        cancels.cancel(task_id, "alice")

    assert cancels.begin("t1", "alice") is True
    assert cancels.begin("t3", "alice") is False


def test_cancels_racing_their_tasks_on_two_threads_are_each_carried_out_once() -> None:
    # Every task is cancelled by one thread while another begins and submits it: whichever
    # wins, each task is either answered as cancelled before it starts, or cancelled at the
    # engine, exactly once.
    cancels = Cancels(memory=100_000)
    task_ids = [f"t{i}" for i in range(20_000)]
    outcomes: dict[str, list[str]] = {task_id: [] for task_id in task_ids}
    lock = threading.Lock()

    def note(task_id: str, what: str) -> None:
        with lock:
            outcomes[task_id].append(what)

    def run() -> None:
        for task_id in task_ids:
            if not cancels.begin(task_id, "alice"):
                note(task_id, "answered as cancelled")
            elif cancels.submitted(task_id):
                note(task_id, "cancelled at the engine")

    def cancel() -> None:
        for task_id in task_ids:
            step, _ = cancels.cancel(task_id, "alice")
            if step == "at-engine":
                note(task_id, "cancelled at the engine")

    threads = [threading.Thread(target=run), threading.Thread(target=cancel)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert {task_id: len(done) for task_id, done in outcomes.items() if len(done) != 1} == {}
