"""The dashboard's pages under ``/ui``: thin routes over ``store`` and ``listing``, each
showing only what the API would show its viewer."""

from __future__ import annotations

import re
import secrets
from importlib.resources import files
from typing import Any
from urllib.parse import unquote, urlsplit

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse
from sqlalchemy.orm import Session
from starlette.datastructures import URL

from gc_core.errors import NotAuthenticated, RegistryError
from gc_core.registry import identity, listing, policy, store
from gc_core.registry.db import FunctionRow
from gc_core.registry.deps import Db
from gc_core.registry.ui.cancel import cancel_task
from gc_core.registry.ui.render import SECURITY_HEADERS, render
from gc_core.registry.ui.sessions import (
    LOGIN_COOKIE,
    SESSION_COOKIE,
    close_session,
    open_session,
    same_secret,
)
from gc_core.registry.ui.viewer import Form, Viewer, ViewerOf
from gc_core.registry_api.listing import ID_PATTERN

__all__ = ["router"]

#: Tasks or functions in one page of the dashboard.
PAGE_SIZE = 25
#: Seconds between live refreshes of a page's changing part.
REFRESH_SECONDS = 2
#: The task states a listing can be filtered by.
STATES = ("waiting", "success", "failed", "cancelled")
_STATIC = {"style.css": "text/css", "live.js": "text/javascript"}

router = APIRouter(prefix="/ui", include_in_schema=False)


def _cookie(response: Response, request: Request, name: str, value: str) -> None:
    response.set_cookie(name, value, httponly=True, samesite="strict", path="/ui",
                        secure=request.url.scheme == "https")


def _page(template: str, viewer: Viewer, status_code: int = 200, **context: Any) -> Response:
    return render(template, status_code, viewer=viewer.principal, csrf=viewer.session.csrf,
                  refresh=REFRESH_SECONDS, **context)


def _refused_form(form: dict[str, str], viewer: Viewer) -> Response | None:
    """The page refusing a form without the session's CSRF secret (another site's page can
    make a browser post, but cannot read the secret), or None for a form that has it."""
    if same_secret(form.get("csrf"), viewer.session.csrf):
        return None
    return _page("error.html", viewer, 403, message="This form is stale or came from another "
                                                    "site: reload the page and try again.")


def _safe_next(target: str | None) -> str:
    """Where to go after signing in: a dashboard page only, never another site nor a path
    that climbs out of /ui (``..``, or a backslash that browsers read as a slash)."""
    if target and not re.search(r"[\\\x00-\x1f]", target):
        parts = urlsplit(target)
        segments = unquote(parts.path).split("/")
        if not (parts.scheme or parts.netloc) and parts.path.startswith("/ui/") \
                and not {".", ".."} & set(segments):
            return target
    return "/ui/tasks"


@router.get("")
def home() -> RedirectResponse:
    return RedirectResponse("/ui/tasks", status_code=303)


@router.get("/static/{name}")
def static(name: str) -> Response:
    if name not in _STATIC:
        return Response("no such file", status_code=404, media_type="text/plain")
    body = files("gc_core.registry.ui").joinpath("static", name).read_bytes()
    return Response(body, media_type=_STATIC[name], headers={"X-Content-Type-Options": "nosniff"})


@router.get("/login")
def login_form(request: Request, next: str | None = None) -> Response:
    secret = secrets.token_urlsafe(32)
    response = render("login.html", csrf=secret, next=_safe_next(next), error="",
                      open_registry=request.app.state.settings.auth == "open")
    _cookie(response, request, LOGIN_COOKIE, secret)
    return response


@router.post("/login")
def login(request: Request, form: Form, db: Db) -> Response:
    target = _safe_next(form.get("next"))
    open_registry = request.app.state.settings.auth == "open"

    def refused(error: str) -> Response:
        return render("login.html", 401, csrf=request.cookies.get(LOGIN_COOKIE, ""), next=target,
                      error=error, open_registry=open_registry)

    if not same_secret(form.get("csrf"), request.cookies.get(LOGIN_COOKIE, "")):
        return refused("This sign-in form is stale; reload the page and sign in again.")
    token = form.get("token", "").strip() or None
    if token is None and not open_registry:
        return refused("Paste your token: the one `gc-client login` takes.")
    token_id = None
    if token is not None:
        try:
            principal = identity.authenticate(db, token)
        except NotAuthenticated as exc:
            return refused(f"The registry refused this token: {exc}")
        if principal.is_agent:
            return refused("This is an endpoint's agent token; sign in with your own.")
        token_id = principal.token_id
    session_id, _session = open_session(db, token_id)
    response = RedirectResponse(target, status_code=303)
    _cookie(response, request, SESSION_COOKIE, session_id)
    response.delete_cookie(LOGIN_COOKIE, path="/ui")
    return response


