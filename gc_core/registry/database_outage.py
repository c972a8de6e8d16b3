"""The ledger's view of its database being away (PostgreSQL restarting, the network to it
cut, a disk full): since when, and when to try it again.

While it is away the ledger holds what it received, unacknowledged (the broker keeps it,
and delivers no more than the ledger's prefetch), and tries again after pauses that
double from FIRST_PAUSE to LONGEST_PAUSE: a ledger returning each batch to the queue at
once failed again as fast as the broker redelivered it, a traceback in the log each time.
The log says once that it waits, briefly at each try, and once that the database is back.
"""

from __future__ import annotations

import logging
import time

from gc_core.registry.ledger_rules import describe

__all__ = ["DatabaseOutage"]

logger = logging.getLogger("gc_core.registry.ledger")

#: Seconds before the first try after the database failed; each failed try doubles it.
FIRST_PAUSE = 0.5
#: Longest pause between tries, in seconds: how late, at most, the ledger notices the
#: database is back.
LONGEST_PAUSE = 10.0


class DatabaseOutage:
    """Whether the database is away; only the ledger's writer thread uses it."""

    def __init__(self, database: str) -> None:
        self._database = database
        self._since: float | None = None
        self._pause = 0.0
        self._retry_at = 0.0

    @property
    def problem(self) -> str | None:
        """What to tell about the database (None while it answers)."""
        if self._since is None:
            return None
        return (f"waiting for its database ({self._database}), away for "
                f"{time.monotonic() - self._since:.0f} s")

    def wait(self) -> float | None:
        """Seconds until the next try while the database is away (0: try now); None while
        it answers."""
        return None if self._since is None else max(0.0, self._retry_at - time.monotonic())

    def failed(self, exc: Exception, held: int) -> None:
        """A write failed for the database's sake, with ``held`` deliveries waiting."""
        now = time.monotonic()
        self._pause = FIRST_PAUSE if self._since is None else min(2 * self._pause, LONGEST_PAUSE)
        self._retry_at = now + self._pause
        if self._since is None:
            self._since = now
            logger.warning("ledger could not write to its database (%s): %s; waiting for its "
                           "database, the %d messages it holds stay in the broker's keeping, "
                           "unacknowledged", self._database, describe(exc), held)
        else:
            logger.info("ledger could not write to its database yet (%s, away for %.0f s); "
                        "trying again in %.1f s", describe(exc), now - self._since, self._pause)

    def answered(self) -> None:
        """A write went through."""
        if self._since is not None:
            logger.warning("ledger's database (%s) is back after %.0f s; writing what waited",
                           self._database, time.monotonic() - self._since)
            self._since = None
