"""HTTP client of the registry, used by agents and clients alike.

httpx errors are translated here and nowhere else: callers see ``RegistryError``.
"""

from __future__ import annotations

import base64
from typing import Any, TypeVar
from urllib.parse import urlencode

import httpx
from pydantic import BaseModel, TypeAdapter, ValidationError

from gc_core.errors import (
    Forbidden,
    NotAuthenticated,
    NotFound,
    RegistryError,
    RegistryUnreachable,
    find_certificate_failure,
)
from gc_core.forks import current_pid
from gc_core.registry_api.listing import DEFAULT_PAGE_SIZE, FunctionPage, TaskPage
from gc_core.registry_api.schemas import (
    EndpointIn,
    EndpointOut,
    EndpointPolicy,
    EndpointStatus,
    FunctionIn,
    FunctionOut,
    FunctionSharing,
    IssuedToken,
    TaskBatchIn,
    TaskCheckIn,
    TaskCheckOut,
    TaskOut,
    TokenIn,
    TokenOut,
    WhoAmI,
)
from gc_core.serialize import CLOUDPICKLE, PYTHON_VERSION

__all__ = ["RegistryClient"]

#: Seconds to wait for the registry; it is never on the task path.
REGISTRY_TIMEOUT = 15.0
#: Statuses of a registry (or a proxy before it) that cannot serve now but may soon.
UNAVAILABLE = frozenset({502, 503, 504})

_Model = TypeVar("_Model", bound=BaseModel)