@router.post("/logout")
def logout(viewer: ViewerOf, form: Form, db: Db) -> Response:
    if (refused := _refused_form(form, viewer)) is not None:
        return refused
    close_session(db, viewer.session_id)
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/ui")
    return response


@router.get("/endpoints")
def endpoints(viewer: ViewerOf, db: Db) -> Response:
    rows = [(endpoint, store.endpoint_status(db, endpoint.endpoint_id))
            for endpoint in store.list_endpoints(db, viewer.principal)]
    return _page("endpoints.html", viewer, rows=rows)


@router.get("/functions")
def functions(viewer: ViewerOf, db: Db, cursor: str | None = None) -> Response:
    try:
        page = listing.list_functions(db, viewer.principal, cursor=cursor, limit=PAGE_SIZE)
    except (ValueError, RegistryError) as exc:
        return _page("error.html", viewer, 422, message=str(exc))
    return _page("functions.html", viewer, page=page)


def _is_id(value: str) -> bool:
    """Whether a value from a URL can be an id (anything else is not looked up)."""
    return re.fullmatch(ID_PATTERN, value) is not None


def _endpoint_names(db: Session, viewer: Viewer) -> dict[str, str]:
    """Names of the endpoints the viewer may see, by id, to show tasks' endpoints by name."""
    return {e.endpoint_id: e.name for e in store.list_endpoints(db, viewer.principal)}


@router.get("/tasks")
def tasks(viewer: ViewerOf, db: Db, state: str = "", endpoint: str = "",
          group: str = "", cursor: str | None = None) -> Response:
    wrong = [value for value in (endpoint, group) if value and not _is_id(value)]
    if wrong:
        return _page("error.html", viewer, 422, message=f"{wrong[0][:80]!r} is not an id.")
    filters = listing.TaskFilter(state=state if state in STATES else None,
                                 endpoint_id=endpoint or None, task_group_id=group or None)
    try:
        page = listing.list_tasks(db, viewer.principal, filters, cursor=cursor, limit=PAGE_SIZE)
    except ValueError as exc:
        return _page("error.html", viewer, 422, message=str(exc))
    return _page("tasks.html", viewer, page=page, states=STATES, filters=filters,
                 endpoint_names=_endpoint_names(db, viewer))


@router.get("/tasks/{task_id}")
def task(viewer: ViewerOf, db: Db, task_id: str, cancel: str = "") -> Response:
    found = store.get_tasks(db, [task_id], viewer.principal)[0] if _is_id(task_id) else None
    if found is None or found.status == "unknown":
        return _page("error.html", viewer, 404, message=f"No task {task_id} (or it is not yours).")
    function = db.get(FunctionRow, found.function_id) if found.function_id else None
    if function is not None and not policy.may_use_function(viewer.principal, function):
        function = None
    may_cancel = found.status == "waiting" and (viewer.principal.admin
                                                or viewer.principal.name == found.user)
    return _page("task.html", viewer, task=found, function=function, may_cancel=may_cancel,
                 notice=cancel)


@router.post("/tasks/{task_id}/cancel")
def cancel(request: Request, viewer: ViewerOf, form: Form, db: Db, task_id: str) -> Response:
    if (refused := _refused_form(form, viewer)) is not None:
        return refused
    if not _is_id(task_id):
        return _page("error.html", viewer, 404, message="No such task.")
    try:
        sent = cancel_task(db, viewer.principal, task_id, request.app.state.action_publisher)
    except RegistryError as exc:
        return _page("error.html", viewer, exc.status or 400, message=str(exc))
    outcome = "sent" if sent else "finished"
    return RedirectResponse(str(URL(f"/ui/tasks/{task_id}").include_query_params(cancel=outcome)),
                            status_code=303, headers=SECURITY_HEADERS)


@router.get("/groups/{task_group_id}")
def group(viewer: ViewerOf, db: Db, task_group_id: str, cursor: str | None = None) -> Response:
    counts = listing.group_progress(db, viewer.principal, task_group_id) \
        if _is_id(task_group_id) else {"waiting": 0}
    total = sum(counts.values())
    if total == 0:
        return _page("error.html", viewer, 404,
                     message=f"No task group {task_group_id} (or none of its tasks is yours).")
    try:
        page = listing.list_tasks(db, viewer.principal,
                                  listing.TaskFilter(task_group_id=task_group_id),
                                  cursor=cursor, limit=PAGE_SIZE)
    except ValueError as exc:
        return _page("error.html", viewer, 422, message=str(exc))
    done = total - counts["waiting"]
    return _page("group.html", viewer, group_id=task_group_id, counts=counts, total=total,
                 done=done, percent=round(100 * done / total), page=page,
                 endpoint_names=_endpoint_names(db, viewer))
