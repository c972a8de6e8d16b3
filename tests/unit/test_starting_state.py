"""A worker's starting state against a timer its host armed before the first task."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from gc_agent.execution import FunctionCache
from gc_agent.starting_state import StartingState
from tests.unit.test_execution import a_job


def leave_a_cpu_timer_running() -> str:
    signal.setitimer(signal.ITIMER_VIRTUAL, 100)
    return "left"


@pytest.fixture
def hosts_alarm() -> Iterator[None]:
    """An ITIMER_REAL armed (with a harmless handler) before the worker's first task, as
    pytest-timeout arms one around each test; the one there was before is handed back."""
    handler = signal.signal(signal.SIGALRM, lambda *_: None)
    before = signal.setitimer(signal.ITIMER_REAL, 100)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)
        signal.setitimer(signal.ITIMER_REAL, *before)
        signal.signal(signal.SIGALRM, handler)


def test_a_timer_armed_before_the_first_task_is_the_hosts_and_keeps_running(
        hosts_alarm: None) -> None:
    # Parsl's worker, or a test runner, may host the worker's tasks with a timer of its own
    # running: no task armed it, so none is told it left it, and it is not stopped
    state = StartingState.of_this_process()

    outcome = state.run(a_job(leave_a_cpu_timer_running), FunctionCache())

    assert signal.getitimer(signal.ITIMER_REAL)[0] > 0
    assert "ITIMER_REAL" not in outcome.stderr
    # while the timer the task left is still stopped, and the task told
    assert signal.getitimer(signal.ITIMER_VIRTUAL)[0] == 0
    assert "left a timer running (ITIMER_VIRTUAL)" in outcome.stderr
