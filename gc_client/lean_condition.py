"""A ``threading.Condition`` that costs the garbage collector three objects, not eight.

``threading.Condition()`` stores five bound methods of its lock on itself (``acquire``,
``release`` and three internals ``wait`` uses), each an object the cyclic collector
tracks. Every ``concurrent.futures.Future`` holds one condition, and a sweep holds its
futures: tens of thousands alive at once, each with eleven tracked objects, walked again
by every full collection while more are submitted (measured: 17 µs of the client's CPU
per task in ``bench.run``'s sweep went to full collections). This condition looks its
lock's methods up when called instead; it behaves as the standard one does.
"""

from __future__ import annotations

import threading
from collections import deque
from types import TracebackType
from typing import Any

__all__ = ["LeanCondition"]


class LeanCondition(threading.Condition):
    """A condition on its own re-entrant lock (``threading.Condition()``'s default)."""

    def __init__(self) -> None:  # not super().__init__(): that binds the five methods
        self._lock = threading.RLock()
        self._waiters: deque[Any] = deque()

    def __enter__(self) -> bool:
        return self._lock.__enter__()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._lock.__exit__(kind, value, traceback)

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    # what Condition.wait calls on an RLock: release all its levels, then restore them
    def _release_save(self) -> Any:
        return self._lock._release_save()  # type: ignore[attr-defined]

    def _acquire_restore(self, state: Any) -> None:
        self._lock._acquire_restore(state)  # type: ignore[attr-defined]

    def _is_owned(self) -> bool:
        return self._lock._is_owned()  # type: ignore[attr-defined,no-any-return]
