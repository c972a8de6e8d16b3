"""The ledger's decisions, as plain functions of data: whose word counts for a result,
and whether a failure to write is one message's fault, the database's, or another
registry's (see ``ledger.py``, whose writer thread acts on them)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.exc import (
    DataError,
    DBAPIError,
    DisconnectionError,
    IntegrityError,
    StatementError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeout

from gc_core.protocol import ResultMessage
from gc_core.registry.identity import AGENT_PREFIX
from gc_core.registry.store import TaskOwner

__all__ = ["Senders", "conflict", "describe", "message_fault", "result_refusal"]

#: PostgreSQL's SQLSTATEs of a transaction it ended for another's sake: tried again.
CONFLICT_STATES = frozenset({"40P01", "40001"})
#: Longest description of an error in a warning line, in characters.
MAX_DESCRIPTION = 300


@dataclass(frozen=True)
class Senders:
    """Whose broker-checked ``user_id`` the ledger believes, and which account is its own."""

    #: True when the broker checks every publisher's ``user_id`` (a tokens-mode registry on
    #: a secured broker); False in open mode, where messages' claims are all there is.
    verified: bool = False
    #: The registry's own broker account: it submits actions for users and republishes dead
    #: letters, so its word counts for anyone ("" if its broker URL names no user).
    registry: str = ""

    def any_of(self, sender: str, *owners: str) -> bool:
        """Whether ``sender`` is one of ``owners`` or the registry's own account."""
        return sender in {name for name in (*owners, self.registry) if name}


def result_refusal(result: ResultMessage, owner: TaskOwner, sender: str,
                    senders: Senders, *, dead: bool) -> str | None:
    """Why the ledger must not record ``result`` (a dead letter if ``dead``) for the task
    ``owner`` describes, or None."""
    if senders.verified:
        # A dead letter is the submitter's own task message (the broker kept its user_id),
        # or one the endpoint's agent took out of a batch and put back alone.
        agent = f"{AGENT_PREFIX}{owner.endpoint_id}"
        expected = (owner.user, agent) if dead else (agent,)
        if not senders.any_of(sender, *expected):
            return f"only {' or '.join(repr(name) for name in expected)} may send it"
        return None
    if not dead and (result.user, result.endpoint_id) != (owner.user, owner.endpoint_id):
        return (f"it claims user {result.user!r} and endpoint {result.endpoint_id!r}, but the "
                f"task is {owner.user!r}'s on endpoint {owner.endpoint_id!r}")
    return None


def conflict(exc: DBAPIError) -> bool:
    """Whether PostgreSQL ended the transaction for another's sake (a deadlock, a
    serialization failure): the same transaction may well succeed at once."""
    state = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
    return state in CONFLICT_STATES


def message_fault(exc: Exception) -> bool:
    """Whether ``exc`` is one message's fault (it is dropped) rather than the database's
    (gone, locked, restarting, its schema missing: the batch waits in the queue)."""
    if isinstance(exc, (DataError, IntegrityError)):  # a value its column cannot hold
        return True
    return not isinstance(exc, (DBAPIError, DisconnectionError, PoolTimeout))


def describe(exc: Exception) -> str:
    """What failed, escaped, without a statement's parameters (they hold payloads)."""
    cause = exc.orig if isinstance(exc, StatementError) else exc
    text = repr(f"{type(cause).__name__}: {cause}")
    return text if len(text) <= MAX_DESCRIPTION else text[:MAX_DESCRIPTION] + "…"
