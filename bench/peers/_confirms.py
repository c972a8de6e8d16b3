"""Publisher-confirm bookkeeping for pika's asynchronous channels."""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

T = TypeVar("T")


class ConfirmTracker(Generic[T]):
    """Remember what each unconfirmed publish was for, and release it when the broker confirms.

    Sequence numbers count publishes on a channel in confirm mode from 1, as the broker does;
    a confirm with ``multiple`` covers every publish up to and including its tag.

    >>> tracker = ConfirmTracker[str]()
    >>> tracker.published("a"); tracker.published("b"); tracker.published("c")
    >>> tracker.confirm(2, multiple=True)
    ['a', 'b']
    """

    def __init__(self) -> None:
        self._next_seq = 1
        # OrderedDict, not dict: popping from the front of a plain dict degrades to O(n)
        self._pending: OrderedDict[int, T] = OrderedDict()

    def __len__(self) -> int:
        return len(self._pending)

    def published(self, item: T) -> None:
        """Record the next publish on the channel and what it was for."""
        self._pending[self._next_seq] = item
        self._next_seq += 1

    def confirm(self, tag: int, multiple: bool) -> list[T]:
        """Release and return the items the broker's ack or nack for ``tag`` covers."""
        if not multiple:
            return [self._pending.pop(tag)] if tag in self._pending else []
        released = []
        while self._pending:
            seq = next(iter(self._pending))
            if seq > tag:
                break
            released.append(self._pending.popitem(last=False)[1])
        return released

    def oldest(self) -> T | None:
        """Return the item of the oldest publish still unconfirmed, if any."""
        return next(iter(self._pending.values()), None)
