"""Who is looking at the dashboard: the session behind a request, its principal, and the
bound on every form's body (the pages check each form's CSRF secret)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated
from urllib.parse import parse_qs, quote

from fastapi import Depends, HTTPException, Request

from gc_core.errors import NotAuthenticated
from gc_core.registry import identity
from gc_core.registry.deps import Db
from gc_core.registry.identity import ANONYMOUS, Principal
from gc_core.registry.ui.sessions import SESSION_COOKIE, UiSession, close_session, find_session

__all__ = ["Form", "Viewer", "ViewerOf"]

#: Largest form body read, in bytes: a token and a CSRF secret fit many times over.
MAX_FORM_BYTES = 16 * 1024


@dataclass(frozen=True)
class Viewer:
    """A signed-in principal, their session and its id."""

    principal: Principal
    session: UiSession
    session_id: str


def _to_login(request: Request) -> HTTPException:
    """Send the browser to the sign-in page, and back here afterwards."""
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return HTTPException(status_code=303, detail="sign in first",
                         headers={"Location": f"/ui/login?next={quote(target, safe='')}"})


def _viewer(request: Request, db: Db) -> Viewer:
    session_id = request.cookies.get(SESSION_COOKIE, "")
    session = find_session(db, session_id)
    if session is None:
        raise _to_login(request)
    if session.token_id is None:
        if request.app.state.settings.auth != "open":
            close_session(db, session_id)
            raise _to_login(request)
        return Viewer(ANONYMOUS, session, session_id)
    try:
        principal = identity.authenticate_token_id(db, session.token_id)
    except NotAuthenticated:  # revoked or expired since sign-in: the session ends with it
        close_session(db, session_id)
        raise _to_login(request) from None
    return Viewer(principal, session, session_id)


#: The signed-in viewer of a page; a browser without a session is sent to sign in.
ViewerOf = Annotated[Viewer, Depends(_viewer)]


async def _form(request: Request) -> dict[str, str]:
    """A urlencoded form body (the first value of each field)."""
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise HTTPException(status_code=413, detail=f"a form body is at most {MAX_FORM_BYTES} bytes")
    fields = parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True)
    return {name: values[0] for name, values in fields.items()}


#: The fields of a posted form.
Form = Annotated[dict[str, str], Depends(_form)]
