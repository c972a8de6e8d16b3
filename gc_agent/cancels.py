"""Who owns each task the agent runs, and the cancels that came before their task.

Three kinds of thread meet here: the broker's IO thread (commands, and tasks whose function
is cached), the fetch threads (tasks whose function or admission had to be fetched first)
and the engine's threads (outcomes). So every look and every change is made under one
lock, and a task goes through the steps below, each of which a cancel may meet:

    begin()      not here yet: a cancel is remembered, and begin() answers it
    submitted()  being handed to the engine: a cancel is noted, submitted() answers it
    (at the engine)   the cancel goes to the engine
    end()        its outcome came: a cancel finds nothing and is remembered again
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

__all__ = ["CancelStep", "Cancels"]

#: What a cancel found: the task is another user's (refused), not here yet (remembered),
#: being handed to the engine (deferred, until :meth:`Cancels.submitted`), or at the engine.
CancelStep = Literal["refused", "remembered", "deferred", "at-engine"]


@dataclass(slots=True)
class _Owned:
    user: str
    at_engine: bool = False
    cancel_requested: bool = False


class Cancels:
    """The agent's record of task owners and early cancels, safe to share across threads."""

    def __init__(self, memory: int) -> None:
        #: Cancelled task ids not yet here, remembered up to this many (oldest dropped).
        self._memory = memory
        self._lock = threading.Lock()
        self._owners: dict[str, _Owned] = {}
        self._early: OrderedDict[str, str] = OrderedDict()

    def begin(self, task_id: str, user: str) -> bool:
        """Before ``task_id`` goes to the engine: False when ``user`` cancelled it first
        (that cancel is used up), else True, and the task is ``user``'s until :meth:`end`."""
        with self._lock:
            if self._early.get(task_id) == user:
                del self._early[task_id]
                return False
            self._owners[task_id] = _Owned(user)
            return True

    def submitted(self, task_id: str) -> bool:
        """The engine has ``task_id`` now: True when a cancel came while it was being handed
        over, so the caller cancels it at the engine."""
        with self._lock:
            owned = self._owners.get(task_id)
            if owned is None:  # its outcome came already
                return False
            owned.at_engine = True
            return owned.cancel_requested

    def end(self, task_id: str) -> None:
        """``task_id``'s outcome came, or handling it failed: it is nobody's any more."""
        with self._lock:
            self._owners.pop(task_id, None)

    def cancel(self, task_id: str, user: str) -> tuple[CancelStep, str]:
        """``user`` cancels ``task_id``: what to do about it, and the task's owner ("" when
        it is not here)."""
        with self._lock:
            owned = self._owners.get(task_id)
            if owned is None:
                self._remember(task_id, user)
                return "remembered", ""
            if owned.user != user:
                return "refused", owned.user
            if not owned.at_engine:
                owned.cancel_requested = True
                return "deferred", owned.user
            return "at-engine", owned.user

    def remember(self, task_id: str, user: str) -> None:
        """Answer ``task_id`` as cancelled if it comes (again) later: the engine did not
        know it."""
        with self._lock:
            self._remember(task_id, user)

    def _remember(self, task_id: str, user: str) -> None:
        self._early[task_id] = user
        if len(self._early) > self._memory:
            self._early.popitem(last=False)
