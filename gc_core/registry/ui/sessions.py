"""The dashboard's sign-in sessions: a random id in a cookie, the rest in the database.

The cookie carries no token, only a session id whose SHA-256 keys the session's row, and
the row names its token by id: neither a leaked cookie jar nor the database gives a bearer
token away. Each request authenticates that token again, so revoking it ends the session at
once. Every registry of the database knows every session (several may serve one address,
behind a load balancer that need not be sticky), and a restarted registry keeps them.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from gc_core.registry.db import UiSessionRow

__all__ = ["LOGIN_COOKIE", "SESSION_COOKIE", "UiSession", "close_session", "find_session",
           "open_session", "same_secret"]

#: The cookie holding the session id.
SESSION_COOKIE = "gc_ui_session"
#: The cookie holding the sign-in form's CSRF secret, before a session exists.
LOGIN_COOKIE = "gc_ui_login"
#: Seconds a session lives without a request.
SESSION_IDLE_SECONDS = 8 * 3600
#: Sessions kept at most; the least recently used goes first.
MAX_SESSIONS = 10_000
#: Seconds within which a session's use is not written down again: a page that refreshes
#: itself every few seconds costs the database a write a minute, not one a refresh.
TOUCH_SECONDS = 60.0


@dataclass(frozen=True)
class UiSession:
    """One signed-in browser."""

    #: The id of the token it signed in with; None on an open registry, where nobody
    #: proves anything.
    token_id: str | None
    #: What every form of the session must send back (the cookie alone is not enough).
    csrf: str


def open_session(db: Session, token_id: str | None) -> tuple[str, UiSession]:
    """A new session for the token ``token_id``: its id (for the cookie) and the session.
    Idle sessions are dropped first, and the least recently used while MAX_SESSIONS are
    kept."""
    session_id, now = secrets.token_urlsafe(32), time.time()
    db.execute(delete(UiSessionRow).where(UiSessionRow.last_used < now - SESSION_IDLE_SECONDS))
    surplus = (db.scalar(select(func.count()).select_from(UiSessionRow)) or 0) - MAX_SESSIONS + 1
    if surplus > 0:
        oldest = db.scalars(select(UiSessionRow.key).order_by(UiSessionRow.last_used)
                            .limit(surplus)).all()
        db.execute(delete(UiSessionRow).where(UiSessionRow.key.in_(oldest)))
    session = UiSession(token_id, secrets.token_urlsafe(32))
    db.add(UiSessionRow(key=_key(session_id), token_id=token_id, csrf=session.csrf,
                        last_used=now))
    db.commit()
    return session_id, session


def find_session(db: Session, session_id: str | None) -> UiSession | None:
    """The live session of this id, or None (an idle one is dropped)."""
    if not session_id:
        return None
    row = db.get(UiSessionRow, _key(session_id))
    if row is None:
        return None
    now = time.time()
    if now - row.last_used > SESSION_IDLE_SECONDS:
        close_session(db, session_id)
        return None
    if now - row.last_used > TOUCH_SECONDS:
        # A statement, not the row: another registry may have ended the session meanwhile.
        db.execute(update(UiSessionRow).where(UiSessionRow.key == row.key)
                   .values(last_used=now))
        db.commit()
    return UiSession(row.token_id, row.csrf)


def close_session(db: Session, session_id: str | None) -> None:
    """End a session (signing out, or its token no longer holds)."""
    if session_id:
        db.execute(delete(UiSessionRow).where(UiSessionRow.key == _key(session_id)))
        db.commit()


def same_secret(sent: str | None, expected: str) -> bool:
    """Whether a form sent the expected CSRF secret (compared in constant time)."""
    return bool(sent) and hmac.compare_digest(str(sent).encode(), expected.encode())


def _key(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()
