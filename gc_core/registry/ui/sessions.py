"""The dashboard's sign-in sessions: a random id in a cookie, the token kept server-side.

The cookie carries no token, only a session id whose SHA-256 keys the store, so neither a
leaked cookie jar nor a memory dump of the ids gives a bearer token away; each request
authenticates the kept token again, so revoking it ends the session at once. Sessions
live in this process: a restarted registry asks everyone to sign in again.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass

__all__ = ["LOGIN_COOKIE", "SESSION_COOKIE", "SessionStore", "UiSession", "same_secret"]

#: The cookie holding the session id.
SESSION_COOKIE = "gc_ui_session"
#: The cookie holding the sign-in form's CSRF secret, before a session exists.
LOGIN_COOKIE = "gc_ui_login"
#: Seconds a session lives without a request.
SESSION_IDLE_SECONDS = 8 * 3600
#: Sessions kept at most; the least recently used goes first.
MAX_SESSIONS = 10_000


@dataclass
class UiSession:
    """One signed-in browser."""

    #: The token it signed in with; None on an open registry, where nobody proves anything.
    token: str | None
    #: What every form of the session must send back (the cookie alone is not enough).
    csrf: str
    last_used: float


class SessionStore:
    """Sessions by the SHA-256 of their id; safe to use from several threads."""

    def __init__(self) -> None:
        self._sessions: dict[str, UiSession] = {}
        self._lock = threading.Lock()

    def open(self, token: str | None) -> tuple[str, UiSession]:
        """A new session for ``token``: its id (for the cookie) and the session."""
        session_id = secrets.token_urlsafe(32)
        session = UiSession(token=token, csrf=secrets.token_urlsafe(32), last_used=time.time())
        with self._lock:
            self._forget_idle(session.last_used)
            if len(self._sessions) >= MAX_SESSIONS:
                oldest = min(self._sessions, key=lambda key: self._sessions[key].last_used)
                del self._sessions[oldest]
            self._sessions[_key(session_id)] = session
        return session_id, session

    def find(self, session_id: str | None) -> UiSession | None:
        """The live session of this id, or None."""
        if not session_id:
            return None
        now = time.time()
        with self._lock:
            session = self._sessions.get(_key(session_id))
            if session is None or now - session.last_used > SESSION_IDLE_SECONDS:
                self._sessions.pop(_key(session_id), None)
                return None
            session.last_used = now
            return session

    def close(self, session_id: str | None) -> None:
        """End a session (signing out, or its token no longer holds)."""
        if session_id:
            with self._lock:
                self._sessions.pop(_key(session_id), None)

    def _forget_idle(self, now: float) -> None:
        idle = [key for key, s in self._sessions.items()
                if now - s.last_used > SESSION_IDLE_SECONDS]
        for key in idle:
            del self._sessions[key]


def same_secret(sent: str | None, expected: str) -> bool:
    """Whether a form sent the expected CSRF secret (compared in constant time)."""
    return bool(sent) and hmac.compare_digest(str(sent).encode(), expected.encode())


def _key(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()
