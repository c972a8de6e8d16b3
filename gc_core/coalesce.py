"""Nagle's rule for messages: what queues behind an unconfirmed publish goes out together.

A :class:`Coalescer` sends the first item for a routing key at once, so a lone call waits
for nothing; items added while that publish waits for the broker's confirm collect and go
as one batch when it comes (or as soon as ``max_items`` or ``max_bytes`` are
waiting). The client coalesces its tasks for an endpoint, the agent its results for a
task group. Each item keeps its own confirm callback: a confirmed batch confirms each of
its items, and a batch the broker refuses for good (too large, say) is sent again one item
per message, so that only the item at fault fails.

An item added with ``more_coming`` (its sender knows more items of its key follow soon: the
agent, for a result whose batch-mates still run) is held up to ``linger`` for them instead
of going at once; the last of them sends what was held. At a few hundred results a second
a confirm comes back before the next result is ready, so without holding nearly every
result went alone, and each message costs the broker, the ledger and the client far more
than the few bytes it carries.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Generic, TypeVar

from gc_core.batches import MAX_BATCH_TASKS
from gc_core.broker_limits import Refusal
from gc_core.broker_publisher import ConfirmCallback
from gc_core.protocol import Envelope

__all__ = ["MAX_BATCH_BYTES", "Coalescer"]

logger = logging.getLogger(__name__)

#: Bytes of payload one batch collects before it goes without waiting for a confirm.
MAX_BATCH_BYTES = 4 * 2**20

T = TypeVar("T")

#: Publishes one message with a routing key: the items it carries, encoded; the callback
#: gets the broker's answer.
Publish = Callable[[str, Sequence[T], Envelope, ConfirmCallback], None]


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

    def __init__(self, publish: Publish[T], encode: Callable[[Sequence[T]], Envelope],
                 size: Callable[[T], int], *, max_items: int = MAX_BATCH_TASKS,
                 max_bytes: int = MAX_BATCH_BYTES, linger: float = 0.0) -> None:
        self._publish = publish
        self._encode = encode
        self._size = size
        #: Items one batch may hold: at most what the wire allows.
        self._max_items = min(max_items, MAX_BATCH_TASKS)
        self._max_bytes = max_bytes
        #: Seconds an item added with ``more_coming`` may wait for more (0: it never does).
        self._linger = linger
        self._waiting: dict[str, _Waiting[T]] = {}
        self._lock = threading.Lock()
        #: When what is held for each key must go (monotonic seconds): the flusher's work.
        self._deadlines: dict[str, float] = {}
        self._held = threading.Condition(self._lock)
        self._flusher: threading.Thread | None = None

    def add(self, key: str, item: T, on_confirm: ConfirmCallback, *,
            more_coming: bool = False) -> None:
        """Send ``item`` now if nothing of ``key`` waits for a confirm, else with the next
        batch of ``key``; with ``more_coming``, hold it up to ``linger`` for the items
        that follow (the first item added without it sends what is held)."""
        with self._lock:
            waiting = self._waiting.setdefault(key, _Waiting())
            waiting.items.append((item, on_confirm))
            waiting.size += self._size(item)
            full = len(waiting.items) >= self._max_items or waiting.size >= self._max_bytes
            if not (more_coming and self._linger) or full:
                self._deadlines.pop(key, None)
            elif key not in self._deadlines:
                self._hold(key)
            held = key in self._deadlines
            batch = self._take(key, waiting) if full or not (waiting.in_flight or held) else []
        if batch:
            self._send_batch(key, batch)

    def idle(self) -> bool:
        """Whether nothing waits here, neither to be sent nor for a confirm."""
        with self._lock:
            return not self._waiting

    def _take(self, key: str, waiting: _Waiting[T]) -> list[tuple[T, ConfirmCallback]]:
        """Under the lock: what waits for ``key``, now in flight (held no longer)."""
        batch, waiting.items, waiting.size = waiting.items, [], 0
        waiting.in_flight += 1
        self._deadlines.pop(key, None)
        return batch

    def _hold(self, key: str) -> None:
        """Under the lock: hold what waits for ``key`` until ``linger`` from now."""
        self._deadlines[key] = time.monotonic() + self._linger
        if self._flusher is None:
            self._flusher = threading.Thread(target=self._flush_held, name="gc-coalescer-linger",
                                             daemon=True)
            self._flusher.start()
        self._held.notify()

    def _flush_held(self) -> None:
        """The flusher thread: send what was held for each key once its time is up (what
        waits for a confirm too is sent by that confirm)."""
        while True:
            with self._held:
                now = time.monotonic()
                due = [key for key, when in self._deadlines.items() if when <= now]
                if not due:
                    self._held.wait(min(self._deadlines.values()) - now if self._deadlines
                                    else None)
                    continue
                batches = []
                for key in due:
                    del self._deadlines[key]
                    waiting = self._waiting[key]
                    if not waiting.in_flight:
                        batches.append((key, self._take(key, waiting)))
            for key, batch in batches:
                try:
                    self._send_batch(key, batch)
                except Exception as exc:  # noqa: BLE001 - the flusher must outlive it
                    # Unconfirmed, each item's sender handles it as a nack (the agent puts
                    # the task back); the flusher goes on holding the others.
                    logger.warning("could not publish %d held items of %r: %s", len(batch),
                                   key, exc)
                    self._confirmed(key, batch, f"it could not be published: {exc}")

    def _send(self, key: str, items: list[T], on_confirm: ConfirmCallback) -> None:
        """Publish ``items`` as one message; one that cannot be encoded is refused as the
        broker would refuse it."""
        try:
            envelope = self._encode(items)
        except Exception as exc:  # noqa: BLE001 - told to its publisher, as any refusal
            on_confirm(Refusal(f"it cannot be encoded: {exc}"))
            return
        self._publish(key, items, envelope, on_confirm)

    def _send_batch(self, key: str, batch: list[tuple[T, ConfirmCallback]]) -> None:
        self._send(key, [item for item, _ in batch], partial(self._confirmed, key, batch))

    def _confirmed(self, key: str, batch: list[tuple[T, ConfirmCallback]],
                   reason: str | None) -> None:
        """The broker answered a publish of ``key``: send what queued behind it, then tell
        each item of the batch."""
        with self._lock:
            waiting = self._waiting[key]
            waiting.in_flight -= 1
            # What is held waits for its time, or for the last item of its key.
            following = self._take(key, waiting) \
                if waiting.items and key not in self._deadlines else []
            if not waiting.in_flight and not waiting.items and not following:
                del self._waiting[key]
        if following:
            self._send_batch(key, following)
        if isinstance(reason, Refusal) and len(batch) > 1:
            for item, on_confirm in batch:  # alone, only the item at fault is refused
                self._send(key, [item], on_confirm)
            return
        for _, on_confirm in batch:
            on_confirm(reason)