class RegistryClient:
    """Talks to one registry over HTTP."""

    def __init__(self, url: str, *, token: str | None = None) -> None:
        self.url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = self._new_pool()
        self._pool_of = current_pid()

    def _new_pool(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self._headers, timeout=REGISTRY_TIMEOUT)

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._http.close()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran: every call then raises RegistryError."""
        return self._http.is_closed

    def register_function(self, payload: bytes, *, name: str, source: str | None,
                          owner: str) -> str:
        """Store a cloudpickled function; returns its id (the same bytes give the same id)."""
        body = FunctionIn(name=name, content_type=CLOUDPICKLE.content_type,
                          payload_b64=base64.b64encode(payload).decode(), source=source,
                          python_version=PYTHON_VERSION, serializer=CLOUDPICKLE.label, owner=owner)
        return self._call("POST", "/functions", FunctionOut, json=body).function_id

    def whoami(self) -> WhoAmI:
        """Who the registry takes this client's token to be."""
        return self._call("GET", "/whoami", WhoAmI)

    def issue_token(self, body: TokenIn) -> IssuedToken:
        """A new token for the caller (or an agent token for an endpoint the caller owns)."""
        return self._call("POST", "/tokens", IssuedToken, json=body)

    def list_tokens(self) -> list[TokenOut]:
        """The caller's tokens (every token, for an admin), without their secrets."""
        return self._call_list("GET", "/tokens", TokenOut)

    def revoke_token(self, token_id: str) -> TokenOut:
        """Revoke one of the caller's tokens."""
        return self._call("DELETE", f"/tokens/{token_id}", TokenOut)

    def delete_function(self, function_id: str) -> FunctionOut:
        """Forget a function (its owner only); returns what it was."""
        return self._call("DELETE", f"/functions/{function_id}", FunctionOut)

    def share_function(self, function_id: str, sharing: FunctionSharing) -> FunctionOut:
        """Change who may run a function the caller owns."""
        return self._call("PUT", f"/functions/{function_id}/sharing", FunctionOut, json=sharing)

    def set_endpoint_policy(self, endpoint_id: str, policy: EndpointPolicy) -> EndpointOut:
        """Replace the policy of an endpoint the caller owns."""
        return self._call("PUT", f"/endpoints/{endpoint_id}/policy", EndpointOut, json=policy)

    def allowed_functions(self, endpoint_id: str) -> list[FunctionOut]:
        """The functions the caller may run on an endpoint."""
        return self._call_list("GET", f"/endpoints/{endpoint_id}/functions", FunctionOut)

    def check_task(self, endpoint_id: str, check: TaskCheckIn) -> TaskCheckOut:
        """An agent's re-check of a task against its endpoint's policy."""
        return self._call("POST", f"/endpoints/{endpoint_id}/check-task", TaskCheckOut, json=check)

    def get_function(self, function_id: str) -> FunctionOut:
        """A registered function, with its serialized bytes."""
        return self._call("GET", f"/functions/{function_id}", FunctionOut)

    def create_endpoint(self, name: str, *, owner: str, description: str = "") -> EndpointOut:
        """Register an endpoint and get its id."""
        body = EndpointIn(name=name, owner=owner, description=description)
        return self._call("POST", "/endpoints", EndpointOut, json=body)

    def get_endpoint(self, endpoint_id: str) -> EndpointOut:
        """One endpoint."""
        return self._call("GET", f"/endpoints/{endpoint_id}", EndpointOut)

    def delete_endpoint(self, endpoint_id: str) -> EndpointOut:
        """Forget an endpoint (its owner only) and revoke its agent tokens; returns what it was."""
        return self._call("DELETE", f"/endpoints/{endpoint_id}", EndpointOut)

    def list_endpoints(self) -> list[EndpointOut]:
        """All endpoints."""
        return self._call_list("GET", "/endpoints", EndpointOut)

    def get_endpoint_status(self, endpoint_id: str) -> EndpointStatus:
        """An endpoint's liveness from its heartbeats."""
        return self._call("GET", f"/endpoints/{endpoint_id}/status", EndpointStatus)

    def get_task_counts(self, endpoint_id: str) -> dict[str, int]:
        """How many of an endpoint's tasks the ledger holds in each status."""
        counts: dict[str, int] = self._request("GET", f"/endpoints/{endpoint_id}/task-counts", None)
        return counts

    def get_tasks(self, task_ids: list[str]) -> list[TaskOut]:
        """Tasks from the ledger, in the order asked."""
        return self._call_list("POST", "/tasks/batch", TaskOut, json=TaskBatchIn(task_ids=task_ids))

    def list_group_tasks(self, task_group_id: str) -> list[TaskOut]:
        """Every task the ledger knows in a task group."""
        return self._call_list("GET", f"/task-groups/{task_group_id}/tasks", TaskOut)

    def list_tasks(self, *, state: str | None = None, endpoint_id: str | None = None,
                   task_group_id: str | None = None, cursor: str | None = None,
                   limit: int = DEFAULT_PAGE_SIZE) -> TaskPage:
        """A page of the tasks the caller may see, newest first; pass its ``next_cursor``
        back for the next one."""
        query = {"state": state, "endpoint": endpoint_id, "group": task_group_id,
                 "cursor": cursor, "limit": limit}
        return self._call("GET", _with_query("/tasks", query), TaskPage)

    def list_functions(self, *, cursor: str | None = None,
                       limit: int = DEFAULT_PAGE_SIZE) -> FunctionPage:
        """A page of the functions the caller may run (theirs, their groups', public ones),
        newest first."""
        return self._call("GET", _with_query("/functions", {"cursor": cursor, "limit": limit}),
                          FunctionPage)

    def _call(self, method: str, path: str, model: type[_Model], *,
              json: BaseModel | None = None) -> _Model:
        answer = self._request(method, path, json)
        try:
            return model.model_validate(answer)
        except ValidationError as exc:
            raise self._unreadable(method, path, exc) from exc

    def _call_list(self, method: str, path: str, model: type[_Model], *,
                   json: BaseModel | None = None) -> list[_Model]:
        answer = self._request(method, path, json)
        try:
            return TypeAdapter(list[model]).validate_python(answer)  # type: ignore[valid-type]
        except ValidationError as exc:
            raise self._unreadable(method, path, exc) from exc

    def _unreadable(self, method: str, path: str, exc: ValidationError) -> RegistryError:
        """An answer the contract does not allow: a registry of another version, or not
        a registry at all (a ValidationError here would pass for a value the caller gave)."""
        return RegistryError(f"the registry at {self.url} answered {method} {path} with what "
                             f"this client cannot read ({exc.error_count()} problems, the first: "
                             f"{exc.errors()[0]['msg']}); are the registry and the client of "
                             "the same version?")

    def _request(self, method: str, path: str, json: BaseModel | None) -> Any:
        if self.closed:  # httpx would raise a bare RuntimeError
            raise RegistryError(f"cannot ask the registry at {self.url}: this client was closed "
                                "(Client.close, or the end of its with-block); make a new one")
        if self._pool_of != current_pid():
            # A forked child: its parent's connections are the parent's (a request of each
            # on one socket would mix their answers). Left unclosed, they stay open there.
            self._http, self._pool_of = self._new_pool(), current_pid()
        try:
            response = self._http.request(
                method, path, json=json.model_dump(mode="json") if json is not None else None)
        except httpx.HTTPError as exc:
            failure = find_certificate_failure(exc)
            if failure is not None:
                raise RegistryError(
                    f"the registry at {self.url} presented a certificate that failed "
                    f"verification ({failure.verify_message}); reach it by a name the "
                    "certificate holds, with SSL_CERT_FILE naming the CA that signed it"
                ) from exc
            raise RegistryUnreachable(
                f"cannot reach the registry at {self.url}: {exc}; is `gc-registry serve` "
                "running, and does GC_REGISTRY_URL point at it?") from exc
        if response.status_code == 404:
            raise NotFound(_detail(response))
        if response.status_code == 401:
            raise NotAuthenticated(_detail(response))
        if response.status_code == 403:
            raise Forbidden(_detail(response))
        if response.status_code in UNAVAILABLE:
            raise RegistryUnreachable(f"the registry at {self.url} cannot serve {method} "
                                      f"{path} now: {_detail(response)}",
                                      status=response.status_code)
        if response.status_code >= 400:
            raise RegistryError(f"registry refused {method} {path}: {_detail(response)}",
                                status=response.status_code)
        return response.json()


def _with_query(path: str, values: dict[str, Any]) -> str:
    """``path`` with the values that are set as its query string."""
    query = urlencode({key: value for key, value in values.items() if value is not None})
    return f"{path}?{query}" if query else path


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    return detail if isinstance(detail, str) else str(detail)
