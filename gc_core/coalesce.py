"""Nagle's rule for messages: what queues behind an unconfirmed publish goes out together.

A :class:`Coalescer` sends the first item for a routing key at once, so a lone call waits
for nothing; items added while that publish waits for the broker's confirm collect and go
as one batch when it comes (or as soon as ``max_items`` or ``max_bytes`` are
waiting). The client coalesces its tasks for an endpoint, the agent its results for a
task group. Each item keeps its own confirm callback: a confirmed batch confirms each of
its items, and a batch the broker refuses for good (too large, say) is sent again one item
per message, so that only the item at fault fails.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Generic, TypeVar

from gc_core.batches import MAX_BATCH_TASKS
from gc_core.broker_limits import Refusal
from gc_core.broker_publisher import ConfirmCallback
from gc_core.protocol import Envelope

__all__ = ["MAX_BATCH_BYTES", "Coalescer"]

#: Bytes of payload one batch collects before it goes without waiting for a confirm.
MAX_BATCH_BYTES = 4 * 2**20

T = TypeVar("T")

#: Publishes one message with a routing key; the callback gets the broker's answer.
Publish = Callable[[str, Envelope, ConfirmCallback], None]


@dataclass(slots=True)
class _Waiting(Generic[T]):
    items: list[tuple[T, ConfirmCallback]] = field(default_factory=list)
    size: int = 0
    #: Publishes of this key the broker has not answered yet.
    in_flight: int = 0


class Coalescer(Generic[T]):
    """Collects items per routing key and publishes them, batched, with their confirms.

    Thread-safe: items are added from any thread, confirms come on the broker's IO thread.
    ``publish`` is never called under the lock (a refused publish calls back at once).
    """

    def __init__(self, publish: Publish, encode: Callable[[Sequence[T]], Envelope],
                 size: Callable[[T], int], *, max_items: int = MAX_BATCH_TASKS,
                 max_bytes: int = MAX_BATCH_BYTES) -> None:
        self._publish = publish
        self._encode = encode
        self._size = size
        #: Items one batch may hold: at most what the wire allows.
        self._max_items = min(max_items, MAX_BATCH_TASKS)
        self._max_bytes = max_bytes
        self._waiting: dict[str, _Waiting[T]] = {}
        self._lock = threading.Lock()

    def add(self, key: str, item: T, on_confirm: ConfirmCallback) -> None:
        """Send ``item`` now if nothing of ``key`` waits for a confirm, else with the next
        batch of ``key``."""
        with self._lock:
            waiting = self._waiting.setdefault(key, _Waiting())
            waiting.items.append((item, on_confirm))
            waiting.size += self._size(item)
            full = len(waiting.items) >= self._max_items or waiting.size >= self._max_bytes
            batch = self._take(waiting) if full or not waiting.in_flight else []
        if batch:
            self._send_batch(key, batch)

    def idle(self) -> bool:
        """Whether nothing waits here, neither to be sent nor for a confirm."""
        with self._lock:
            return not self._waiting

    def _take(self, waiting: _Waiting[T]) -> list[tuple[T, ConfirmCallback]]:
        """Under the lock: what waits for ``key``, now in flight."""
        batch, waiting.items, waiting.size = waiting.items, [], 0
        waiting.in_flight += 1
        return batch

    def _send(self, key: str, items: list[T], on_confirm: ConfirmCallback) -> None:
        """Publish ``items`` as one message; one that cannot be encoded is refused as the
        broker would refuse it."""
        try:
            envelope = self._encode(items)
        except Exception as exc:  # noqa: BLE001 - told to its publisher, as any refusal
            on_confirm(Refusal(f"it cannot be encoded: {exc}"))
            return
        self._publish(key, envelope, on_confirm)

    def _send_batch(self, key: str, batch: list[tuple[T, ConfirmCallback]]) -> None:
        self._send(key, [item for item, _ in batch], partial(self._confirmed, key, batch))

    def _confirmed(self, key: str, batch: list[tuple[T, ConfirmCallback]],
                   reason: str | None) -> None:
        """The broker answered a publish of ``key``: send what queued behind it, then tell
        each item of the batch."""
        with self._lock:
            waiting = self._waiting[key]
            waiting.in_flight -= 1
            following = self._take(waiting) if waiting.items else []
            if not waiting.in_flight and not following:
                del self._waiting[key]
        if following:
            self._send_batch(key, following)
        if isinstance(reason, Refusal) and len(batch) > 1:
            for item, on_confirm in batch:  # alone, only the item at fault is refused
                self._send(key, [item], on_confirm)
            return
        for _, on_confirm in batch:
            on_confirm(reason)
