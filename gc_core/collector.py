"""The cyclic garbage collector in a long-running daemon (the agent, the registry).

A full collection walks every object the collector tracks. In a daemon most of them are
what starting built (modules, classes, validators, the app) and live as long as the
process, yet every full collection walks them again, and under load full collections come
often: a task in flight outlives two young collections, so each one counts towards the
next full walk. Frozen (:func:`gc.freeze`), the startup heap is left out of those walks.
"""

from __future__ import annotations

import gc

__all__ = ["freeze_startup_heap"]


def freeze_startup_heap() -> None:
    """Collect what starting left as garbage, then exempt all that lives now from later
    collections. Call it once, when a daemon is built and about to serve; never in a
    library's caller's process (its heap is not ours to freeze)."""
    gc.collect()
    gc.freeze()
